"""Pareto-front parent selection: hand-computed fronts, the authors' pool (every candidate on some front, dominated
ones kept), the gepa package's pruning (the remove_dominated option), and exact sampling probabilities."""

import itertools

import numpy as np
import pytest

from p2o_jax.p2o.pareto import instance_fronts, parent_weights, prune_dominated, sample_parents

# Means: c0 .2, c1 .4, c2 .2, c3 .6. Fronts: i0 {0,1}, i1 {1,3}, i2 {2,3}, i3 (all zero) {0,1,2,3}, i4 {3}.
# Pruning (the gepa package, remove_dominated=True) visits 0, 2, 1, 3: c0 is only ever on fronts shared with c1 ->
# pruned; c2 likewise with c3 -> pruned; then c1 is alone on i0 and c3 alone on i4 -> both kept. The authors' pool
# keeps all four, weighted by their front counts 2, 3, 2, 4.
SCORES = np.array([
    [1, 0, 0, 0, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 1, 1, 0, 1],
], dtype=float)


def test_instance_fronts_hand_computed():
  assert instance_fronts(SCORES) == [{0, 1}, {1, 3}, {2, 3}, {0, 1, 2, 3}, {3}]


def test_prune_removes_candidates_only_on_shared_fronts():
  assert prune_dominated(SCORES, instance_fronts(SCORES)) == {1, 3}


def test_prune_identical_candidates_keeps_the_newer():
  scores = np.array([[1, 0], [1, 0], [0, 1]], dtype=float)
  assert prune_dominated(scores, instance_fronts(scores)) == {1, 2}


def test_prune_equal_means_visits_lower_index_first():
  # All means 2/3; fronts i0 {0,1}, i1 {1,2}, i2 {0,2}. Visiting 0 first prunes it and protects 1 and 2;
  # descending order would have pruned 2 instead.
  scores = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=float)
  assert prune_dominated(scores, instance_fronts(scores)) == {1, 2}


def test_prune_invariants_on_random_matrices():
  # Independent characterisation: every front keeps a survivor, and every survivor is the only survivor on some front.
  rng = np.random.default_rng(0)
  for _ in range(200):
    scores = rng.integers(0, 2, size=(rng.integers(1, 7), rng.integers(1, 9))).astype(float)
    fronts = instance_fronts(scores)
    survivors = prune_dominated(scores, fronts)
    assert all(front & survivors for front in fronts)
    assert all(any(front & survivors == {c} for front in fronts) for c in survivors)


def test_parent_pool_keeps_dominated_candidates_by_default():
  # c0 is dominated by c1 (c1 solves everything c0 does, and more), yet both are on the front of i0 and i3.
  assert parent_weights(SCORES) == {0: 2, 1: 3, 2: 2, 3: 4}
  assert parent_weights(SCORES, remove_dominated=True) == {1: 3, 3: 4}
  assert parent_weights(np.zeros((1, 4))) == {0: 4}
  # An instance nobody solves ties every candidate, so even a candidate that is never best elsewhere is drawable.
  strictly_worse = np.array([[1, 1, 0], [0, 1, 0]], dtype=float)
  assert parent_weights(strictly_worse) == {0: 3, 1: 2}
  assert parent_weights(strictly_worse, remove_dominated=True) == {0: 3}
  assert parent_weights(np.array([[1, 1], [0, 1]], dtype=float)) == {0: 2, 1: 1}  # no all-zero instance


def test_sample_parents_returns_the_whole_pool_when_width_suffices():
  assert sample_parents(SCORES, 4, np.random.default_rng(0)) == [0, 1, 2, 3]
  assert sample_parents(SCORES, 16, np.random.default_rng(0)) == [0, 1, 2, 3]
  assert sample_parents(SCORES, 2, np.random.default_rng(0), remove_dominated=True) == [1, 3]
  assert sorted(sample_parents(SCORES, 3, np.random.default_rng(0))) != [1, 3]


@pytest.mark.parametrize("remove_dominated,expected", [(False, {0: 2 / 11, 1: 3 / 11, 2: 2 / 11, 3: 4 / 11}),
                                                       (True, {1: 3 / 7, 3: 4 / 7})])
def test_single_parent_probabilities_follow_front_counts(remove_dominated, expected):
  rng = np.random.default_rng(123)
  n = 5_000
  draws = np.array([sample_parents(SCORES, 1, rng, remove_dominated=remove_dominated)[0] for _ in range(n)])
  assert set(draws.tolist()) == set(expected)
  for candidate, p in expected.items():
    assert abs(np.mean(draws == candidate) - p) < 4 * np.sqrt(p * (1 - p) / n)


def _inclusion_probabilities(weights: dict[int, int], width: int) -> dict[int, float]:
  """Exact P(candidate among the parents) for successive weighted draws without replacement, by enumeration."""
  inclusion = dict.fromkeys(weights, 0.0)
  for ordered in itertools.permutations(weights, width):
    p, remaining = 1.0, sum(weights.values())
    for c in ordered:
      p *= weights[c] / remaining
      remaining -= weights[c]
    for c in ordered:
      inclusion[c] += p
  return inclusion


def test_beam_draws_are_distinct_and_match_exact_inclusion_probabilities():
  scores = np.array([[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=float)
  weights = parent_weights(scores)
  assert weights == {0: 1, 1: 2, 2: 3}
  exact = _inclusion_probabilities(weights, 2)
  # Hand check of one entry: P(c0) = 1/6 + (2/6)(1/4) + (3/6)(1/3) = 5/12.
  assert exact[0] == pytest.approx(5 / 12)
  rng = np.random.default_rng(7)
  n = 5_000
  beams = [sample_parents(scores, 2, rng) for _ in range(n)]
  assert all(len(set(beam)) == 2 for beam in beams)
  first = np.array([beam[0] for beam in beams])
  for c in weights:
    p_first = weights[c] / 6
    assert abs(np.mean(first == c) - p_first) < 4 * np.sqrt(p_first * (1 - p_first) / n)
    p_in = np.mean([c in beam for beam in beams])
    assert abs(p_in - exact[c]) < 4 * np.sqrt(exact[c] * (1 - exact[c]) / n)


def test_bad_input_is_rejected():
  with pytest.raises(ValueError, match="width"):
    sample_parents(SCORES, 0, np.random.default_rng(0))
  with pytest.raises(ValueError, match="scores_cd"):
    instance_fronts(np.zeros((0, 3)))
