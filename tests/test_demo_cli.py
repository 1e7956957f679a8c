"""The README's first command, shortened by .ci/demo_smoke.args (the same overrides CI's fresh-install check uses):
the real CLI runs P^2O on the built-in task from the shipped base end to end and writes the report, the templates GEPA
found, metrics and the exported policy, and its last lines say where the report is and what it shows."""

import json
import os
import subprocess
import sys

import pytest

from conftest import DEMO_CONFIG, REPO

SMOKE_ARGS = (REPO / ".ci" / "demo_smoke.args").read_text().splitlines()  # one argument per line, as mapfile reads it


def run_demo(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "p2o_jax.main", "--config", str(DEMO_CONFIG), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_shortened_demo_runs_every_phase_through_the_cli_and_ends_with_the_report(tmp_path):
  workdir = tmp_path / "demo"
  result = run_demo("--workdir", str(workdir), *SMOKE_ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "on mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in result.stderr  # distributed.cpu_devices = 2
  assert "the one shipped with the package" in result.stderr and "building the built-in base" not in result.stderr
  metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(m.get("p2o/assigned_groups", 0) > 0 for m in metrics)  # the second epoch rolled out with templates
  report = (workdir / "report.md").read_text()
  assert "| builtin_hard |" in report and "| builtin_easy |" in report
  assert "## Templates GEPA found" in report and "Wall time" in report
  history = json.loads((workdir / "history.json").read_text())
  assert set(history["base_with_best_template"]) == {"builtin_easy", "builtin_hard"}
  assert (workdir / "templates" / "epoch_000.md").is_file()
  assert (workdir / "export" / "final" / "config.json").is_file()
  assert report in result.stderr  # the report is also printed on the terminal
  last = result.stdout.strip().splitlines()[-2:]
  assert last[0] == f"Report: {workdir / 'report.md'}"
  assert last[1].startswith("Plain-prompt accuracy, starting -> trained policy: builtin_hard ")


@pytest.mark.slow
def test_a_broken_run_directory_fails_in_seconds_before_any_base_build(tmp_path):
  """A config whose base is neither shipped nor cached would start a long SFT build; the unwritable workdir must be
  reported first, in one line."""
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = run_demo("--workdir", str(blocker / "run"), "--config.builtin.sft_steps=7",
                    f"--config.model.builtin_cache_dir={tmp_path / 'cache'}", timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1].startswith(f"error: config.workdir {blocker / 'run'} is not writable")
  assert "building the built-in base" not in result.stderr and not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_rebuild_base_builds_an_announced_base_into_the_cache_and_trains_from_it(tmp_path):
  cache = tmp_path / "cache"
  tiny_base = ["--config.builtin.sft_steps=3", "--config.builtin.num_layers=1", "--config.builtin.hidden_size=32",
               "--config.builtin.sft_examples=64", f"--config.model.builtin_cache_dir={cache}"]
  result = run_demo("--workdir", str(tmp_path / "run"), "--rebuild_base", *tiny_base, *SMOKE_ARGS,
                    "--config.train.epochs=1", "--config.p2o.enabled=False")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "building the built-in base policy (--rebuild_base): SFT, 3 steps, about" in result.stderr
  built = list(cache.glob("base-*/config.json"))
  assert len(built) == 1 and f"policy {built[0].parent} (qwen2" in result.stderr
