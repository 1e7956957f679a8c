"""Policy losses against independent NumPy re-derivations: values and hand-derived d(loss)/d(logp)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2o_jax.rl import losses

B, T, MAX_LEN = 8, 16, 20
MODES = sorted(losses.AGGREGATIONS)
# Modes whose loss is the same however the rows are cut into micro-batches ("microbatch-token-mean" is verl's, not).
EXACT_MODES = [m for m in MODES if m != "microbatch-token-mean"]
ESTIMATORS = sorted(losses.KL_ESTIMATORS)
# (clip_low, clip_high, dual_clip): symmetric with dual clip, clip-higher, and no dual clip.
CLIPS = [(0.2, 0.2, 3.0), (0.2, 0.28, 3.0), (0.2, 0.28, None)]


def make_batch(seed=0):
  """Mixed signs of advantage (one row 0), log-ratios in [-1.6, 1.6] so every clip branch is hit, rows 6-7 empty."""
  rng = np.random.default_rng(seed)
  logp = rng.normal(-2.0, 1.0, size=(B, T)).astype(np.float32)
  old_logp = (logp - rng.uniform(-1.6, 1.6, size=(B, T))).astype(np.float32)
  ref_logp = (logp - rng.uniform(-1.0, 1.0, size=(B, T))).astype(np.float32)
  advantages = (rng.uniform(0.3, 1.5, size=B) * np.array([1, -1, 1, -1, 0, -1, 1, -1])).astype(np.float32)
  lengths = np.array([16, 11, 5, 1, 14, 9, 0, 0])
  mask = np.arange(T)[None, :] < lengths[:, None]
  return logp, old_logp, ref_logp, advantages, mask


def numpy_ppo(logp, old_logp, advantages, clip_low, clip_high, dual_clip):
  """(loss, d loss / d logp, clipped) per token, derived branch by branch from d ratio / d logp = ratio."""
  ratio = np.exp(logp.astype(np.float64) - old_logp)
  a = np.broadcast_to(advantages.astype(np.float64)[:, None], ratio.shape)
  hi, lo = 1 + clip_high, 1 - clip_low
  cap = np.inf if dual_clip is None else dual_clip
  pos_loss, pos_live = -a * np.minimum(ratio, hi), ratio < hi  # A > 0: only the upper bound binds
  neg_loss, neg_live = -a * np.minimum(np.maximum(ratio, lo), cap), (ratio > lo) & (ratio < cap)  # A < 0
  loss = np.where(a > 0, pos_loss, np.where(a < 0, neg_loss, 0.0))
  live = np.where(a > 0, pos_live, np.where(a < 0, neg_live, False))
  grad = np.where(live, -a * ratio, 0.0)
  return loss, grad, (a != 0) & ~live


def numpy_kl(logp, ref_logp, estimator):
  """(kl, d kl / d logp) per token with x = logp - ref."""
  x = logp.astype(np.float64) - ref_logp
  if estimator == "k1":
    return x, np.ones_like(x)
  if estimator == "k2":
    return 0.5 * x**2, x
  return np.exp(-x) + x - 1, 1 - np.exp(-x)


def numpy_coefficients(mask, mode):
  """(c, denominator) with c such that the aggregated loss is sum(c * loss_bt): also each token's gradient weight."""
  m = mask.astype(np.float64)
  tokens = m.sum(axis=1)
  rows = np.count_nonzero(tokens)
  if mode == "token-mean":
    return m / m.sum(), m.sum()
  if mode == "microbatch-token-mean":  # one call = one micro-batch: its token-mean, times its rows over its rows
    return m / m.sum(), len(m)
  if mode == "seq-mean-token-mean":
    return m / np.maximum(tokens, 1)[:, None] / rows, rows
  return m / MAX_LEN / rows, rows


def mean_loss(fn):
  """fn returning (loss_sum, denominator, ...) -> the scalar loss_sum / denominator a caller differentiates."""
  def scalar(*args):
    loss_sum, denominator = fn(*args)[:2]
    return loss_sum / denominator
  return scalar


@pytest.mark.parametrize("clip_low,clip_high,dual_clip", CLIPS)
@pytest.mark.parametrize("mode", MODES)
def test_ppo_loss_and_gradient_match_numpy(mode, clip_low, clip_high, dual_clip):
  logp, old_logp, _, advantages, mask = make_batch()
  want_loss, want_grad, want_clipped = numpy_ppo(logp, old_logp, advantages, clip_low, clip_high, dual_clip)
  ratio = np.exp(logp.astype(np.float64) - old_logp)
  negative = (advantages < 0)[:, None] & mask
  assert np.any(negative & (ratio > 3.0)) and np.any(negative & (ratio < 1 - clip_low))  # dual clip / low clip hit
  assert np.any((advantages > 0)[:, None] & mask & (ratio > 1 + clip_high))  # high clip hit

  ppo = functools.partial(losses.ppo_token_losses, clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip)
  loss_bt, is_clipped_bt = ppo(logp, old_logp, advantages)
  np.testing.assert_allclose(np.asarray(loss_bt), want_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(is_clipped_bt), want_clipped)

  aggregated = lambda lp: losses.aggregate(ppo(lp, old_logp, advantages)[0], mask, mode, max_response_len=MAX_LEN)
  coef, want_denominator = numpy_coefficients(mask, mode)
  loss_sum, denominator = jax.jit(aggregated)(logp)
  assert float(denominator) == want_denominator
  np.testing.assert_allclose(float(loss_sum / denominator), np.sum(coef * want_loss), rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(mean_loss(aggregated)))(logp)
  np.testing.assert_allclose(np.asarray(grad), coef * want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("mode", MODES)
def test_policy_loss_with_kl_and_token_weights_matches_numpy(mode, estimator):
  logp, old_logp, ref_logp, advantages, mask = make_batch(seed=1)
  weights = np.random.default_rng(2).choice([0.0, 0.5, 1.0, 2.0], size=(B, T)).astype(np.float32)
  cfg = losses.PolicyLossConfig(aggregation=mode, max_response_len=MAX_LEN, kl_coef=0.1, kl_estimator=estimator)
  pg_loss, pg_grad, clipped = numpy_ppo(logp, old_logp, advantages, 0.2, 0.2, 3.0)
  kl, kl_grad = numpy_kl(logp, ref_logp, estimator)
  coef, want_denominator = numpy_coefficients(mask, mode)

  def run(lp):
    return losses.policy_loss(lp, old_logp, advantages, mask, cfg, ref_logp_bt=ref_logp, token_weights_bt=weights)

  loss_sum, denominator, metrics = jax.jit(run)(logp)
  assert float(denominator) == want_denominator  # weights never touch the denominator
  want_loss = np.sum(coef * (weights * pg_loss + 0.1 * kl))
  np.testing.assert_allclose(float(loss_sum / denominator), want_loss, rtol=1e-5, atol=1e-6)
  grad = jax.jit(jax.grad(mean_loss(run)))(logp)
  np.testing.assert_allclose(np.asarray(grad), coef * (weights * pg_grad + 0.1 * kl_grad), rtol=1e-5, atol=1e-6)

  ratio = np.exp(logp.astype(np.float64) - old_logp)
  np.testing.assert_allclose(float(metrics["token_count"]), mask.sum())
  np.testing.assert_allclose(float(metrics["clipped_token_count"]), np.sum(clipped & mask))
  np.testing.assert_allclose(float(metrics["ratio_sum"]), np.sum(ratio * mask), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ratio_squared_sum"]), np.sum(ratio**2 * mask), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["kl_sum"]), np.sum(kl * mask), rtol=1e-5, atol=1e-5)


def test_zero_kl_coef_needs_no_reference():
  logp, old_logp, _, advantages, mask = make_batch()
  loss_sum, denominator, metrics = losses.policy_loss(logp, old_logp, advantages, mask, losses.PolicyLossConfig())
  pg_loss, _, _ = numpy_ppo(logp, old_logp, advantages, 0.2, 0.2, 3.0)
  np.testing.assert_allclose(float(loss_sum / denominator), np.sum(pg_loss * mask) / mask.sum(), rtol=1e-5)
  assert "kl_sum" not in metrics
  with pytest.raises(ValueError, match="needs ref_logp_bt"):
    losses.policy_loss(logp, old_logp, advantages, mask, losses.PolicyLossConfig(kl_coef=0.01))


@pytest.mark.parametrize("mode", EXACT_MODES)
def test_micro_batch_accumulation_is_exact(mode):
  logp, old_logp, ref_logp, advantages, mask = make_batch(seed=3)
  cfg = losses.PolicyLossConfig(aggregation=mode, max_response_len=MAX_LEN, kl_coef=0.05)

  def sum_and_denominator(lp, old, ref, adv, m):
    loss_sum, denominator, metrics = losses.policy_loss(lp, old, adv, m, cfg, ref_logp_bt=ref)
    return loss_sum, (denominator, metrics)

  step = jax.jit(jax.value_and_grad(sum_and_denominator, has_aux=True))
  (full_sum, (full_denominator, full_metrics)), full_grad = step(logp, old_logp, ref_logp, advantages, mask)
  for n_micro in (2, 4):
    parts = [step(*xs) for xs in zip(*(np.split(x, n_micro) for x in (logp, old_logp, ref_logp, advantages, mask)))]
    total_sum = sum(float(s) for (s, _), _ in parts)
    total_denominator = sum(float(d) for (_, (d, _)), _ in parts)
    assert total_denominator == float(full_denominator)
    np.testing.assert_allclose(total_sum / total_denominator, float(full_sum / full_denominator), rtol=1e-5, atol=1e-6)
    micro_grad = np.concatenate([np.asarray(g) for _, g in parts]) / total_denominator
    np.testing.assert_allclose(micro_grad, np.asarray(full_grad) / float(full_denominator), rtol=1e-5, atol=1e-6)
    clipped = sum(float(m["clipped_token_count"]) for (_, (_, m)), _ in parts)
    assert clipped == float(full_metrics["clipped_token_count"])


def accumulated(logp, old_logp, advantages, mask, mode, n_micro):
  """The train step's arithmetic: (sum of the micro-batches' loss_sum) / (sum of their denominators)."""
  cfg = losses.PolicyLossConfig(aggregation=mode)
  parts = [losses.policy_loss(*xs, cfg)[:2] for xs in zip(*(jnp.split(x, n_micro) for x in
                                                            (logp, old_logp, advantages, mask)))]
  return sum(p[0] for p in parts) / sum(p[1] for p in parts)


def numpy_microbatch_coefficients(mask, n_micro):
  """verl's accumulation (dp_actor.update_policy): micro-batch m's token-mean scaled by rows_m / rows."""
  coef = np.zeros(mask.shape)
  for rows in np.split(np.arange(len(mask)), n_micro):
    m = mask[rows].astype(np.float64)
    coef[rows] = m / max(m.sum(), 1.0) * len(rows) / len(mask)
  return coef


def test_microbatch_token_mean_by_hand():
  """Two micro-batches of two rows, ratio 1 (token loss = -A, d loss / d logp = -A per token)."""
  advantages = np.array([1.0, -1.0, 2.0, 2.0], np.float32)
  logp = np.full((4, 3), -1.0, np.float32)
  for lengths, want_global, want_micro in [
      # tokens 4 | 4: both -10 / 8 = -1.25
      ([3, 1, 2, 2], -1.25, -1.25),
      # tokens 4 | 1: global (-3 + 1 - 2) / 5 = -0.8; micro 2/4 * (-2 / 4) + 2/4 * (-2 / 1) = -1.25
      ([3, 1, 1, 0], -0.8, -1.25)]:
    mask = np.arange(3)[None, :] < np.array(lengths)[:, None]
    for mode, want in (("token-mean", want_global), ("microbatch-token-mean", want_micro)):
      loss = lambda lp: accumulated(lp, logp, advantages, mask, mode, 2)
      assert float(jax.jit(loss)(logp)) == pytest.approx(want)
      coef = numpy_microbatch_coefficients(mask, 2) if mode != "token-mean" else mask / mask.sum()
      np.testing.assert_allclose(np.asarray(jax.grad(loss)(logp)), -advantages[:, None] * coef, rtol=1e-6)
    # The whole mini-batch in one call is the global token-mean under either mode.
    whole = accumulated(logp, logp, advantages, mask, "microbatch-token-mean", 1)
    assert float(whole) == pytest.approx(want_global)


@pytest.mark.parametrize("n_micro", [2, 4])
def test_microbatch_token_mean_matches_numpy_and_differs_from_the_global_one(n_micro):
  logp, old_logp, _, advantages, mask = make_batch(seed=6)
  token_loss, token_grad, _ = numpy_ppo(logp, old_logp, advantages, 0.2, 0.2, 3.0)
  coef = numpy_microbatch_coefficients(mask, n_micro)
  loss = lambda lp: accumulated(lp, old_logp, advantages, mask, "microbatch-token-mean", n_micro)
  np.testing.assert_allclose(float(jax.jit(loss)(logp)), np.sum(coef * token_loss), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(jax.grad(loss))(logp)), coef * token_grad, rtol=1e-5, atol=1e-6)
  tokens = mask.reshape(n_micro, -1).sum(axis=1)
  assert len(set(tokens.tolist())) > 1  # make_batch's rows have unequal lengths: the two means must differ
  global_mean = float(accumulated(logp, old_logp, advantages, mask, "token-mean", n_micro))
  assert abs(float(loss(logp)) - global_mean) > 1e-3


def test_aggregation_ignores_non_finite_loss_at_padding():
  loss = np.array([[1.0, np.nan], [np.inf, 3.0]], np.float32)
  mask = np.array([[1, 0], [0, 1]], bool)
  expected = {"token-mean": (4.0, 2.0), "seq-mean-token-mean": (4.0, 2.0), "seq-mean-token-sum-norm": (2.0, 2.0),
              "microbatch-token-mean": (4.0, 2.0)}
  for mode, want in expected.items():
    got = losses.aggregate(loss, mask, mode, max_response_len=2)
    np.testing.assert_allclose([float(g) for g in got], want)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_kl_clamps_extreme_log_ratios(estimator):
  logp = np.array([[5.0, -30.0, -1.0]], np.float32)
  ref_logp = np.array([[-30.0, 5.0, -1.5]], np.float32)  # log-ratios 35 and -35 clamp to +-20
  kl = losses.kl_per_token(logp, ref_logp, estimator)
  want, _ = numpy_kl(np.array([[20.0, -20.0, -1.0]]), np.array([[0.0, 0.0, -1.5]]), estimator)
  np.testing.assert_allclose(np.asarray(kl), want, rtol=1e-5)
  grad = jax.grad(lambda lp: jnp.sum(losses.kl_per_token(lp, ref_logp, estimator)))(logp)
  assert grad[0, 0] == 0.0 and grad[0, 1] == 0.0 and grad[0, 2] != 0.0


def boundary_log_probs():
  """plain log-probs (templated = 0) at, and one f32 step beyond, each bound [0.01, 10], plus clear cases."""
  log_low, log_high = np.float32(math.log(0.01)), np.float32(math.log(10.0))
  plain = [np.log(0.005), np.nextafter(log_low, -np.inf), log_low, np.log(0.5), 0.0, log_high,
           np.nextafter(log_high, np.inf), np.log(20.0)]
  return np.array([plain], np.float32), np.zeros((1, len(plain)), np.float32)


def test_hard_context_ratio_zeroes_exactly_the_tokens_outside_the_bounds():
  plain, templated = boundary_log_probs()
  weights = losses.context_ratio_weights(plain, templated, mode="hard")
  np.testing.assert_array_equal(np.asarray(weights), [[0, 0, 1, 1, 1, 1, 0, 0]])


def test_soft_context_ratio_rescales_to_the_nearest_bound():
  plain, templated = boundary_log_probs()
  weights = np.asarray(losses.context_ratio_weights(plain, templated, mode="soft"))
  np.testing.assert_allclose(weights[0, [0, 7]], [0.01 / 0.005, 10.0 / 20.0], rtol=1e-5)
  np.testing.assert_array_equal(weights[0, 2:6], 1.0)
  rng = np.random.default_rng(4)
  plain, templated = rng.normal(-3, 3, size=(2, 2, 50)).astype(np.float32)
  rho = np.exp(plain.astype(np.float64) - templated)
  want = np.where(rho > 10.0, 10.0 / rho, np.where(rho < 0.01, 0.01 / rho, 1.0))
  assert np.any(rho > 10.0) and np.any(rho < 0.01)
  got = losses.context_ratio_weights(plain, templated, mode="soft")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


@pytest.mark.parametrize("mode", sorted(losses.CONTEXT_RATIO_MODES))
def test_no_gradient_flows_through_context_ratio_weights(mode):
  rng = np.random.default_rng(5)
  plain, templated = rng.normal(-3, 3, size=(2, 3, 40)).astype(np.float32)
  weighted = lambda p, q: jnp.sum(losses.context_ratio_weights(p, q, mode=mode) * p)
  grad_plain, grad_templated = jax.grad(weighted, argnums=(0, 1))(plain, templated)
  np.testing.assert_array_equal(np.asarray(grad_templated), 0.0)
  weights = losses.context_ratio_weights(plain, templated, mode=mode)
  np.testing.assert_array_equal(np.asarray(grad_plain), np.asarray(weights))


def test_bad_configuration_is_a_value_error():
  with pytest.raises(ValueError, match="dual_clip must be > 1"):
    losses.PolicyLossConfig(dual_clip=1.0)
  with pytest.raises(ValueError, match=r"unknown aggregation 'mean'; valid: \['microbatch-token-mean', 'seq-mean"):
    losses.PolicyLossConfig(aggregation="mean")
  with pytest.raises(ValueError, match="needs max_response_len"):
    losses.PolicyLossConfig(aggregation="seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'; valid: \['k1', 'k2', 'k3'\]"):
    losses.kl_per_token(np.zeros((1, 1)), np.zeros((1, 1)), "k4")
  with pytest.raises(ValueError, match="needs max_response_len"):
    losses.aggregate(np.zeros((1, 1)), np.ones((1, 1)), "seq-mean-token-sum-norm")
  with pytest.raises(ValueError, match="0 < low < high"):
    losses.context_ratio_weights(np.zeros((1, 1)), np.zeros((1, 1)), low=10.0, high=0.01)
  with pytest.raises(ValueError, match=r"valid: \['hard', 'soft'\]"):
    losses.context_ratio_weights(np.zeros((1, 1)), np.zeros((1, 1)), mode="clip")
