"""Per-chip memory of every jitted function a run executes, as the compiler reports it, against the chip's HBM.

A function's own bytes come from XLA's buffer assignment (`compiled.memory_analysis()`): arguments + outputs - the
outputs that reuse donated arguments + temporaries. What stays in HBM for the whole run (the params, the optimizer
state, the sampler's weight copies) is counted once as `resident`, and every function's total is resident + what it
adds on top: its KV cache and its temporaries (activations, logits chunks, its inputs and outputs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from p2o_jax import sampling, sharding
from p2o_jax.p2o.reflectors import REFERENCE_REFLECTORS
from p2o_jax.sampling import SamplingConfig

GIB = 2**30


class DoesNotFit(ValueError):
  """A function's compile was refused for lack of memory; the message names it and the compiler's figures."""


def compiled(name: str, shapes: str, compile_fn: Callable[[], Any]):
  """compile_fn(), or DoesNotFit naming `name` when the compiler refuses it for lack of memory (TPU compilers refuse
  a program whose temporaries exceed the chip's HBM)."""
  try:
    return compile_fn()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    reason = str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
    raise DoesNotFit(f"{name} ({shapes}): {reason}") from None


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a tree of (abstract) arrays: each leaf's shard shape times its item size."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def compiled_bytes(compiled) -> int:
  """Peak bytes one call of a compiled function holds on one device."""
  m = compiled.memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


@dataclasses.dataclass(frozen=True)
class Resident:
  """Bytes per device that live through the whole run."""

  params: int  # the trained params (and the frozen reference params, when kept)
  opt_state: int
  sampler_weights: int  # the samplers' compute-dtype copies (0 where the sampler reads the params themselves)

  @property
  def total(self) -> int:
    return self.params + self.opt_state + self.sampler_weights


@dataclasses.dataclass(frozen=True)
class FunctionMemory:
  name: str  # "train step", "sampler decode: rollouts", ...
  shapes: str  # what it was compiled for, e.g. "16 rows x 16384 tokens"
  kv_cache: int  # per device
  temporaries: int  # per device: everything else the call adds to the resident state

  def total(self, resident: Resident) -> int:
    return resident.total + self.kv_cache + self.temporaries


def function_memory(name: str, shapes: str, compiled, *, resident_args: int, kv_cache: int = 0) -> FunctionMemory:
  """`compiled`'s memory beyond the resident state it takes as arguments (`resident_args` bytes per device)."""
  return FunctionMemory(name, shapes, kv_cache, compiled_bytes(compiled) - resident_args - kv_cache)


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  where: str  # "v5p-8 (4 chips)" or "8 CPU devices"
  resident: Resident
  functions: tuple[FunctionMemory, ...]
  hbm_bytes: int | None  # per chip; None on CPU

  def headroom(self, f: FunctionMemory) -> float | None:
    return None if self.hbm_bytes is None else 1.0 - f.total(self.resident) / self.hbm_bytes

  def table(self) -> str:
    r = self.resident
    head = (f"Memory per chip on {self.where}" + (f", {_gib(self.hbm_bytes)} HBM each" if self.hbm_bytes else "")
            + f": resident {_gib(r.total)} = params {_gib(r.params)} + optimizer state {_gib(r.opt_state)} + "
            f"sampler weights {_gib(r.sampler_weights)}")
    columns = ("function", "compiled for", "resident", "KV cache", "temporaries", "total", "headroom")
    rows = [columns] + [(f.name, f.shapes, _gib(r.total), _gib(f.kv_cache), _gib(f.temporaries),
                         _gib(f.total(r)), _percent(self.headroom(f))) for f in self.functions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([head, *lines])

  def shortfalls(self) -> list[str]:
    """One line per function that does not fit the chip's HBM, naming it and the bytes short."""
    if self.hbm_bytes is None:
      return []
    return [self._shortfall(f) for f in self.functions if f.total(self.resident) > self.hbm_bytes]

  def _shortfall(self, f: FunctionMemory) -> str:
    total = f.total(self.resident)
    return (f"{f.name} ({f.shapes}) needs {_gib(total)} per chip, {_gib(total - self.hbm_bytes)} more than the "
            f"{_gib(self.hbm_bytes)} of HBM on {self.where}")


def _gib(n: int) -> str:
  return f"{n / GIB:.2f} GiB"


def _percent(x: float | None) -> str:
  return "n/a" if x is None else f"{100 * x:.0f}%"


# ---- measuring a run ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SamplerCall:
  """One kind of `Policy.generate` call of a run, at its largest."""

  name: str
  rows: int
  prompt_len: int
  sampling: SamplingConfig
  reference: bool = False  # sampled from the frozen reference params (Self-Ref reflection)


def sampler_calls(c: ml_collections.ConfigDict) -> list[SamplerCall]:
  """Every kind of sampler call the run makes. Evaluation takes its largest call: a small set's problems times
  eval.small_set_samples, or a step's rollout rows (a larger, greedy set is chunked like any call)."""
  r, e, p = c.rollout, c.eval, c.p2o
  rollout_rows = c.train.batch_size * r.num_samples
  eval_rows = max((e.small_set_size - 1) * e.small_set_samples, rollout_rows)
  calls = [SamplerCall("rollouts", rollout_rows, r.max_prompt_len,
                       SamplingConfig(r.max_new_tokens, r.temperature, r.top_p, r.top_k)),
           SamplerCall("evaluation", eval_rows, r.max_prompt_len,
                       SamplingConfig(e.max_new_tokens or r.max_new_tokens, e.temperature))]
  if p.enabled:
    calls.append(SamplerCall("GEPA scoring", p.gepa.dev_size, r.max_prompt_len,
                             SamplingConfig(r.max_new_tokens, temperature=0.0)))
    if p.reflector in REFERENCE_REFLECTORS:
      calls.append(SamplerCall("Self-Ref reflection", 1, p.reflection_max_prompt_len,
                               SamplingConfig(p.reflection_max_new_tokens, p.reflection_temperature), reference=True))
  return calls


def keeps_reference(c: ml_collections.ConfigDict) -> bool:
  """The trainer freezes a copy of the initial params for the KL term or the Self-Ref reflector."""
  return c.grpo.kl_coef > 0 or (c.p2o.enabled and c.p2o.reflector in REFERENCE_REFLECTORS)


def measure(c: ml_collections.ConfigDict, steps, mesh, where: str, hbm_bytes: int | None) -> MemoryReport:
  """Compile the train step, the log-prob pass and every sampler call (prefill and decode) for `mesh` and tabulate
  their per-chip memory. `steps` is the dry run's AbstractSteps (the trainer's own jitted functions)."""
  cfg = steps.model_cfg
  sampler_state, copied = sampling.abstract_sampling_params(steps.params, mesh, cfg.dtype)
  param_bytes, opt_bytes, sampler_bytes = (bytes_per_device(x) for x in (steps.params, steps.opt_state,
                                                                        sampler_state))
  resident = Resident(params=param_bytes * (1 + keeps_reference(c)), opt_state=opt_bytes,
                      sampler_weights=sampler_bytes if copied else 0)
  minibatch, whole = steps.minibatch["tokens"].shape, steps.whole["tokens"].shape
  train_shapes = f"{minibatch[0]} x {minibatch[1]} rows x {minibatch[2]} tokens"
  logprob_shapes = f"{whole[0]} x {whole[1]} rows x {whole[2]} tokens"
  train_step = compiled("train step", train_shapes,
                        lambda: steps.train_step.lower(steps.params, steps.opt_state, steps.minibatch).compile())
  logprobs = compiled("log-prob pass", logprob_shapes, lambda: steps.logprobs.lower(steps.params, steps.whole).compile())
  functions = [function_memory("train step", train_shapes, train_step, resident_args=param_bytes + opt_bytes),
               function_memory("log-prob pass", logprob_shapes, logprobs, resident_args=param_bytes)]
  budget = int(c.rollout.kv_cache_gib * GIB)
  for call in sampler_calls(c):
    # The reference sampler reads the frozen params as they are (Policy: no copy of them for rare reflections).
    state, state_bytes = (steps.params, param_bytes) if call.reference else (sampler_state, sampler_bytes)
    functions += _sampler_memory(call, steps.graphdef, cfg, state, state_bytes, mesh, budget)
  return MemoryReport(where, resident, tuple(functions), hbm_bytes)


def _sampler_memory(call: SamplerCall, graphdef, cfg, state, state_bytes: int, mesh,
                    budget: int) -> list[FunctionMemory]:
  """The prefill and decode of `call` at the engine's peak: as many slots as the budget holds (or the call's rows),
  every one prefilled at once, then decoding with the cache at the whole allocation."""
  length = call.prompt_len + call.sampling.max_new_tokens
  slots = sampling.slot_count(call.rows, length, cfg=cfg, mesh=mesh, cache_budget_bytes=budget)
  kv_cache = sampling.kv_cache_bytes_per_row(cfg, length, mesh) * slots // sharding.batch_divisor(mesh)
  shapes = f"{slots} slots x {call.prompt_len} + {call.sampling.max_new_tokens} tokens" + (
      f" (for {call.rows} rows)" if slots < call.rows else "")
  prefill, decode = compiled(f"sampler: {call.name}", shapes, lambda: sampling.lower_sampler_call(
      graphdef, state, mesh, rows=slots, prompt_len=call.prompt_len, cfg=call.sampling))
  return [function_memory(f"sampler {part}: {call.name}", shapes, compiled, resident_args=state_bytes,
                          kv_cache=kv_cache) for part, compiled in (("prefill", prefill), ("decode", decode))]