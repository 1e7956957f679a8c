"""Prompts over rollout.max_prompt_len. A DATASET prompt (the plain user turn) is stopped at load: a one-line error
naming the query and its length (data.too_long="error", the authors' truncation='error') or a counted, logged skip
("skip"). A TEMPLATED prompt is left-truncated to its last max_prompt_len tokens (the authors' truncation='left'),
counted and logged, in rollouts, evaluation and GEPA scoring alike: never a ValueError from the sampler."""

import json
import logging
import pathlib
import time

import numpy as np
import pytest
from flax import nnx

from p2o_jax import experiment, sharding
from p2o_jax.config import ConfigError, base_config, validate
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.records import Query
from p2o_jax.evaluation import EvalProtocol, evaluate_set
from p2o_jax.models.builtin import builtin_model_config
from p2o_jax.models.decoder import Decoder
from p2o_jax.models.tokenizer import chat_prompt_ids, load_tokenizer
from p2o_jax.p2o.evaluator import PolicyEvaluator
from p2o_jax.p2o.templates import apply_template
from p2o_jax.policy import Policy
from p2o_jax.preflight import PreflightError, check_prompt_lengths
from p2o_jax.rl.rollout import RowContexts, collect_rollouts
from p2o_jax.rl.trainer import Trainer, TrainerHooks
from p2o_jax.sampling import SamplingConfig, left_truncate

QWEN3 = pathlib.Path(__file__).parent / "fixtures" / "chat_tokenizers" / "qwen3"
LIMIT = 64
FORMAT = "Q: {question}"
SHORT = [Query("q0", "1+2=", "3"), Query("q1", "20+22=", "42")]
LONG_TEMPLATE = "Work digit by digit, carry every ten, then check the sum twice. " * 3  # ~190 characters
SAMPLING = SamplingConfig(max_new_tokens=2, temperature=0.0)


def zero_score(texts, queries):
  return np.zeros(len(texts), np.float32)


@pytest.fixture(scope="module")
def qwen3():
  return load_tokenizer(QWEN3)


@pytest.fixture(scope="module")
def policy(qwen3):
  model = Decoder(builtin_model_config(len(qwen3), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(0))
  return Policy(model, qwen3, mesh=None, max_prompt_len=LIMIT)


# --- (a) dataset prompts: checked once at load ------------------------------------------------------------------------

def test_a_too_long_dataset_prompt_is_one_line_naming_the_query_and_its_length(qwen3):
  queries = SHORT + [Query("long-7", "9" * 80, "1"), Query("long-8", "9" * 90, "1")]
  length = len(chat_prompt_ids(qwen3, [FORMAT.format(question="9" * 80)])[0])
  with pytest.raises(PreflightError) as raised:
    check_prompt_lengths(qwen3, queries, FORMAT, LIMIT)
  message = str(raised.value)
  assert "\n" not in message
  assert message.startswith(f"training query 'long-7' has a {length}-token prompt, over rollout.max_prompt_len={LIMIT}")
  assert "2 of 4 are" in message and "data.too_long='skip'" in message


def test_skip_drops_the_too_long_queries_and_says_how_many(qwen3, caplog):
  queries = [SHORT[0], Query("long", "9" * 80, "1"), SHORT[1]]
  with caplog.at_level(logging.WARNING):
    kept = check_prompt_lengths(qwen3, queries, FORMAT, LIMIT, too_long="skip")
  assert kept == SHORT
  assert "skipped 1 of 3 training query(s)" in caplog.text and "'long'" in caplog.text


def test_the_length_is_the_one_the_rollout_renders_thinking_switch_included(qwen3):
  """Qwen3's empty think block is part of the prompt: a query that fits only without it is too long."""
  text = FORMAT.format(question="1+2=")
  on, off = (len(chat_prompt_ids(qwen3, [text], enable_thinking=e)[0]) for e in (True, False))
  assert off > on
  check_prompt_lengths(qwen3, SHORT[:1], FORMAT, on, enable_thinking=True)
  with pytest.raises(PreflightError, match=f"has a {off}-token prompt"):
    check_prompt_lengths(qwen3, SHORT[:1], FORMAT, on, enable_thinking=False)


def _write(path: pathlib.Path, rows) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _file_config(tmp_path, too_long: str):
  c = base_config()
  c.data.train_path = _write(tmp_path / "train.jsonl", [{"id": "a", "problem": "1+2=", "answer": "3"},
                                                        {"id": "b", "problem": "9" * 200, "answer": "9"}])
  c.data.id_field, c.data.prompt_format, c.data.too_long = "id", FORMAT, too_long
  c.eval.sets = "dev=" + _write(tmp_path / "dev.jsonl", [{"id": "d0", "problem": "8" * 200, "answer": "8"},
                                                        {"id": "d1", "problem": "2+2=", "answer": "4"}])
  c.rollout.max_prompt_len = LIMIT
  return c


def test_load_data_stops_a_too_long_training_query_early(tmp_path, qwen3):
  with pytest.raises(PreflightError, match=r"^training query 'b' has a \d+-token prompt, over rollout\.max_prompt_len"):
    experiment.load_data(_file_config(tmp_path, "error"), qwen3)


def test_load_data_skips_too_long_training_and_eval_queries(tmp_path, qwen3, caplog):
  with caplog.at_level(logging.WARNING):
    train, eval_sets = experiment.load_data(_file_config(tmp_path, "skip"), qwen3)
  assert [q.id for q in train] == ["a"] and [q.answer for q in eval_sets["dev"]] == ["4"]
  assert "skipped 1 of 2 training query(s)" in caplog.text and "skipped 1 of 2 eval set 'dev' query(s)" in caplog.text


def test_load_data_uses_the_policy_tokenizer_by_default(tmp_path):
  """No tokenizer given: the config's checkpoint's (here the built-in base's character tokenizer)."""
  c = _file_config(tmp_path, "skip")
  train, _ = experiment.load_data(c)
  expected = check_prompt_lengths(build_char_tokenizer(), experiment._read(c.data.train_path, c), FORMAT, LIMIT,
                                  too_long="skip")
  assert train == expected and [q.id for q in train] == ["a"]


def test_run_training_fails_on_a_too_long_query_before_any_model_work(tmp_path, monkeypatch):
  c = _file_config(tmp_path, "error")
  c.workdir = str(tmp_path / "run")
  monkeypatch.setattr(experiment.builders, "build_policy", lambda *a, **k: pytest.fail("a model was built"))
  with pytest.raises(PreflightError, match="training query 'b'"):
    experiment.run_training(c)


def test_too_long_must_be_error_or_skip():
  c = base_config()
  c.data.train_path, c.data.too_long = "train.jsonl", "truncate"
  with pytest.raises(ConfigError, match=r"^config\.data\.too_long: 'truncate' is not one of \('error', 'skip'\)$"):
    validate(c)


def test_the_check_renders_a_large_dataset_in_a_few_batched_calls(qwen3, monkeypatch):
  """One batched chat-template render and one batched tokenizer call per 4,096 queries, not one per query."""
  calls = {"render": 0, "tokenize": 0}
  tokenizer = type(qwen3)
  render, tokenize = tokenizer.apply_chat_template, tokenizer.__call__

  def counted(name, real):
    def wrapper(self, *args, **kwargs):
      calls[name] += 1
      return real(self, *args, **kwargs)
    return wrapper

  monkeypatch.setattr(tokenizer, "apply_chat_template", counted("render", render))
  monkeypatch.setattr(tokenizer, "__call__", counted("tokenize", tokenize))
  queries = [Query(f"q{i}", f"{i}+{i}=", "0") for i in range(10_000)]
  start = time.perf_counter()
  assert len(check_prompt_lengths(qwen3, queries, FORMAT, 4096)) == len(queries)
  assert calls == {"render": 3, "tokenize": 3}
  assert time.perf_counter() - start < 30  # ~1 s here


# --- (b) templated prompts: left-truncated, counted, logged ----------------------------------------------------------

def test_left_truncate_keeps_the_last_tokens():
  prompts, truncated = left_truncate([[1, 2, 3], [1, 2, 3, 4, 5, 6], [9]], 4)
  assert prompts == [[1, 2, 3], [3, 4, 5, 6], [9]] and truncated == [1]
  assert left_truncate([[1]], 4) == ([[1]], [])


def test_a_templated_prompt_over_the_limit_is_left_truncated_not_an_error(policy, qwen3, caplog):
  turn = FORMAT.format(question="1+2=")
  full = chat_prompt_ids(qwen3, [apply_template(LONG_TEMPLATE, turn)])[0]
  assert len(full) > LIMIT
  before = policy.prompts_truncated
  with caplog.at_level(logging.WARNING):
    out = policy.generate([turn, turn], SAMPLING, templates=[LONG_TEMPLATE, ""], n=3)
  assert out.prompt_ids[0] == full[-LIMIT:] and len(out.prompt_ids) == 6  # verl's truncation='left'
  assert qwen3.decode(out.prompt_ids[0]).endswith(f"{turn}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
  assert out.prompt_ids[3] == chat_prompt_ids(qwen3, [turn])[0]  # the plain one is untouched
  assert out.prompts_truncated == 3 and policy.prompts_truncated - before == 3  # rows: 1 prompt x n=3
  assert out.tokens.shape[0] == 6
  assert (f"left-truncated 3 of 6 prompts (longest {len(full)} tokens) to their last max_prompt_len={LIMIT}"
          in caplog.text)


def test_evaluation_and_gepa_scoring_with_a_long_template_truncate_alike(policy):
  before = policy.prompts_truncated
  greedy = EvalProtocol(max_new_tokens=2, small_set_size=1)
  evaluate_set(policy, SHORT, FORMAT, greedy, zero_score, template=LONG_TEMPLATE)
  assert policy.prompts_truncated - before == 2
  rollouts = PolicyEvaluator(policy, SHORT, FORMAT, 2, zero_score).evaluate([(LONG_TEMPLATE, 0), ("", 1)])
  assert len(rollouts) == 2 and policy.prompts_truncated - before == 3


def test_templated_rollouts_are_truncated_and_their_plain_reencoding_is_not(policy, qwen3):
  turns = [FORMAT.format(question=q.question) for q in SHORT]
  contexts = RowContexts(generate=[apply_template(LONG_TEMPLATE, turns[0]), turns[1]], train=turns)
  rollouts = collect_rollouts(policy, contexts, SHORT, 1, SAMPLING, 0, zero_score)
  assert len(rollouts.generate_prompt_ids[0]) == LIMIT
  assert rollouts.train_prompt_ids == chat_prompt_ids(qwen3, turns)  # context distillation trains on the plain x
  assert rollouts.is_templated().tolist() == [True, False]


class _LongTemplateHooks(TrainerHooks):
  """Every row generated from the long template, trained on the plain turn (as P^2O's templated rows are)."""

  def contexts(self, queries, user_turns, group_size):
    rows = [turn for turn in user_turns for _ in range(group_size)]
    return RowContexts(generate=[apply_template(LONG_TEMPLATE, turn) for turn in rows], train=rows)


@pytest.mark.slow
def test_a_training_step_counts_its_truncated_rollouts_in_the_metrics(qwen3, tmp_path):
  c = base_config()
  c.workdir, c.data.train_path, c.data.prompt_format = str(tmp_path), "unused.jsonl", FORMAT
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples = LIMIT, 2, 2
  c.train.batch_size, c.grpo.micro_batch_size, c.grpo.num_minibatches = 2, 2, 1
  model = Decoder(builtin_model_config(len(qwen3), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(0))
  policy = Policy(model, qwen3, mesh=sharding.make_mesh({}), max_prompt_len=LIMIT)
  trainer = Trainer(c, policy=policy, train_queries=SHORT, eval_sets={}, score=zero_score, hooks=_LongTemplateHooks())
  assert trainer.step(1, SHORT)["rollout/prompts_truncated"] == 4.0  # 2 queries x 2 rows, all over the limit
