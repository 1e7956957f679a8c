"""Tests for p2o_jax/metrics.py: JSONL records, TensorBoard events read back from disk, resume truncation, progress."""

import io
import json
import math
import struct
import time

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from p2o_jax import metrics


def _strict_json(line: str) -> dict:
  """json.loads that rejects NaN/Infinity, which are not valid JSON."""
  def reject(token):
    raise AssertionError(f"non-standard JSON constant {token}")
  return json.loads(line, parse_constant=reject)


def _read_events(logdir) -> list[event_pb2.Event]:
  """Every event in the TFRecord files under logdir: u64 length, masked crc, payload, masked crc per record."""
  events = []
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      header = data[offset:offset + 8]
      (length,) = struct.unpack("<Q", header)
      (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
      assert length_crc == masked_crc32c(header)
      payload = data[offset + 12:offset + 12 + length]
      (payload_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
      assert payload_crc == masked_crc32c(payload)
      events.append(event_pb2.Event.FromString(payload))
      offset += 16 + length
  return events


def _scalars(events) -> dict[tuple[str, int], float]:
  return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def _without_time(records):
  return [{k: v for k, v in r.items() if k != "time"} for r in records]


# --- MetricsWriter ---------------------------------------------------------------------------------------------------


def test_jsonl_records_are_flushed_and_converted_while_open(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    before = time.time()
    writer.write(3, {"reward/mean": np.float32(0.25), "loss": jnp.asarray(-1.5), "hard/count": np.int64(12),
                     "done": True, "lr": 1e-3})
    # Read back while the writer is still open: every write must already be on disk.
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    after = time.time()
  assert _without_time(records) == [
      {"step": 3, "reward/mean": 0.25, "loss": -1.5, "hard/count": 12, "done": 1, "lr": 1e-3},
  ]
  assert all(before <= r["time"] <= after for r in records)
  assert isinstance(records[0]["hard/count"], int)


def test_non_finite_values_are_null_in_valid_json(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(0, {"a": float("nan"), "b": np.float32("inf"), "c": jnp.asarray(-jnp.inf), "d": 2.0})
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 1
  record = _strict_json(lines[0])
  assert (record["a"], record["b"], record["c"], record["d"]) == (None, None, None, 2.0)


def test_tensorboard_events_hold_the_scalars(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(1, {"reward/mean": 0.5, "loss": np.float32(0.125), "skipped": float("nan")})
    writer.write(2, {"reward/mean": 0.75, "loss": jnp.asarray(0.0625)})
  events = _read_events(tmp_path / "tensorboard")
  assert events[0].file_version.startswith("brain.Event")
  assert _scalars(events) == {("reward/mean", 1): 0.5, ("loss", 1): 0.125,
                              ("reward/mean", 2): 0.75, ("loss", 2): 0.0625}


def test_disabled_writer_creates_nothing(tmp_path):
  workdir = tmp_path / "run"
  with metrics.MetricsWriter(workdir, enabled=False, resume_step=5) as writer:
    writer.write(0, {"a": 1.0})
  assert not workdir.exists()


def _simulate_steps(writer, steps):
  for step in steps:
    writer.write(step, {"reward/mean": step / 10, "loss": 1.0 / (step + 1)})


def test_resume_truncates_to_an_uninterrupted_runs_records(tmp_path):
  uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
  with metrics.MetricsWriter(uninterrupted) as writer:
    _simulate_steps(writer, range(10))
  # The killed run reached step 8 and was torn mid-line; its last checkpoint is at step 6.
  with metrics.MetricsWriter(resumed) as writer:
    _simulate_steps(writer, range(9))
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 9, "reward/me')
  with metrics.MetricsWriter(resumed, resume_step=6) as writer:
    assert [r["step"] for r in metrics.read_metrics(resumed / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    _simulate_steps(writer, range(6, 10))
  expected = _without_time(metrics.read_metrics(uninterrupted / "metrics.jsonl"))
  assert _without_time(metrics.read_metrics(resumed / "metrics.jsonl")) == expected
  assert sorted(p.name for p in resumed.iterdir()) == ["metrics.jsonl", "tensorboard"]
  # TensorBoard is told to hide the killed run's events from step 6 on.
  restarts = [e.step for e in _read_events(resumed / "tensorboard")
              if e.session_log.status == event_pb2.SessionLog.START]
  assert restarts == [6]


def test_resume_from_zero_empties_the_file_and_missing_file_is_fine(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    writer.write(0, {"a": 1.0})
  with metrics.MetricsWriter(tmp_path, tensorboard=False, resume_step=0):
    pass
  assert metrics.read_metrics(tmp_path / "metrics.jsonl") == []
  with metrics.MetricsWriter(tmp_path / "fresh", tensorboard=False, resume_step=4) as writer:
    writer.write(4, {"a": 2.0})
  assert _without_time(metrics.read_metrics(tmp_path / "fresh" / "metrics.jsonl")) == [{"step": 4, "a": 2.0}]


@pytest.mark.parametrize("bad_metrics, message", [
    ({"vec": np.zeros(3)}, "'vec' is not a scalar"),
    ({"name": "abc"}, "'name' is not a number"),
    ({"step": 1.0}, "'step' is reserved"),
    ({3: 1.0}, "must be strings"),
])
def test_bad_metrics_are_rejected_by_name(tmp_path, bad_metrics, message):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as writer:
    with pytest.raises(ValueError, match=message):
      writer.write(0, bad_metrics)
  assert metrics.read_metrics(tmp_path / "metrics.jsonl") == []


def test_corrupt_line_in_the_middle_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 0, "a": 1}\nnot json\n{"step": 1, "a": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
    metrics.read_metrics(path)
  path.write_text('{"a": 1}\n')
  with pytest.raises(ValueError, match="integer step"):
    metrics.read_metrics(path)


def test_write_after_close_is_an_error(tmp_path):
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
  writer.close()
  writer.close()
  with pytest.raises(ValueError, match="closed"):
    writer.write(0, {"a": 1.0})


# --- formatting helpers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [
    (0, "0:00:00"), (59.9, "0:00:59"), (61, "0:01:01"), (3725, "1:02:05"), (90000, "25:00:00"),
])
def test_format_duration(seconds, text):
  assert metrics.format_duration(seconds) == text


@pytest.mark.parametrize("seconds", [-1.0, math.inf, math.nan])
def test_format_duration_rejects_bad_values(seconds):
  with pytest.raises(ValueError, match="duration"):
    metrics.format_duration(seconds)


def test_eta_seconds():
  assert metrics.eta_seconds(20, 100, 2.0) == 40.0
  assert metrics.eta_seconds(3, 10, 0.25) == 28.0
  assert metrics.eta_seconds(100, 100, None) == 0.0
  assert metrics.eta_seconds(5, 100, None) is None
  assert metrics.eta_seconds(5, 100, 0.0) is None


def test_format_rate_and_progress_line():
  assert metrics.format_rate(2.5) == "2.50 step/s"
  assert metrics.format_rate(0.125) == "8.0 s/step"
  assert metrics.format_rate(None) == "? step/s"
  line = metrics.format_progress_line("train", 25, 100, 3725, 0.5, {"reward": 0.312345, "hard": 12,
                                                                   "gepa": "iter 3/8"})
  # eta = 75 steps / 0.5 step/s = 150 s.
  assert line == ("train 25/100  25.0% | 2.0 s/step | elapsed 1:02:05 | eta 0:02:30 | "
                  "reward=0.3123 hard=12 gepa=iter 3/8")
  unknown_rate = metrics.format_progress_line("eval", 0, 8, 0, None, {})
  assert unknown_rate == "eval 0/8   0.0% | ? step/s | elapsed 0:00:00 | eta ?"


# --- Progress --------------------------------------------------------------------------------------------------------


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


class FakeTerminal(io.StringIO):
  def isatty(self) -> bool:
    return True


def _progress_at(progress, clock, now, step, **fields):
  clock.now = now
  progress.update(step, **fields)


def test_progress_in_a_log_prints_throttled_full_lines_and_the_end():
  clock, stream = FakeClock(), io.StringIO()
  progress = metrics.Progress(10, desc="train", stream=stream, log_interval_s=30, clock=clock)
  _progress_at(progress, clock, 1, 1)    # first update is printed; rate = 1/1 = 1.0
  _progress_at(progress, clock, 10, 2)   # 9 s after the last print: held; rate = .3/9 + .7*1 = 0.73333
  _progress_at(progress, clock, 31, 3)   # 30 s after: printed; rate = .3/21 + .7*0.73333 = 0.527619
  _progress_at(progress, clock, 40, 4, reward=0.31, gepa="iter 3/8")  # held; rate = .3/9 + .7*0.527619 = 0.402667
  clock.now = 45
  progress.close()
  progress.close()
  assert stream.getvalue().splitlines() == [
      "train 1/10  10.0% | 1.00 step/s | elapsed 0:00:01 | eta 0:00:09",
      # 1/0.527619 = 1.895 s/step; eta = 7/0.527619 = 13.27 s.
      "train 3/10  30.0% | 1.9 s/step | elapsed 0:00:31 | eta 0:00:13",
      # 1/0.402667 = 2.483 s/step; eta = 6/0.402667 = 14.90 s.
      "train 4/10  40.0% | 2.5 s/step | elapsed 0:00:45 | eta 0:00:14 | reward=0.31 gepa=iter 3/8",
  ]


def test_progress_close_does_not_repeat_a_line_just_printed():
  clock, stream = FakeClock(), io.StringIO()
  with metrics.Progress(4, desc="eval", stream=stream, clock=clock) as progress:
    _progress_at(progress, clock, 2, 4)
  assert stream.getvalue() == "eval 4/4 100.0% | 2.00 step/s | elapsed 0:00:02 | eta 0:00:00\n"


def test_progress_on_a_terminal_rewrites_one_line():
  clock, terminal = FakeClock(), FakeTerminal()
  progress = metrics.Progress(100, desc="train", stream=terminal, start_step=50, clock=clock)
  _progress_at(progress, clock, 5, 60)   # resumed at 50: 10 steps in 5 s = 2 step/s, eta 40/2 = 20 s
  _progress_at(progress, clock, 5.05, 60, reward=0.5)  # within the refresh interval: not redrawn
  clock.now = 10
  progress.close()
  assert terminal.getvalue() == (
      "\rtrain 60/100  60.0% | 2.00 step/s | elapsed 0:00:05 | eta 0:00:20\x1b[K"
      "\rtrain 60/100  60.0% | 2.00 step/s | elapsed 0:00:10 | eta 0:00:20 | reward=0.5\x1b[K\n")


def test_disabled_progress_prints_nothing():
  stream = io.StringIO()
  with metrics.Progress(10, desc="train", enabled=False, stream=stream) as progress:
    progress.update(5, reward=1.0)
  assert stream.getvalue() == ""


@pytest.mark.parametrize("kwargs, message", [
    ({"total_steps": 0}, "total_steps"), ({"total_steps": 5, "start_step": 6}, "start_step"),
])
def test_progress_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    metrics.Progress(desc="x", stream=io.StringIO(), **kwargs)


def test_progress_rejects_a_step_past_the_total():
  progress = metrics.Progress(5, desc="x", stream=io.StringIO(), clock=FakeClock())
  with pytest.raises(ValueError, match=r"step must be in \[0, 5\], got 6"):
    progress.update(6)
