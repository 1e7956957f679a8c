"""Group-relative advantages (GRPO, Dr.GRPO): one scalar per rollout from the rewards of its query's group.

Rows come as consecutive blocks of `group_size` rollouts of one query (the batch builder puts all K rollouts of a
query next to each other), so grouping is a reshape, never a gather. Optional `valid_b` marks real rows; padding rows
(added to fill a shape bucket) get advantage 0 and do not enter their group's statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _to_groups(x_b: jax.Array, group_size: int) -> jax.Array:
  if group_size < 1:
    raise ValueError(f"group_size must be >= 1, got {group_size}")
  if x_b.ndim != 1 or x_b.shape[0] % group_size:
    raise ValueError(f"expected a 1-D array whose length is a multiple of group_size={group_size}, got {x_b.shape}")
  return x_b.reshape(-1, group_size)


def _grouped_rewards(rewards_b, group_size: int, valid_b) -> tuple[jax.Array, jax.Array]:
  """(rewards_gk, valid_gk) with padding rewards zeroed: padding may hold anything, even NaN."""
  rewards_gk = _to_groups(jnp.asarray(rewards_b, jnp.float32), group_size)
  if valid_b is None:
    valid_gk = jnp.ones(rewards_gk.shape, bool)
  else:
    valid_gk = _to_groups(jnp.asarray(valid_b, bool), group_size)
    if valid_gk.shape != rewards_gk.shape:
      raise ValueError(f"valid_b has {valid_gk.size} rows but rewards_b has {rewards_gk.size}")
  return jnp.where(valid_gk, rewards_gk, 0.0), valid_gk


def _zero_variance(rewards_gk: jax.Array, valid_gk: jax.Array) -> jax.Array:
  # max == min over valid rows; a group with no valid rows is zero-variance too (hi=-inf, lo=+inf).
  hi_g = jnp.max(jnp.where(valid_gk, rewards_gk, -jnp.inf), axis=-1)
  lo_g = jnp.min(jnp.where(valid_gk, rewards_gk, jnp.inf), axis=-1)
  return ~(hi_g > lo_g)


def zero_variance_groups(rewards_b, group_size: int, valid_b=None) -> jax.Array:
  """bool_g: True where every valid rollout of the group got the same reward (the group gives no gradient)."""
  return _zero_variance(*_grouped_rewards(rewards_b, group_size, valid_b))


def group_advantages(
    rewards_b, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6, valid_b=None
) -> jax.Array:
  """advantages_b: r - mean_g, divided by (std_g + eps) for GRPO (normalize_std=True) or not for Dr.GRPO."""
  rewards_gk, valid_gk = _grouped_rewards(rewards_b, group_size, valid_b)
  count_g = jnp.maximum(jnp.sum(valid_gk, axis=-1), 1)
  mean_g = jnp.sum(rewards_gk, axis=-1) / count_g
  centered_gk = jnp.where(valid_gk, rewards_gk - mean_g[:, None], 0.0)
  if normalize_std:
    # Population std (ddof=0): the K rollouts are the whole group we normalize over, not a sample of it. verl's
    # torch.std uses ddof=1, which only scales every advantage by about sqrt((K-1)/K).
    std_g = jnp.sqrt(jnp.sum(jnp.square(centered_gk), axis=-1) / count_g)
    centered_gk = centered_gk / (std_g[:, None] + eps)
  # The float mean of equal values need not reproduce them bit for bit; an equal-reward group must give exactly 0.
  advantages_gk = jnp.where(_zero_variance(rewards_gk, valid_gk)[:, None], 0.0, centered_gk)
  return advantages_gk.reshape(-1)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., jax.Array]] = {
    "grpo": functools.partial(group_advantages, normalize_std=True),
    "dr_grpo": functools.partial(group_advantages, normalize_std=False),
}


def advantage_estimator(name: str) -> Callable[..., jax.Array]:
  """The estimator registered as `name`; called like `group_advantages` without `normalize_std`."""
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}")
  return ADVANTAGE_ESTIMATORS[name]
