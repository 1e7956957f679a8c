"""grpo.old_logprobs: the update without a log-prob pass equals the update with one (a single on-policy update), and
the sampler's own log-probs are the trainer's in float32 (the "sampler" mode's premise)."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from p2o_jax.rl.losses import PolicyLossConfig
from p2o_jax.rl.train_step import StepConfig, make_logprob_fn, make_train_step
from p2o_jax.sampling import Sampler, SamplingConfig
from test_train_step import PROMPT, RESPONSE, ROWS, as_micro, random_rows, tiny_model

TEMPERATURE = 0.7


def sgd_delta(rows, with_old_logp: bool):
  graphdef, params = nnx.split(tiny_model())
  rows = dict(rows)
  if with_old_logp:
    rows["old_logp"] = np.asarray(make_logprob_fn(graphdef, TEMPERATURE)(params, as_micro(rows, 2))).reshape(ROWS, -1)
  optimizer = optax.apply_if_finite(optax.sgd(1.0), 10)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(), TEMPERATURE))
  before = jax.tree.map(np.asarray, params)
  new_params, _, metrics = step(params, optimizer.init(params), as_micro(rows, 4))
  return jax.tree.map(lambda a, b: np.asarray(a) - b, new_params, before), jax.device_get(metrics)


@pytest.mark.slow
def test_an_update_without_the_log_prob_pass_equals_one_with_it():
  rows = random_rows()
  skipped, skipped_metrics = sgd_delta(rows, with_old_logp=False)
  recomputed, recomputed_metrics = sgd_delta(rows, with_old_logp=True)
  assert skipped_metrics["ratio_mean"] == 1.0 and skipped_metrics["clip_fraction"] == 0.0
  np.testing.assert_allclose(recomputed_metrics["ratio_mean"], 1.0, atol=1e-5)
  np.testing.assert_allclose(skipped_metrics["loss"], recomputed_metrics["loss"], rtol=1e-5, atol=1e-7)
  largest = max(np.abs(x).max() for x in jax.tree.leaves(recomputed))
  assert largest > 1e-4  # the update moves the params: the comparison below means something
  for a, b in zip(jax.tree.leaves(skipped), jax.tree.leaves(recomputed)):
    np.testing.assert_allclose(a, b, atol=1e-6 * largest + 1e-9)


@pytest.mark.slow  # ~10 s of compiles; the option it backs is not the default
def test_the_samplers_logprobs_are_the_trainers_in_float32():
  graphdef, params = nnx.split(tiny_model())
  prompts = [np.random.RandomState(i).randint(2, 40, n).tolist() for i, n in enumerate([PROMPT, 3, 5, PROMPT] * 2)]
  sampler = Sampler(nnx.merge(graphdef, params), eos_ids=[0], pad_id=0, max_prompt_len=PROMPT, slots=3)
  out = sampler.generate(prompts, SamplingConfig(max_new_tokens=RESPONSE, temperature=TEMPERATURE), seed=5)
  tokens = np.zeros((ROWS, PROMPT + RESPONSE), np.int32)
  valid = np.zeros(tokens.shape, bool)
  for r, prompt in enumerate(prompts):
    tokens[r, PROMPT - len(prompt):PROMPT], valid[r, PROMPT - len(prompt):PROMPT] = prompt, True
  tokens[:, PROMPT:], valid[:, PROMPT:] = np.where(out.mask, out.tokens, 0), out.mask
  batch = {"tokens": tokens, "valid": valid, "response_mask": out.mask}
  trainer = np.asarray(make_logprob_fn(graphdef, TEMPERATURE)(params, as_micro(batch, 2))).reshape(ROWS, -1)
  difference = np.abs(np.where(out.mask, trainer - out.logprobs, 0.0)).max()
  assert out.mask.sum() > ROWS * 2  # responses long enough to compare
  assert difference < 2e-5, difference
