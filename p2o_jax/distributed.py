"""Multi-host plumbing: starting jax.distributed from the config, and moving values between this process and the rest.

Every process runs the same program on its own share of each batch (DESIGN.md): global arrays are assembled from
process-local rows with `jax.make_array_from_process_local_data`, whose layout puts process p's rows in the p-th
contiguous block of the batch axes (`check_batch_layout`); results come back as this process's block (`local_part`) or
whole (`to_host`); small host values are gathered (`allgather`, `concat_rows`, `allgather_json`) or taken from process
0 (`broadcast_json`, `broadcast`). Those six (`to_host` when the array is split across processes) are collectives when
several processes run: all processes must call them, in the same order. With one process each is a cheap local no-op.

Rewards that decide something every process must agree on are scored once: `scored_on_process_zero` gives a lockstep
call (the same responses on every process) process 0's rewards everywhere, as the verifier's per-item timeout makes
them wall-clock dependent.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from p2o_jax import sharding
from p2o_jax.rewards.functions import ScoreFn, as_scores

log = logging.getLogger(__name__)
INITIALIZE_MODES = ("auto", "always", "never")
CPU_COLLECTIVES = ("gloo", "mpi", "none")


# ---- starting ---------------------------------------------------------------------------------------------------------

def on_tpu_vm() -> bool:
  """libtpu is installed and TPU chips are visible, judged without starting a JAX backend."""
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize_arguments(cfg, env: Mapping[str, str], tpu_vm: bool) -> dict[str, Any] | None:
  """Keyword arguments for jax.distributed.initialize, or None when this run stays single-process.

  "never": None. "always": initialize; what the config leaves unset (coordinator_address "", num_processes 0,
  process_id -1) JAX fills in itself: the coordinator from JAX_COORDINATOR_ADDRESS, the rest auto-detected on TPU VMs,
  SLURM, Open MPI and Kubernetes. "auto": like "always" when a coordinator is given (config or JAX_COORDINATOR_ADDRESS)
  or on a TPU VM (where a bare initialize() discovers the slice's hosts), else None.
  """
  if cfg.initialize == "never":
    return None
  has_coordinator = bool(cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"))
  if cfg.initialize == "auto" and not has_coordinator and not tpu_vm:
    return None
  kwargs: dict[str, Any] = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes > 0:
    kwargs["num_processes"] = int(cfg.num_processes)
  if cfg.process_id >= 0:
    kwargs["process_id"] = int(cfg.process_id)
  return kwargs


def use_cpu_devices(count: int) -> None:
  """Make this process's CPU appear as `count` JAX devices (0: leave JAX's default of one); no effect on TPU or GPU.

  Why: XLA:CPU splits each op over an intra-op thread pool whose workers take ~50-100 us to wake, longer than most
  ops of a tiny model's decode step. With one device per core and the batch data-parallel over them (mesh.data = -1),
  the built-in policy sampled ~1.8x faster on 2 cores with the sampler before the rollout engine. With the engine it
  is the other way round: the demo's GRPO step generated in 0.05 s on one device against 0.08 s on two
  (benchmarks/grpo_step.py). Larger models are better off with one device: a 50M model samples 1.1-1.3x slower on two,
  as each device then reads all the weights every step.
  Only possible before JAX starts its backends; later, the request is logged and ignored.
  """
  if not count:
    return
  try:
    jax.config.update("jax_num_cpu_devices", int(count))
  except RuntimeError:
    log.warning("distributed.cpu_devices=%d ignored: JAX had already started (%d devices)", count, jax.device_count())


def initialize(cfg) -> bool:
  """Split the CPU into `cfg.cpu_devices` devices, and start jax.distributed when `cfg` (config.distributed) and the
  environment ask for it; True if jax.distributed started.

  Must run before anything else touches JAX devices: the CPU devices, the CPU collectives choice and the process
  topology are fixed when the backend starts.
  """
  use_cpu_devices(cfg.cpu_devices)
  kwargs = initialize_arguments(cfg, os.environ, on_tpu_vm())
  if kwargs is None:
    return False
  if cfg.cpu_collectives != "none":  # CPU devices only talk across processes through an explicit collectives library
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


# ---- layout -------------------------------------------------------------------------------------------------------------

def check_batch_layout(mesh: jax.sharding.Mesh) -> int:
  """This process's number of devices on the batch (data x fsdp) axes; raises unless it holds exactly the p-th
  contiguous 1/P of them, the layout in which process-local rows form one global batch in process order."""
  total, count, index = sharding.batch_divisor(mesh), jax.process_count(), jax.process_index()
  if count == 1:
    return total
  indices = sharding.batch_sharding(mesh, 1, total).addressable_devices_indices_map((total,)).values()
  held = {idx[0].indices(total)[0] for idx in indices}
  share = total // count
  if total % count or held != set(range(index * share, (index + 1) * share)):
    raise ValueError(f"mesh {dict(mesh.shape)}: process {index} of {count} must hold the {index}-th contiguous "
                     f"1/{count} of the {total} data x fsdp devices (keep the tensor axis within one host)")
  return share


# ---- device arrays -> host -----------------------------------------------------------------------------------------------

def to_host(x: jax.Array) -> np.ndarray:
  """The whole of `x` on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_part(x: jax.Array, axis: int = 0) -> np.ndarray:
  """This process's block of `x` along `axis` (the p-th of P equal contiguous blocks): its own rows of a global batch."""
  count, index = jax.process_count(), jax.process_index()
  n = x.shape[axis]
  if n % count:
    raise ValueError(f"axis {axis} of length {n} does not split into {count} process blocks")
  start, stop = index * n // count, (index + 1) * n // count
  if x.is_fully_addressable:
    return np.asarray(x)[(slice(None),) * axis + (slice(start, stop),)]
  shape = list(x.shape)
  shape[axis] = stop - start
  out = np.empty(shape, x.dtype)
  covered = np.zeros(stop - start, bool)
  for shard in x.addressable_shards:
    shard_start, shard_stop = shard.index[axis].indices(n)[:2]
    lo, hi = max(shard_start, start), min(shard_stop, stop)
    if lo >= hi:
      continue
    target = list(shard.index)
    target[axis] = slice(lo - start, hi - start)
    out[tuple(target)] = np.asarray(shard.data).take(range(lo - shard_start, hi - shard_start), axis=axis)
    covered[lo - start:hi - start] = True
  if not covered.all():
    raise ValueError(f"process {index} does not hold its block [{start}, {stop}) of axis {axis}")
  return out


# ---- host values across processes ----------------------------------------------------------------------------------------

def allgather(x: np.ndarray) -> np.ndarray:
  """(process_count, *x.shape): every process's `x` in process order; same shape and a <= 32-bit dtype everywhere
  (JAX moves 64-bit values as 32-bit ones, silently truncating them)."""
  x = np.asarray(x)
  if x.dtype.itemsize > 4:
    raise ValueError(f"allgather of {x.dtype} would be truncated to 32 bits; cast it first")
  if jax.process_count() == 1:
    return x[None]
  return np.asarray(multihost_utils.process_allgather(x))


def _per_process(x: np.ndarray) -> list[np.ndarray]:
  """Every process's `x` in process order; the leading (row) axis may differ in length between processes."""
  counts = allgather(np.int32(len(x)))
  padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
  padded[:len(x)] = x
  return [rows[:n] for rows, n in zip(allgather(padded), counts)]


def concat_rows(x: np.ndarray) -> np.ndarray:
  """Every process's rows of `x` concatenated in process order; processes may hold different numbers of rows."""
  x = np.asarray(x)
  return x if jax.process_count() == 1 else np.concatenate(_per_process(x))


def allgather_json(value: Any) -> list[Any]:
  """Every process's JSON-able `value`, in process order."""
  if jax.process_count() == 1:
    return [value]
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8)
  return [json.loads(bytes(b).decode()) for b in _per_process(payload)]


def broadcast_json(value: Any) -> Any:
  """`value` as process 0 has it, on every process."""
  if jax.process_count() == 1:
    return value
  payload = np.frombuffer(json.dumps(value).encode(), np.uint8) if jax.process_index() == 0 else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.asarray(payload.size, np.int32)))
  buffer = np.zeros(size, np.uint8)
  buffer[:payload.size] = payload
  return json.loads(bytes(multihost_utils.broadcast_one_to_all(buffer)).decode())


def broadcast(x: np.ndarray) -> np.ndarray:
  """`x` as process 0 has it, on every process; every process passes the same shape and a <= 32-bit dtype (what it
  passes besides process 0 is ignored)."""
  x = np.asarray(x)
  if x.dtype.itemsize > 4:
    raise ValueError(f"broadcast of {x.dtype} would be truncated to 32 bits; cast it first")
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.broadcast_one_to_all(x))


def scored_on_process_zero(score: ScoreFn) -> Callable[[Sequence[str], Sequence], np.ndarray]:
  """`score` for lockstep calls (every process passes the same responses and queries): process 0 scores, and every
  process gets the float32 correctness rewards (functions.RewardScores.correctness).

  Why: a reward that times out is 0, so two processes scoring the same response may disagree, then decide differently
  (GEPA's accepts, its best candidate) and run different collectives afterwards: a hang. Scored once, they cannot.
  Not for process-local calls (training rollouts): there each process's rows are its own, scored by it alone.
  """
  def on_process_zero(responses: Sequence[str], queries: Sequence) -> np.ndarray:
    rewards = np.zeros(len(responses), np.float32)
    if jax.process_index() == 0:
      rewards = as_scores(score(responses, queries), len(responses)).correctness
    return broadcast(rewards) if len(responses) and jax.process_count() > 1 else rewards

  return on_process_zero
