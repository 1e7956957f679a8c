"""The end-of-run report and the method-comparison summaries, on hand-written run directories."""

import json
import pathlib

import numpy as np
import pytest

from p2o_jax import comparison, report
from p2o_jax.run_dir import METRICS_FILENAME, RunDir


def _write_run(run_dir: pathlib.Path, hard_by_step: dict[int, float], easy_by_step: dict[int, float],
               extra: list[dict] = ()) -> pathlib.Path:
  run_dir.mkdir(parents=True, exist_ok=True)
  records = [{"step": s, "eval/builtin_hard/accuracy": h, "eval/builtin_easy/accuracy": easy_by_step[s]}
             for s, h in hard_by_step.items()]
  (run_dir / METRICS_FILENAME).write_text("".join(json.dumps(r) + "\n" for r in [*records, *extra]))
  return run_dir


def _write_gepa_state(workdir: pathlib.Path, candidates: list[str], scores_cd: list[list[float]]) -> None:
  path = RunDir(workdir).gepa_progress
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"state": {"candidates": candidates, "scores_cd": scores_cd}}))


def test_ranked_templates_orders_by_mean_dev_score(tmp_path):
  _write_gepa_state(tmp_path, ["", "Add them.", "Add the numbers one at a time."], [[0, 0], [1, 0], [1, 1]])
  assert report.ranked_templates(RunDir(tmp_path)) == [("Add the numbers one at a time.", 1.0), ("Add them.", 0.5),
                                                        ("", 0.0)]
  assert report.ranked_templates(RunDir(tmp_path / "no_gepa_here")) == []


def test_report_shows_accuracies_efficiency_templates_and_gepa_time_share(tmp_path):
  _write_run(tmp_path, {0: 0.0}, {0: 0.9}, extra=[{"step": 4, "p2o/gepa_seconds": 30.0},
                                                   {"step": 8, "p2o/gepa_seconds": 10.0}])
  _write_gepa_state(tmp_path, ["", "Add the numbers one at a time."], [[0, 0], [1, 0]])
  history = {"eval_at_start": {"eval/builtin_hard/accuracy": 0.0, "eval/builtin_easy/accuracy": 0.9,
                               "eval/mean_accuracy": 0.45},
             "eval_at_end": {"eval/builtin_hard/accuracy": 0.6, "eval/builtin_easy/accuracy": 0.95},
             "final_export": str(tmp_path / "export" / "final")}
  text = report.render_report(RunDir(tmp_path), history, wall_seconds=400.0, with_template={"builtin_hard": 0.75})
  assert "| builtin_hard | 0.0% | 60.0% | 75.0% |" in text
  assert "| builtin_easy | 90.0% | 95.0% | - |" in text
  assert "builtin_hard 0.80" in text  # 0.6 / 0.75
  assert "1. (0.50) Add the numbers one at a time." in text and "2. (0.00) (empty template)" in text
  assert "GEPA 40 s (10.0%)" in text
  assert "mean" not in text.split("## Templates")[0].split("|")[-1]  # eval/mean_accuracy is not a set row
  assert report.closing_lines(RunDir(tmp_path), history) == [
      f"Report: {tmp_path / 'report.md'}",
      "Plain-prompt accuracy, starting -> trained policy: builtin_hard 0.0% -> 60.0%; builtin_easy 90.0% -> 95.0%"]


def test_every_search_best_is_read_in_epoch_order_and_the_reference_is_the_best_per_set(tmp_path):
  path = RunDir(tmp_path).search_bests
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({"10": {"template": "Keep a running total.", "dev": 0.25},
                              "2": {"template": "Add the numbers and write every running total.", "dev": 0.41}}))
  bests = report.search_bests(RunDir(tmp_path))
  assert [(b["epoch"], b["dev"]) for b in bests] == [(2, 0.41), (10, 0.25)]  # numeric, not string, order
  assert report.search_bests(RunDir(tmp_path / "no_gepa_here")) == []
  results = [{**bests[0], "accuracy": {"builtin_hard": 0.6, "builtin_easy": 0.9}},
             {**bests[1], "accuracy": {"builtin_hard": 0.2, "builtin_easy": 0.95}}]
  assert report.best_with_template(results) == {"builtin_hard": 0.6, "builtin_easy": 0.95}
  _write_gepa_state(tmp_path, ["", "Keep a running total."], [[0, 0], [1, 0]])
  text = report.render_report(RunDir(tmp_path), {"base_with_search_bests": results}, wall_seconds=1.0)
  assert ("- after epoch 2 (0.41): Add the numbers and write every running total. — builtin_easy 90.0%, "
          "builtin_hard 60.0%") in text
  assert "- after epoch 10 (0.25): Keep a running total." in text and "1. (0.50) Keep a running total." in text


def test_distillation_efficiency_skips_sets_without_a_templated_score():
  assert report.distillation_efficiency({"a": 0.5, "b": 0.2}, {"a": 0.625, "b": 0.0}) == {"a": 0.8}


def test_seed_curves_align_on_common_steps_and_table_shows_mean_and_std(tmp_path):
  runs = {"grpo": [_write_run(tmp_path / "grpo" / "0", {0: 0.0, 10: 0.1, 20: 0.2}, {0: .9, 10: .9, 20: .9}),
                   _write_run(tmp_path / "grpo" / "1", {0: 0.0, 10: 0.3}, {0: .9, 10: .8})],
          "p2o": [_write_run(tmp_path / "p2o" / "0", {0: 0.0, 10: 0.5}, {0: .9, 10: .9}),
                  _write_run(tmp_path / "p2o" / "1", {0: 0.0, 10: 0.7}, {0: .9, 10: 1.0})]}
  steps, acc = comparison.seed_curves(runs["grpo"], "builtin_hard")
  np.testing.assert_array_equal(steps, [0, 10])
  np.testing.assert_allclose(acc, [[0.0, 0.1], [0.0, 0.3]])
  histories = {"p2o": [{"eval_at_end": {"eval/builtin_hard/accuracy": 0.5},
                        "base_with_best_template": {"builtin_hard": 0.625}},
                       {"eval_at_end": {"eval/builtin_hard/accuracy": 0.7},
                        "base_with_best_template": {"builtin_hard": 0.7}}]}
  table, plot = comparison.summarize(runs, tmp_path / "out", eval_set="builtin_hard",
                                     labels={"grpo": "GRPO (K)", "p2o": "P^2O"}, histories=histories)
  text = table.read_text()
  assert "| GRPO (K) | 85.0 ± 5.0 | 20.0 ± 10.0 | - |" in text  # easy: (.9 + .8) / 2; hard: (.1 + .3) / 2
  assert "| P^2O | 95.0 ± 5.0 | 60.0 ± 10.0 | builtin_hard 0.90 |" in text  # (0.8 + 1.0) / 2
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_a_run_without_eval_records_gives_dashes_not_a_crash(tmp_path):
  empty = tmp_path / "run"
  empty.mkdir()
  (empty / METRICS_FILENAME).write_text(json.dumps({"step": 1, "train/loss": 0.1}) + "\n")
  full = _write_run(tmp_path / "full", {0: 0.0, 5: 0.5}, {0: 1.0, 5: 1.0})
  text = comparison.render_table({"a": [empty], "b": [full]}, {})
  assert "| a | - | - | - |" in text
  assert "| b | 100.0 ± 0.0 | 50.0 ± 0.0 | - |" in text


@pytest.mark.parametrize("method", ["grpo", "grpo_2k", "p2o", "p2o_templated", "p2o_same_template"])
def test_compare_method_configs_differ_only_where_the_method_says(tmp_path, method):

  from p2o_jax.config import base_config
  base = base_config()
  c = comparison.method_config(base, method, seed=2, workdir=tmp_path)
  assert c.seed == 2 and c.workdir == str(tmp_path / method / "seed_2")
  assert c.rollout.num_samples == (2 * base.rollout.num_samples if method == "grpo_2k" else base.rollout.num_samples)
  assert c.p2o.enabled == method.startswith("p2o")
  assert c.p2o.distillation == ("templated" if method == "p2o_templated" else "plain")
  assert c.p2o.same_template_in_sample == (method == "p2o_same_template")
  assert c.train.to_dict() == base.train.to_dict() and c.optim.to_dict() == base.optim.to_dict()
