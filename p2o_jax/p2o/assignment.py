"""Template assignment after GEPA: a greedy set cover of the dev instances, then K templates drawn per hard query.

The cover keeps a few templates that between them solve every dev instance any template solved. Each hard query then
gets K candidate indices (0 is the empty template, i.e. a plain rollout) drawn with replacement from the cover, weighted
by mean dev score; a dev query that some cover template solved draws only among the cover templates that solved it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

# Stands in for a weight <= 0 so a cover template with a non-positive mean dev score stays drawable.
MIN_TEMPLATE_WEIGHT = 1e-6


def solved_sets(scores_cd: np.ndarray) -> list[frozenset[int]]:
  """Per candidate, the dev instances it solved (full reward, score >= 1)."""
  scores_cd = np.asarray(scores_cd, dtype=np.float64)
  if scores_cd.ndim != 2:
    raise ValueError(f"scores_cd must be a (candidates, dev instances) matrix, got shape {scores_cd.shape}")
  return [frozenset(np.flatnonzero(row >= 1.0).tolist()) for row in scores_cd]


def greedy_set_cover(solved: Sequence[frozenset[int]], mean_scores: Sequence[float]) -> list[int]:
  """Candidates in pick order: each covers the most still-uncovered instances (ties: higher mean, then lower index)."""
  if len(solved) != len(mean_scores):
    raise ValueError(f"solved has {len(solved)} candidates but mean_scores has {len(mean_scores)}")
  cover: list[int] = []
  covered: set[int] = set()
  while True:
    gains = [len(s - covered) for s in solved]
    best = max(range(len(solved)), key=lambda c: (gains[c], mean_scores[c], -c), default=None)
    if best is None or gains[best] == 0:
      return cover
    cover.append(best)
    covered |= solved[best]


def template_distribution(cover: Sequence[int], solved: Sequence[frozenset[int]], mean_scores: Sequence[float],
                          dev_instance: int | None) -> tuple[list[int], np.ndarray]:
  """(candidates, probabilities) a query draws from; `dev_instance` is its dev column, None for a train query."""
  if not cover:
    raise ValueError("the set cover is empty: there is nothing to draw templates from")
  pool = list(cover)
  if dev_instance is not None:
    pool = [c for c in cover if dev_instance in solved[c]] or pool
  weights = np.array([mean_scores[c] for c in pool], dtype=np.float64)
  weights = np.where(weights > 0, weights, MIN_TEMPLATE_WEIGHT)
  return pool, weights / weights.sum()


def assign_templates(query_ids: Sequence[Hashable], dev_query_ids: Sequence[Hashable], scores_cd: np.ndarray, k: int,
                     rng: np.random.Generator, *, same_template_in_group: bool = False) -> dict[Hashable, list[int]]:
  """Every hard query id -> its k candidate indices; {} when no template solved any dev instance.

  `dev_query_ids[j]` is the query behind column j of `scores_cd`. Queries are drawn in `query_ids` order, so the result
  is a function of the inputs and the rng state. With `same_template_in_group` one draw is repeated k times.
  """
  scores_cd = np.asarray(scores_cd, dtype=np.float64)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if scores_cd.ndim != 2 or scores_cd.shape[1] != len(dev_query_ids):
    raise ValueError(f"scores_cd has shape {scores_cd.shape} but there are {len(dev_query_ids)} dev query ids")
  if len(set(query_ids)) != len(query_ids) or len(set(dev_query_ids)) != len(dev_query_ids):
    raise ValueError("query_ids and dev_query_ids must not repeat an id")
  solved = solved_sets(scores_cd)
  if not any(solved):
    return {}
  mean_scores = scores_cd.mean(axis=1).tolist()
  cover = greedy_set_cover(solved, mean_scores)
  dev_column = {q: j for j, q in enumerate(dev_query_ids)}
  assignment: dict[Hashable, list[int]] = {}
  for query in query_ids:
    pool, probs = template_distribution(cover, solved, mean_scores, dev_column.get(query))
    draws = rng.choice(len(pool), size=1 if same_template_in_group else k, p=probs)
    picked = [pool[i] for i in draws.tolist()]
    assignment[query] = picked * k if same_template_in_group else picked
  return assignment
