"""Run records and live progress: a JSONL + TensorBoard metrics writer, and a one-line progress display.

`MetricsWriter` appends one JSON line per record to `<workdir>/metrics.jsonl` (flushed at once, so a killed run loses
nothing it reported) and mirrors scalars into TensorBoard event files under `<workdir>/tensorboard/`. On
resume it drops what the killed run wrote past its last checkpoint, so the file matches an uninterrupted run's.
`Progress` shows step/total, rate, elapsed and ETA: rewritten in place on a terminal, throttled full lines in logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np

from p2o_jax.run_dir import METRICS_FILENAME, TENSORBOARD_DIRNAME

# Keys every JSONL record carries; a metric may not reuse them.
RESERVED_KEYS = ("step", "time")
# How often the TensorBoard writer's background thread flushes; the JSONL file is the record that must survive a kill.
TENSORBOARD_FLUSH_S = 30
# Weight of the newest interval in the smoothed rate: responsive to slowdowns, steady across a single slow step.
RATE_SMOOTHING = 0.3
# A terminal line is rewritten at most this often, so a tight loop calling update() does not flood the terminal.
TTY_REFRESH_S = 0.1

Number = int | float


# ---------------------------------------------------------------------------------------------------------------------
# JSONL records


def scalar_value(key: str, value: Any) -> Number | None:
  """A metric as a JSON number: integers and bools as ints, the rest through float(); NaN and inf become None."""
  if getattr(value, "ndim", 0) != 0:
    raise ValueError(f"metric {key!r} is not a scalar: shape {value.shape}")
  if isinstance(value, (int, np.integer)):
    return int(value)
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"metric {key!r} is not a number: {value!r:.80}") from None
  return number if math.isfinite(number) else None


def metrics_record(step: int, wall_time: float, metrics: Mapping[str, Any]) -> dict[str, Any]:
  """The JSONL record {"step", "time", **metrics} with every metric converted by `scalar_value`."""
  for key in metrics:
    if not isinstance(key, str):
      raise ValueError(f"metric names must be strings, got {key!r}")
    if key in RESERVED_KEYS:
      raise ValueError(f"metric name {key!r} is reserved for the record itself")
  return {"step": int(step), "time": wall_time, **{k: scalar_value(k, v) for k, v in metrics.items()}}


def parse_metrics_lines(lines: list[str], source: str) -> list[dict[str, Any]]:
  """Records from JSONL lines; a torn last line (a kill mid-write, no newline) is skipped and logged."""
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines) and not line.endswith("\n"):
        logging.warning("%s: skipped a torn last line (%d chars) left by an interrupted write", source, len(line))
        continue
      raise ValueError(f"{source}:{number} is not valid JSON: {line[:80]!r}") from None
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
      raise ValueError(f"{source}:{number} is not a metrics record with an integer step: {line[:80]!r}")
    records.append(record)
  return records


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file, in file order."""
  with open(path, encoding="utf-8") as f:
    return parse_metrics_lines(f.readlines(), str(path))


def truncate_metrics(path: Path, resume_step: int) -> int:
  """Keeps only records with step < resume_step, replacing the file atomically; returns how many were dropped."""
  with open(path, encoding="utf-8") as f:
    records = parse_metrics_lines(f.readlines(), str(path))
  kept = [r for r in records if r["step"] < resume_step]
  temp_path = path.with_name(path.name + ".tmp")
  with open(temp_path, "w", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temp_path, path)
  return len(records) - len(kept)


def _open_tensorboard(logdir: Path, purge_step: int | None) -> Any:
  # Imported here: tensorboardX imports torch when it is installed, which costs seconds on every `import p2o_jax`.
  from tensorboardX import SummaryWriter
  # purge_step makes TensorBoard hide the killed run's events at steps >= the resumed step, like the JSONL truncation.
  return SummaryWriter(str(logdir), purge_step=purge_step, flush_secs=TENSORBOARD_FLUSH_S)


class MetricsWriter:
  """Writes metric records to `<workdir>/metrics.jsonl` and TensorBoard; every call is a no-op when not `enabled`.

  `resume_step` (the step a resumed run starts from) drops the records with step >= resume_step that the killed run
  wrote after its last checkpoint. `enabled=False` is for the non-zero processes of a multi-host run.
  """

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self._jsonl: TextIO | None = None
    self._tensorboard: Any = None
    if not enabled:
      return
    if resume_step is not None and resume_step < 0:
      raise ValueError(f"resume_step must be >= 0, got {resume_step}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self.path = workdir / METRICS_FILENAME
    if resume_step is not None and self.path.exists():
      dropped = truncate_metrics(self.path, resume_step)
      logging.info("resuming at step %d: dropped %d records written after the last checkpoint", resume_step, dropped)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    if tensorboard:
      self._tensorboard = _open_tensorboard(workdir / TENSORBOARD_DIRNAME, resume_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Records scalar metrics at `step`; non-finite values are null in JSONL and left out of TensorBoard."""
    if not self.enabled:
      return
    wall_time = time.time()
    record = metrics_record(step, wall_time, metrics)
    self._append(record)
    if self._tensorboard is not None:
      for key in metrics:
        if record[key] is not None:
          self._tensorboard.add_scalar(key, record[key], int(step), walltime=wall_time)

  def _append(self, record: dict[str, Any]) -> None:
    if self._jsonl is None:
      raise ValueError(f"MetricsWriter for {self.path} is closed")
    # allow_nan=False: a non-finite value that slipped past conversion must fail loudly, not write invalid JSON.
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes both outputs; closing twice is fine."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               traceback: TracebackType | None) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------------------------------
# Progress display


def format_duration(seconds: float) -> str:
  """Whole seconds as h:mm:ss (hours unbounded), e.g. 3725 -> "1:02:05"."""
  if not math.isfinite(seconds) or seconds < 0:
    raise ValueError(f"a duration must be finite and >= 0, got {seconds}")
  minutes, secs = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def eta_seconds(done: int, total: int, rate: float | None) -> float | None:
  """Seconds left at `rate` steps/s to go from `done` to `total` steps; None while the rate is unknown or zero."""
  if done >= total:
    return 0.0
  if rate is None or rate <= 0:
    return None
  return (total - done) / rate


def smoothed_rate(previous: float | None, latest: float) -> float:
  """Exponential moving average of steps/s, started at the first measured interval."""
  if previous is None:
    return latest
  return RATE_SMOOTHING * latest + (1 - RATE_SMOOTHING) * previous


def format_rate(rate: float | None) -> str:
  """steps/s, shown as s/step when a step takes longer than a second (the usual case for RL steps)."""
  if rate is None or rate <= 0:
    return "? step/s"
  return f"{rate:.2f} step/s" if rate >= 1 else f"{1 / rate:.1f} s/step"


def format_field(name: str, value: Any) -> str:
  """name=value, floats to 4 significant digits."""
  if isinstance(value, (float, np.floating)):
    return f"{name}={value:.4g}"
  return f"{name}={value}"


def format_progress_line(desc: str, step: int, total: int, elapsed_s: float, rate: float | None,
                         fields: Mapping[str, Any]) -> str:
  """e.g. "train 20/100  20.0% | 1.70 step/s | elapsed 0:00:15 | eta 0:00:47 | reward=0.31 hard=12"."""
  eta = eta_seconds(step, total, rate)
  parts = [f"{desc} {step}/{total} {100 * step / total:5.1f}%", format_rate(rate),
           f"elapsed {format_duration(elapsed_s)}", f"eta {'?' if eta is None else format_duration(eta)}"]
  if fields:
    parts.append(" ".join(format_field(k, v) for k, v in fields.items()))
  return " | ".join(parts)


class Progress:
  """A one-line live progress display: rewritten with \\r on a terminal, a full line every `log_interval_s` otherwise.

  `start_step` is where a resumed run starts; the rate counts only the steps this process did. `clock` is injectable
  so tests can drive time.
  """

  def __init__(self, total_steps: int, *, desc: str, enabled: bool = True, stream: TextIO | None = None,
               start_step: int = 0, log_interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
    if total_steps <= 0:
      raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= start_step <= total_steps:
      raise ValueError(f"start_step must be in [0, {total_steps}], got {start_step}")
    # sys.stderr as it is now, not when this module was imported (it may have been redirected since).
    stream = sys.stderr if stream is None else stream
    self.total_steps, self.desc, self.enabled, self.stream = total_steps, desc, enabled, stream
    self.log_interval_s, self._clock = log_interval_s, clock
    self._is_tty = enabled and stream.isatty()
    self._start_time = self._last_time = clock()
    self._step, self._last_step = start_step, start_step
    self._fields: dict[str, Any] = {}
    self._rate: float | None = None
    self._printed_at: float | None = None
    self._shown = False  # whether the latest state is already on the stream
    self._closed = False

  def update(self, step: int, **fields: Any) -> None:
    """Sets the current step and the fields shown after the timing (replacing the previous fields)."""
    if not self.enabled or self._closed:
      return
    if not 0 <= step <= self.total_steps:
      raise ValueError(f"progress step must be in [0, {self.total_steps}], got {step}")
    now = self._clock()
    if now > self._last_time and step != self._last_step:
      self._rate = smoothed_rate(self._rate, (step - self._last_step) / (now - self._last_time))
      self._last_time, self._last_step = now, step
    self._step, self._fields, self._shown = step, fields, False
    interval = TTY_REFRESH_S if self._is_tty else self.log_interval_s
    if self._printed_at is None or now - self._printed_at >= interval:
      self._show(now)

  def _show(self, now: float) -> None:
    elapsed = max(0.0, now - self._start_time)
    line = format_progress_line(self.desc, self._step, self.total_steps, elapsed, self._rate, self._fields)
    # On a terminal \x1b[K clears what a longer previous line left to the right.
    self.stream.write(f"\r{line}\x1b[K" if self._is_tty else f"{line}\n")
    self.stream.flush()
    self._printed_at, self._shown = now, True

  def close(self) -> None:
    """Prints the final line (ending the terminal line); closing twice is fine."""
    if not self.enabled or self._closed:
      return
    if self._is_tty or not self._shown:
      self._show(self._clock())
    if self._is_tty:
      self.stream.write("\n")
      self.stream.flush()
    self._closed = True

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
               traceback: TracebackType | None) -> None:
    self.close()
