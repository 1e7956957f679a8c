"""The jitted train step: exact micro-batch accumulation, the loss it reports, skipped non-finite updates."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from p2o_jax.models.config import ModelConfig
from p2o_jax.models.decoder import Decoder, positions_from_mask
from p2o_jax.rl import logprobs
from p2o_jax.rl.losses import PolicyLossConfig, ppo_token_losses
from p2o_jax.rl.sequence_packing import pack_sequences, packed_shape
from p2o_jax.rl.train_step import StepConfig, make_logprob_fn, make_train_step

ROWS, PROMPT, RESPONSE = 8, 6, 5


def tiny_model(seed=0):
  cfg = ModelConfig(model_type="qwen2", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, qkv_bias=True)
  return Decoder(cfg, nnx.Rngs(seed))


def random_rows(seed=0):
  rs = np.random.RandomState(seed)
  tokens = rs.randint(1, 40, (ROWS, PROMPT + RESPONSE)).astype(np.int32)
  valid = np.ones(tokens.shape, bool)
  valid[0, :3] = False  # left padding of a short prompt
  response_mask = np.ones((ROWS, RESPONSE), bool)
  response_mask[1, 2:] = False  # a short response
  valid[1, PROMPT + 2:] = False
  return {"tokens": tokens, "valid": valid, "response_mask": response_mask,
          "advantages": rs.randn(ROWS).astype(np.float32),
          "token_weights": rs.uniform(0.5, 1.5, (ROWS, RESPONSE)).astype(np.float32)}


def as_micro(rows, micro, packing="sequences"):
  """Padded rows (left-padded prompts of PROMPT tokens, responses of RESPONSE) as the train step's packed batch
  (sequence_packing), `micro` rows per micro-batch; the other fields reshaped to (micro-batches, micro, ...)."""
  prompts = [t[:PROMPT][v[:PROMPT]].tolist() for t, v in zip(rows["tokens"], rows["valid"])]
  responses, mask = rows["tokens"][:, PROMPT:], rows["response_mask"]
  shape = packed_shape(prompts, mask, micro, PROMPT + RESPONSE, packing, attention_span=1e9)
  batch = {**pack_sequences(prompts, responses, mask, 0, micro, shape, packing),
           **{k: v for k, v in rows.items() if k not in ("tokens", "valid", "response_mask")}}
  return {k: v.reshape(ROWS // micro, -1, *v.shape[1:]) for k, v in batch.items()}


def one_sgd_step(rows, micro, aggregation="token-mean", temperature=0.7, chunk_size=None):
  graphdef, params = nnx.split(tiny_model())
  rows = dict(rows)
  rows["old_logp"] = np.asarray(make_logprob_fn(graphdef, temperature)(params, as_micro(rows, 2))).reshape(ROWS, -1)
  # Perturb the old log-probs so ratios differ from 1 and some tokens clip.
  rows["old_logp"] = rows["old_logp"] + np.random.RandomState(1).normal(0, 0.3, rows["old_logp"].shape)
  rows["old_logp"] = rows["old_logp"].astype(np.float32)
  optimizer = optax.apply_if_finite(optax.sgd(1.0), 10)
  loss_cfg = PolicyLossConfig(aggregation=aggregation, max_response_len=RESPONSE)
  step = make_train_step(graphdef, optimizer, StepConfig(loss_cfg, temperature, logprob_chunk_size=chunk_size))
  before = jax.tree.map(np.asarray, params)
  new_params, _, metrics = step(params, optimizer.init(params), as_micro(rows, micro))
  delta = jax.tree.map(lambda a, b: np.asarray(a) - b, new_params, before)
  return delta, {**jax.device_get(metrics), "old_logp": rows["old_logp"]}


# Slow (10-15 s each); the fast tier keeps the loss-level check (tests/test_losses.py, micro-batch accumulation).
@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_accumulated_gradient_equals_full_batch(aggregation):
  rows = random_rows()
  full, full_metrics = one_sgd_step(rows, micro=ROWS, aggregation=aggregation)
  for micro in (1, 4):  # one row per micro-batch, and an uneven-content split
    split, metrics = one_sgd_step(rows, micro=micro, aggregation=aggregation)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), split, full)
    np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(full_metrics["clip_fraction"])
  assert float(np.abs(np.concatenate([x.ravel() for x in jax.tree.leaves(full)])).max()) > 0


def reference_sgd_delta(rows, coef_bt, temperature=0.7):
  """-grad of sum(coef * w * ppo_loss), log-probs from a plain forward pass over the packed rows: the update one SGD
  step of lr 1 must make, for token coefficients `coef_bt` derived in NumPy."""
  graphdef, params = nnx.split(tiny_model())

  def loss(p, coef):
    logits = nnx.merge(graphdef, p)(jnp.asarray(rows["tokens"]), positions_from_mask(jnp.asarray(rows["valid"])),
                                    jnp.asarray(rows["valid"]))[0][:, PROMPT - 1:-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits / temperature, axis=-1),
                               jnp.asarray(rows["tokens"][:, PROMPT:, None]), -1)[..., 0]
    token_loss, _ = ppo_token_losses(logp, jnp.asarray(rows["old_logp"]), jnp.asarray(rows["advantages"]))
    return jnp.sum(coef * rows["token_weights"] * token_loss)

  return jax.tree.map(lambda g: -np.asarray(g), jax.jit(jax.grad(loss))(params, coef_bt.astype(np.float32)))


@pytest.mark.slow  # ~15 s; the fast tier has the loss-level check (tests/test_losses.py, test_microbatch_token_mean_*)
def test_train_step_gradient_under_each_token_mean():
  """Two micro-batches with 17 and 20 valid tokens: the global token-mean weighs every token 1/37; verl's
  micro-batch token-mean weighs micro-batch m's tokens (rows_m / rows) / tokens_m = 1/34 and 1/40."""
  rows = random_rows()
  mask = rows["response_mask"].astype(np.float64)
  assert mask[:4].sum() == 17 and mask[4:].sum() == 20
  coefs = {"token-mean": mask / mask.sum(),
           "microbatch-token-mean": mask * np.repeat([0.5 / mask[:4].sum(), 0.5 / mask[4:].sum()], 4)[:, None]}
  deltas = {}
  for aggregation, coef in coefs.items():
    delta, metrics = one_sgd_step(rows, micro=4, aggregation=aggregation)
    rows["old_logp"] = metrics.pop("old_logp")
    want = reference_sgd_delta(rows, coef)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4), delta, want)
    deltas[aggregation] = delta
  gaps = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *deltas.values()))
  assert max(gaps) > 1e-4  # the two aggregations really move the params differently here


def test_loss_at_ratio_one_is_minus_weighted_mean_advantage():
  """Old log-probs from the same params: ratio 1 on every token, so token-mean loss = -sum(A*w)/tokens."""
  rows = random_rows()
  graphdef, params = nnx.split(tiny_model())
  rows["old_logp"] = np.asarray(make_logprob_fn(graphdef, 1.0)(params, as_micro(rows, 4))).reshape(ROWS, -1)
  optimizer = optax.apply_if_finite(optax.sgd(0.0), 10)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(), 1.0))
  _, _, metrics = step(params, optimizer.init(params), as_micro(rows, 4))
  mask = rows["response_mask"]
  expected = -np.sum(rows["advantages"][:, None] * rows["token_weights"] * mask) / mask.sum()
  np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
  assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  assert float(metrics["clip_fraction"]) == 0.0
  assert float(metrics["loss_denominator"]) == mask.sum()


def test_non_finite_loss_skips_the_update():
  rows = random_rows()
  rows["advantages"][3] = np.nan
  graphdef, params = nnx.split(tiny_model())
  rows["old_logp"] = np.asarray(make_logprob_fn(graphdef, 1.0)(params, as_micro(rows, 4))).reshape(ROWS, -1)
  optimizer = optax.apply_if_finite(optax.sgd(0.1), 10)
  before = jax.tree.map(np.asarray, params)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(), 1.0))
  new_params, opt_state, metrics = step(params, optimizer.init(params), as_micro(rows, 4))
  assert float(metrics["update_skipped"]) == 1.0
  assert int(opt_state.total_notfinite) == 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new_params, before)


@pytest.mark.slow  # ~9 s
def test_logprobs_match_a_plain_forward_pass():
  """Response log-probs equal log_softmax(logits / T) of an unpacked forward pass over the same tokens."""
  rows = random_rows()
  model = tiny_model()
  graphdef, params = nnx.split(model)
  got = np.asarray(make_logprob_fn(graphdef, 0.7)(params, as_micro(rows, 4))).reshape(ROWS, -1)
  for r in range(ROWS):
    keep = rows["valid"][r]
    seq = rows["tokens"][r][keep]
    start = int(keep[:PROMPT].sum())
    logits = np.asarray(model(jnp.asarray(seq[None]), jnp.arange(len(seq))[None],
                              jnp.ones((1, len(seq)), bool))[0][0])
    logp = jax.nn.log_softmax(logits / 0.7, axis=-1)
    n = int(rows["response_mask"][r].sum())
    want = [logp[start - 1 + j, seq[start + j]] for j in range(n)]
    np.testing.assert_allclose(got[r, :n], want, atol=1e-5)


@pytest.mark.slow  # ~10 s
def test_entropy_metric_with_the_lm_head_in_chunks():
  """LM head in chunks of 2 positions (R = 5: two full chunks and a padded one), at ratio 1: the loss is still
  -sum(A*w)/tokens, and the entropy metric is the masked mean of -sum p log p from a plain full-vocab pass."""
  rows = random_rows()
  model = tiny_model()
  logits = np.asarray(model(jnp.asarray(rows["tokens"]), positions_from_mask(jnp.asarray(rows["valid"])),
                            jnp.asarray(rows["valid"]))[0])[:, PROMPT - 1:-1]  # before the step donates the params
  logp_full = np.asarray(jax.nn.log_softmax(logits / 0.7, axis=-1))
  entropy = -(np.exp(logp_full) * logp_full).sum(-1)
  graphdef, params = nnx.split(model)
  logprobs = make_logprob_fn(graphdef, 0.7, chunk_size=2)(params, as_micro(rows, 4))
  rows["old_logp"] = np.asarray(logprobs).reshape(ROWS, -1)
  optimizer = optax.apply_if_finite(optax.sgd(0.0), 10)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(), 0.7, logprob_chunk_size=2))
  _, _, metrics = step(params, optimizer.init(params), as_micro(rows, 4))
  mask = rows["response_mask"]
  np.testing.assert_allclose(float(metrics["loss"]),
                             -np.sum(rows["advantages"][:, None] * rows["token_weights"] * mask) / mask.sum(), rtol=1e-5)
  assert float(metrics["ratio_mean"]) == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(float(metrics["entropy"]), (entropy * mask).sum() / mask.sum(), rtol=1e-5)
  want = np.take_along_axis(logp_full, rows["tokens"][:, PROMPT:, None], -1)[..., 0]
  np.testing.assert_allclose(rows["old_logp"][mask], want[mask], atol=1e-5)


@pytest.mark.slow
def test_lm_head_chunks_change_nothing():
  """The same update and metrics with the LM head in chunks of 2 positions as in one chunk."""
  rows = random_rows()
  full, full_metrics = one_sgd_step(rows, micro=4)
  split, metrics = one_sgd_step(rows, micro=4, chunk_size=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), split, full)
  for name in ("loss", "entropy", "ratio_mean", "clip_fraction", "grad_norm"):
    np.testing.assert_allclose(metrics[name], full_metrics[name], rtol=1e-5, err_msg=name)


@pytest.mark.slow
def test_a_kept_softmax_gives_the_update_of_recomputed_logits(monkeypatch):
  """The LM head's backward pass keeps each chunk's softmax when they fit (the tiny model's always do) or recomputes
  the logits (KEEP_SOFTMAX_BYTES 0): the same update and metrics."""
  rows = random_rows()
  kept, kept_metrics = one_sgd_step(rows, micro=4, chunk_size=2)
  monkeypatch.setattr(logprobs, "KEEP_SOFTMAX_BYTES", 0)
  recomputed, metrics = one_sgd_step(rows, micro=4, chunk_size=2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), recomputed, kept)
  for name in ("loss", "entropy", "grad_norm"):
    np.testing.assert_allclose(metrics[name], kept_metrics[name], rtol=1e-5, err_msg=name)
  assert float(np.abs(np.concatenate([x.ravel() for x in jax.tree.leaves(kept)])).max()) > 1e-4


@pytest.mark.slow
def test_rematerialized_layers_give_the_same_logprobs_and_update():
  """model.remat recomputes activations in the backward pass; the numbers must not change."""
  rows = random_rows()
  results = []
  for remat in ("none", "full", "save_dots"):
    model = tiny_model()
    model.cfg = dataclasses.replace(model.cfg, remat=remat)
    graphdef, params = nnx.split(model)
    logp = make_logprob_fn(graphdef, 1.0)(params, as_micro(rows, 2))
    batch = dict(rows, old_logp=np.asarray(logp).reshape(ROWS, -1))
    optimizer = optax.apply_if_finite(optax.sgd(1.0), 10)
    step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(max_response_len=RESPONSE), 1.0))
    new_params, _, _ = step(params, optimizer.init(params), as_micro(batch, 4))
    results.append((np.asarray(logp), jax.tree.map(np.asarray, new_params)))
  for logp, params in results[1:]:
    np.testing.assert_allclose(logp, results[0][0], atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, results[0][1])
