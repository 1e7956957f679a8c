"""Epoch-exact, resumable, multi-host batches of queries for the trainer, built on grain's random-access MapDataset.

Epoch e is one permutation of the queries, shuffled with a seed derived from (seed, e). Global batch `step` of it is
positions [step*G, (step+1)*G); process p of P reads only the contiguous slice [p*G/P, (p+1)*G/P) of every global
batch, so the local batches of all processes, concatenated in process order, are exactly the global batch a single
process would see. Every batch is a pure function of (queries, seed, epoch, step): the iterator state is (epoch, step)
plus a fingerprint of the rest, a resume is bit-exact, and a run may even resume on a different number of processes.

With drop_remainder=False the last global batch of an epoch is smaller (N mod G queries) and is cut into P contiguous
parts of ceil((N mod G) / P), so the last processes' parts may be shorter or empty.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from p2o_jax.data.records import Query

_IDENTITY_KEYS = ("seed", "global_batch_size", "drop_remainder", "num_queries", "queries_digest")
_STATE_KEYS = ("epoch", "step") + _IDENTITY_KEYS


def epoch_seed(seed: int, epoch: int) -> int:
  """The shuffle seed of one epoch; SeedSequence hashing keeps neighbouring (seed, epoch) pairs unrelated."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def queries_digest(queries: Sequence[Query]) -> str:
  """A short hash of the query ids in order: a saved position means nothing for a different or reordered list."""
  return hashlib.sha256(json.dumps([query.id for query in queries]).encode()).hexdigest()[:16]


def _check_int(name: str, value: int, lowest: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lowest:
    raise ValueError(f"{name} must be an integer >= {lowest}, got {value!r}")


class EpochBatches:
  """This process's local batches of every epoch of `queries`; see the module docstring for the layout."""

  def __init__(self, queries: Sequence[Query], *, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, drop_remainder: bool = True):
    _check_int("global_batch_size", global_batch_size, 1)
    _check_int("seed", seed, 0)
    _check_int("process_count", process_count, 1)
    _check_int("process_index", process_index, 0)
    if process_index >= process_count:
      raise ValueError(f"process_index {process_index} must be < process_count {process_count}")
    if global_batch_size % process_count:
      raise ValueError(f"global_batch_size {global_batch_size} is not divisible by process_count {process_count}")
    if len(queries) < global_batch_size:
      raise ValueError(f"only {len(queries)} queries, fewer than one global batch of {global_batch_size}")
    self.queries = tuple(queries)
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // int(process_count)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.drop_remainder = bool(drop_remainder)
    self.queries_digest = queries_digest(self.queries)

  @property
  def full_batches_per_epoch(self) -> int:
    return len(self.queries) // self.global_batch_size

  @property
  def steps_per_epoch(self) -> int:
    has_tail = not self.drop_remainder and len(self.queries) % self.global_batch_size
    return self.full_batches_per_epoch + int(bool(has_tail))

  def epoch_batches(self, epoch: int) -> grain.MapDataset:
    """This process's local batches (lists of Query) of `epoch`, one per step, lazily computed."""
    _check_int("epoch", epoch, 0)
    shuffled = grain.MapDataset.source(self.queries).shuffle(seed=epoch_seed(self.seed, epoch))
    full_end = self.full_batches_per_epoch * self.global_batch_size
    # Consecutive local-size chunks of the permutation: global batch s is chunks s*P .. s*P+P-1, ours is s*P + p.
    local = shuffled[:full_end].batch(self.local_batch_size, batch_fn=list)[self.process_index::self.process_count]
    if self.steps_per_epoch == self.full_batches_per_epoch:
      return local
    return grain.MapDataset.concatenate([local, self._tail_part(shuffled[full_end:])])

  def _tail_part(self, tail: grain.MapDataset) -> grain.MapDataset:
    share = -(-len(tail) // self.process_count)
    mine = tail.batch(share, batch_fn=list)[self.process_index:self.process_index + 1]
    # A process past the end still takes the step (with nothing), so all processes run the same number of steps.
    return mine if len(mine) else grain.MapDataset.source([[]])

  def batch(self, epoch: int, step: int) -> list[Query]:
    """This process's part of global batch `step` of `epoch`."""
    _check_int("step", step, 0)
    if step >= self.steps_per_epoch:
      raise ValueError(f"step {step} is out of range: an epoch has {self.steps_per_epoch} steps")
    return self.epoch_batches(epoch)[step]

  def iterator(self, state: Mapping | None = None) -> "EpochIterator":
    """An endless iterator over (epoch, step, local batch), from the start or from a saved `state()`."""
    return EpochIterator(self, state)


class EpochIterator:
  """Walks the batches epoch after epoch; `state()` is a small JSON-able dict to checkpoint and restore from."""

  def __init__(self, batches: EpochBatches, state: Mapping | None = None):
    self._batches = batches
    self.epoch, self.step = 0, 0  # the position of the batch next() returns
    if state is not None:
      self._restore(state)
    self._epoch_dataset = batches.epoch_batches(self.epoch)

  def next(self) -> tuple[int, int, list[Query]]:
    """(epoch, step, this process's local batch), then advances; crosses into the next epoch after its last step."""
    epoch, step = self.epoch, self.step
    local_batch = self._epoch_dataset[step]
    self.step += 1
    if self.step == self._batches.steps_per_epoch:
      self.epoch, self.step = self.epoch + 1, 0
      self._epoch_dataset = self._batches.epoch_batches(self.epoch)
    return epoch, step, local_batch

  @property
  def epoch_finished(self) -> bool:
    """True right after next() returned the last batch of an epoch (and after restoring a state saved then)."""
    return self.step == 0 and self.epoch > 0

  def state(self) -> dict[str, int | bool | str]:
    """The position plus what the order depends on, so a restore into a different pipeline is refused."""
    batches = self._batches
    return {"epoch": self.epoch, "step": self.step, "seed": batches.seed,
            "global_batch_size": batches.global_batch_size, "drop_remainder": batches.drop_remainder,
            "num_queries": len(batches.queries),
            "queries_digest": batches.queries_digest}

  def _restore(self, state: Mapping) -> None:
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
      raise ValueError(f"iterator state is missing {missing}; expected keys {list(_STATE_KEYS)}")
    expected = self.state()
    for key in _IDENTITY_KEYS:
      if state[key] != expected[key]:
        raise ValueError(f"iterator state has {key}={state[key]!r} but this pipeline has {expected[key]!r}")
    _check_int("state epoch", state["epoch"], 0)
    _check_int("state step", state["step"], 0)
    if state["step"] >= self._batches.steps_per_epoch:
      raise ValueError(f"iterator state step {state['step']} is out of range: an epoch has "
                       f"{self._batches.steps_per_epoch} steps")
    self.epoch, self.step = int(state["epoch"]), int(state["step"])
