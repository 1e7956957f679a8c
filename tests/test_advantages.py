"""Group advantages against hand-computed cases and an independent NumPy re-derivation."""

import math

import jax
import numpy as np
import pytest

from p2o_jax.rl import advantages as adv


def numpy_group_advantages(rewards, valid, group_size, normalize_std, eps=1e-6):
  """Loop-per-group reference in float64."""
  out = np.zeros(len(rewards))
  for start in range(0, len(rewards), group_size):
    idx = [i for i in range(start, start + group_size) if valid[i]]
    group = np.array([rewards[i] for i in idx], np.float64)
    if len(group) == 0 or np.all(group == group[0]):
      continue
    scale = (group.std(ddof=0) + eps) if normalize_std else 1.0
    out[idx] = (group - group.mean()) / scale
  return out


def test_one_success_of_four_by_hand():
  # mean 1/4, population std sqrt(3)/4: the winner gets sqrt(3), each loser -1/sqrt(3).
  got = np.asarray(adv.group_advantages(np.array([1.0, 0, 0, 0]), 4, eps=0.0))
  np.testing.assert_allclose(got, [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)], rtol=1e-6)
  got_eps = np.asarray(adv.group_advantages(np.array([1.0, 0, 0, 0]), 4))
  np.testing.assert_allclose(got_eps[0], 0.75 / (math.sqrt(3) / 4 + 1e-6), rtol=1e-6)


def test_dr_grpo_only_centers():
  got = np.asarray(adv.group_advantages(np.array([1.0, 0, 0, 0, 1, 1, 0, 1]), 4, normalize_std=False))
  np.testing.assert_allclose(got, [0.75, -0.25, -0.25, -0.25, 0.25, 0.25, -0.75, 0.25], rtol=1e-6)
  np.testing.assert_array_equal(adv.advantage_estimator("dr_grpo")(np.array([1.0, 0]), 2), [0.5, -0.5])


def test_all_equal_groups_are_exactly_zero():
  rewards = np.array([0.3, 0.3, 0.3, 1, 1, 1, 0, 0, 0, 0.7, 0.1, 0.7], np.float32)
  for normalize_std in (True, False):
    got = np.asarray(adv.group_advantages(rewards, 3, normalize_std=normalize_std))
    assert np.all(got[:9] == 0.0)
    assert np.all(got[9:] != 0.0)
  np.testing.assert_array_equal(adv.zero_variance_groups(rewards, 3), [True, True, True, False])


def test_padding_rows_get_zero_and_do_not_move_group_stats():
  rewards = np.array([1.0, 0.0, np.nan, 7.0, 1.0, 1.0, 0.0, 5.0])
  valid = np.array([1, 1, 0, 0, 1, 1, 1, 0], bool)
  got = np.asarray(adv.group_advantages(rewards, 4, valid_b=valid, eps=0.0))
  # Group 1 is {1, 0}: mean 1/2, std 1/2. Group 2 is {1, 1, 0}: mean 2/3, std sqrt(2)/3.
  s = math.sqrt(2) / 3
  np.testing.assert_allclose(got, [1, -1, 0, 0, (1 / 3) / s, (1 / 3) / s, -(2 / 3) / s, 0], rtol=1e-6)
  # One valid row left (or none): nothing to compare against, so the group is zero-variance.
  np.testing.assert_array_equal(
      adv.zero_variance_groups(np.array([1.0, 0, 0, 1]), 2, valid_b=np.array([1, 0, 0, 0], bool)), [True, True]
  )


@pytest.mark.parametrize("name", sorted(adv.ADVANTAGE_ESTIMATORS))
def test_random_groups_match_numpy_under_jit(name):
  rng = np.random.default_rng(0)
  group_size = 6
  rewards = rng.integers(0, 2, size=8 * group_size).astype(np.float32)
  rewards[:group_size] = 1.0  # make sure one all-correct group is in there
  valid = rng.random(rewards.shape) > 0.2
  estimator = adv.advantage_estimator(name)
  got = jax.jit(lambda r, v: estimator(r, group_size, valid_b=v))(rewards, valid)
  want = numpy_group_advantages(rewards, valid, group_size, normalize_std=(name == "grpo"))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_value_error():
  with pytest.raises(ValueError, match="multiple of group_size=4"):
    adv.group_advantages(np.zeros(6), 4)
  with pytest.raises(ValueError, match="group_size must be >= 1"):
    adv.zero_variance_groups(np.zeros(6), 0)
  with pytest.raises(ValueError, match="valid_b has 4 rows"):
    adv.group_advantages(np.zeros(6), 2, valid_b=np.ones(4, bool))
  with pytest.raises(ValueError, match=r"valid: \['dr_grpo', 'grpo'\]"):
    adv.advantage_estimator("ppo")
