"""Policy-gradient losses as pure functions: PPO-clip per token, KL penalties, loss aggregation, P^2O's context ratio
weights, token entropy, and `policy_loss`, the composition the train step calls.

Losses come back as (loss_sum, denominator), not as a mean, so gradient accumulation stays exact: the caller sums both
over micro-batches and divides once. `mask_bt` is always the 0/1 validity mask of response tokens; per-token weights
(e.g. `context_ratio_weights`) multiply the loss before aggregation and never touch the denominator.

Two token-means (config grpo.aggregation):
- "token-mean" (our default): the global token-mean of the mini-batch, sum of token losses / its valid tokens, the
  same number however the mini-batch is cut into micro-batches or spread over devices.
- "microbatch-token-mean": what the P^2O authors' code computes (their verl fork, workers/actor/dp_actor.py
  `update_policy` with trainer/ppo/core_algos.py `agg_loss`): each micro-batch's own token-mean, scaled by its rows /
  the mini-batch's rows, accumulated. The two agree when every micro-batch has the same valid tokens per row (equal
  token counts, as our micro-batches have equal rows); otherwise a token in a micro-batch of short responses weighs
  more. Our micro-batch is the
  unit of gradient accumulation (grpo.micro_batch_size rows over all batch devices); verl's is one GPU's share, packed
  to ~16k tokens, a grouping we cannot reproduce, so this option reproduces the kind of weighting, not the numbers.
Why the default departs from the authors' code: their per-micro-batch normalization is verl's accumulation bug, not
a choice of P^2O (the paper states token-mean; verl's newer engines divide by the global token count, agg_loss's
batch_num_tokens, and verl issue #5625 reports the legacy path as a bug), and it makes the objective depend on
grpo.micro_batch_size, which we pick per accelerator for memory, not for the method.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

# exp(20) ~ 5e8: ratios stay finite in f32 however far the policy drifts from the old or reference policy.
LOG_RATIO_LIMIT = 20.0


def _lookup(registry: dict[str, Callable], name: str, kind: str) -> Callable:
  if name not in registry:
    raise ValueError(f"unknown {kind} {name!r}; valid: {sorted(registry)}")
  return registry[name]


def _clamped_log_ratio(logp_bt: jax.Array, base_logp_bt: jax.Array) -> jax.Array:
  return jnp.clip(logp_bt - base_logp_bt, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)


def ppo_token_losses(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_b: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = 3.0,
) -> tuple[jax.Array, jax.Array]:
  """(loss_bt, is_clipped_bt): PPO-clip loss per token; clip_high > clip_low is DAPO's clip-higher.

  With `dual_clip` c (> 1, checked by `PolicyLossConfig`), a negative-advantage token's loss is capped at -A*c so a
  huge ratio cannot blow up the update. `is_clipped_bt` marks tokens whose loss is a clipped constant (no gradient).
  """
  if old_logp_bt.shape != logp_bt.shape or advantages_b.shape != logp_bt.shape[:1]:
    raise ValueError(f"shapes differ: logp {logp_bt.shape}, old_logp {old_logp_bt.shape}, adv {advantages_b.shape}")
  ratio_bt = jnp.exp(_clamped_log_ratio(logp_bt, old_logp_bt))
  adv_bt = advantages_b[:, None]
  unclipped_bt = -adv_bt * ratio_bt
  clipped_bt = -adv_bt * jnp.clip(ratio_bt, 1.0 - clip_low, 1.0 + clip_high)
  loss_bt = jnp.maximum(unclipped_bt, clipped_bt)
  is_clipped_bt = clipped_bt > unclipped_bt
  if dual_clip is not None:
    dual_bound_bt = -adv_bt * dual_clip
    dual_clipped_bt = (adv_bt < 0) & (loss_bt > dual_bound_bt)
    loss_bt = jnp.where(dual_clipped_bt, dual_bound_bt, loss_bt)
    is_clipped_bt = is_clipped_bt | dual_clipped_bt
  return loss_bt, is_clipped_bt


def _kl_k1(log_ratio_bt: jax.Array) -> jax.Array:
  return log_ratio_bt  # unbiased, high variance, can be negative per token


def _kl_k2(log_ratio_bt: jax.Array) -> jax.Array:
  return 0.5 * jnp.square(log_ratio_bt)  # biased, low variance; its gradient is the true KL gradient in expectation


def _kl_k3(log_ratio_bt: jax.Array) -> jax.Array:
  return jnp.exp(-log_ratio_bt) + log_ratio_bt - 1.0  # unbiased, low variance, never negative


KL_ESTIMATORS: dict[str, Callable[[jax.Array], jax.Array]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_per_token(logp_bt: jax.Array, ref_logp_bt: jax.Array, estimator: str) -> jax.Array:
  """kl_bt: per-token estimate of KL(pi || pi_ref) from sampled tokens, by a name in KL_ESTIMATORS."""
  return _lookup(KL_ESTIMATORS, estimator, "KL estimator")(_clamped_log_ratio(logp_bt, ref_logp_bt))


def _require_max_response_len(max_response_len: int | None) -> int:
  if max_response_len is None or max_response_len < 1:
    raise ValueError(f"aggregation 'seq-mean-token-sum-norm' needs max_response_len >= 1, got {max_response_len}")
  return max_response_len


def _token_mean(loss_bt, valid_bt, max_response_len):
  del max_response_len
  return jnp.sum(loss_bt), jnp.sum(valid_bt, dtype=jnp.float32)


def _microbatch_token_mean(loss_bt, valid_bt, max_response_len):
  # verl's token-mean under gradient accumulation: the call's own token-mean, weighted by its rows (rows without
  # tokens included), so that summed over micro-batches and divided by the mini-batch's rows it is
  # sum_m rows_m / rows * token_mean_m. One call over the whole mini-batch gives the global token-mean.
  del max_response_len
  rows = jnp.float32(loss_bt.shape[0])
  token_mean = jnp.sum(loss_bt) / jnp.maximum(jnp.sum(valid_bt, dtype=jnp.float32), 1.0)  # 0 with no tokens
  return token_mean * rows, rows


def _seq_mean_token_mean(loss_bt, valid_bt, max_response_len):
  del max_response_len
  tokens_b = jnp.sum(valid_bt, axis=-1, dtype=jnp.float32)
  row_mean_b = jnp.sum(loss_bt, axis=-1) / jnp.maximum(tokens_b, 1.0)  # 0 for empty rows: their loss is all 0
  return jnp.sum(row_mean_b), jnp.sum(tokens_b > 0, dtype=jnp.float32)


def _seq_mean_token_sum_norm(loss_bt, valid_bt, max_response_len):
  # Dr.GRPO: a constant length normalizer removes the bias toward long wrong answers. Rows without tokens are
  # padding, not responses (every sampled response has >= 1 token), so they stay out of the row count.
  row_sum_b = jnp.sum(loss_bt, axis=-1) / _require_max_response_len(max_response_len)
  return jnp.sum(row_sum_b), jnp.sum(jnp.any(valid_bt, axis=-1), dtype=jnp.float32)


AGGREGATIONS: dict[str, Callable[..., tuple[jax.Array, jax.Array]]] = {
    "token-mean": _token_mean,
    "microbatch-token-mean": _microbatch_token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregate(
    loss_bt: jax.Array, mask_bt: jax.Array, mode: str, *, max_response_len: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """(loss_sum, denominator) of the masked per-token loss; the loss is sum(loss_sum) / sum(denominator).

  Summed over micro-batches, every mode but "microbatch-token-mean" gives the loss of the whole mini-batch; that one
  is by design a function of which rows each call aggregates (verl's per-micro-batch token-mean).

  To weight tokens (e.g. the context ratio mask), multiply loss_bt by the weights first and pass the unweighted
  0/1 mask here: a weighted-out token then still counts in the denominator.
  """
  aggregation = _lookup(AGGREGATIONS, mode, "aggregation")
  if loss_bt.shape != mask_bt.shape:
    raise ValueError(f"loss_bt {loss_bt.shape} and mask_bt {mask_bt.shape} differ in shape")
  valid_bt = mask_bt.astype(bool)
  # where, not multiply: a non-finite loss at a padding position must not turn the sum into NaN.
  return aggregation(jnp.where(valid_bt, loss_bt, 0.0), valid_bt, max_response_len)


def _hard_ratio_weights(log_rho_bt, log_low, log_high):
  return ((log_rho_bt >= log_low) & (log_rho_bt <= log_high)).astype(jnp.float32)


def _soft_ratio_weights(log_rho_bt, log_low, log_high):
  # weight * rho lands on the nearest bound: an out-of-range token's ratio is clipped instead of dropped.
  return jnp.exp(jnp.clip(log_rho_bt, log_low, log_high) - log_rho_bt)


CONTEXT_RATIO_MODES: dict[str, Callable[..., jax.Array]] = {"hard": _hard_ratio_weights, "soft": _soft_ratio_weights}


def context_ratio_weights(
    plain_logp_bt: jax.Array,
    templated_logp_bt: jax.Array,
    *,
    low: float = 0.01,
    high: float = 10.0,
    mode: str = "hard",
) -> jax.Array:
  """w_bt: P^2O's Context Ratio Mask from rho = pi(y|x) / pi(y|x~) per token; 1 inside [low, high].

  hard: 0 outside the bounds; soft: high/rho above, low/rho below. The bounds are compared in log space, so
  rho exactly at a bound is inside. The weights carry no gradient.
  """
  weight_fn = _lookup(CONTEXT_RATIO_MODES, mode, "context ratio mode")
  if not 0.0 < low < high:
    raise ValueError(f"context ratio bounds need 0 < low < high, got low={low}, high={high}")
  log_rho_bt = plain_logp_bt - templated_logp_bt
  return jax.lax.stop_gradient(weight_fn(log_rho_bt, math.log(low), math.log(high)))


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
  """The knobs of `policy_loss`, validated on creation. Hashable, so it can be a static jit argument."""

  clip_low: float = 0.2
  clip_high: float = 0.2  # > clip_low: DAPO's clip-higher
  dual_clip: float | None = 3.0
  aggregation: str = "token-mean"
  max_response_len: int | None = None  # only "seq-mean-token-sum-norm" uses it
  kl_coef: float = 0.0  # beta; 0 means no reference log-probs are needed
  kl_estimator: str = "k3"

  def __post_init__(self):
    if not 0.0 <= self.clip_low < 1.0 or self.clip_high < 0.0:
      raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
    if self.dual_clip is not None and not self.dual_clip > 1.0:
      raise ValueError(f"dual_clip must be > 1 (or None), got {self.dual_clip}")
    if self.kl_coef < 0.0:
      raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
    _lookup(AGGREGATIONS, self.aggregation, "aggregation")
    _lookup(KL_ESTIMATORS, self.kl_estimator, "KL estimator")
    if self.aggregation == "seq-mean-token-sum-norm":
      _require_max_response_len(self.max_response_len)


def policy_loss(
    logp_bt: jax.Array,
    old_logp_bt: jax.Array,
    advantages_b: jax.Array,
    mask_bt: jax.Array,
    cfg: PolicyLossConfig,
    *,
    ref_logp_bt: jax.Array | None = None,
    token_weights_bt: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """(loss_sum, denominator, metrics): PPO-clip loss plus kl_coef * KL, aggregated by cfg.aggregation.

  `token_weights_bt` multiplies the PPO term only (the KL term regularizes every valid token). Metrics are sums over
  valid tokens, so they accumulate over micro-batches like the loss: token_count, clipped_token_count, ratio_sum,
  ratio_squared_sum, and kl_sum whenever ref_logp_bt is given.
  """
  if cfg.kl_coef > 0.0 and ref_logp_bt is None:
    raise ValueError(f"kl_coef={cfg.kl_coef} needs ref_logp_bt")
  loss_bt, is_clipped_bt = ppo_token_losses(
      logp_bt, old_logp_bt, advantages_b, clip_low=cfg.clip_low, clip_high=cfg.clip_high, dual_clip=cfg.dual_clip
  )
  if token_weights_bt is not None:
    loss_bt = loss_bt * token_weights_bt
  valid_bt = mask_bt.astype(bool)
  ratio_bt = jnp.where(valid_bt, jnp.exp(_clamped_log_ratio(logp_bt, old_logp_bt)), 0.0)
  metrics = {
      "token_count": jnp.sum(valid_bt, dtype=jnp.float32),
      "clipped_token_count": jnp.sum(is_clipped_bt & valid_bt, dtype=jnp.float32),
      "ratio_sum": jnp.sum(ratio_bt),
      "ratio_squared_sum": jnp.sum(jnp.square(ratio_bt)),
  }
  if ref_logp_bt is not None:
    kl_bt = kl_per_token(logp_bt, ref_logp_bt, cfg.kl_estimator)
    metrics["kl_sum"] = jnp.sum(jnp.where(valid_bt, kl_bt, 0.0))
    if cfg.kl_coef > 0.0:
      loss_bt = loss_bt + cfg.kl_coef * kl_bt
  loss_sum, denominator = aggregate(loss_bt, mask_bt, cfg.aggregation, max_response_len=cfg.max_response_len)
  return loss_sum, denominator, jax.lax.stop_gradient(metrics)
