"""DAPO's dynamic sampling: keep only query groups whose rewards vary (a flat group has zero advantage everywhere),
refilling the batch from further draws up to a limit; short of varied groups, flat ones pad the batch (A = 0).

Multi-process: each process keeps or drops its own groups by the rewards it scored itself (no other process scores or
trains on them), so those choices need not agree; only when to stop drawing is shared (a draw is a collective)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
import numpy as np

from p2o_jax import distributed
from p2o_jax.data.records import Query
from p2o_jax.rl.advantages import zero_variance_groups
from p2o_jax.rl.rollout import Rollouts


def refill_flat_groups(queries: Sequence[Query], rollouts: Rollouts,
                       draw: Callable[[int], tuple[list[Query], Rollouts]], *, wanted: int,
                       max_batches: int) -> tuple[list[Query], Rollouts]:
  """`wanted` groups, varied ones first in the order drawn; `draw(attempt)` rolls out the next batch (attempt >= 1)."""
  k = rollouts.group_size
  kept_rows, dropped = [], []
  for attempt in range(max_batches):
    if attempt:
      queries, rollouts = draw(attempt)
    flat = np.asarray(zero_variance_groups(jnp.asarray(rollouts.rewards), k))
    for i, q in enumerate(queries):
      (dropped if flat[i] else kept_rows).append((q, rollouts, i))
    # Every attempt is a sampler call over all processes: they stop together, once each has its local share.
    if distributed.allgather(np.int32(len(kept_rows) >= wanted)).all():
      break
  chosen = (kept_rows + dropped)[:wanted]
  return [q for q, _, _ in chosen], select_groups([(r, i) for _, r, i in chosen], k)


def select_groups(chosen: list[tuple[Rollouts, int]], k: int) -> Rollouts:
  """Concatenate the chosen query groups (each: a Rollouts object and the group's index in it)."""
  rows = [g * k + j for _, g in chosen for j in range(k)]
  sources = [r for r, _ in chosen for _ in range(k)]
  width = max(r.tokens.shape[1] for r in sources)

  def stack(field):
    return np.stack([np.pad(getattr(r, field)[i], (0, width - getattr(r, field).shape[1]))
                     for r, i in zip(sources, rows)])

  return Rollouts(group_size=k, answers=[r.answers[i] for r, i in zip(sources, rows)],
                  texts=[r.texts[i] for r, i in zip(sources, rows)],
                  generate_prompt_ids=[r.generate_prompt_ids[i] for r, i in zip(sources, rows)],
                  train_prompt_ids=[r.train_prompt_ids[i] for r, i in zip(sources, rows)],
                  tokens=stack("tokens"), mask=stack("mask"), sampler_logp=stack("sampler_logp"),
                  rewards=np.asarray([r.rewards[i] for r, i in zip(sources, rows)], np.float32),
                  templated=np.asarray([r.is_templated()[i] for r, i in zip(sources, rows)], bool),
                  reward_terms={name: np.asarray([r.reward_terms[name][i] for r, i in zip(sources, rows)], np.float32)
                                for name in sources[0].reward_terms} if sources else {})
