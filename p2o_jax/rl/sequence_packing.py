"""Train rows without padding: (prompt, response) sequences packed side by side into rows of one length, and the
hidden state that predicts each response token gathered back into a (rows, R) response layout for the loss.

Layouts (config grpo.packing; "auto" resolves by attention implementation, `resolve_packing`):
- "rows": every sequence alone in its packed row (the padded layout; bool segments, which cuDNN attention takes).
- "sequences": sequences side by side, each its own attention segment (ids 1, 2, ... in a row, 0 = padding) with
  positions restarting at 0, so each computes exactly what it would alone (verl's remove-padding; splash attention
  takes these segments).
- "shared_prompts": also the rows of one cell with the same prompt (a query's K rollouts) share one copy of it: the
  prompt minus its last token is a segment of its own, and each response is a segment [last prompt token, response]
  that attends to that shared prefix too (segments (rows, L, 2): own id, id of the prefix it also sees; attention
  "plain" and "chunked"). The same log-probs and gradients as one row per sequence, with the prompt's positions
  computed once per group instead of K times.
A sequence ends one token before its response does: the last token is only ever a target. `predictor` (rows, R): for
response token j, the index into its cell's packed positions, flattened, of the position that predicts it.

Cells. The rows of one micro-batch on one batch device form a cell (`rows_per_cell` consecutive rows: the order
`BatchLayout.to_micro_batches` gives the devices), and a cell's sequences pack only into its own packed rows, so the
gather stays on the device (`gather_predicted`, batched over cells). Every cell has the same number of packed rows,
as the arrays are one global batch: packed arrays are (cells * rows, L), row-major by cell, so the same
`to_micro_batches` puts each cell's packed rows on its device with its own response rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from p2o_jax.sampling import length_buckets, round_up_to_bucket

PACKINGS = ("rows", "sequences", "shared_prompts")
PACKING_CHOICES = ("auto", *PACKINGS)
# "auto" per attention implementation: shared prefixes need the XLA mask; splash takes plain segments; cuDNN only
# a row's validity.
AUTO_PACKING = {"plain": "shared_prompts", "chunked": "shared_prompts", "splash": "sequences", "cudnn": "rows"}
MODEL_INPUTS = ("tokens", "positions", "segments", "predictor", "response_tokens", "response_mask")


def resolve_packing(packing: str, attention: str) -> str:
  """The layout `packing` means for the resolved attention implementation `attention`."""
  return AUTO_PACKING[attention] if packing == "auto" else packing


def attention_span(cfg) -> float:
  """Keys attended per position that cost as many FLOPs as the position's matmuls (a ModelConfig's projections, MLP
  and LM head against QK^T and PV over the keys)."""
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
  return (cfg.num_layers * per_layer + cfg.hidden_size * cfg.vocab_size) / (2 * cfg.num_layers * q)


@dataclasses.dataclass(frozen=True)
class Packer:
  """One run's packing: its layout, the rows of a cell and the longest sequence a row may hold."""

  packing: str  # one of PACKINGS
  rows_per_cell: int
  max_len: int  # rollout.max_prompt_len + rollout.max_new_tokens
  attention_span: float
  pad_id: int

  def shape(self, prompt_ids: Sequence[Sequence[int]], mask: np.ndarray) -> PackedShape:
    return packed_shape(prompt_ids, mask, self.rows_per_cell, self.max_len, self.packing, self.attention_span)

  def pack(self, prompt_ids: Sequence[Sequence[int]], tokens: np.ndarray, mask: np.ndarray,
           shape: PackedShape) -> dict[str, np.ndarray]:
    return pack_sequences(prompt_ids, tokens, mask, self.pad_id, self.rows_per_cell, shape, self.packing)


@dataclasses.dataclass(frozen=True)
class PackedShape:
  rows: int  # packed rows per cell
  row_len: int  # L: tokens per packed row
  response_len: int  # R: the response layout's length

  def as_array(self) -> np.ndarray:
    return np.asarray(dataclasses.astuple(self), np.int32)


@dataclasses.dataclass(frozen=True)
class _Unit:
  """Rows packed together behind one copy of their prompt (one row unless prompts are shared)."""

  prompt: tuple[int, ...]
  rows: tuple[int, ...]
  length: int  # tokens: the prompt minus its last token, then each row's last prompt token and response minus its last


def response_lengths(mask: np.ndarray) -> np.ndarray:
  """Valid tokens per response row; a response must be a prefix of its row (as the sampler writes them)."""
  lengths = mask.sum(axis=1).astype(np.int64)
  if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] < lengths[:, None]):
    raise ValueError("response masks must be prefixes of their rows")
  return lengths


def _units(prompt_ids: Sequence[Sequence[int]], lengths: np.ndarray, rows: range, row_len: int,
           share: bool) -> list[_Unit]:
  """The cell's rows as units of at most `row_len` tokens: consecutive rows with the same prompt together when
  `share` (a group that does not fit is split, each part with its own prompt). Rows without a response are left out."""
  units: list[_Unit] = []
  for i in rows:
    if lengths[i] == 0:
      continue
    prompt, size = tuple(prompt_ids[i]), int(lengths[i])
    last = units[-1] if units else None
    if share and last is not None and last.prompt == prompt and last.length + size <= row_len:
      units[-1] = _Unit(prompt, (*last.rows, i), last.length + size)
    else:
      units.append(_Unit(prompt, (i,), len(prompt) - 1 + size))
  return units


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(bin of each item, its offset in the bin, number of bins): longest first, each into the first bin it fits."""
  used: list[int] = []
  bin_of, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    b = next((b for b, u in enumerate(used) if u + lengths[i] <= capacity), len(used))
    if b == len(used):
      used.append(0)
    bin_of[i], offset[i] = b, used[b]
    used[b] += lengths[i]
  return bin_of, offset, len(used)


def _bins(units: list[_Unit], row_len: int, packing: str) -> tuple[np.ndarray, np.ndarray, int]:
  if packing == "rows":
    return np.arange(len(units)), np.zeros(len(units), np.int64), len(units)
  return first_fit_decreasing([u.length for u in units], row_len)


def row_len_buckets(max_len: int) -> tuple[int, ...]:
  """Packed row lengths up to (and always including) `max_len`: quarter steps between powers of two below 128 (8, 10,
  12, 14, 16, 20, ...), eighth steps from 128 (128, 144, 160, ...), so a row holds at most 1/5 (1/9) of padding
  past the longest sequence. A 16-token prompt and a 128-token response fit 144 exactly, as the prompt and response
  buckets of a padded row (16 + 128) do."""
  quarters = {(8 << p) * q // 4 for p in range(4) for q in (4, 5, 6, 7)}
  eighths = {(128 << p) * q // 8 for p in range(28) for q in range(8, 16)}
  return tuple(b for b in sorted(quarters | eighths) if b < max_len) + (max_len,)


def packed_shape(prompt_ids: Sequence[Sequence[int]], mask: np.ndarray, rows_per_cell: int, max_len: int,
                 packing: str, attention_span: float) -> PackedShape:
  """The cheapest bucketed shape these rows pack into. Row lengths L are tried from the longest sequence's bucket up
  to `max_len` (`row_len_buckets`), packed rows per cell are bucketed by `length_buckets` (powers of two and 1.5x; at
  most rows_per_cell), and a shape costs rows x L x (1 + L / attention_span): a position's
  matmuls, plus attention over the L keys of its row (attention_span: the keys that cost as much as the matmuls; the
  XLA attentions do not skip other segments' keys). R is the longest response, bucketed."""
  lengths = response_lengths(mask)
  share = packing == "shared_prompts"
  longest = max((len(p) + n - 1 for p, n in zip(prompt_ids, lengths) if n > 0), default=1)
  buckets = row_len_buckets(max_len)
  candidates = buckets[buckets.index(round_up_to_bucket(longest, buckets)):]
  if packing == "rows":
    candidates = candidates[:1]
  cells = range(0, len(prompt_ids), rows_per_cell)
  best = None
  for row_len in candidates:
    needed = max(_bins(_units(prompt_ids, lengths, range(c, c + rows_per_cell), row_len, share), row_len,
                       packing)[2] for c in cells)
    rows = round_up_to_bucket(max(needed, 1), length_buckets(rows_per_cell, smallest=1))
    cost = rows * row_len * (1 + row_len / attention_span)
    if best is None or cost < best[0]:
      best = (cost, rows, row_len)
  response_len = round_up_to_bucket(max(int(lengths.max(initial=0)), 1), length_buckets(mask.shape[1], smallest=8))
  return PackedShape(best[1], best[2], response_len)


def pack_sequences(prompt_ids: Sequence[Sequence[int]], tokens: np.ndarray, mask: np.ndarray, pad_id: int,
                   rows_per_cell: int, shape: PackedShape, packing: str) -> dict[str, np.ndarray]:
  """The packed train inputs of these rows (see the module docstring); `shape` from `packed_shape`, or the maximum
  of several processes' (their arrays form one global batch).

  Returns rows-first arrays: tokens, positions (cells * shape.rows, L) int32 and segments (bool for "rows", (.., L, 2)
  int32 for "shared_prompts", else int32); response_tokens (rows, R) int32, response_mask (rows, R) bool and predictor
  (rows, R) int32 (0 where the mask is off).
  """
  if packing not in PACKINGS:
    raise ValueError(f"unknown packing {packing!r}; valid: {PACKINGS}")
  n_rows = len(prompt_ids)
  if n_rows % rows_per_cell:
    raise ValueError(f"{n_rows} rows do not split into cells of {rows_per_cell}")
  lengths = response_lengths(mask)
  r, row_len = shape.response_len, shape.row_len
  cells = n_rows // rows_per_cell
  packed = np.full((cells * shape.rows, row_len), pad_id, np.int32)
  positions = np.zeros(packed.shape, np.int32)
  segments = np.zeros((*packed.shape, 2), np.int32)  # own id, id of the shared prefix it also sees
  predictor = np.zeros((n_rows, r), np.int32)
  for cell in range(cells):
    units = _units(prompt_ids, lengths, range(cell * rows_per_cell, (cell + 1) * rows_per_cell), row_len,
                   packing == "shared_prompts")
    bin_of, offset, used = _bins(units, row_len, packing)
    if used > shape.rows or any(u.length > row_len for u in units) or lengths.max(initial=0) > r:
      raise ValueError(f"cell {cell} needs {used} rows of up to {max(u.length for u in units)} tokens and "
                       f"responses of {lengths.max()}; the shape has {shape.rows} rows of {row_len}, responses of {r}")
    next_id = 1
    for unit, b, start in zip(units, bin_of, offset):
      row = cell * shape.rows + b
      next_id = _place(unit, tokens, lengths, packed[row], positions[row], segments[row], predictor, int(b) * row_len,
                       int(start), next_id)
  response_mask = _fit(mask, r)
  out = {"tokens": packed, "positions": positions, "predictor": predictor,
         "response_tokens": np.where(response_mask, _fit(tokens, r), pad_id).astype(np.int32),
         "response_mask": response_mask}
  if packing == "shared_prompts":
    out["segments"] = segments
  else:
    out["segments"] = segments[..., 0] > 0 if packing == "rows" else segments[..., 0]
  return out


def _place(unit: _Unit, tokens: np.ndarray, lengths: np.ndarray, packed_row: np.ndarray, positions_row: np.ndarray,
           segments_row: np.ndarray, predictor: np.ndarray, row_base: int, start: int, next_id: int) -> int:
  """Write `unit` at `start` of one packed row (row_base: that row's first flat index in its cell); the next free
  segment id. One row: one segment. Several: the prompt minus its last token is the prefix segment, each row's last
  prompt token and response another that also sees the prefix."""
  prompt = unit.prompt
  prefix_id = next_id
  if len(unit.rows) > 1:
    end = start + len(prompt) - 1
    packed_row[start:end], positions_row[start:end] = prompt[:-1], np.arange(len(prompt) - 1)
    segments_row[start:end] = prefix_id
    start, next_id = end, next_id + 1
  for i in unit.rows:
    n = int(lengths[i])
    body = [*prompt, *tokens[i, :n - 1]] if len(unit.rows) == 1 else [prompt[-1], *tokens[i, :n - 1]]
    first_position = 0 if len(unit.rows) == 1 else len(prompt) - 1
    end = start + len(body)
    packed_row[start:end], positions_row[start:end] = body, first_position + np.arange(len(body))
    segments_row[start:end] = (next_id, next_id if len(unit.rows) == 1 else prefix_id)
    predicts_first = row_base + end - n  # the last prompt token's position predicts response token 0
    predictor[i, :n] = predicts_first + np.arange(n)
    start, next_id = end, next_id + 1
  return next_id


def _fit(x: np.ndarray, width: int) -> np.ndarray:
  """x cut or zero-padded to `width` columns."""
  out = np.zeros((x.shape[0], width), x.dtype)
  out[:, :min(width, x.shape[1])] = x[:, :width]
  return out


def gather_predicted(hidden_nle: jax.Array, predictor_br: jax.Array, cells: int) -> jax.Array:
  """(b, R, e): for each response token, the hidden state of the packed position that predicts it. Batched over
  cells (each cell's rows index only its own packed rows), so under a mesh whose batch axes split the cells the
  gather needs no communication."""
  n, length, e = hidden_nle.shape
  b, r = predictor_br.shape
  hidden = hidden_nle.reshape(cells, n // cells * length, e)
  index = predictor_br.reshape(cells, b // cells, r)
  picked = jax.vmap(lambda h, i: jnp.take(h, i, axis=0))(hidden, index)
  return picked.reshape(b, r, e)
