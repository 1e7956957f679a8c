"""The pre-engine sampler (p2o_jax/sampling.py at 7aec36e), kept as a benchmark peer measured side by side.

Prompts are left-padded to a length bucket and the batch is padded to a size bucket, so a run compiles one prefill and
one decode program per (prompt bucket, batch bucket, sampling mode), not one per call. A call with more rows than fit
the KV-cache budget (`cache_budget_bytes` per device) runs in chunks of rows, each padded at most to the chunk size.
The sampler reads its own copy of the weights (`sampling_params`): in the compute dtype, whole on every data/fsdp
device, so no decode step gathers full-precision shards. Params are passed as arguments
(NNX graphdef/state split), so the trainer can swap in new weights without recompiling; the decode state is donated.
Each sampled token comes with its log-probability under the distribution it was drawn from: log_softmax(logits / T)
restricted to the top-k / top-p set (for greedy decoding: log_softmax(logits)).
With several processes, a call is either lockstep (every process passes the same prompts and gets every row back)
or process-local (each passes its own rows of one global batch and gets its own rows back); see Sampler.generate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2o_jax import distributed, sharding
from p2o_jax.models.decoder import Decoder, init_cache, positions_from_mask
# What did not change with the engine is shared, so the peer differs from it only where the engine does.
from p2o_jax.sampling import (SampleOutput, SamplingConfig, chunk_rows, default_buckets, round_up_to_bucket,
                              sampling_params)
from p2o_jax import token_sampling
from p2o_jax.token_sampling import filter_logits, first_argmax


def inverse_cdf_sample(key, probs_bv):
  """The pre-engine draw: one key for the whole batch."""
  return token_sampling.inverse_cdf_sample(jax.random.uniform(key, (probs_bv.shape[0],), probs_bv.dtype), probs_bv)


def sample_tokens(logits_bv, key, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
  """Draw one token per row; return (tokens, log-prob of each under the distribution it was drawn from)."""
  if greedy:
    tokens = first_argmax(logits_bv)
    logp = jax.nn.log_softmax(logits_bv, axis=-1)
  else:
    logp = jax.nn.log_softmax(filter_logits(logits_bv / temperature, top_k, top_p, use_top_p), axis=-1)
    tokens = inverse_cdf_sample(key, jnp.exp(logp))
  return tokens.astype(jnp.int32), jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@dataclasses.dataclass(frozen=True)
class _Mode:
  """Everything static about a compiled sampling program."""

  max_new_tokens: int
  greedy: bool
  top_k: int
  use_top_p: bool
  eos_ids: tuple[int, ...]
  pad_id: int


def call_batch(rows: int, chunk: int, mesh: jax.sharding.Mesh | None) -> int:
  """Rows of one device call: `rows` rounded up to a power of two (few distinct compiled shapes), at most `chunk`,
  a multiple of the devices the batch is split over."""
  divisor = sharding.batch_divisor(mesh)
  size = min(max(divisor, 1 << max(rows - 1, 0).bit_length()), chunk)
  return -(-size // divisor) * divisor


def _is_eos(tokens_b, eos_ids):
  return jnp.isin(tokens_b, jnp.asarray(eos_ids, jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"))
def _prefill(graphdef, state, tokens_bp, valid_bp, live_b, key, temperature, top_p, *, mode: _Mode):
  """Run the prompts through the model, fill the cache, sample the first token; return the decode state."""
  model: Decoder = nnx.merge(graphdef, state)
  b, p = tokens_bp.shape
  length = p + mode.max_new_tokens
  cache = init_cache(model.cfg, b, length)
  key_valid = jnp.zeros((b, length), bool).at[:, :p].set(valid_bp)
  hidden, cache = model.hidden_states(tokens_bp, positions_from_mask(valid_bp), key_valid, cache, 0)
  logits = model.logits(hidden[:, -1:])[:, 0]
  token, logp = sample_tokens(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=mode.greedy,
                              top_k=mode.top_k, use_top_p=mode.use_top_p)
  token = jnp.where(live_b, token, mode.pad_id)
  out_tokens = jnp.full((b, mode.max_new_tokens), mode.pad_id, jnp.int32).at[:, 0].set(token)
  out_logp = jnp.zeros((b, mode.max_new_tokens), jnp.float32).at[:, 0].set(jnp.where(live_b, logp, 0.0))
  return dict(cache=cache, key_valid=key_valid, tokens=out_tokens, logprobs=out_logp, last=token,
              position=jnp.sum(valid_bp, axis=1).astype(jnp.int32), done=~live_b | _is_eos(token, mode.eos_ids),
              step=jnp.asarray(1, jnp.int32), key=key)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("carry",))
def _decode(graphdef, state, carry, temperature, top_p, *, mode: _Mode):
  """One while_loop over new tokens; exits as soon as every row has stopped."""
  model: Decoder = nnx.merge(graphdef, state)
  prompt_len = carry["key_valid"].shape[1] - mode.max_new_tokens

  def cond(c):
    return (c["step"] < mode.max_new_tokens) & ~jnp.all(c["done"])

  def body(c):
    write_at = prompt_len + c["step"] - 1  # cache slot of the token sampled in the previous step
    key_valid = jax.lax.dynamic_update_slice_in_dim(c["key_valid"], jnp.ones((c["last"].shape[0], 1), bool),
                                                    write_at, 1)
    hidden, cache = model.hidden_states(c["last"][:, None], c["position"][:, None], key_valid, c["cache"], write_at)
    logits = model.logits(hidden)[:, 0]
    token, logp = sample_tokens(logits, jax.random.fold_in(c["key"], c["step"]), temperature, top_p,
                                greedy=mode.greedy, top_k=mode.top_k, use_top_p=mode.use_top_p)
    token = jnp.where(c["done"], mode.pad_id, token)
    logp = jnp.where(c["done"], 0.0, logp)
    return dict(cache=cache, key_valid=key_valid,
                tokens=jax.lax.dynamic_update_slice_in_dim(c["tokens"], token[:, None], c["step"], 1),
                logprobs=jax.lax.dynamic_update_slice_in_dim(c["logprobs"], logp[:, None], c["step"], 1),
                last=token, position=c["position"] + 1, done=c["done"] | _is_eos(token, mode.eos_ids),
                step=c["step"] + 1, key=c["key"])

  # Returning the whole state lets XLA alias every donated buffer (the cache above all) to an output.
  return jax.lax.while_loop(cond, body, carry)


class Sampler:
  """Samples continuations of token-id prompts from a Decoder, optionally sharded over a mesh."""

  def __init__(self, model: Decoder, *, eos_ids: Sequence[int], pad_id: int, max_prompt_len: int,
               prompt_buckets: Sequence[int] | None = None, mesh: jax.sharding.Mesh | None = None,
               cache_budget_bytes: int = 0, copy_weights: bool = True):
    if not eos_ids:
      raise ValueError("the sampler needs at least one EOS token id")
    self.graphdef, state = nnx.split(model)
    self.cfg = model.cfg
    self.cache_budget_bytes = cache_budget_bytes  # per device; 0: every call in one chunk
    # False: read the params as they are (fsdp shards gathered every decode step) instead of keeping a whole copy; for
    # rare calls such as Self-Ref reflection, where a second copy's HBM costs more than the gathers' time.
    self.copy_weights = copy_weights
    self.mesh = mesh
    self.set_params(state)
    self.eos_ids = tuple(int(e) for e in eos_ids)
    self.pad_id = int(pad_id)
    self.max_prompt_len = max_prompt_len
    self.prompt_buckets = tuple(sorted(prompt_buckets or default_buckets(max_prompt_len)))
    if self.prompt_buckets[-1] < max_prompt_len:
      raise ValueError(f"the largest prompt bucket {self.prompt_buckets[-1]} is below max_prompt_len={max_prompt_len}")

  def set_params(self, state: nnx.State) -> None:
    """Sample from new weights (same architecture and shardings): no recompilation."""
    self.state = sampling_params(state, self.mesh, self.cfg.dtype) if self.copy_weights else state

  def _batch_size(self, rows: int, chunk: int) -> int:
    return call_batch(rows, chunk, self.mesh)

  def _check_prompts(self, prompts: Sequence[Sequence[int]]) -> None:
    for i, prompt in enumerate(prompts):
      if not len(prompt):
        raise ValueError(f"prompt {i} is empty")
      if len(prompt) > self.max_prompt_len:
        raise ValueError(f"prompt {i} has {len(prompt)} tokens; the sampler's max_prompt_len is {self.max_prompt_len} "
                         "(Policy.generate left-truncates; a direct Sampler call must pass prompts that fit)")

  def _call_shape(self, rows: Sequence[Sequence[int]], process_local: bool) -> tuple[int, int, int]:
    """(prompt bucket, the most rows any process passes, processes). Process-local rows are padded to the longest
    prompt and largest row count over all processes, so every process calls the jitted programs with the same global
    shapes and the same number of chunks."""
    longest, count = max(map(len, rows), default=0), len(rows)
    processes = jax.process_count() if process_local else 1
    if processes > 1:
      if self.mesh is None:
        raise ValueError("a multi-process sampler needs a mesh over all processes' devices")
      distributed.check_batch_layout(self.mesh)
      longest, count = (int(v) for v in distributed.allgather(np.asarray([longest, count], np.int32)).max(axis=0))
    if not count:
      raise ValueError("generate() needs at least one prompt")
    return round_up_to_bucket(longest, self.prompt_buckets), count, processes

  def _pad_prompts(self, rows: Sequence[Sequence[int]], length: int, batch: int):
    tokens = np.full((batch, length), self.pad_id, np.int32)
    valid = np.zeros((batch, length), bool)
    for r, prompt in enumerate(rows):
      tokens[r, length - len(prompt):] = prompt
      valid[r, length - len(prompt):] = True
    live = np.arange(batch) < len(rows)
    return tokens, valid, live

  def _put(self, x: np.ndarray, global_batch: int) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    target = sharding.batch_sharding(self.mesh, x.ndim, global_batch)
    if len(x) == global_batch:  # the whole batch, the same on every process
      return jax.device_put(x, target)
    return jax.make_array_from_process_local_data(target, x, (global_batch, *x.shape[1:]))

  def generate(self, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, n: int = 1,
               seed: int | jax.Array = 0, process_local: bool = False) -> SampleOutput:
    """Sample `n` continuations of every prompt: one batched device call per chunk of rows (one call when the KV
    cache of all rows fits the budget).

    By default every process passes the same prompts and gets every row back (evaluation, GEPA: lockstep). With
    `process_local=True` each process passes only its own prompts (possibly none), the processes' rows form one global
    batch in process order, and each process gets back its own rows (training rollouts). With one process both agree.
    """
    self._check_prompts(prompts)
    rows = [p for p in prompts for _ in range(n)]
    length, count, processes = self._call_shape(rows, process_local)
    chunk = chunk_rows(self.cache_budget_bytes, self.cfg, length + cfg.max_new_tokens, self.mesh)
    chunk = chunk or self._batch_size(count * processes, chunk=sys.maxsize)  # no budget: one call
    local_chunk = max(chunk // processes, 1)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)
    parts = []
    for i, start in enumerate(range(0, count, local_chunk)):  # the same chunks on every process
      batch = self._batch_size(min(local_chunk, count - start) * processes, chunk)
      chunk_key = key if i == 0 else jax.random.fold_in(key, i)
      parts.append(self._generate_chunk(rows[start:start + local_chunk], length, batch, processes, cfg, chunk_key))
    return _finish(np.concatenate([t for t, _ in parts]), np.concatenate([l for _, l in parts]), self.eos_ids)

  def _generate_chunk(self, rows: Sequence[Sequence[int]], length: int, global_batch: int, processes: int,
                      cfg: SamplingConfig, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, log-probs) of this process's `rows` in one prefill + decode over a global batch of `global_batch`."""
    local_batch = global_batch // processes
    tokens, valid, live = self._pad_prompts(rows, length, local_batch)
    mode = _Mode(cfg.max_new_tokens, cfg.greedy, cfg.top_k, cfg.top_p < 1.0, self.eos_ids, self.pad_id)
    temperature = jnp.float32(cfg.temperature if not cfg.greedy else 1.0)
    top_p = jnp.float32(cfg.top_p)
    with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
      put = functools.partial(self._put, global_batch=global_batch)
      carry = _prefill(self.graphdef, self.state, put(tokens), put(valid), put(live), key, temperature, top_p,
                       mode=mode)
      carry = _decode(self.graphdef, self.state, carry, temperature, top_p, mode=mode)
    fetch = distributed.local_part if local_batch < global_batch else distributed.to_host
    return fetch(carry["tokens"])[:len(rows)], fetch(carry["logprobs"])[:len(rows)]


def _finish(tokens: np.ndarray, logprobs: np.ndarray, eos_ids: tuple[int, ...]) -> SampleOutput:
  is_eos = np.isin(tokens, eos_ids)
  first_eos = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), tokens.shape[1] - 1)
  lengths = (first_eos + 1).astype(np.int32)
  mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return SampleOutput(tokens=tokens, mask=mask, lengths=lengths, logprobs=np.where(mask, logprobs, 0.0))
