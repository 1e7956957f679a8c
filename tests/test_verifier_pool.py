"""The verifier pool under adversarial, slow, crashing and plentiful items; workers are real processes."""

import logging
import os
import pathlib
import signal
import threading
import time

import numpy as np
import pytest

from p2o_jax.rewards.equivalence import math_reward
from p2o_jax.rewards.functions import RewardFunction
from p2o_jax.rewards.pool import VerifierPool

PWNED = pathlib.Path("/tmp/p2o_pwned")
# This module is importable in the workers (multiprocessing hands them our sys.path), so its functions can score.
SLEEPY = (RewardFunction("sleepy", f"{__name__}:sleepy_or_greedy_reward", grader=True),)


def sleepy_or_greedy_reward(response: str, reference: str, fallback: str) -> float:
  """Test hook: "SLEEP <marker>" writes the worker pid to <marker> and hangs; "ALLOC" asks for 4 GiB;
  "MEET <mine> <other>" creates <mine> and scores 1 iff <other> appears within 10 s; else math_reward."""
  if response.startswith("MEET"):
    mine, other = map(pathlib.Path, response.split()[1:])
    mine.touch()
    return float(any(other.exists() or time.sleep(0.01) for _ in range(1000)))
  if response.startswith("SLEEP"):
    marker = response.split(" ", 1)[1:]
    if marker:
      pathlib.Path(marker[0]).write_text(str(os.getpid()))
    time.sleep(120)
  if response == "ALLOC":
    return float(len(bytearray(4 * 2**30)) > 0)
  return math_reward(response, reference, fallback)


def _kill_when_started(marker: pathlib.Path) -> None:
  for _ in range(2000):
    if marker.exists() and marker.read_text():
      os.kill(int(marker.read_text()), signal.SIGKILL)
      return
    time.sleep(0.01)


def _assert_reaped(pids):
  for pid in pids:
    with pytest.raises(ProcessLookupError):  # a zombie would still accept signal 0
      os.kill(pid, 0)


def test_adversarial_outputs_score_zero_and_the_pool_survives():
  PWNED.unlink(missing_ok=True)
  adversarial = [
    "\\boxed{10**10**10}",
    "\\boxed{9^{9^{9^9}}}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "\\boxed{" * 200_000,  # 1.4 MB of unclosed boxes
    "\\boxed{__import__('os').system('touch /tmp/p2o_pwned')}",
    "\\def\\a{\\a\\a}\\a \\boxed{\\def\\a{\\a\\a}\\a}",
    "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "\\boxed{(2^{5000})^{5000}}",
  ]
  with VerifierPool(num_workers=2, timeout_s=2.0) as pool:
    rewards = pool.score(adversarial, ["1"] * len(adversarial))
    np.testing.assert_array_equal(rewards, np.zeros(len(adversarial), np.float32))
    assert not PWNED.exists()
    np.testing.assert_array_equal(pool.score(["so \\boxed{\\frac{2}{4}}", "\\boxed{3}"], ["0.5", "4"]), [1.0, 0.0])
    assert pool.stats["scored"] == len(adversarial) + 2


def test_slow_item_times_out_while_others_finish(caplog):
  responses = ["\\boxed{1}", "SLEEP", "\\boxed{2}", "\\boxed{3}", "\\boxed{5}"]
  references = ["1", "1", "2", "4", "5"]
  with caplog.at_level(logging.WARNING, logger="p2o_jax.rewards.pool"):
    with VerifierPool(num_workers=2, timeout_s=1.0, functions=SLEEPY) as pool:
      np.testing.assert_array_equal(pool.score(responses, references), [1.0, 0.0, 1.0, 0.0, 1.0])
      assert (pool.stats.timeouts, pool.stats.scored, pool.stats.workers_restarted) == (1, 4, 1)
      np.testing.assert_array_equal(pool.score(["\\boxed{8}"], ["8"]), [1.0])
  # One line for the one timeout, naming the item by index and never quoting its text.
  assert [record.getMessage().split(" timed out")[0] for record in caplog.records] == ["verifier item 1"]
  assert "SLEEP" not in caplog.text


def test_worker_killed_mid_item_is_replaced(tmp_path):
  marker = tmp_path / "started"
  with VerifierPool(num_workers=1, timeout_s=30.0, functions=SLEEPY) as pool:
    killer = threading.Thread(target=_kill_when_started, args=(marker,))
    killer.start()
    rewards = pool.score([f"SLEEP {marker}", "\\boxed{2}"], ["1", "2"])
    killer.join()
    np.testing.assert_array_equal(rewards, [0.0, 1.0])
    assert dict(pool.stats) == {"scored": 1, "timeouts": 0, "worker_crashes": 1, "errors": 0, "workers_restarted": 1}
    assert int(marker.read_text()) not in pool.worker_pids


def test_memory_cap_turns_a_huge_allocation_into_a_zero():
  with VerifierPool(num_workers=1, timeout_s=5.0, memory_limit_mb=512, functions=SLEEPY) as pool:
    np.testing.assert_array_equal(pool.score(["ALLOC", "\\boxed{4}"], ["1", "4"]), [0.0, 1.0])
    assert (pool.stats.errors, pool.stats.worker_crashes) == (1, 0)


def test_parallel_scoring_of_200_items_with_recycling():
  responses = [f"step by step ... \\boxed{{{i} + {i}}}" for i in range(200)]
  references = [str(2 * i + (i % 3 == 0)) for i in range(200)]  # every third reference is off by one
  expected = np.array([i % 3 != 0 for i in range(200)], np.float32)
  with VerifierPool(num_workers=2, timeout_s=5.0, max_tasks_per_worker=40) as pool:
    np.testing.assert_array_equal(pool.score(responses, references), expected)
    # A slot is recycled after every 40 items; two slots sharing 200 items give floor(n/40) + floor((200-n)/40).
    assert pool.stats.scored == 200 and pool.stats.workers_restarted in (4, 5)
    assert pool.score([], []).shape == (0,)


def test_items_run_concurrently_across_workers(tmp_path):
  first, second = tmp_path / "first", tmp_path / "second"
  # Each item waits for the other's marker: both score 1 only if two workers hold them at the same time.
  with VerifierPool(num_workers=2, timeout_s=20.0, functions=SLEEPY) as pool:
    rewards = pool.score([f"MEET {first} {second}", f"MEET {second} {first}"], ["", ""])
  np.testing.assert_array_equal(rewards, [1.0, 1.0])


def test_close_reaps_workers_and_refuses_new_work():
  pool = VerifierPool(num_workers=2, timeout_s=2.0)
  pids = pool.worker_pids
  assert len(set(pids)) == 2
  pool.close()
  pool.close()  # idempotent
  _assert_reaped(pids)
  with pytest.raises(ValueError, match="closed"):
    pool.score(["\\boxed{1}"], ["1"])


@pytest.mark.parametrize(
  "kwargs,message",
  [
    ({"fallback": "first_number"}, "first_number"),
    ({"num_workers": 0}, "num_workers"),
    ({"timeout_s": 0.0}, "timeout_s"),
    ({"memory_limit_mb": 16}, "memory_limit_mb"),
    ({"functions": "os.system"}, "unknown reward function 'os.system'"),
    ({"functions": "p2o_jax.rewards.equivalence:no_such_function"}, "no_such_function"),
    ({"functions": "math=heavy"}, "weight 'heavy' of 'math' is not a number"),
  ],
)
def test_bad_configuration_is_a_one_line_error(kwargs, message):
  with pytest.raises(ValueError, match=message):
    VerifierPool(**kwargs)


def test_mismatched_lengths_are_rejected():
  with VerifierPool(num_workers=1) as pool, pytest.raises(ValueError, match="2 responses but 1 references"):
    pool.score(["a", "b"], ["1"])
