"""Reward functions from the config and from Python: parsing, the TRL calling convention, the weighted sum, and
failures (a wrong shape is a one-line error at the first batch; a per-item failure is a counted, logged 0)."""

import numpy as np
import pytest

import reward_fns
from p2o_jax.config import base_config
from p2o_jax.data.records import Query
from p2o_jax.experiment import run_training
from p2o_jax.metrics import read_metrics
from p2o_jax.models.builtin import build_builtin_checkpoint
from p2o_jax.rewards.functions import GRADERS, RewardFunctionError, RewardScores, resolve, \
  score_item, weighted_total
from p2o_jax.rewards.pool import VerifierPool

FNS = "reward_fns"


def test_config_string_names_built_ins_and_import_paths_with_weights():
  functions = resolve(f"builtin_exact=1, boxed_format = 0.25, {FNS}:digits_only=-0.5, equivalence")
  assert [(f.name, f.weight, f.grader) for f in functions] == [
    ("builtin_exact", 1.0, True), ("boxed_format", 0.25, True), (f"{FNS}:digits_only", -0.5, False),
    ("equivalence", 1.0, True)]
  assert functions[0].target == GRADERS["builtin_exact"]


def test_python_list_takes_functions_and_weights():
  functions = resolve([reward_fns.digits_only, ("builtin_exact", 2.0), (reward_fns.echo_columns, 0.5)])
  assert [(f.name, f.weight) for f in functions] == [("digits_only", 1.0), ("builtin_exact", 2.0),
                                                     ("echo_columns", 0.5)]
  assert functions[0].load() is reward_fns.digits_only


@pytest.mark.parametrize("entries,message", [
  ("", "empty"),
  ("exact_match", "unknown reward function 'exact_match'"),
  ("math=high", "weight 'high' of 'math' is not a number"),
  ("math=inf", "not finite"),
  ("equivalence, equivalence=2", "'equivalence' is listed twice"),
  ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
  (f"{FNS}:missing", "has no function 'missing'"),
  ([lambda completions, **kw: [1.0]], "module-level function"),
  ([("math", 1.0, 2.0)], r"is not \(function, weight\)"),
])
def test_bad_entries_are_one_line_errors(entries, message):
  with pytest.raises(RewardFunctionError, match=message) as error:
    resolve(entries)
  assert "\n" not in str(error.value)


def loaded(spec):
  return [(f, f.load()) for f in resolve(spec)]


def test_a_trl_function_gets_prompts_completions_and_every_column_as_lists():
  values, errors = score_item(loaded(f"{FNS}:echo_columns"), "7", "Q: 7", {"answer": "7", "level": 3}, "none")
  assert (values, errors) == ([1.0], [""])
  values, _ = score_item(loaded(f"{FNS}:echo_columns"), "7", "Q: 7", {"answer": "8", "level": 3}, "none")
  assert values == [0.0]


def test_none_leaves_a_completion_out_and_failures_score_zero_with_a_reason():
  functions = loaded(f"builtin_exact, {FNS}:digits_only, {FNS}:raises_on_bad, {FNS}:two_values, {FNS}:a_string")
  values, errors = score_item(functions, "  ", "", {"answer": "7"}, "none")
  assert values[:3] == [0.0, None, 1.0] and errors[:3] == ["", "", ""]
  values, errors = score_item(functions, "BAD 7", "", {"answer": "7"}, "last_number")
  assert values[:3] == [1.0, 0.0, 0.0]
  assert errors[2] == "ZeroDivisionError"
  assert errors[3].startswith("shape: reward function 'reward_fns:two_values' returned list [1.0, 0.0] for 1")
  assert errors[4].startswith("shape: reward function 'reward_fns:a_string' returned str '1.0'; expected a float")


def test_weighted_total_sums_weight_times_value_and_skips_none():
  functions = resolve("builtin_exact=1, boxed_format=0.5, equivalence=-2")
  values = np.array([[1.0, 1.0, 0.0], [0.0, np.nan, 1.0], [np.nan, np.nan, np.nan]])
  expected = [1.0 * 1 + 0.5 * 1 + -2 * 0, 0.0 * 1 + -2 * 1, 0.0]  # by hand
  np.testing.assert_allclose(weighted_total(functions, values), expected)


def test_correctness_is_the_first_function():
  scores = RewardScores(np.array([1.1, 0.1], np.float32),
                        {"math": np.array([1.0, np.nan], np.float32), "fmt": np.array([1.0, 1.0], np.float32)})
  np.testing.assert_array_equal(scores.correctness, [1.0, 0.0])
  assert scores.function_means() == {"math": 1.0, "fmt": 1.0}


QUERY = Query("q1", "7", "7", {"answer": "7", "level": 3})


def test_the_pool_scores_with_every_function_and_reports_each():
  with VerifierPool(num_workers=2, timeout_s=5.0, fallback="last_number",
                    functions=resolve([("builtin_exact", 1.0), (reward_fns.digits_only, 0.5),
                                       (f"{FNS}:echo_columns", 0.25)])) as pool:
    scores = pool.scorer("Q: {question}")(["7", "it is 7", "8", ""], [QUERY] * 4)
  np.testing.assert_array_equal(scores.by_function["builtin_exact"], [1, 1, 0, 0])
  np.testing.assert_array_equal(scores.by_function["digits_only"], [1, 0, 1, np.nan])
  np.testing.assert_array_equal(scores.by_function[f"{FNS}:echo_columns"], [1, 0, 0, 0])
  np.testing.assert_allclose(scores.total, [1 + 0.5 + 0.25, 1, 0.5, 0])


def test_a_wrong_shape_in_the_first_batch_is_an_error_naming_the_function():
  with VerifierPool(num_workers=1, functions=f"builtin_exact, {FNS}:two_values") as pool:
    with pytest.raises(RewardFunctionError, match="reward_fns:two_values.*expected a list of 1 float"):
      pool.score(["7"], ["7"])


def test_later_failures_are_counted_logged_zeros_and_training_goes_on(caplog):
  with VerifierPool(num_workers=2, timeout_s=2.0, fallback="last_number",
                    functions=f"builtin_exact, {FNS}:string_on_bad, {FNS}:raises_on_bad, {FNS}:hangs_on_slow") as pool:
    first = pool.score_rows(["7"], [""], [{"answer": "7"}])
    np.testing.assert_array_equal(first.total, [4.0])
    later = pool.score_rows(["BAD 7", "SLOW 7", "7"], [""] * 3, [{"answer": "7"}] * 3)
    np.testing.assert_array_equal(later.by_function[f"{FNS}:string_on_bad"], [0, 0, 1])
    np.testing.assert_array_equal(later.by_function[f"{FNS}:raises_on_bad"], [0, 0, 1])
    # "BAD 7": exact 1 + two failures + 1; "SLOW 7" timed out as a whole item: 0.
    np.testing.assert_array_equal(later.total, [2.0, 0.0, 4.0])
    assert pool.stats["errors"] == 2 and pool.stats["timeouts"] == 1
  assert "reward function 'reward_fns:raises_on_bad' failed (ZeroDivisionError)" in caplog.text


@pytest.mark.slow
def test_a_grpo_run_from_the_config_trains_on_the_weighted_sum_and_logs_each_function(tmp_path):
  c = base_config()
  c.workdir = str(tmp_path)
  c.model.checkpoint = str(build_builtin_checkpoint(tmp_path / "policy", hidden_size=32, num_layers=1, num_heads=2,
                                                    num_kv_heads=1, intermediate_size=64))
  c.data.source, c.data.prompt_format, c.data.builtin_train_size = "builtin", "{question}", 8
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples, c.rollout.temperature = 64, 8, 4, 1.0
  c.train.batch_size, c.train.max_steps, c.train.checkpoint_every = 4, 2, 100
  c.grpo.micro_batch_size, c.reward.num_workers = 8, 1
  c.reward.functions = f"{FNS}:even_length=1, {FNS}:has_digit=0.5"
  run_training(c)
  records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "rollout/reward_mean" in r]
  assert len(records) == 2
  for r in records:  # the reward trained on is the weighted sum of the functions, per row, so also in the mean
    even, digit = r[f"reward/{FNS}:even_length_mean"], r[f"reward/{FNS}:has_digit_mean"]
    assert r["rollout/reward_mean"] == pytest.approx(even + 0.5 * digit, abs=1e-6)
    assert 0 < even < 1 or 0 < digit < 1  # random completions: the functions do vary
