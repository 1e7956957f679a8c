"""Multi-process training for real: two local processes (2 CPU devices each, gloo collectives, one coordinator) against
one process with 4 devices, on the same global batch and seed.

Each run is tests/multihost_worker.py in subprocesses (XLA_FLAGS must be set before JAX starts). The GRPO comparison
goes through the real experiment path (VerifierPool on single-digit answers, orbax checkpoints, lockstep evaluation, HF
export by process 0); the P^2O run checks that both processes end with the same hard set and template assignment, and
the same GEPA searches although process 1's verifier scores every response 0 (as if each item timed out).
"""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from p2o_jax import distributed
from p2o_jax.config import ConfigError, base_config, validate_distributed
from p2o_jax.metrics import read_metrics
from p2o_jax.models.builtin import build_builtin_checkpoint
from p2o_jax.models.hf_checkpoint import load_hf_model, save_hf_model
from p2o_jax.models.tokenizer import load_tokenizer
from p2o_jax.rewards.functions import RewardScores
from p2o_jax.rl.batch_layout import from_micro_batches, to_micro_batches

WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")
ROOT = WORKER.parents[1]
TIMEOUT_S = 240  # per run; a hung collective fails the test instead of the suite
EPOCHS = 3  # of the P^2O run (tests/multihost_worker.py)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Run:
  """The worker processes of one run, started at once; `results()` waits for them (killing all on a timeout)."""

  def __init__(self, tmp_path, name: str, mode: str, num_processes: int, devices_per_process: int, policy_dir,
               data_dir, **options):
    self.tmp_path, self.name, self.workdir = tmp_path, name, tmp_path / name
    # This file's CPU time is mostly XLA compiles: all runs share a persistent compilation cache (the P^2O run reuses
    # the GRPO run's programs: same shapes, same topology), and LLVM optimizes less (the same flags for every run).
    flags = f"--xla_force_host_platform_device_count={devices_per_process} --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    coordinator = f"127.0.0.1:{free_port()}"
    self.procs = []
    for pid in range(num_processes):
      spec = {"mode": mode, "policy_dir": str(policy_dir), "data_dir": str(data_dir), "workdir": str(self.workdir),
              "out": str(self._path(pid, "json")), "num_processes": num_processes, "process_id": pid,
              "coordinator": coordinator, **options}
      with open(self._path(pid, "log"), "w", encoding="utf-8") as log:
        self.procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env, cwd=tmp_path,
                                           stdout=log, stderr=subprocess.STDOUT))

  def _path(self, pid: int, suffix: str) -> pathlib.Path:
    return self.tmp_path / f"{self.name}_{pid}.{suffix}"

  def results(self) -> list[dict]:
    """Every process's result, by process index."""
    try:
      for proc in self.procs:
        proc.wait(timeout=TIMEOUT_S)
    finally:
      for proc in self.procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    for pid, proc in enumerate(self.procs):
      assert proc.returncode == 0, self._path(pid, "log").read_text()[-4000:]
    return [json.loads(self._path(pid, "json").read_text()) for pid in range(len(self.procs))]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Single-digit answers, so even a random tiny policy is sometimes right (the verifier's last-number fallback)."""
  path = tmp_path_factory.mktemp("data")
  pairs = [(1, 1), (0, 2), (2, 0), (5, 3), (1, 6), (4, 3), (3, 0), (2, 2)]
  with open(path / "train.jsonl", "w", encoding="utf-8") as f:
    for i, (a, b) in enumerate(pairs):
      f.write(json.dumps({"id": f"q{i}", "problem": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
  with open(path / "eval.jsonl", "w", encoding="utf-8") as f:
    for i, (p, a) in enumerate([("3+3=", "6"), ("1+2=", "3"), ("0+1=", "1"), ("2+5=", "7")]):
      f.write(json.dumps({"id": f"e{i}", "problem": p, "answer": a}) + "\n")
  return path


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  return build_builtin_checkpoint(tmp_path_factory.mktemp("policy") / "tiny", hidden_size=32, num_layers=1,
                                  num_heads=2, num_kv_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def scaled_policy_dir(policy_dir):
  """Weights x 25, so greedy outputs depend on the whole prompt and GEPA's templates change them (test_p2o_e2e.py)."""
  model = load_hf_model(policy_dir)
  nnx.update(model, jax.tree.map(lambda x: x * 25.0, nnx.state(model, nnx.Param)))
  return save_hf_model(model, policy_dir.parent / "scaled", tokenizer=load_tokenizer(policy_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, policy_dir, scaled_policy_dir, data_dir):
  """The same GRPO run on two processes x 2 devices and on one process x 4 devices, and a two-process P^2O run whose
  process 1 has a verifier that disagrees with process 0's."""
  tmp = tmp_path_factory.mktemp("runs")
  two = Run(tmp, "grpo_two", "grpo", 2, 2, policy_dir, data_dir)
  one = Run(tmp, "grpo_one", "grpo", 1, 4, policy_dir, data_dir)  # alongside: 2 cores, and a run waits in collectives
  two_results = two.results()
  # After grpo_two: reuses its compiled programs.
  p2o = Run(tmp, "p2o_two", "p2o", 2, 2, scaled_policy_dir, data_dir, disagree=True)
  return {"two": two_results, "two_dir": two.workdir, "one": one.results(), "one_dir": one.workdir,
          "p2o": p2o.results()}


def test_each_process_rolls_out_only_its_half_of_every_global_batch(runs):
  (one,), (first, second) = runs["one"], runs["two"]
  assert [r["process_count"] for r in (one, first, second)] == [1, 2, 2]
  assert [r["device_count"] for r in (one, first, second)] == [4, 4, 4]
  assert len(one["seen"]) == 3
  for step, batch in enumerate(one["seen"]):
    assert len(batch) == 4
    assert first["seen"][step] == batch[:2] and second["seen"][step] == batch[2:], step


def final_params(workdir):
  return load_file(str(workdir / "export" / "final" / "model.safetensors"))


def comparable(records):
  return [{k: v for k, v in r.items() if not k.startswith("time") and k != "train/tokens_per_s"} for r in records]


def test_two_processes_train_exactly_like_one_process_with_the_same_devices(runs, policy_dir):
  one, two = final_params(runs["one_dir"]), final_params(runs["two_dir"])
  start = load_file(str(policy_dir / "model.safetensors"))
  assert one.keys() == two.keys() == start.keys()
  assert max(np.abs(one[k] - start[k]).max() for k in one) > 1e-3  # the run really updated the policy
  for name in one:
    # Same rows on the same devices in the same micro-batches: here the params come out bit-identical. Only the
    # cross-process all-reduce (gloo, not XLA's in-process one) may add partial sums in another order; it visibly does
    # for the logged entropy and ratio sums (last float32 bit), so allow that much rounding and nothing more.
    np.testing.assert_allclose(two[name], one[name], rtol=1e-6, atol=1e-7, err_msg=name)
  one_metrics = comparable(read_metrics(runs["one_dir"] / "metrics.jsonl"))
  two_metrics = comparable(read_metrics(runs["two_dir"] / "metrics.jsonl"))
  assert [r["step"] for r in two_metrics] == [0, 1, 2, 3, 3]  # eval at start, 3 steps, eval at end
  assert any(r.get("rollout/reward_mean", 0) > 0 for r in one_metrics)  # some verified reward: a real gradient
  for a, b in zip(one_metrics, two_metrics, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      exact = key.startswith(("rollout/", "eval/")) or key in ("step", "epoch", "train/tokens")
      assert b[key] == (a[key] if exact else pytest.approx(a[key], rel=1e-6, abs=1e-7)), (a["step"], key)


def test_evaluation_runs_in_lockstep_and_only_process_zero_writes(runs):
  (one,), (first, second) = runs["one"], runs["two"]
  for key in ("eval_at_start", "eval_at_end"):
    assert first["history"][key] == second["history"][key] == one["history"][key]
  # Both processes' train.checkpoint_dir (tests/multihost_worker.py): one directory of complete checkpoints.
  assert sorted(p.name for p in (runs["two_dir"] / "checkpoints").iterdir()) == ["2", "3"]
  assert (runs["two_dir"] / "export" / "final" / "config.json").is_file()
  # Process 1 never opened the metrics file: every record appears once.
  steps = [r["step"] for r in read_metrics(runs["two_dir"] / "metrics.jsonl")]
  assert steps == sorted(steps) and len(steps) == 5


def test_p2o_processes_share_one_hard_set_and_one_template_assignment(runs):
  first, second = runs["p2o"]
  for mine, theirs in zip(first["seen"], second["seen"], strict=True):
    assert len(mine) == len(theirs) == 2 and not set(mine) & set(theirs)
  assert first["hard_sets"] == second["hard_sets"] and len(first["hard_sets"]) == EPOCHS
  # The epoch-0 hard set was gathered from both processes' rollouts (steps 1 and 2).
  hard = set(first["hard_sets"][0])
  assert hard & {q for batch in first["seen"][:2] for q in batch}
  assert hard & {q for batch in second["seen"][:2] for q in batch}
  assert first["assignments"] == second["assignments"]
  has_templates = [any(t for templates in a.values() for t in templates) for a in first["assignments"]]
  assert any(has_templates), "GEPA never assigned a non-empty template: nothing was compared"
  # Each process rolls out its own assigned queries from their templates in the next epoch (2 steps per epoch).
  templated_rows = np.add(first["templated_rows"], second["templated_rows"])
  for epoch in range(1, EPOCHS):
    assert (templated_rows[2 * epoch:2 * epoch + 2].sum() > 0) == has_templates[epoch - 1], epoch


def gepa_decisions(metrics):
  """A phase's metrics without its timings and reflector counters (those count process 0's proposer calls only)."""
  return [{k: v for k, v in m.items() if not any(s in k for s in ("seconds", "time_share", "/reflector/"))}
          for m in metrics]


def test_p2o_processes_share_gepa_scores_although_their_verifiers_disagree(runs):
  first, second = runs["p2o"]
  # Process 1's verifier scored all its own rollouts 0 (it ran: its rows are half of every step's batch); process 0's
  # did not. Scored each on its own, GEPA's rollouts would get different rewards on the two processes.
  assert len(second["local_rewards"]) == 2 * EPOCHS and not any(second["local_rewards"])
  assert any(first["local_rewards"])
  searches = first["searches"]
  assert searches and second["searches"] == searches  # candidates, accepts, dev scores, minibatch pool, RNG: all
  assert any(score > 0 for s in second["searches"] for row in s["scores_cd"] for score in row)  # process 0's scores
  assert any(it["accepted"] for s in searches for it in s["history"]), "GEPA never accepted a child"
  assert len(first["phase_metrics"]) == len(searches)
  assert gepa_decisions(second["phase_metrics"]) == gepa_decisions(first["phase_metrics"])  # best_dev among them


# ---- single-process pieces -----------------------------------------------------------------------------------------


def distributed_config(**overrides):
  c = base_config()
  c.distributed.update(overrides)
  return c


@pytest.mark.parametrize("overrides, env, tpu_vm, expected", [
    ({}, {}, False, None),  # auto, nothing says multi-process
    ({}, {}, True, {}),  # auto on a TPU VM: JAX detects the slice
    ({}, {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, False, {}),  # JAX reads the coordinator from the environment
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, {}, False,
     {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
    ({"initialize": "always"}, {}, False, {}),  # SLURM / Open MPI / Kubernetes auto-detection
    ({"initialize": "never", "coordinator_address": "h:1"}, {}, True, None),
])
def test_initialize_arguments(overrides, env, tpu_vm, expected):
  assert distributed.initialize_arguments(distributed_config(**overrides).distributed, env, tpu_vm) == expected


@pytest.mark.parametrize("overrides, key", [
    ({"num_processes": 2}, "distributed.coordinator_address"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, "distributed.process_id"),
    ({"process_id": 0}, "distributed.process_id"),
    ({"coordinator_address": "h:1", "num_processes": 3}, "train.batch_size"),  # 128 queries do not split in 3
    ({"coordinator_address": "h:1", "num_processes": 2}, "train.checkpoint_dir"),  # each host its own checkpoints
    ({"coordinator_address": "h:1", "num_processes": 2, "initialize": "never"}, "distributed.initialize"),
    ({"cpu_collectives": "nccl"}, "distributed.cpu_collectives"),
    ({"num_processes": -1}, "distributed.num_processes"),
    ({"cpu_devices": -2}, "distributed.cpu_devices"),
])
def test_bad_distributed_config_is_one_line_naming_the_key(overrides, key, monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  with pytest.raises(ConfigError, match=f"^config.{key}: ") as error:
    validate_distributed(distributed_config(**overrides))
  assert "\n" not in str(error.value)


def test_cpu_devices_split_the_cpu_when_set_before_jax_starts(tmp_path):
  script = ("from p2o_jax import config, distributed\n"
            "c = config.base_config()\n"
            "c.distributed.initialize, c.distributed.cpu_devices = 'never', 3\n"
            "distributed.initialize(c.distributed)\n"
            "import jax\n"
            "print(jax.device_count(), jax.devices()[0].platform)\n")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=tmp_path)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["3", "cpu"]


def test_cpu_devices_asked_for_after_jax_started_are_logged_and_ignored(caplog):
  before = jax.device_count()  # this test process's JAX has started
  with caplog.at_level(logging.WARNING, logger="p2o_jax.distributed"):
    distributed.use_cpu_devices(before + 2)
  assert jax.device_count() == before
  assert f"distributed.cpu_devices={before + 2} ignored" in caplog.text


def test_host_helpers_with_one_process():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  np.testing.assert_array_equal(distributed.allgather(x), x[None])
  np.testing.assert_array_equal(distributed.concat_rows(x), x)
  assert distributed.allgather_json({"a": [1]}) == [{"a": [1]}]
  assert distributed.broadcast_json(["b"]) == ["b"]
  np.testing.assert_array_equal(distributed.broadcast(x), x)
  # One process: no collective; the lockstep score is the correctness reward (the first function), as a float32 array.
  scores = RewardScores(np.float32([1.5, 0.5]), {"math": np.float32([1, np.nan]), "fmt": np.float32([0.5, 0.5])})
  lockstep = distributed.scored_on_process_zero(lambda texts, queries: scores)(["a", "b"], [None, None])
  assert lockstep.dtype == np.float32 and lockstep.tolist() == [1.0, 0.0]
  with pytest.raises(ValueError, match="int64"):
    distributed.allgather(np.arange(3, dtype=np.int64))
  with pytest.raises(ValueError, match="float64"):
    distributed.broadcast(np.zeros(3))
  np.testing.assert_array_equal(distributed.local_part(jax.numpy.asarray(x), axis=1), x)


def test_micro_batch_layout_does_not_depend_on_the_number_of_processes():
  rows = np.arange(16)
  whole = to_micro_batches(rows, 4, (2,))  # one process, 4 batch devices, 2 micro-batches
  np.testing.assert_array_equal(whole, [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]])
  halves = [to_micro_batches(rows[:8], 2, (2,)), to_micro_batches(rows[8:], 2, (2,))]  # two processes, 2 devices each
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), whole)
  np.testing.assert_array_equal(from_micro_batches(halves[1], 2, 1), rows[8:])
