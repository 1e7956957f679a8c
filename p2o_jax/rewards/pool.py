"""A small process pool that scores untrusted model responses: per-item timeouts, memory caps, crash recovery.

Each item is one completion with its prompt and dataset columns, scored by every reward function of the run
(functions.py); the pool returns each function's values and their weighted total.

Not multiprocessing.Pool: a hung or crashing item must cost only its own slot. The parent hands one item at a time to
each worker over a pipe and waits with a per-item deadline; on a timeout or a dead worker it SIGKILLs and replaces
that worker and scores the item 0, while the other workers keep going. Workers come from the "forkserver" context:
the parent runs JAX threads and must never fork itself, and the fork server (a fresh interpreter) preloads sympy and
the parser once, so replacing a killed worker costs a fork rather than an import.

Workers cap their address space (RLIMIT_AS) and, per item, their CPU time (RLIMIT_CPU, a backstop should the parent
stall), and are replaced after max_tasks_per_worker items so that leaks in sympy's caches cannot accumulate. Results
come back as JSON, never pickles: a worker that untrusted input somehow subverted cannot run code in the trainer.
A pool is used from one thread; close() (or the `with` block) always kills and reaps its workers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import resource
import signal
import time
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from p2o_jax.rewards.extract import check_fallback
from p2o_jax.rewards.functions import RewardFunction, RewardFunctionError, RewardScores, ScoreFn, query_columns, \
  resolve, score_item, weighted_total

logger = logging.getLogger(__name__)

DEFAULT_FUNCTIONS = "math"
_STARTUP_TIMEOUT_S = 60.0
_MIN_MEMORY_MB = 256
_READY = "ready"
_MAX_REPLY_BYTES = 65536


@dataclasses.dataclass
class PoolStats(Mapping):
  """Counters since the pool was created; reads like a dict (`stats["timeouts"]`, `dict(stats)`)."""

  scored: int = 0  # items the score function finished (right or wrong)
  timeouts: int = 0  # items killed at their deadline, scored 0
  worker_crashes: int = 0  # workers that died on their own or were killed externally
  errors: int = 0  # (item, function) pairs where the function raised or returned a wrong type, scored 0
  workers_restarted: int = 0  # replacements for any reason: timeout, crash, or recycling after max_tasks_per_worker

  def __getitem__(self, name: str) -> int:
    if name not in self._names():
      raise KeyError(name)
    return getattr(self, name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._names())

  def __len__(self) -> int:
    return len(self._names())

  def _names(self) -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(self))


@dataclasses.dataclass
class _Worker:
  process: multiprocessing.process.BaseProcess
  conn: multiprocessing.connection.Connection
  deadline: float  # for startup until ready, then for the item in hand
  ready: bool = False
  item: int | None = None
  tasks_done: int = 0

  @property
  def waited_on(self) -> bool:
    return not self.ready or self.item is not None


class VerifierPool:
  """Score completions in worker processes with `functions` (functions.resolve: a config string such as
  "math=1, boxed_format=0.1", or RewardFunctions); tests inject slow or crashing functions by import path.
  A function returning the wrong shape or type in the pool's first batch is a RewardFunctionError (a bug to fix
  before training); later, that completion's value is a counted, logged 0.
  """

  def __init__(
    self,
    num_workers: int = 2,
    timeout_s: float = 5.0,
    max_tasks_per_worker: int = 200,
    memory_limit_mb: int = 1024,
    fallback: str = "none",
    functions: str | Sequence[RewardFunction] = DEFAULT_FUNCTIONS,
  ):
    _check_positive(num_workers=num_workers, timeout_s=timeout_s, max_tasks_per_worker=max_tasks_per_worker)
    if memory_limit_mb < _MIN_MEMORY_MB:
      raise ValueError(f"memory_limit_mb={memory_limit_mb} is too small for a worker with sympy (>= {_MIN_MEMORY_MB})")
    check_fallback(fallback)
    self.functions = resolve(functions) if isinstance(functions, str) else tuple(functions)
    self._timeout_s = float(timeout_s)
    self._max_tasks = max_tasks_per_worker
    self._worker_args = (self.functions, fallback, memory_limit_mb, self._timeout_s)
    self._context = multiprocessing.get_context("forkserver")
    # Only takes effect if this process has not started its fork server yet; otherwise workers import on start.
    self._context.set_forkserver_preload(_forkserver_preload(self.functions))
    self.stats = PoolStats()
    self._batches_done = 0
    self._workers: list[_Worker] = []
    try:
      for _ in range(num_workers):
        self._workers.append(self._start_worker())
    except BaseException:
      self.close()
      raise

  def __enter__(self) -> VerifierPool:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  @property
  def worker_pids(self) -> tuple[int, ...]:
    """Process ids of the current workers (they change as workers are replaced)."""
    return tuple(worker.process.pid for worker in self._workers)

  def score(self, responses: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Total rewards, float32 of len(responses), with only each reference as the row's columns ({"answer": ref})."""
    if len(responses) != len(references):
      raise ValueError(f"got {len(responses)} responses but {len(references)} references")
    return self.score_rows(responses, [""] * len(responses), [{"answer": r} for r in references]).total

  def scorer(self, prompt_format: str) -> ScoreFn:
    """score(completions, queries): each completion's prompt is its query's plain user turn (never the template)."""

    def score(completions: Sequence[str], queries: Sequence) -> RewardScores:
      prompts = [prompt_format.format(question=q.question) for q in queries]
      return self.score_rows(completions, prompts, [query_columns(q) for q in queries])

    return score

  def score_rows(self, completions: Sequence[str], prompts: Sequence[str],
                 columns: Sequence[Mapping[str, object]]) -> RewardScores:
    """Every function's values and the weighted totals; items that time out or crash their worker score 0."""
    if not len(completions) == len(prompts) == len(columns):
      raise ValueError(f"got {len(completions)} completions, {len(prompts)} prompts, {len(columns)} column rows")
    if not self._workers:
      raise ValueError("VerifierPool is closed")
    values_nf = np.zeros((len(completions), len(self.functions)), np.float64)
    items = list(zip(completions, prompts, columns))
    pending = collections.deque(range(len(items)))
    while pending or any(worker.item is not None for worker in self._workers):
      self._dispatch(pending, items)
      self._wait_and_collect(values_nf)
    self._batches_done += 1
    by_function = {f.name: values_nf[:, i].astype(np.float32) for i, f in enumerate(self.functions)}
    return RewardScores(weighted_total(self.functions, values_nf), by_function)

  def close(self) -> None:
    """Kill and reap every worker; idempotent."""
    for worker in self._workers:
      _kill(worker)
    self._workers = []

  # --- scheduling ---
  def _dispatch(self, pending: collections.deque, items: Sequence[tuple]) -> None:
    for slot, worker in enumerate(self._workers):
      if not pending or not worker.ready or worker.item is not None:
        continue
      index = pending.popleft()
      try:
        worker.conn.send((index, *items[index]))
      except OSError:  # it died while idle: the item never reached it, so give it to the next worker
        pending.appendleft(index)
        self._on_crash(slot, item=None)
        continue
      worker.item, worker.deadline = index, time.monotonic() + self._timeout_s

  def _wait_and_collect(self, values_nf: np.ndarray) -> None:
    watched = [worker for worker in self._workers if worker.waited_on]
    if not watched:
      return
    wait_s = max(0.0, min(worker.deadline for worker in watched) - time.monotonic())
    handles = [worker.conn for worker in watched] + [worker.process.sentinel for worker in watched]
    ready = set(multiprocessing.connection.wait(handles, wait_s))
    for slot, worker in enumerate(self._workers):
      if worker.conn in ready or worker.process.sentinel in ready:
        self._on_event(slot, values_nf)
    now = time.monotonic()
    for slot, worker in enumerate(self._workers):
      if worker.waited_on and now >= worker.deadline:
        self._on_deadline(slot)

  def _on_event(self, slot: int, values_nf: np.ndarray) -> None:
    worker = self._workers[slot]
    try:
      reply = json.loads(worker.conn.recv_bytes(_MAX_REPLY_BYTES)) if worker.conn.poll() else None
    except (EOFError, OSError, ValueError):  # died mid-reply, or sent something that is not a short JSON reply
      reply = None
    if reply == _READY and not worker.ready:
      worker.ready, worker.deadline = True, math.inf
    elif _is_reply_for(reply, worker.item, len(self.functions)):
      self._record(slot, reply, values_nf)
    else:  # its sentinel fired with nothing to read, or it broke the protocol: either way it is not trusted again
      self._on_crash(slot, item=worker.item)

  def _record(self, slot: int, reply: list, values_nf: np.ndarray) -> None:
    worker = self._workers[slot]
    index, values, errors = reply
    for i, (function, value, error) in enumerate(zip(self.functions, values, errors)):
      if error.startswith("shape: ") and self._batches_done == 0:
        self.close()
        raise RewardFunctionError(error.removeprefix("shape: "))
      if error:
        self.stats.errors += 1
        logger.warning("verifier item %d: reward function %r failed (%s); scored 0", index, function.name, error)
      values_nf[index, i] = math.nan if value is None else value if math.isfinite(value) else 0.0
    self.stats.scored += 1
    worker.item, worker.deadline = None, math.inf
    worker.tasks_done += 1
    if worker.tasks_done >= self._max_tasks:
      self._replace(slot)

  def _on_deadline(self, slot: int) -> None:
    worker = self._workers[slot]
    if not worker.ready:
      self.close()
      raise RuntimeError(f"verifier worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
    self.stats.timeouts += 1
    logger.warning(
      "verifier item %d timed out after %.1f s; killing worker pid %d", worker.item, self._timeout_s, worker.process.pid
    )
    self._replace(slot)

  def _on_crash(self, slot: int, item: int | None) -> None:
    worker = self._workers[slot]
    _kill(worker)
    if not worker.ready:
      self.close()
      code = worker.process.exitcode
      raise RuntimeError(f"verifier worker exited during startup (exit code {code}); check the reward functions and "
                         "memory_limit_mb")
    self.stats.worker_crashes += 1
    doing = "idle" if item is None else f"scoring item {item}"
    pid, code = worker.process.pid, worker.process.exitcode
    logger.warning("verifier worker pid %d died (exit code %s) while %s", pid, code, doing)
    self._replace(slot)

  def _replace(self, slot: int) -> None:
    _kill(self._workers[slot])
    self._workers[slot] = self._start_worker()
    self.stats.workers_restarted += 1

  def _start_worker(self) -> _Worker:
    parent_conn, child_conn = self._context.Pipe(duplex=True)
    process = self._context.Process(
      target=_worker_main, args=(child_conn, *self._worker_args), name="p2o-verifier", daemon=True
    )
    process.start()
    child_conn.close()
    return _Worker(process, parent_conn, deadline=time.monotonic() + _STARTUP_TIMEOUT_S)


def _forkserver_preload(functions: Sequence[RewardFunction]) -> list[str]:
  """Modules the fork server imports once, so that a new worker is a cheap fork. The caller's main module is left
  out on purpose: multiprocessing re-runs it in each child as `__mp_main__`, and an entry point (ours is
  p2o_jax.main) must stay cheap and import-safe for that rather than being imported twice under two names.
  """
  modules = [f.target.split(":")[0] if isinstance(f.target, str) else f.target.__module__ for f in functions]
  return list(dict.fromkeys([__name__, *(m for m in modules if m != "__main__")]))


def _check_positive(**values: float) -> None:
  for name, value in values.items():
    if not value > 0:
      raise ValueError(f"{name} must be positive, got {value!r}")


def _is_reply_for(reply: object, item: int | None, num_functions: int) -> bool:
  return (
    isinstance(reply, list)
    and len(reply) == 3
    and item is not None
    and reply[0] == item
    and isinstance(reply[1], list)
    and isinstance(reply[2], list)
    and len(reply[1]) == len(reply[2]) == num_functions
    and all(v is None or isinstance(v, float) for v in reply[1])
    and all(isinstance(e, str) for e in reply[2])
  )


def _kill(worker: _Worker) -> None:
  """SIGKILL (a no-op if it already exited) and reap, so no zombie outlives the pool."""
  if worker.process.exitcode is None:
    worker.process.kill()
  worker.process.join()
  worker.conn.close()


# --- the worker process ---
def _worker_main(
  conn: multiprocessing.connection.Connection,
  functions: Sequence[RewardFunction],
  fallback: str,
  memory_limit_mb: int,
  timeout_s: float,
) -> None:
  """Loop until the parent goes away: receive (index, completion, prompt, columns), reply [index, values, errors]."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the trainer, which then closes the pool
  loaded = [(function, function.load()) for function in functions]
  # The cap is on top of what the worker already maps: its parent's imports (JAX, say) must not eat the budget.
  memory_bytes = _within_hard_limit(resource.RLIMIT_AS, _address_space_bytes() + memory_limit_mb * 2**20)
  resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
  conn.send_bytes(json.dumps(_READY).encode())
  while True:
    try:
      task = conn.recv()
    except EOFError:
      return
    index, completion, prompt, columns = task
    _limit_cpu_for_next_item(timeout_s)
    values, errors = score_item(loaded, completion, prompt, columns, fallback)
    conn.send_bytes(json.dumps([index, values, errors]).encode())


def _limit_cpu_for_next_item(timeout_s: float) -> None:
  """RLIMIT_CPU counts the whole life of the process, so move the soft limit to `now + 2 * timeout` per item."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  soft = _within_hard_limit(resource.RLIMIT_CPU, int(usage.ru_utime + usage.ru_stime + 2 * timeout_s) + 1)
  resource.setrlimit(resource.RLIMIT_CPU, (soft, resource.getrlimit(resource.RLIMIT_CPU)[1]))


def _address_space_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[0]) * resource.getpagesize()


def _within_hard_limit(kind: int, value: int) -> int:
  """`value` lowered to the existing hard limit: asking for more than it would make setrlimit fail."""
  hard = resource.getrlimit(kind)[1]
  return value if hard == resource.RLIM_INFINITY else min(value, hard)
