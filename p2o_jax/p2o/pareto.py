"""GEPA parent selection from the per-instance Pareto front of a candidates x dev-instances score matrix.

A candidate is worth mutating if it is among the best on some dev instance. The authors' code (P^2O's GEPA driver)
keeps every such candidate in the pool and draws parents with probability proportional to the number of instances it
is best on; an instance nobody solves ties every candidate, so every candidate stays drawable. The gepa package also
prunes candidates whose every front holds another surviving candidate (`remove_dominated=True`). All functions are
pure; randomness comes from the caller.
"""

from __future__ import annotations

import numpy as np


def _check_scores(scores_cd: np.ndarray) -> np.ndarray:
  scores_cd = np.asarray(scores_cd, dtype=np.float64)
  if scores_cd.ndim != 2 or scores_cd.shape[0] == 0 or scores_cd.shape[1] == 0:
    raise ValueError(f"scores_cd must be a non-empty (candidates, dev instances) matrix, got shape {scores_cd.shape}")
  return scores_cd


def instance_fronts(scores_cd: np.ndarray) -> list[frozenset[int]]:
  """Per dev instance, the candidates tied at that instance's best score (an all-zero column ties everyone)."""
  scores_cd = _check_scores(scores_cd)
  best_d = scores_cd.max(axis=0)
  return [frozenset(np.flatnonzero(scores_cd[:, d] == best_d[d]).tolist()) for d in range(scores_cd.shape[1])]


def prune_dominated(scores_cd: np.ndarray, fronts: list[frozenset[int]]) -> set[int]:
  """Candidates left after dropping, one at a time, those whose every front holds another survivor (the gepa package).

  Visit order: mean dev score ascending, ties by candidate index ascending (a stable sort, as GEPA does), so of two
  identical candidates the newer one survives. One pass suffices: dropping a candidate only removes potential
  dominators, so a candidate kept earlier can never become droppable later.
  """
  scores_cd = _check_scores(scores_cd)
  on_front = sorted(set().union(*fronts))
  fronts_of = {c: [f for f in fronts if c in f] for c in on_front}
  survivors = set(on_front)
  visit_order = sorted(on_front, key=lambda c: scores_cd[c].mean())
  for c in visit_order:
    if all(any(other in survivors for other in front if other != c) for front in fronts_of[c]):
      survivors.discard(c)
  return survivors


def parent_weights(scores_cd: np.ndarray, *, remove_dominated: bool = False) -> dict[int, int]:
  """Candidate in the parent pool -> number of dev instances on whose front it is, keys ascending.

  The pool is every candidate on some front (the authors' code); with `remove_dominated`, only the survivors of
  `prune_dominated` (the gepa package).
  """
  fronts = instance_fronts(scores_cd)
  pool = prune_dominated(scores_cd, fronts) if remove_dominated else set().union(*fronts)
  return {c: sum(c in f for f in fronts) for c in sorted(pool)}


def sample_parents(scores_cd: np.ndarray, width: int, rng: np.random.Generator, *,
                   remove_dominated: bool = False) -> list[int]:
  """`width` distinct parents, or the whole pool (ascending) if it holds no more than `width` candidates.

  Draws are successive and without replacement, each proportional to the remaining candidates' front counts, like
  the authors' beam selection (it excludes already-selected parents before every weighted draw).
  """
  if width < 1:
    raise ValueError(f"width must be >= 1, got {width}")
  weights = parent_weights(scores_cd, remove_dominated=remove_dominated)
  if len(weights) <= width:
    return list(weights)
  pool = list(weights)
  counts = np.array([weights[c] for c in pool], dtype=np.float64)
  parents = []
  for _ in range(width):
    pick = int(rng.choice(len(pool), p=counts / counts.sum()))
    parents.append(pool.pop(pick))
    counts = np.delete(counts, pick)
  return parents
