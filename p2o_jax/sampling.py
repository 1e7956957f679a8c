"""Autoregressive sampling: `Sampler`, a continuous-batching engine inside our own jitted JAX programs.

A call's rows wait in a queue and run in a fixed number of slots (as many as the KV-cache budget `cache_budget_bytes`
per device holds, at most `slots`); a finished row's slot takes the next waiting row at once. Decode runs in segments
(`slot_programs.decode_segment`); between them the state is resized so that its cache is as long as the longest live
row needs and, once nothing waits, it holds only the live rows: a step's cost follows the live work, not the
allocation or the longest row of the call. Each row may have its own token limit, temperature and stop tokens, and
draws its tokens from (seed, its row index, the token index): the same seed gives the same tokens whatever slot it
lands in.
The sampler reads its own copy of the weights (`sampling_params`): in the compute dtype, whole on every data/fsdp
device, so no decode step gathers full-precision shards. Params are passed as arguments (NNX graphdef/state split), so
the trainer can swap in new weights without recompiling; the slots' state is donated from program to program.
Each sampled token comes with its log-probability under the distribution it was drawn from (see token_sampling).
With several processes, a call is either lockstep (every process passes the same prompts and gets every row back)
or process-local (each passes its own rows and gets its own rows back; the engine runs on all rows); see generate.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from p2o_jax import distributed, sharding
from p2o_jax.models.decoder import Decoder, cast_floating
from p2o_jax.slot_programs import (SLOT_FIELDS, SlotMode, decode_segment, empty_slots, prefill_slots, regroup_fields,
                                   regroup_layer, slot_outputs, slot_status)
from p2o_jax.slot_schedule import RowRequests, SlotSchedule


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 256
  temperature: float = 1.0  # 0 = greedy
  top_p: float = 1.0  # 1 = off
  top_k: int = 0  # 0 = off

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Rows are prompt-major: the n samples of prompt i are rows i*n .. i*n+n-1."""

  tokens: np.ndarray  # (rows, max_new_tokens) int32, pad_id after the stop
  mask: np.ndarray  # (rows, max_new_tokens) bool, True on generated tokens (including the EOS that stopped a row)
  lengths: np.ndarray  # (rows,) int32
  logprobs: np.ndarray  # (rows, max_new_tokens) float32, 0 where masked


def default_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` up to (and always including) `max_len`."""
  buckets = [b for b in (smallest << i for i in range(32)) if b < max_len]
  return tuple(buckets) + (max_len,)


def length_buckets(max_len: int, smallest: int) -> tuple[int, ...]:
  """Powers of two and 1.5x powers of two from `smallest` up to (and always including) `max_len`: a length rounded up
  to one is at most a third longer, for two compiled shapes per doubling. The engine's cache lengths, the train rows'
  prompt and response lengths."""
  steps = sorted({b for p in range(32) for b in (smallest << p, 3 * (smallest << p) // 2)})
  return tuple(b for b in steps if b < max_len) + (max_len,)


def left_truncate(prompts: Sequence[Sequence[int]], max_len: int) -> tuple[list[list[int]], list[int]]:
  """(prompts cut to their last `max_len` tokens, indices of the ones that were longer). verl's truncation='left',
  which the P^2O authors use for templated prompts: the template's head goes, the question and the generation prompt
  stay."""
  return [list(p[-max_len:]) for p in prompts], [i for i, p in enumerate(prompts) if len(p) > max_len]


def round_up_to_bucket(n: int, buckets: Sequence[int]) -> int:
  return next(b for b in buckets if b >= n)


def sampling_params(state: nnx.State, mesh: jax.sharding.Mesh | None, dtype) -> nnx.State:
  """The weights as the sampler reads them: floating params in `dtype` with `SAMPLING_RULES` shardings. `state`
  itself when that changes nothing (f32 compute on a mesh without fsdp), so no second copy is kept."""
  if mesh is None:
    return state if _same_dtype(state, dtype) else cast_floating(state, dtype)
  targets = sharding.state_shardings(state, mesh, sharding.SAMPLING_RULES)
  if _same_dtype(state, dtype) and _same_layout(state, targets):
    return state
  return jax.jit(functools.partial(cast_floating, dtype=dtype), out_shardings=targets)(state)


def abstract_sampling_params(state: nnx.State, mesh: jax.sharding.Mesh, dtype) -> tuple[nnx.State, bool]:
  """(`sampling_params` of abstract params as ShapeDtypeStructs, whether that is a second copy of the weights)."""
  targets = sharding.state_shardings(state, mesh, sharding.SAMPLING_RULES)
  copy = not (_same_dtype(state, dtype) and _same_layout(state, targets))

  def one(variable, target):
    x = variable.get_value()
    return variable.replace(jax.ShapeDtypeStruct(x.shape, _floating_dtype(x.dtype, dtype), sharding=target))

  return jax.tree.map(one, state, targets, is_leaf=_is_variable), copy


def _floating_dtype(current, dtype):
  return dtype if jnp.issubdtype(current, jnp.floating) else current


def _same_dtype(state: nnx.State, dtype) -> bool:
  return all(v.dtype == _floating_dtype(v.dtype, dtype) for v in jax.tree.leaves(state, is_leaf=_is_variable))


def _same_layout(state: nnx.State, targets) -> bool:
  variables = jax.tree.leaves(state, is_leaf=_is_variable)
  return all(v.get_value().sharding.is_equivalent_to(t, v.ndim) for v, t in zip(variables, jax.tree.leaves(targets)))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def kv_cache_bytes_per_row(cfg, length: int, mesh: jax.sharding.Mesh | None) -> int:
  """KV-cache bytes one row of `length` slots takes on one device (kv heads split over "tensor" where they divide)."""
  tensor = mesh.shape.get("tensor", 1) if mesh is not None else 1
  kv_heads = cfg.num_kv_heads // tensor if cfg.num_kv_heads % tensor == 0 else cfg.num_kv_heads
  return 2 * cfg.num_layers * kv_heads * length * cfg.head_dim * np.dtype(cfg.dtype).itemsize


def chunk_rows(cache_budget_bytes: int, cfg, length: int, mesh: jax.sharding.Mesh | None) -> int | None:
  """Slots (rows decoding at once) whose KV cache fits `cache_budget_bytes` per device (None: no budget)."""
  if not cache_budget_bytes:
    return None
  per_row = kv_cache_bytes_per_row(cfg, length, mesh)
  rows_per_device = cache_budget_bytes // per_row
  if rows_per_device < 1:
    raise ValueError(f"rollout.kv_cache_gib: one row of {length} tokens needs {per_row / 2**30:.2f} GiB of KV cache "
                     f"per device, more than the budget of {cache_budget_bytes / 2**30:.2f} GiB")
  return rows_per_device * sharding.batch_divisor(mesh)




def slot_count(rows: int, length: int, *, cfg, mesh: jax.sharding.Mesh | None, cache_budget_bytes: int,
               most: int = 0) -> int:
  """Slots for a call of `rows` rows whose cache rows hold `length` positions: as many as the KV-cache budget holds
  (all rows without one), at most `most` if set, never more than the rows need; a multiple of the batch devices."""
  divisor = sharding.batch_divisor(mesh)
  wanted = -(-rows // divisor) * divisor
  if most:
    wanted = min(wanted, -(-most // divisor) * divisor)
  budget = chunk_rows(cache_budget_bytes, cfg, length, mesh)
  return min(wanted, budget) if budget else wanted


def _params_mesh(state: nnx.State) -> jax.sharding.Mesh | None:
  shardings = [getattr(x, "sharding", None) for x in jax.tree.leaves(state)]
  if not all(isinstance(s, jax.sharding.NamedSharding) for s in shardings):
    return None
  meshes = {s.mesh for s in shardings}
  return meshes.pop() if len(meshes) == 1 else None


def _distinct_prompts(prompts: Sequence[Sequence[int]], most_copies: int) -> tuple[list[tuple[int, ...]], list[int]]:
  """(the prompts to run, each row's index into them): equal prompts run once for up to `most_copies` rows."""
  distinct: list[tuple[int, ...]] = []
  copies: list[int] = []
  latest: dict[tuple[int, ...], int] = {}
  source = []
  for prompt in map(tuple, prompts):
    i = latest.get(prompt)
    if i is None or copies[i] == most_copies:
      i = latest[prompt] = len(distinct)
      distinct.append(prompt)
      copies.append(0)
    copies[i] += 1
    source.append(i)
  return distinct, source


def _pad_to(values: Sequence[int], size: int, fill: int) -> np.ndarray:
  return np.asarray(list(values) + [fill] * (size - len(values)), np.int32)


class Sampler:
  """Samples continuations of token-id prompts from a Decoder: a continuous-batching engine over a fixed number of
  slots (see slot_programs and slot_schedule), optionally sharded over a mesh.

  One `generate` call: every row (prompt x n) waits in a queue; free slots take rows in groups (one prefill each);
  decode segments run until rows finish; their slots take the next rows. Between segments the cache is resized to the
  longest live row (length_buckets, at least SEGMENT_STEPS ahead), and once the queue is empty the live rows are
  packed and idle slots dropped. Each row may have its own token limit, temperature and stop tokens. The same seed
  gives the same tokens whatever slot a row lands in.
  """

  # A decode step costs what the cache's length costs (attention reads it all; XLA:CPU's scatter rewrites it), so the
  # cache keeps little headroom: the demo's 48 rollouts of ~18 tokens after 24-token prompts took 50 ms with these
  # values (a 64-position cache) against 75 ms with 64 and 128 (a 128-position one). A segment is at most
  # SEGMENT_STEPS long; a cache grows only at a bucket boundary (a few regroups per call).
  SEGMENT_STEPS = 32  # the cache leaves room for at least this many more tokens of the longest live row
  SMALLEST_CACHE = 32  # the shortest cache: the smallest of a call's length_buckets
  REFILL_FRACTION = 8  # with rows waiting, a segment ends once 1/REFILL_FRACTION of the slots (at least 1) are free
  # A prefill runs a prompt once for up to this many rows (a query's K rollouts): its cache is written to each of their
  # slots by one scatter per copy, unrolled in the program, so the count stays small.
  MAX_PROMPT_COPIES = 8

  def __init__(self, model: Decoder, *, eos_ids: Sequence[int], pad_id: int, max_prompt_len: int,
               prompt_buckets: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None,
               cache_budget_bytes: int = 0, copy_weights: bool = True, slots: int = 0):
    if not eos_ids:
      raise ValueError("the sampler needs at least one EOS token id")
    if slots < 0:
      raise ValueError(f"slots={slots} must be >= 0 (0: as many as the KV-cache budget allows)")
    self.graphdef, state = nnx.split(model)
    self.cfg = model.cfg
    self.cache_budget_bytes = cache_budget_bytes  # per device; 0: no budget
    self.slots = slots
    # False: read the params as they are (fsdp shards gathered every decode step) instead of keeping a whole copy; for
    # rare calls such as Self-Ref reflection, where a second copy's HBM costs more than the gathers' time.
    self.copy_weights = copy_weights
    # Without a mesh, the mesh the params live on (load_hf_model puts them on a 1-device one): every program of a call
    # then runs under it, so their outputs carry one kind of sharding and a call compiles each program once.
    self.mesh = mesh if mesh is not None else _params_mesh(state)
    self.set_params(state)
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.pad_id = int(pad_id)
    self.max_prompt_len = max_prompt_len
    self.prompt_buckets = tuple(sorted(prompt_buckets or default_buckets(max_prompt_len)))
    if self.prompt_buckets[-1] < max_prompt_len:
      raise ValueError(f"the largest prompt bucket {self.prompt_buckets[-1]} is below max_prompt_len={max_prompt_len}")
    self.last_stats: dict[str, int] = {}

  def set_params(self, state: nnx.State) -> None:
    """Sample from new weights (same architecture and shardings): no recompilation."""
    self.state = sampling_params(state, self.mesh, self.cfg.dtype) if self.copy_weights else state

  def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
    for i, prompt in enumerate(prompts):
      if not len(prompt):
        raise ValueError(f"prompt {i} is empty")
      if len(prompt) > self.max_prompt_len:
        raise ValueError(f"prompt {i} has {len(prompt)} tokens; the sampler's max_prompt_len is {self.max_prompt_len} "
                         "(Policy.generate left-truncates; a direct Sampler call must pass prompts that fit)")

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, n: int = 1,
               seed: int | jax.Array = 0, process_local: bool = False,
               row_max_new_tokens: Sequence[int] | None = None, row_temperatures: Sequence[float] | None = None,
               row_stop_ids: Sequence[Sequence[int]] | None = None) -> SampleOutput:
    """Sample `n` continuations of every prompt (rows prompt-major); the row_* arguments, one entry per row, override
    cfg.max_new_tokens (each in [1, cfg.max_new_tokens]), cfg.temperature (0: greedy) and add stop tokens.

    By default every process passes the same prompts and gets every row back (evaluation, GEPA: lockstep). With
    `process_local=True` each process passes only its own prompts (possibly none), the processes' rows form one
    request in process order, and each process gets back its own rows (training rollouts).
    """
    self._check_prompts(prompts)
    rows = [list(p) for p in prompts for _ in range(n)]
    requests = RowRequests.build(rows, cfg.max_new_tokens, cfg.temperature if not cfg.greedy else 0.0,
                                 row_max_new_tokens, row_temperatures, row_stop_ids)
    mine = slice(0, len(requests))
    if process_local and jax.process_count() > 1:
      requests, mine = self._whole_request(requests)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    tokens, logprobs, lengths = self._run(requests, cfg, key)
    return _output(tokens[mine], logprobs[mine], lengths[mine])

  def _whole_request(self, requests: RowRequests) -> tuple[RowRequests, slice]:
    """Every process's rows, in process order (the engine runs lockstep on all of them), and this process's slice."""
    if self.mesh is None:
      raise ValueError("a multi-process sampler needs a mesh over all processes' devices")
    distributed.check_batch_layout(self.mesh)
    parts = distributed.allgather_json([requests.prompts, requests.limits.tolist(), requests.temperatures.tolist(),
                                        [list(s) for s in requests.stops]])
    before = sum(len(p[0]) for p in parts[:jax.process_index()])
    merged = RowRequests([p for part in parts for p in part[0]], np.asarray([x for p in parts for x in p[1]], np.int32),
                         np.asarray([x for p in parts for x in p[2]], np.float32),
                         [tuple(s) for p in parts for s in p[3]])
    return merged, slice(before, before + len(requests))

  def _run(self, requests: RowRequests, cfg: SamplingConfig, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    self.last_stats = dict(slots=0, prefills=0, segments=0, regroups=0, tokens=0)
    call = _Call.start(self, requests, cfg, key)
    if len(requests):
      with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
        self._decode_all(call)
    self.last_stats["tokens"] = int(call.lengths.sum())
    return call.tokens, call.logprobs, call.lengths

  def _decode_all(self, call: _Call) -> None:
    """Fill free slots, decode a segment, collect finished rows; until the queue is empty and every slot idle."""
    schedule = call.schedule
    length = call.cache_len(call.prompt_len + self.SEGMENT_STEPS)
    carry = empty_slots(self.cfg, slots=call.slots, length=length, mode=call.mode,
                        stop_width=call.requests.stop_width())
    self.last_stats["slots"] = call.slots
    while not schedule.idle():
      placed = schedule.place()
      if placed:
        group = self._prefill_group(placed, call.requests, schedule.blocks * schedule.per_block)
        if group["tokens"].shape[1] > length:
          length = call.cache_len(group["tokens"].shape[1] + self.SEGMENT_STEPS)
          carry = self._regroup(carry, schedule, schedule.per_block, length)
        carry = prefill_slots(self.graphdef, self.state, carry, call.key, call.top_p, group, mode=call.mode)
        self.last_stats["prefills"] += 1
        self._collect(carry, call)
        continue  # rows that stopped at their first token free their slots at once
      per_block = schedule.per_block
      if not schedule.queue:  # nothing waits: keep only the slots the live rows need
        per_block = round_up_to_bucket(schedule.packed_rows(), default_buckets(schedule.per_block, smallest=1))
      needed = call.cache_len(schedule.longest_live() + self.SEGMENT_STEPS)
      if per_block < schedule.per_block or needed > length or 2 * needed <= length:
        length = needed
        carry = self._regroup(carry, schedule, per_block, length)
      carry = self._segment(carry, call, length)
      self._collect(carry, call)

  def _collect(self, carry, call: _Call) -> None:
    """Read the slots' status; copy the rows that finished into the call's outputs and free their slots."""
    finished = call.schedule.update(distributed.to_host(slot_status(carry)))
    if not finished:
      return
    slots = self._slot_index([slot for slot, _ in finished])
    got_tokens, got_logp = (distributed.to_host(x) for x in slot_outputs(carry, slots))
    for i, (slot, row) in enumerate(finished):
      call.tokens[row], call.logprobs[row] = got_tokens[i], got_logp[i]
      call.lengths[row] = call.schedule.count[slot]

  def _regroup(self, carry, schedule: SlotSchedule, per_block: int, length: int) -> dict:
    """The state with `per_block` slots per block (live rows first) and a cache of `length` positions."""
    index = self._replicated(schedule.regroup(per_block).astype(np.int32))
    self.last_stats["regroups"] += 1
    fields = regroup_fields({k: carry[k] for k in SLOT_FIELDS}, index)
    old, cache = carry.pop("cache"), []
    while old:  # the old layer's last reference goes with the call: freed once it is copied
      cache.append(regroup_layer(old.pop(0), index, length=length))
    return dict(cache=cache, **fields)

  def _slot_index(self, slots: Sequence[int]) -> jax.Array:
    """`slots` padded (with its first) to a power-of-two count: few distinct gathers to compile."""
    return self._replicated(_pad_to(slots, 1 << max(len(slots) - 1, 0).bit_length(), slots[0]))

  def _replicated(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

  def _prefill_group(self, placed: list[tuple[int, int]], requests: RowRequests, slots: int) -> dict[str, jax.Array]:
    """The placed rows as one prefill: their distinct prompts right-padded to a bucket (a power-of-two count, a
    multiple of the batch devices) and `copies`, the slots each one's cache goes to; per row a power-of-two count (a
    multiple of the batch devices) whose padding rows point past the last slot, so nothing of theirs is written."""
    divisor = sharding.batch_divisor(self.mesh)
    count = lambda n: -(-max(divisor, 1 << max(n - 1, 0).bit_length()) // divisor) * divisor
    rows = [row for _, row in placed]
    prompts, source = _distinct_prompts([requests.prompts[row] for row in rows], self.MAX_PROMPT_COPIES)
    width = round_up_to_bucket(max(map(len, prompts)), self.prompt_buckets)
    tokens = np.full((count(len(prompts)), width), self.pad_id, np.int32)
    for i, prompt in enumerate(prompts):
      tokens[i, :len(prompt)] = prompt
    copies = np.full((len(tokens), 1 << (max(collections.Counter(source).values()) - 1).bit_length()), slots, np.int32)
    for (slot, _), u in zip(placed, source):
      copies[u, np.count_nonzero(copies[u] < slots)] = slot
    size = count(len(rows))
    stops = np.full((size, requests.stop_width()), -1, np.int32)
    for i, row in enumerate(rows):
      stops[i, :len(requests.stops[row])] = requests.stops[row]
    group = dict(tokens=tokens, lengths=_pad_to([len(p) for p in prompts], len(tokens), 1), copies=copies,
                 source=_pad_to(source, size, 0), slot=_pad_to([s for s, _ in placed], size, slots),
                 row=_pad_to(rows, size, 0), limit=_pad_to(requests.limits[rows], size, 1),
                 temperature=np.pad(requests.temperatures[rows], (0, size - len(rows))), stops=stops)
    return {k: self._put(v) for k, v in group.items()}

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim, len(x)))

  def _segment(self, carry, call: _Call, length: int):
    """One decode segment. It ends when the cache is full, when enough slots free up to refill, or (nothing waiting)
    when half the slots are idle, so the state can shrink."""
    schedule = call.schedule
    slots = schedule.blocks * schedule.per_block
    live = int(schedule.live().sum())
    if schedule.queue:
      wanted = max(1, min(len(schedule.queue), slots // self.REFILL_FRACTION))
    else:
      wanted = live if schedule.per_block == 1 else max(1, live - slots // 2)
    self.last_stats["segments"] += 1
    return decode_segment(self.graphdef, self.state, carry, call.key, call.top_p,
                          jnp.int32(length - schedule.longest_live()), jnp.int32(slots - live + min(wanted, live)),
                          mode=call.mode)


@dataclasses.dataclass
class _Call:
  """One generate call's fixed choices, its schedule and its outputs (filled as rows finish)."""

  requests: RowRequests
  mode: SlotMode
  schedule: SlotSchedule
  slots: int
  prompt_len: int  # the longest prompt's bucket
  buckets: tuple[int, ...]  # the cache lengths the state takes: length_buckets up to prompt_len + max_new_tokens
  key: jax.Array
  top_p: jax.Array
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray

  @classmethod
  def start(cls, sampler: Sampler, requests: RowRequests, cfg: SamplingConfig, key) -> _Call:
    m, rows = cfg.max_new_tokens, len(requests)
    prompt_len = round_up_to_bucket(max(map(len, requests.prompts), default=1), sampler.prompt_buckets)
    # The allocation (prompt bucket + max_new_tokens) only caps the cache: its length follows the longest live row.
    slots = slot_count(max(rows, 1), prompt_len + m, cfg=sampler.cfg, mesh=sampler.mesh,
                       cache_budget_bytes=sampler.cache_budget_bytes, most=sampler.slots)
    blocks = sharding.batch_divisor(sampler.mesh)
    return cls(requests=requests,
               mode=SlotMode(m, requests.sampling_kind(), cfg.top_k, cfg.top_p < 1.0, sampler.eos_ids, sampler.pad_id),
               schedule=SlotSchedule(rows, blocks, slots // blocks), slots=slots, prompt_len=prompt_len,
               buckets=length_buckets(prompt_len + m, smallest=sampler.SMALLEST_CACHE), key=key,
               top_p=jnp.float32(cfg.top_p), tokens=np.full((rows, m), sampler.pad_id, np.int32),
               logprobs=np.zeros((rows, m), np.float32), lengths=np.zeros(rows, np.int32))

  def cache_len(self, needed: int) -> int:
    """The cache length for `needed` positions: its bucket, at most the allocation."""
    return round_up_to_bucket(min(needed, self.buckets[-1]), self.buckets)


def _output(tokens: np.ndarray, logprobs: np.ndarray, lengths: np.ndarray) -> SampleOutput:
  mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return SampleOutput(tokens=tokens, mask=mask, lengths=lengths, logprobs=np.where(mask, logprobs, 0.0))


def lower_sampler_call(graphdef, state: nnx.State, mesh: jax.sharding.Mesh, *, rows: int, prompt_len: int,
                       cfg: SamplingConfig) -> tuple[jax.stages.Compiled, jax.stages.Compiled]:
  """The compiled prefill and decode segment of an engine call with `rows` slots at their largest (every slot
  prefilled at once with `prompt_len`-token prompts; decoding with the cache at the whole allocation), from abstract
  `state` (see abstract_sampling_params): what `Sampler.generate` runs at its peak, for the dry run."""
  model_cfg = nnx.eval_shape(lambda: nnx.merge(graphdef, state)).cfg
  mode = SlotMode(cfg.max_new_tokens, "greedy" if cfg.greedy else "sample", cfg.top_k, cfg.top_p < 1.0, eos_ids=(1,),
                  pad_id=0)
  rows_of = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape),
                                                                                                     rows))
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=jax.sharding.NamedSharding(mesh, P()))
  key, f32, i32 = scalar(jax.eval_shape(lambda: jax.random.key(0)).dtype), scalar(jnp.float32), scalar(jnp.int32)
  group = dict(tokens=rows_of((rows, prompt_len), jnp.int32), stops=rows_of((rows, 1), jnp.int32),
               temperature=rows_of((rows,), jnp.float32), copies=rows_of((rows, 1), jnp.int32),
               **{k: rows_of((rows,), jnp.int32) for k in ("lengths", "source", "slot", "row", "limit")})
  with jax.set_mesh(mesh):
    empty = empty_slots.lower(model_cfg, slots=rows, length=prompt_len + cfg.max_new_tokens, mode=mode,
                              stop_width=1).compile()
    carry = jax.tree.map(lambda info, target: jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=target),
                         empty.out_info, empty.output_shardings)
    prefill = prefill_slots.lower(graphdef, state, carry, key, f32, group, mode=mode).compile()
    decode = decode_segment.lower(graphdef, state, carry, key, f32, i32, i32, mode=mode).compile()
  return prefill, decode
