"""Greedy set cover and per-query template assignment: hand-computed covers and exact/empirical draw distributions."""

import numpy as np
import pytest

from p2o_jax.p2o.assignment import (MIN_TEMPLATE_WEIGHT, assign_templates, greedy_set_cover, solved_sets,
                                    template_distribution)

# 4 candidates (0 = empty template) x 5 dev instances; means .4, .4, .2, 0. Cover: c0 and c1 both add 2 new instances
# at mean .4 -> c0 (lower index); then c1 and c2 both add 1 -> c1 (higher mean); then c2. Instance 4 stays unsolved.
SCORES = np.array([
    [1, 0, 0, 1, 0],
    [1, 1, 0, 0, 0],
    [0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0],
], dtype=float)
DEV_IDS = ["d0", "d1", "d2", "d3", "d4"]
QUERY_IDS = DEV_IDS + ["t0"]


def test_set_cover_hand_computed():
  solved = [frozenset({0, 1}), frozenset({2, 3}), frozenset({1, 2}), frozenset()]
  assert greedy_set_cover(solved, [0.4, 0.5, 0.4, 0.0]) == [1, 0]
  assert greedy_set_cover([frozenset({0, 1, 2}), frozenset({1, 2})], [0.6, 0.4]) == [0]


def test_set_cover_ties_prefer_higher_mean_then_lower_index():
  assert greedy_set_cover([frozenset({0}), frozenset({1})], [0.2, 0.7]) == [1, 0]
  assert greedy_set_cover([frozenset({0}), frozenset({1})], [0.5, 0.5]) == [0, 1]
  solved = solved_sets(SCORES)
  assert solved == [{0, 3}, {0, 1}, {2}, set()]
  assert greedy_set_cover(solved, SCORES.mean(axis=1)) == [0, 1, 2]


def test_set_cover_never_picks_a_candidate_that_solves_nothing():
  assert greedy_set_cover([frozenset(), frozenset()], [0.0, 0.0]) == []


def test_template_distribution_restricts_dev_queries_to_their_solvers():
  solved, means = solved_sets(SCORES), SCORES.mean(axis=1)
  cover = [0, 1, 2]
  expected = {0: ([0, 1], [0.5, 0.5]), 1: ([1], [1.0]), 2: ([2], [1.0]), 3: ([0], [1.0]),
              4: ([0, 1, 2], [0.4, 0.4, 0.2]), None: ([0, 1, 2], [0.4, 0.4, 0.2])}
  for dev_instance, (pool, probs) in expected.items():
    got_pool, got_probs = template_distribution(cover, solved, means, dev_instance)
    assert got_pool == pool
    np.testing.assert_allclose(got_probs, probs, rtol=1e-12)


def test_non_positive_weights_are_floored():
  scores = np.array([[1, -1, -1, -1], [-1, 1, 1, 0]], dtype=float)  # means -0.5 and 0.25
  solved, means = solved_sets(scores), scores.mean(axis=1)
  cover = greedy_set_cover(solved, means)
  assert cover == [1, 0]
  pool, probs = template_distribution(cover, solved, means, None)
  assert pool == [1, 0]
  np.testing.assert_allclose(probs, np.array([0.25, MIN_TEMPLATE_WEIGHT]) / (0.25 + MIN_TEMPLATE_WEIGHT), rtol=1e-12)


def _within_4_sigma(draws: np.ndarray, value: int, p: float) -> bool:
  return abs(np.mean(draws == value) - p) < 4 * np.sqrt(p * (1 - p) / draws.size) + 1e-12


def test_assignment_draws_follow_the_weights():
  k = 6_000
  assignment = assign_templates(QUERY_IDS, DEV_IDS, SCORES, k, np.random.default_rng(0))
  assert set(assignment) == set(QUERY_IDS) and all(len(v) == k for v in assignment.values())
  assert set(assignment["d1"]) == {1} and set(assignment["d2"]) == {2} and set(assignment["d3"]) == {0}
  d0 = np.array(assignment["d0"])
  assert set(d0.tolist()) == {0, 1} and _within_4_sigma(d0, 0, 0.5)
  for query in ("d4", "t0"):
    draws = np.array(assignment[query])
    assert set(draws.tolist()) == {0, 1, 2}
    assert all(_within_4_sigma(draws, c, p) for c, p in ((0, 0.4), (1, 0.4), (2, 0.2)))


def test_same_template_in_group_repeats_one_draw():
  train_ids = [f"t{i}" for i in range(3_000)]
  assignment = assign_templates(DEV_IDS + train_ids, DEV_IDS, SCORES, 6, np.random.default_rng(1),
                                same_template_in_group=True)
  assert all(len(v) == 6 and len(set(v)) == 1 for v in assignment.values())
  assert assignment["d1"] == [1] * 6 and assignment["d2"] == [2] * 6
  firsts = np.array([assignment[q][0] for q in train_ids])
  assert all(_within_4_sigma(firsts, c, p) for c, p in ((0, 0.4), (1, 0.4), (2, 0.2)))


def test_assignment_is_deterministic_given_the_rng():
  first = assign_templates(QUERY_IDS, DEV_IDS, SCORES, 6, np.random.default_rng(5))
  again = assign_templates(QUERY_IDS, DEV_IDS, SCORES, 6, np.random.default_rng(5))
  other = assign_templates(QUERY_IDS, DEV_IDS, SCORES, 6, np.random.default_rng(6))
  assert first == again and first != other


def test_nothing_covered_means_no_templates():
  assert assign_templates(QUERY_IDS, DEV_IDS, np.zeros((3, 5)), 6, np.random.default_rng(0)) == {}


def test_bad_input_is_rejected():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="k must be"):
    assign_templates(QUERY_IDS, DEV_IDS, SCORES, 0, rng)
  with pytest.raises(ValueError, match="dev query ids"):
    assign_templates(QUERY_IDS, DEV_IDS[:4], SCORES, 6, rng)
  with pytest.raises(ValueError, match="repeat"):
    assign_templates(QUERY_IDS + ["t0"], DEV_IDS, SCORES, 6, rng)
