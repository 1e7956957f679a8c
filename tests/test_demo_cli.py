"""The README's first command, reduced to a few steps: the real CLI runs P^2O on the built-in task end to end and writes
the report, the templates GEPA found, metrics and the exported policy. The base policy here is a random tiny one
(builtin.sft_steps=0): this test is about the pipeline, not the base's skill."""

import json
import os
import subprocess
import sys

from conftest import DEMO_CONFIG, REPO

REDUCED = {
    "data.builtin_train_size": 32, "train.batch_size": 8, "train.epochs": 2, "rollout.num_samples": 4,
    "grpo.micro_batch_size": 16, "p2o.hard_min_count": 4, "p2o.gepa.dev_size": 6, "p2o.gepa.minibatch_size": 2,
    "p2o.gepa.max_metric_calls": 24, "eval.builtin_easy": 8, "eval.builtin_hard": 8, "eval.small_set_samples": 2,
    "eval.every_steps": 0, "builtin.sft_steps": 0, "builtin.num_layers": 1, "builtin.hidden_size": 32,
}


def test_reduced_demo_runs_through_the_cli_and_writes_the_report(tmp_path):
  workdir = tmp_path / "demo"
  args = [f"--config.{k}={v}" for k, v in {**REDUCED, "model.builtin_cache_dir": tmp_path / "cache"}.items()]
  result = subprocess.run([sys.executable, "-m", "p2o_jax.main", "--config", str(DEMO_CONFIG), "--workdir",
                           str(workdir), *args], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-3000:]
  assert "on mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in result.stderr  # distributed.cpu_devices = 2
  report = (workdir / "report.md").read_text()
  assert "| builtin_hard |" in report and "| builtin_easy |" in report
  assert "## Templates GEPA found" in report and "Wall time" in report
  history = json.loads((workdir / "history.json").read_text())
  assert set(history["base_with_best_template"]) == {"builtin_easy", "builtin_hard"}
  assert (workdir / "templates" / "epoch_000.md").is_file()
  assert (workdir / "export" / "final" / "config.json").is_file()
  assert report in result.stderr  # the report is also printed on the terminal
