"""Qwen3 thinking off: every chat-template call passes enable_thinking (model.enable_thinking, default False; Self-Ref
reflection: p2o.thinking_in_reflection) when the template has the switch, and templates without it render exactly as
before. The Qwen3 fixture has Qwen3's own chat template (tests/fixtures/chat_tokenizers/)."""

import pathlib

import numpy as np
import pytest
from flax import nnx

from p2o_jax import builders
from p2o_jax.config import base_config
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.records import Query
from p2o_jax.evaluation import EvalProtocol, evaluate_set
from p2o_jax.models.builtin import builtin_model_config
from p2o_jax.models.decoder import Decoder
from p2o_jax.models.hf_checkpoint import save_hf_model
from p2o_jax.models.tokenizer import chat_prompt_ids, load_tokenizer, supports_thinking_switch
from p2o_jax.p2o.evaluator import PolicyEvaluator
from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest
from p2o_jax.p2o.self_ref import SelfReflector
from p2o_jax.p2o.templates import apply_template
from p2o_jax.policy import Policy
from p2o_jax.rl.rollout import RowContexts, collect_rollouts
from p2o_jax.sampling import SamplingConfig

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "chat_tokenizers"
THINK_OFF = "<|im_start|>assistant\n<think>\n\n</think>\n\n"  # Qwen3's generation prompt with enable_thinking=False
THINK_ON = "<|im_start|>assistant\n"
FORMAT = "Question: {question}"
QUERIES = [Query("q0", "1+2=", "3"), Query("q1", "20+22=", "42")]
TEMPLATE = "Add the numbers digit by digit."
REQUEST = ReflectionRequest(TEMPLATE, (FeedbackRecord("Question: 1+2=", "4", "incorrect", 0.0),))
SAMPLING = SamplingConfig(max_new_tokens=2, temperature=0.0)


def zero_score(texts, queries):
  return np.zeros(len(texts), np.float32)


def tiny_policy(tokenizer, **settings) -> Policy:
  model = Decoder(builtin_model_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(0))
  policy = Policy(model, tokenizer, mesh=None, max_prompt_len=256, reference_max_prompt_len=2048, **settings)
  policy.freeze_reference()
  return policy


def old_chat_prompt_ids(tokenizer, texts):
  """What chat_prompt_ids did before the thinking switch: one render without enable_thinking, one encode, per text."""
  rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                            add_generation_prompt=True) for t in texts]
  return [tokenizer.encode(r, add_special_tokens=False) for r in rendered]


@pytest.fixture(scope="module")
def qwen3():
  return load_tokenizer(FIXTURES / "qwen3")


def test_fixtures_carry_their_templates():
  qwen3, qwen2_5 = load_tokenizer(FIXTURES / "qwen3"), load_tokenizer(FIXTURES / "qwen2_5")
  assert qwen3.chat_template == (FIXTURES / "qwen3.jinja").read_text()  # rerun make_tokenizers.py after an edit
  assert qwen2_5.chat_template == (FIXTURES / "qwen2_5.jinja").read_text()
  assert supports_thinking_switch(qwen3)
  assert not supports_thinking_switch(qwen2_5) and not supports_thinking_switch(build_char_tokenizer())


def test_qwen3_prompt_ends_with_the_empty_think_block_unless_thinking_is_on(qwen3):
  texts = [FORMAT.format(question=q.question) for q in QUERIES]
  off, on = chat_prompt_ids(qwen3, texts), chat_prompt_ids(qwen3, texts, enable_thinking=True)
  assert [qwen3.decode(ids) for ids in off] == [f"<|im_start|>user\n{t}<|im_end|>\n{THINK_OFF}" for t in texts]
  assert [qwen3.decode(ids) for ids in on] == [f"<|im_start|>user\n{t}<|im_end|>\n{THINK_ON}" for t in texts]
  assert on == old_chat_prompt_ids(qwen3, texts) != off  # the old path passed nothing: Qwen3 thought


@pytest.mark.parametrize("tokenizer", [build_char_tokenizer(), load_tokenizer(FIXTURES / "qwen2_5")],
                         ids=["builtin_char", "qwen2_5"])
def test_templates_without_the_switch_render_exactly_as_before(tokenizer):
  texts = ["Q: 12+30=", "Be careful.\n\nQ: 7+8=", ""]
  before = old_chat_prompt_ids(tokenizer, texts)
  assert chat_prompt_ids(tokenizer, texts) == before
  assert chat_prompt_ids(tokenizer, texts, enable_thinking=True) == before
  assert chat_prompt_ids(tokenizer, []) == []


class _PromptSpy:
  """Records the decoded prompts each sampler call gets (the actor's and the reference's)."""

  def __init__(self, policy: Policy, monkeypatch):
    self.policy, self.calls = policy, []
    for sampler in (policy.sampler, policy._sampler(reference=True)):
      real = sampler.generate

      def spy(prompts, *args, _real=real, **kwargs):
        self.calls.append([policy.tokenizer.decode(p) for p in prompts])
        return _real(prompts, *args, **kwargs)

      monkeypatch.setattr(sampler, "generate", spy)

  def last(self) -> list[str]:
    return self.calls[-1]


def _every_call_path(policy: Policy, spy: _PromptSpy) -> dict[str, list[str]]:
  """The rendered prompts of: templated rollouts, their plain re-encoding (context distillation), plain rollouts,
  evaluation with a template, GEPA scoring, Self-Ref reflection."""
  turns = [FORMAT.format(question=q.question) for q in QUERIES]
  contexts = RowContexts(generate=[apply_template(TEMPLATE, turns[0]), turns[1]], train=turns)
  rollouts = collect_rollouts(policy, contexts, QUERIES, 1, SAMPLING, 0, zero_score)
  prompts = {"templated rollouts": [policy.tokenizer.decode(rollouts.generate_prompt_ids[0])],
             "plain rollouts": [policy.tokenizer.decode(rollouts.generate_prompt_ids[1])],
             "re-encoded plain rows": [policy.tokenizer.decode(ids) for ids in rollouts.train_prompt_ids]}
  assert spy.last() == prompts["templated rollouts"] + prompts["plain rollouts"]
  evaluate_set(policy, QUERIES, FORMAT, EvalProtocol(max_new_tokens=2, small_set_size=1), zero_score, template=TEMPLATE)
  prompts["evaluation"] = spy.last()
  PolicyEvaluator(policy, QUERIES, FORMAT, 2, zero_score).evaluate([(TEMPLATE, 0), ("", 1)])
  prompts["GEPA scoring"] = spy.last()
  SelfReflector(policy, seed=0, max_new_tokens=2).propose([REQUEST])
  prompts["Self-Ref reflection"] = spy.last()
  return prompts


@pytest.mark.slow
def test_every_call_path_renders_qwen3_with_thinking_off_by_default(qwen3, monkeypatch):
  policy = tiny_policy(qwen3)
  prompts = _every_call_path(policy, _PromptSpy(policy, monkeypatch))
  for path, rendered in prompts.items():
    assert rendered and all(p.endswith(THINK_OFF) for p in rendered), path
  assert TEMPLATE in prompts["templated rollouts"][0] and TEMPLATE not in "".join(prompts["re-encoded plain rows"])


def test_thinking_on_everywhere_renders_no_think_block(qwen3, monkeypatch):
  policy = tiny_policy(qwen3, enable_thinking=True, reflection_enable_thinking=True)
  prompts = _every_call_path(policy, _PromptSpy(policy, monkeypatch))
  for path, rendered in prompts.items():
    assert rendered and all(p.endswith(THINK_ON) and "<think>" not in p for p in rendered), path


def test_reflection_thinking_is_its_own_switch(qwen3, monkeypatch):
  policy = tiny_policy(qwen3, enable_thinking=False, reflection_enable_thinking=True)
  prompts = _every_call_path(policy, _PromptSpy(policy, monkeypatch))
  assert prompts.pop("Self-Ref reflection")[0].endswith(THINK_ON)
  assert all(p.endswith(THINK_OFF) for rendered in prompts.values() for p in rendered)
  # An explicit setting on the reflector wins over the policy's.
  spy = _PromptSpy(policy, monkeypatch)
  SelfReflector(policy, seed=0, max_new_tokens=2, enable_thinking=False).propose([REQUEST])
  assert spy.last()[0].endswith(THINK_OFF)


def test_build_policy_passes_the_config_switches(qwen3, tmp_path):
  model = Decoder(builtin_model_config(len(qwen3), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(0))
  checkpoint = save_hf_model(model, tmp_path / "qwen3_like", tokenizer=qwen3)
  c = base_config()
  assert c.model.enable_thinking is False and c.p2o.thinking_in_reflection is False  # the paper's setting
  policy = builders.build_policy(c, checkpoint, None)
  assert (policy.enable_thinking, policy.reflection_enable_thinking) == (False, False)
  assert policy.tokenizer.decode(policy.prompt_ids(["hi"])[0]).endswith(THINK_OFF)
  c.model.enable_thinking, c.p2o.thinking_in_reflection = True, True
  policy = builders.build_policy(c, checkpoint, None)
  assert (policy.enable_thinking, policy.reflection_enable_thinking) == (True, True)
  assert policy.tokenizer.decode(policy.prompt_ids(["hi"])[0]).endswith(THINK_ON)
