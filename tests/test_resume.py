"""Resume through the real CLI: a run SIGKILLed mid-training and restarted ends with exactly the params and metrics of
an uninterrupted run, and an interrupted save never hides the last complete checkpoint."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from p2o_jax.checkpoint import Checkpointer
from p2o_jax.models.builtin import build_builtin_checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  return build_builtin_checkpoint(tmp_path_factory.mktemp("policy") / "tiny", hidden_size=32, num_layers=1,
                                  num_heads=2, num_kv_heads=1, intermediate_size=64)


def command(policy_dir, workdir):
  overrides = {
      "model.checkpoint": policy_dir, "data.builtin_train_size": 64, "train.batch_size": 2, "train.max_steps": STEPS,
      "train.checkpoint_every": 1, "rollout.num_samples": 4, "rollout.max_new_tokens": 8, "rollout.temperature": 1.0,
      "grpo.micro_batch_size": 4, "eval.builtin_easy": 0, "eval.builtin_hard": 0, "eval.every_steps": 0,
      "optim.lr": 1e-2, "reward.num_workers": 1,
  }
  return ([sys.executable, "-m", "p2o_jax.main", "--config", str(ROOT / "configs" / "demo_cpu.py"),
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def run_to_end(cmd, cwd):
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=cwd)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def comparable_metrics(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in r.items() if k != "time" and not k.startswith("time/") and "tokens_per_s" not in k}
          for r in records]


def final_params(workdir):
  return load_file(str(workdir / "export" / "final" / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_params_and_metrics(policy_dir, tmp_path):
  straight = tmp_path / "straight"
  run_to_end(command(policy_dir, straight), tmp_path)

  resumed = tmp_path / "resumed"
  process = subprocess.Popen(command(policy_dir, resumed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             cwd=tmp_path)
  deadline = time.monotonic() + 600
  while not (resumed / "checkpoints" / "2").is_dir():  # the step-2 checkpoint is complete (renamed into place)
    assert process.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()
  killed_at = Checkpointer(resumed / "checkpoints").latest_step()
  assert killed_at is not None and 2 <= killed_at
  log = run_to_end(command(policy_dir, resumed), tmp_path)
  if killed_at < STEPS:
    assert f"restored checkpoint at step {killed_at}" in log

  a, b = final_params(straight), final_params(resumed)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert comparable_metrics(straight) == comparable_metrics(resumed)
  assert [r["step"] for r in comparable_metrics(resumed)] == list(range(1, STEPS + 1))


def test_interrupted_save_leaves_the_last_complete_checkpoint(tmp_path):
  ckpt = Checkpointer(tmp_path, async_save=False)
  state = {"params": {"w": np.arange(4.0)}, "opt_state": {"m": np.zeros(4)}}
  ckpt.save(1, state, {"step": 1})
  ckpt.save(2, {"params": {"w": np.arange(4.0) + 1}, "opt_state": {"m": np.ones(4)}}, {"step": 2})
  ckpt.close()
  # What a kill in the middle of writing step 3 leaves behind: orbax's temporary directory, never renamed.
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234567890"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(os.urandom(100))
  reopened = Checkpointer(tmp_path)
  assert reopened.latest_step() == 2
  import jax
  like = jax.tree.map(lambda x: jax.numpy.asarray(x), state)
  restored, meta = reopened.restore(2, like)
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.arange(4.0) + 1)
  assert meta == {"step": 2}
  reopened.close()


def test_relative_directory_is_accepted(tmp_path, monkeypatch):
  """The demo's default workdir is relative (runs/demo_cpu); orbax itself only takes absolute paths."""
  monkeypatch.chdir(tmp_path)
  ckpt = Checkpointer("runs/relative/checkpoints", async_save=False)
  ckpt.save(1, {"params": {"w": np.arange(3.0)}, "opt_state": {}}, {"step": 1})
  ckpt.close()
  assert (tmp_path / "runs" / "relative" / "checkpoints" / "1").is_dir()
  assert Checkpointer("runs/relative/checkpoints").latest_step() == 1
