"""The P^2O authors' switches (their verl fork's trainer.gepa keys, same defaults), each pinned by its effect, and their
per-step template-ratio log. No model: rollouts are built by hand, so every number below is derived here."""

import types

import numpy as np
import pytest

from p2o_jax.config import base_config
from p2o_jax.data.records import Query
from p2o_jax.p2o import phase
from p2o_jax.p2o.hooks import P2OHooks
from p2o_jax.rl.losses import aggregate
from p2o_jax.rl.rollout import Rollouts

K, R = 4, 3
TEMPLATE = "Work digit by digit."
QUERIES = [Query("a", "1+1=", "2"), Query("b", "2+2=", "4")]


def hooks_with(**p2o):
  c = base_config()
  c.rollout.num_samples = K
  c.p2o.update(p2o)
  hooks = P2OHooks(c)
  hooks.assignment = {"b": [TEMPLATE] * K}  # query b was hard last epoch: all of its K rollouts are templated
  return hooks


def fake_rollouts(hooks, correct, plain_logp, templated_logp, lengths=(R,) * (2 * K)):
  """Rows of QUERIES as `hooks` lays them out; `plain_logp` are the train-context log-probs (the trainer's old_logp),
  `templated_logp` the sampler's (generation context)."""
  contexts = hooks.contexts(QUERIES, [q.question for q in QUERIES], K)
  mask = np.arange(R)[None, :] < np.asarray(lengths)[:, None]
  rows = len(contexts.generate)
  rollouts = Rollouts(group_size=K, answers=["2"] * K + ["4"] * K, texts=[""] * rows,
                      generate_prompt_ids=[[ord(ch) for ch in t] for t in contexts.generate],
                      train_prompt_ids=[[ord(ch) for ch in t] for t in contexts.train],
                      tokens=np.ones((rows, R), np.int32), mask=mask,
                      sampler_logp=np.asarray(templated_logp, np.float32),
                      rewards=np.asarray(correct, np.float32),
                      templated=None if contexts.templated is None else np.asarray(contexts.templated))
  packed = {"response_mask": mask.copy()}
  return rollouts, packed, np.asarray(plain_logp, np.float32)


def test_defaults_are_the_authors():
  """ray_trainer_gepa_wo_additional_grpo_in_distribution.py `_init_gepa_cfg` (the shipped scripts' trainer), with
  the scripts' add_near_hard=True and the ratio mask they enable ([1 - 0.99, 1 + 9], soft_clip=false)."""
  p = base_config().p2o
  assert (p.same_template_in_sample, p.left_1_no_template_rollout, p.drop_failed_template_rollout) == (False,) * 3
  assert (p.hard_max_correct, p.hard_min_count) == (1, 100)
  assert (p.ratio_mask, p.ratio_low, p.ratio_high) == ("hard", 0.01, 10.0)
  assert "same_template_in_group" not in p  # one name, theirs


@pytest.mark.parametrize("left_1", [False, True])
def test_left_1_no_template_rollout_keeps_the_last_rollout_plain(left_1):
  hooks = hooks_with(left_1_no_template_rollout=left_1)
  contexts = hooks.contexts(QUERIES, [q.question for q in QUERIES], K)
  templated_b = [TEMPLATE + "\n\n" + QUERIES[1].question] * K
  if left_1:
    templated_b[-1] = QUERIES[1].question
  assert contexts.generate == [QUERIES[0].question] * K + templated_b  # an unassigned query stays plain throughout
  assert contexts.train == [q.question for q in QUERIES for _ in range(K)]
  assert contexts.templated == [False] * K + [True] * (K - 1) + [not left_1]


@pytest.mark.parametrize("drop", [False, True])
def test_drop_failed_template_rollout_takes_failed_templated_rows_out_of_the_loss(drop):
  hooks = hooks_with(drop_failed_template_rollout=drop, ratio_mask="off")
  correct = [0, 1, 0, 1] + [0, 1, 0, 1]  # rows 4 and 6 are templated and failed
  logp = np.full((2 * K, R), -1.0)
  rollouts, packed, old = fake_rollouts(hooks, correct, logp, logp, lengths=(3, 3, 3, 3, 1, 2, 3, 3))
  before = packed["response_mask"].copy()
  _, weights, metrics = hooks.train_inputs(rollouts, packed, old)
  dropped = np.zeros(2 * K, bool)
  if drop:
    dropped[[4, 6]] = True
    assert metrics["p2o/dropped_failed_templated_rows"] == 2.0
  else:
    assert "p2o/dropped_failed_templated_rows" not in metrics
  np.testing.assert_array_equal(packed["response_mask"], before & ~dropped[:, None])
  np.testing.assert_array_equal(weights, 1.0)
  # As in the authors' code (response_mask cleared), the dropped tokens leave the token-mean's denominator too.
  _, denominator = aggregate(np.zeros(before.shape, np.float32), packed["response_mask"], "token-mean")
  assert float(denominator) == before.sum() - (1 + 3 if drop else 0)


def test_same_template_in_sample_gives_one_template_per_query():
  """phase._assign draws the K templates of each hard query; with the switch all K are one draw."""
  hard_ids = [f"q{i}" for i in range(6)]
  # Three candidates (0 = empty) on a dev set of the first three queries; 1 and 2 solve different instances.
  state = types.SimpleNamespace(dev_idx=(0, 1, 2), candidates=("", "T1", "T2"),
                                scores_cd=np.array([[0, 0, 0], [1, 0, 1], [0, 1, 1]], np.float64))
  for same in (False, True):
    c = base_config()
    c.rollout.num_samples, c.p2o.same_template_in_sample = K, same
    assignment = phase._assign(c, state, hard_ids, epoch=0)  # pylint: disable=protected-access
    assert set(assignment) == set(hard_ids) and all(len(t) == K for t in assignment.values())
    distinct = [len(set(t)) for t in assignment.values()]
    if same:
      assert distinct == [1] * len(hard_ids)
    else:
      assert max(distinct) > 1


@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_template_ratio_log_and_the_ratio_mask_modes(mode):
  """rho = pi(y|x) / pi(y|x~) per templated token: the authors' soft_clip rescales by bound / rho, the hard mask
  zeroes; either way the masked fraction counts the tokens whose weight is not 1, low/high count rho's side."""
  hooks = hooks_with(ratio_mask=mode)
  plain = np.zeros((2 * K, R))
  log_rho = np.log([[0.005, 1.0, 2.0], [20.0, 1.0, 0.5], [10.0, 0.01, 3.0], [1.0, 1.0, 40.0]])
  plain[K:] = log_rho
  rollouts, packed, old = fake_rollouts(hooks, [0] * (2 * K), plain, np.zeros((2 * K, R)),
                                        lengths=(3,) * K + (3, 3, 3, 2))  # row 7's last token (rho 40) is padding
  _, weights, metrics = hooks.train_inputs(rollouts, packed, old)
  np.testing.assert_array_equal(weights[:K], 1.0)  # plain rows are never weighted
  rho = np.exp(log_rho)
  if mode == "hard":  # rho exactly at a bound (10, 0.01) is inside
    want = [[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 0]]
  else:  # 0.01 / 0.005, 10 / 20, 10 / 40
    want = [[2, 1, 1], [0.5, 1, 1], [1, 1, 1], [1, 1, 0.25]]
  np.testing.assert_allclose(weights[K:], want, rtol=1e-5)
  valid = rho[packed["response_mask"][K:]]
  assert valid.size == 11
  expected = {"max": valid.max(), "min": valid.min(), "mean": valid.mean(), "std": valid.std(ddof=1),
              "low_fraction": 1 / 11, "high_fraction": 1 / 11}
  for name, value in expected.items():
    assert metrics[f"p2o/template_ratio/{name}"] == pytest.approx(value, rel=1e-5), name
  assert metrics["p2o/ratio_masked_token_fraction"] == pytest.approx(2 / 11)


def test_no_templated_rows_no_ratio_log():
  hooks = hooks_with()
  hooks.assignment = {}
  logp = np.zeros((2 * K, R))
  rollouts, packed, old = fake_rollouts(hooks, [0] * (2 * K), logp, logp)
  assert not any(k.startswith("p2o/template_ratio") for k in hooks.train_inputs(rollouts, packed, old)[2])


def test_templated_row_counts_per_step():
  hooks = hooks_with(left_1_no_template_rollout=True)
  logp = np.zeros((2 * K, R))
  rollouts, _, _ = fake_rollouts(hooks, [0] * (2 * K), logp, logp)
  metrics = hooks.observe(QUERIES, rollouts)
  assert (metrics["p2o/templated_rows"], metrics["p2o/templated_queries"]) == (K - 1, 1)


@pytest.mark.parametrize("max_correct,hard", [(1, ["a", "b"]), (0, ["a"])])
def test_hard_max_correct(max_correct, hard):
  """The authors' add_near_hard=True is hard_max_correct=1 ("all wrong, or exactly one right"); False is 0."""
  hooks = hooks_with(hard_max_correct=max_correct)
  hooks.assignment = {}
  queries = QUERIES + [Query("c", "3+3=", "6")]
  correct = [0, 0, 0, 0] + [0, 1, 0, 0] + [1, 1, 0, 0]
  logp = np.zeros((3 * K, R))
  rollouts = Rollouts(group_size=K, answers=[""] * 3 * K, texts=[""] * 3 * K, generate_prompt_ids=[[1]] * 3 * K,
                      train_prompt_ids=[[1]] * 3 * K, tokens=np.ones((3 * K, R), np.int32),
                      mask=np.ones((3 * K, R), bool), sampler_logp=logp, rewards=np.asarray(correct, np.float32))
  hooks.observe(queries, rollouts)
  assert hooks.tracker.ids == hard


@pytest.mark.parametrize("count,skipped", [(99, True), (100, False)])
def test_hard_min_count(count, skipped):
  """Fewer hard queries than hard_min_count (the authors' hard_set_min_count, 100): no GEPA, no templates."""
  hooks = hooks_with()
  hooks.tracker.restore([f"q{i}" for i in range(count)])
  metrics = hooks.end_epoch(0, last=False)
  assert metrics["p2o/epoch_hard_set_size"] == count
  assert metrics.get("p2o/gepa_skipped") == (1.0 if skipped else None)
  assert hooks.pending_phase() is not skipped and hooks.assignment == {}
