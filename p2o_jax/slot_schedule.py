"""Host bookkeeping of one engine call (`sampling.Sampler.generate`): the rows waiting, which row each slot holds,
which slots to fill next, and how to pack live rows so the device state can shrink with them. Plain Python.

Slots are `blocks` blocks of `per_block` (one block per batch device); slot d * per_block + j is row j of block d. New
rows take the free slots with the lowest in-block index first, round-robin over blocks, so rows stay balanced over
devices; once no row waits, `regroup` packs each block's live rows and drops idle slots.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RowRequests:
  """One call's rows: prompt, own token limit, temperature and stop tokens (besides the sampler's EOS ids)."""

  prompts: list[list[int]]
  limits: np.ndarray  # (rows,) int32
  temperatures: np.ndarray  # (rows,) float32; 0 = greedy
  stops: list[tuple[int, ...]]

  def __len__(self) -> int:
    return len(self.prompts)

  @classmethod
  def build(cls, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
            limits: Sequence[int] | None = None, temperatures: Sequence[float] | None = None,
            stops: Sequence[Sequence[int]] | None = None) -> RowRequests:
    rows = len(prompts)
    for name, values in (("row_max_new_tokens", limits), ("row_temperatures", temperatures),
                         ("row_stop_ids", stops)):
      if values is not None and len(values) != rows:
        raise ValueError(f"{name} has {len(values)} entries for {rows} rows")
    limits = np.full(rows, max_new_tokens, np.int32) if limits is None else np.asarray(limits, np.int32)
    for r in np.flatnonzero((limits < 1) | (limits > max_new_tokens)):
      raise ValueError(f"row {r}: row_max_new_tokens={limits[r]} is outside [1, max_new_tokens={max_new_tokens}]")
    temps = np.full(rows, temperature, np.float32) if temperatures is None else np.asarray(temperatures, np.float32)
    for r in np.flatnonzero(~(temps >= 0)):
      raise ValueError(f"row {r}: temperature {temps[r]} must be >= 0")
    stop_lists = [tuple(int(t) for t in s) for s in stops] if stops is not None else [()] * rows
    return cls([list(p) for p in prompts], limits, temps, stop_lists)

  def sampling_kind(self) -> str:
    greedy = self.temperatures == 0
    return "greedy" if greedy.all() else "sample" if not greedy.any() else "mixed"

  def stop_width(self) -> int:
    return max((len(s) for s in self.stops), default=0) or 1


class SlotSchedule:
  """The queue of waiting rows and, per slot, the row it holds and the device's last (done, pos, count) for it."""

  def __init__(self, rows: int, blocks: int, per_block: int):
    self.blocks, self.per_block = blocks, per_block
    self.queue = collections.deque(range(rows))
    self.holder = np.full(blocks * per_block, -1, np.int64)  # the request row each slot holds, -1: free
    self.pos = np.zeros(blocks * per_block, np.int64)  # from the device after every program
    self.done = np.ones(blocks * per_block, bool)
    self.count = np.zeros(blocks * per_block, np.int64)  # tokens each slot's row has generated

  def _fill_order(self) -> np.ndarray:
    """Every slot, lowest in-block index first, round-robin over blocks."""
    return np.arange(self.blocks * self.per_block).reshape(self.blocks, self.per_block).T.reshape(-1)

  def place(self) -> list[tuple[int, int]]:
    """(slot, row) for as many waiting rows as there are free slots."""
    placed = []
    for slot in self._fill_order():
      if not self.queue:
        break
      if self.holder[slot] < 0:
        row = self.queue.popleft()
        self.holder[slot] = row
        placed.append((int(slot), row))
    return placed

  def update(self, status: np.ndarray) -> list[tuple[int, int]]:
    """Take the device's (done, pos, count) per slot; return (slot, row) of the rows that finished, and free them."""
    self.done, self.pos, self.count = status[0].astype(bool), status[1].astype(np.int64), status[2].astype(np.int64)
    finished = [(int(s), int(self.holder[s])) for s in np.flatnonzero(self.done & (self.holder >= 0))]
    for slot, _ in finished:
      self.holder[slot] = -1
    return finished

  def live(self) -> np.ndarray:
    return self.holder >= 0

  def idle(self) -> bool:
    return not self.queue and not self.live().any()

  def _blocked_live(self) -> np.ndarray:
    return self.live().reshape(self.blocks, self.per_block)

  def packed_rows(self) -> int:
    """Slots per block that would hold every live row if they were packed: the most live rows of any block."""
    return int(self._blocked_live().sum(axis=1).max())

  def regroup(self, per_block: int) -> np.ndarray:
    """(blocks, per_block) old in-block slot indices for new slots: each block's live rows first, in order, then idle
    slots. Applied to the bookkeeping; the device state must be regrouped with the same index."""
    order = np.argsort(~self._blocked_live(), axis=1, kind="stable")
    if per_block > self.per_block:
      raise ValueError(f"regroup to {per_block} slots per block, more than the {self.per_block} there are")
    index = order[:, :per_block]
    flat = (index + self.per_block * np.arange(self.blocks)[:, None]).reshape(-1)
    self.holder, self.pos, self.done, self.count = (x[flat] for x in (self.holder, self.pos, self.done, self.count))
    self.per_block = per_block
    return index

  def longest_live(self) -> int:
    """The highest cache position a live row writes next."""
    return int(self.pos[self.live()].max(initial=0))
