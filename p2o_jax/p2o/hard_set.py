"""Hard-sample tracking: queries whose K rollouts had at most `max_correct` successes during this epoch.

config.p2o.hard_max_correct is the authors' add_near_hard (their `_collect_very_hard_samples`): True, their default,
adds "exactly one right" to "all wrong", i.e. max_correct=1; False is max_correct=0. Larger values are our extension.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class HardSetTracker:
  """Collects hard query ids in first-seen order, deduplicated; templated queries are judged on their templated rows.

  A query seen twice in an epoch (dynamic sampling can redraw it) is hard if any of its groups was hard.
  """

  def __init__(self, max_correct: int = 1):
    if max_correct < 0:
      raise ValueError(f"hard_max_correct must be >= 0, got {max_correct}")
    self.max_correct = max_correct
    self._ids: dict[str, None] = {}

  def observe(self, query_ids: Sequence[str], rewards_b: np.ndarray, group_size: int) -> np.ndarray:
    """Record this batch; returns the bool mask of its hard queries."""
    correct_g = (np.asarray(rewards_b).reshape(len(query_ids), group_size) > 0).sum(axis=1)
    hard_g = correct_g <= self.max_correct
    for query_id, hard in zip(query_ids, hard_g):
      if hard:
        self._ids.setdefault(query_id, None)
    return hard_g

  @property
  def ids(self) -> list[str]:
    return list(self._ids)

  def reset(self) -> None:
    self._ids.clear()

  def state(self) -> list[str]:
    return self.ids

  def restore(self, ids: Sequence[str]) -> None:
    self._ids = dict.fromkeys(ids)
