"""Context distillation: rows generated from the templated prompt are trained on the plain prompt, and their
gradient equals the plain-context GRPO gradient on those re-encoded rows; the ablation really trains on x~."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from p2o_jax.config import base_config
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.records import Query
from p2o_jax.models.builtin import builtin_model_config
from p2o_jax.models.decoder import Decoder
from p2o_jax.models.tokenizer import chat_prompt_ids
from p2o_jax.p2o.hooks import P2OHooks
from p2o_jax.rl.advantages import group_advantages
from p2o_jax.rl.losses import PolicyLossConfig
from p2o_jax.rl.rollout import collect_rollouts
from p2o_jax.rl.sequence_packing import pack_sequences, packed_shape
from p2o_jax.rl.train_step import StepConfig, make_logprob_fn, make_train_step
from p2o_jax.policy import Policy
from p2o_jax.sampling import SamplingConfig

K, TEMPLATE = 4, "Add the numbers one at a time."
QUERIES = [Query("a", "Q: 12+34=", "46"), Query("b", "Q: 50+27+11=", "88")]


@pytest.fixture(scope="module")
def setup():
  tokenizer = build_char_tokenizer()
  model = Decoder(builtin_model_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(0))
  # Scaled-up weights: at the default init scale a tiny random model hardly looks at the prompt's prefix, and the
  # ablation below (gradient on x~ instead of x) would differ from distillation only by rounding noise.
  nnx.update(model, jax.tree.map(lambda x: x * 10.0, nnx.state(model, nnx.Param)))
  policy = Policy(model, tokenizer, mesh=None, max_prompt_len=96)
  return tokenizer, model, policy


def rollouts_for(distillation, setup):
  _, _, policy = setup
  c = base_config()
  c.p2o.distillation = distillation
  hooks = P2OHooks(c)
  hooks.assignment = {"b": [TEMPLATE, "", TEMPLATE, TEMPLATE]}  # query b is hard: 3 templated rows, 1 plain
  turns = [q.question for q in QUERIES]
  contexts = hooks.contexts(QUERIES, turns, K)
  reward = lambda texts, queries: np.asarray([len(t) % 2 for t in texts], np.float32)  # any fixed rewards will do
  rollouts = collect_rollouts(policy, contexts, QUERIES, K,
                              SamplingConfig(max_new_tokens=6, temperature=1.0), seed=3, score=reward)
  return hooks, rollouts


def pack(prompt_ids, tokens, mask, pad_id):
  """The rows as the trainer packs them, all in one cell, a query's rows behind one copy of their prompt."""
  shape = packed_shape(prompt_ids, mask, len(prompt_ids), 96 + 6, "shared_prompts", attention_span=1e9)
  return pack_sequences(prompt_ids, tokens, mask, pad_id, len(prompt_ids), shape, "shared_prompts")


def sgd_delta(model, packed, advantages, old_logp, weights):
  graphdef, params = nnx.split(model)
  rows = {**packed, "advantages": advantages, "old_logp": old_logp, "token_weights": weights}
  rows = {k: np.asarray(v)[None] for k, v in rows.items()}  # one micro-batch
  optimizer = optax.apply_if_finite(optax.sgd(1.0), 3)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(), 1.0))
  params = jax.tree.map(jnp.copy, params)
  before = jax.tree.map(np.asarray, params)
  after, _, _ = step(params, optimizer.init(params), rows)
  return jax.tree.map(lambda a, b: np.asarray(a) - b, after, before)


def old_logprobs(model, packed):
  graphdef, params = nnx.split(model)
  return np.asarray(make_logprob_fn(graphdef, 1.0)(params, {k: v[None] for k, v in packed.items()}))[0]


def test_templated_rows_are_generated_from_x_tilde_and_trained_on_x(setup):
  tokenizer = setup[0]
  _, rollouts = rollouts_for("plain", setup)
  plain_ids = chat_prompt_ids(tokenizer, [q.question for q in QUERIES])
  templated_ids = chat_prompt_ids(tokenizer, [TEMPLATE + "\n\n" + QUERIES[1].question])[0]
  assert rollouts.train_prompt_ids == [plain_ids[0]] * K + [plain_ids[1]] * K
  assert rollouts.generate_prompt_ids[K:] == [templated_ids, plain_ids[1], templated_ids, templated_ids]
  assert rollouts.is_templated().tolist() == [False] * K + [True, False, True, True]


def test_templated_ablation_counts_the_rows_rolled_out_with_a_template(setup):
  """Under distillation="templated" a row is trained on the context it was generated from, so the prompt ids cannot
  tell templated rows apart: the contexts say which rows had a template, and the per-step counts and the ratio log
  follow them (no ratio mask or ratio log: there are no plain-context log-probs to compare with)."""
  tokenizer, model, _ = setup
  hooks, rollouts = rollouts_for("templated", setup)
  assert rollouts.train_prompt_ids == rollouts.generate_prompt_ids
  assert rollouts.is_templated().tolist() == [False] * K + [True, False, True, True]
  metrics = hooks.observe(QUERIES, rollouts)
  assert (metrics["p2o/templated_rows"], metrics["p2o/templated_queries"]) == (3, 1)
  packed = pack(rollouts.train_prompt_ids, rollouts.tokens, rollouts.mask, tokenizer.pad_token_id)
  _, weights, metrics = hooks.train_inputs(rollouts, packed, old_logprobs(model, packed))
  assert (weights == 1).all() and not any(k.startswith("p2o/template_ratio") for k in metrics)
  hooks.end_epoch(0, last=True)
  hooks.assignment = {"b": [TEMPLATE, "", TEMPLATE, TEMPLATE]}
  hooks.observe(QUERIES, rollouts)
  assert hooks.epoch_stats.templated_rows == 3 and hooks.epoch_stats.plain_rows == 1


@pytest.mark.slow
def test_distillation_gradient_equals_plain_grpo_gradient_on_reencoded_rows(setup):
  tokenizer, model, _ = setup
  _, rollouts = rollouts_for("plain", setup)
  advantages = np.asarray(group_advantages(jnp.asarray(rollouts.rewards), K))
  assert np.abs(advantages).max() > 0
  # P^2O's path: the trainer packs the rows on their TRAIN contexts.
  distill = pack(rollouts.train_prompt_ids, rollouts.tokens, rollouts.mask, tokenizer.pad_token_id)
  # Reference: plain GRPO on (x, y~), the plain prompt re-encoded from scratch, same responses.
  plain_ids = chat_prompt_ids(tokenizer, [q.question for q in QUERIES for _ in range(K)])
  plain = pack(plain_ids, rollouts.tokens, rollouts.mask, tokenizer.pad_token_id)
  ones = np.ones(plain["response_mask"].shape, np.float32)
  got = sgd_delta(model, distill, advantages, old_logprobs(model, distill), ones)
  want = sgd_delta(model, plain, advantages, old_logprobs(model, plain), ones)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), got, want)

  # The ablation ("w/o context distillation") takes the gradient on x~: a different update.
  _, ablation = rollouts_for("templated", setup)
  templated = pack(ablation.train_prompt_ids, ablation.tokens, ablation.mask, tokenizer.pad_token_id)
  other = sgd_delta(model, templated, advantages, old_logprobs(model, templated), ones)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), other, want))
  assert max(diffs) > 1e-6


def test_ratio_mask_weights_only_templated_rows_and_importance_uses_behaviour_logprobs(setup):
  tokenizer, model, _ = setup
  for mode in ("plain", "importance"):
    hooks, rollouts = rollouts_for(mode, setup)
    packed = pack(rollouts.train_prompt_ids, rollouts.tokens, rollouts.mask, tokenizer.pad_token_id)
    old = old_logprobs(model, packed)
    response_len = packed["response_mask"].shape[1]
    # Push one templated token's behaviour log-prob far below the plain one: rho = exp(plain - templated) > 10.
    rollouts.sampler_logp[K, 0] = old[K, 0] - 5.0
    new_old, weights, metrics = hooks.train_inputs(rollouts, packed, old)
    templated = rollouts.is_templated()
    assert (weights[~templated] == 1).all()
    rho = np.exp(old - rollouts.sampler_logp[:, :response_len])
    inside = (rho >= 0.01) & (rho <= 10)
    np.testing.assert_array_equal(weights[templated], inside[templated].astype(np.float32))
    assert weights[K, 0] == 0 and metrics["p2o/ratio_masked_token_fraction"] > 0
    if mode == "plain":
      np.testing.assert_array_equal(new_old, old)
    else:
      np.testing.assert_array_equal(new_old[templated], rollouts.sampler_logp[templated][:, :response_len])
      np.testing.assert_array_equal(new_old[~templated], old[~templated])
