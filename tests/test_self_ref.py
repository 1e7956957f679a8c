"""Self-Ref: the reference policy writes templates through our sampler; every reply is extracted and counted,
over-long prompts are rejected without a device call, the thinking switch follows p2o.thinking_in_reflection, and
resumed reflection repeats its draws."""

import types

import numpy as np
import pytest
from flax import nnx

from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.models.builtin import builtin_model_config
from p2o_jax.models.decoder import Decoder
from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest
from p2o_jax.p2o.self_ref import SelfReflector
from p2o_jax.policy import Policy

REQUEST = ReflectionRequest("Be careful.", (FeedbackRecord("Q: 1+2=", " The answer is 4", "incorrect", 0.0),))


def tiny_policy(reference_max_prompt_len: int) -> Policy:
  tokenizer = build_char_tokenizer()
  model = Decoder(builtin_model_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(1))
  policy = Policy(model, tokenizer, mesh=None, max_prompt_len=64, reference_max_prompt_len=reference_max_prompt_len)
  policy.freeze_reference()
  return policy


@pytest.fixture(scope="module")
def policy():
  return tiny_policy(1024)


def test_every_reply_is_extracted_and_counted(policy):
  reflector = SelfReflector(policy, seed=0, max_new_tokens=8)
  out = reflector.propose([REQUEST, REQUEST])
  assert len(out) == 2
  assert reflector.stats.requests == 2
  assert reflector.stats.accepted + reflector.stats.rejected_empty == 2


def test_fenced_reply_is_adopted(policy, monkeypatch):
  reflector = SelfReflector(policy, seed=0, max_new_tokens=8)
  monkeypatch.setattr("p2o_jax.policy.decode_completions",
                      lambda tok, tokens, lengths: ["Sure:\n```\nAdd the numbers one at a time.\n```"] * len(lengths))
  assert reflector.propose([REQUEST]) == ["Add the numbers one at a time."]
  assert reflector.stats.accepted == 1


def test_prompt_over_the_limit_is_rejected_without_sampling(monkeypatch):
  small = tiny_policy(16)
  monkeypatch.setattr(small, "generate", lambda *a, **k: pytest.fail("sampled an over-long prompt"))
  reflector = SelfReflector(small, seed=0, max_new_tokens=8)
  assert reflector.propose([REQUEST]) == [None]
  assert reflector.stats.rejected_empty == 1


@pytest.mark.parametrize("policy_setting, explicit, expected", [
    (False, None, False), (True, None, True), (True, False, False), (False, True, True)])
def test_thinking_follows_the_reflection_setting(policy, monkeypatch, policy_setting, explicit, expected):
  """p2o.thinking_in_reflection reaches the policy as reflection_enable_thinking; an explicit argument wins."""
  seen = {}
  real_ids = policy.prompt_ids

  def prompt_ids(turns, **kwargs):
    seen["prompt_ids"] = kwargs["enable_thinking"]
    return real_ids(turns, **kwargs)

  def generate(turns, sampling, **kwargs):
    seen["generate"] = kwargs["enable_thinking"]
    return types.SimpleNamespace(texts=["```\nA template.\n```"] * len(turns))

  monkeypatch.setattr(policy, "reflection_enable_thinking", policy_setting)
  monkeypatch.setattr(policy, "prompt_ids", prompt_ids)
  monkeypatch.setattr(policy, "generate", generate)
  reflector = SelfReflector(policy, seed=0, max_new_tokens=8, enable_thinking=explicit)
  assert reflector.propose([REQUEST]) == ["A template."]
  assert seen == {"prompt_ids": expected, "generate": expected}


def test_resumed_reflector_draws_the_same_replies(policy, monkeypatch):
  seen = []
  real = policy.generate

  def spy(*args, **kwargs):
    assert kwargs["reference"]  # Self-Ref samples from the frozen initial params
    out = real(*args, **kwargs)
    seen.append(out.tokens.copy())
    return out

  monkeypatch.setattr(policy, "generate", spy)
  first = SelfReflector(policy, seed=7, max_new_tokens=8, temperature=1.0)
  first.propose([REQUEST])
  saved = first.state()
  first.propose([REQUEST])
  second = SelfReflector(policy, seed=7, max_new_tokens=8, temperature=1.0)
  second.restore(saved)
  second.propose([REQUEST])
  np.testing.assert_array_equal(seen[1], seen[2])
  assert not np.array_equal(seen[0], seen[1])
