"""The rollout engine's device programs: a set of slots, each holding one request row (its KV cache, the tokens it
has generated, its own limit, temperature and stop tokens), which the host (`sampling.Sampler`) schedules.

- `empty_slots`: the slots' state for one call; every slot idle (done).
- `prefill_slots`: run a group's distinct prompts (right-padded to a prompt bucket) through the model once each, sample
  each row's first token and write the rows into the given slots (their cache, first token, limits). Rows that stop
  at once are done.
- `decode_segment`: one `lax.while_loop` of decode steps over every slot, attending over the slots' whole cache. It
  stops after `max_steps` (the cache is full up to its length) or as soon as `stop_at_done` slots are done, so the
  host can refill slots or shrink the state.
- `regroup_fields`, `regroup_layer`: the state resized to other slots (live rows packed, idle ones dropped) and another
  cache length, one layer at a time.

The state is always the size of the live work: the host keeps the cache as long as the longest live row needs (a
power-of-two bucket) and the slots as many as the live rows (packed when the queue is empty), so a decode step costs
what the live rows need, never the allocation. Slot fields are (slots, ...) arrays; `pos` is where the row's last token
(`last`) is written when it is fed, which is also its RoPE position (a row's prompt sits at positions 0 .. len - 1 of
its slot, no left padding). Slots are `blocks` equal blocks (one per batch device); resizes gather within a block.
A row's tokens are drawn with uniforms from (seed key, the row's index in the request, the token's index): scheduling
never changes them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from p2o_jax import sharding
from p2o_jax.models.decoder import Decoder, init_cache, positions_from_mask
from p2o_jax.token_sampling import row_uniforms, sample_tokens

SLOT_FIELDS = ("tokens", "logprobs", "last", "pos", "count", "limit", "temperature", "row", "stops", "done")


@dataclasses.dataclass(frozen=True)
class SlotMode:
  """Everything static about a call's programs."""

  max_new_tokens: int
  kind: str  # "greedy" | "sample" | "mixed": see token_sampling.sample_tokens
  top_k: int
  use_top_p: bool
  eos_ids: tuple[int, ...]
  pad_id: int


def _batch_axes(x: jax.Array) -> jax.Array:
  return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))


@functools.partial(jax.jit, static_argnames=("cfg", "slots", "length", "mode", "stop_width"))
def empty_slots(cfg, *, slots: int, length: int, mode: SlotMode, stop_width: int) -> dict:
  """Idle slots with a (slots, kv, length, d) cache per layer."""
  m = mode.max_new_tokens
  fields = dict(tokens=jnp.full((slots, m), mode.pad_id, jnp.int32), logprobs=jnp.zeros((slots, m), jnp.float32),
                last=jnp.zeros(slots, jnp.int32), pos=jnp.zeros(slots, jnp.int32), count=jnp.zeros(slots, jnp.int32),
                limit=jnp.zeros(slots, jnp.int32), temperature=jnp.zeros(slots, jnp.float32),
                row=jnp.zeros(slots, jnp.int32), stops=jnp.full((slots, stop_width), -1, jnp.int32),
                done=jnp.ones(slots, bool))
  return dict(cache=init_cache(cfg, slots, length), **{k: _batch_axes(v) for k, v in fields.items()})


def _stopped(token_b, stops_bw, eos_ids):
  own = jnp.any(token_b[:, None] == stops_bw, axis=1)
  return own | jnp.isin(token_b, jnp.asarray(eos_ids, jnp.int32))


def _draw(logits_bv, key, rows_b, index_b, temperature_b, top_p, mode: SlotMode):
  uniform = (jnp.zeros(rows_b.shape, jnp.float32) if mode.kind == "greedy"
             else row_uniforms(key, rows_b, index_b))
  return sample_tokens(logits_bv, uniform, temperature_b, top_p, kind=mode.kind, top_k=mode.top_k,
                       use_top_p=mode.use_top_p)


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("carry",))
def prefill_slots(graphdef, state, carry, key, top_p, group: dict, *, mode: SlotMode):
  """Prefill `group` and write its rows into their slots. The group's distinct prompts run once each (tokens (u, p)
  right-padded, lengths; a query's K rollouts share one), `copies` (u, c) names the slots each one's cache goes to
  (an index out of range writes nothing); per row (g): source (its prompt), slot (out of range: a padding row),
  row, limit, temperature, stops."""
  model: Decoder = nnx.merge(graphdef, state)
  tokens, lengths, source, slot = group["tokens"], group["lengths"], group["source"], group["slot"]
  u, p = tokens.shape
  valid = jnp.arange(p)[None, :] < lengths[:, None]
  hidden, cache = model.hidden_states(tokens, positions_from_mask(valid), valid, init_cache(model.cfg, u, p), 0)
  last_hidden = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[source]
  row_lengths = lengths[source]
  token, logp = _draw(model.logits(last_hidden)[:, 0], key, group["row"], jnp.zeros_like(row_lengths),
                      group["temperature"], top_p, mode)
  g, m = source.shape[0], mode.max_new_tokens
  new = dict(tokens=jnp.full((g, m), mode.pad_id, jnp.int32).at[:, 0].set(token),
             logprobs=jnp.zeros((g, m), jnp.float32).at[:, 0].set(logp), last=token, pos=row_lengths,
             count=jnp.ones_like(row_lengths), limit=group["limit"], temperature=group["temperature"],
             row=group["row"], stops=group["stops"],
             done=_stopped(token, group["stops"], mode.eos_ids) | (group["limit"] <= 1))
  out = {k: carry[k].at[slot].set(v.astype(carry[k].dtype), mode="drop") for k, v in new.items()}
  out["cache"] = [{name: _write_copies(layer[name], filled[name], group["copies"]) for name in ("k", "v")}
                  for layer, filled in zip(carry["cache"], cache)]
  return out


def _write_copies(cache_bksd, filled_uksd, copies_uc):
  """The cache with each prompt's keys (or values) written into every slot of its row of `copies`: one scatter per
  column, so no (rows, ...) copy of the prompts' cache is ever built."""
  p = filled_uksd.shape[2]
  for c in range(copies_uc.shape[1]):
    cache_bksd = cache_bksd.at[copies_uc[:, c], :, :p].set(filled_uksd.astype(cache_bksd.dtype), mode="drop")
  return cache_bksd


@functools.partial(jax.jit, static_argnames=("graphdef", "mode"), donate_argnames=("carry",))
def decode_segment(graphdef, state, carry, key, top_p, max_steps, stop_at_done, *, mode: SlotMode):
  """Decode every live slot until `max_steps` steps or until `stop_at_done` slots are done."""
  model: Decoder = nnx.merge(graphdef, state)
  m, b = mode.max_new_tokens, carry["done"].shape[0]

  def cond(c):
    return (c["step"] < max_steps) & (jnp.sum(c["slots"]["done"]) < stop_at_done)

  def body(c):
    s = c["slots"]
    live = ~s["done"]
    logits, cache = model.decode_step(s["last"], s["pos"], c["cache"])
    token, logp = _draw(logits, key, s["row"], s["count"], s["temperature"], top_p, mode)
    index = jnp.where(live, s["count"], m)  # a done row writes nowhere
    count = s["count"] + live
    s = dict(s, tokens=s["tokens"].at[jnp.arange(b), index].set(token, mode="drop"),
             logprobs=s["logprobs"].at[jnp.arange(b), index].set(logp, mode="drop"),
             last=jnp.where(live, token, s["last"]), pos=s["pos"] + live, count=count,
             done=s["done"] | (live & (_stopped(token, s["stops"], mode.eos_ids) | (count >= s["limit"]))))
    return dict(cache=cache, slots=s, step=c["step"] + 1)

  start = dict(cache=carry["cache"], slots={k: carry[k] for k in SLOT_FIELDS}, step=jnp.zeros((), jnp.int32))
  end = jax.lax.while_loop(cond, body, start)
  return dict(cache=end["cache"], **end["slots"])


def _per_block_take(x: jax.Array, index_br: jax.Array) -> jax.Array:
  """Rows index_br[d] of block d of x (blocks = index_br.shape[0]); a gather within each block, so rows never
  leave their device."""
  blocked = x.reshape(index_br.shape[0], -1, *x.shape[1:])
  taken = jax.vmap(lambda block, index: block[index])(blocked, index_br)
  return taken.reshape(-1, *x.shape[1:])


@jax.jit
def regroup_fields(fields: dict, index_br: jax.Array) -> dict:
  """The slot fields (not the cache) of the slots index_br selects, block by block."""
  return {k: _batch_axes(_per_block_take(v, index_br)) for k, v in fields.items()}


@functools.partial(jax.jit, static_argnames=("length",))
def regroup_layer(layer: dict, index_br: jax.Array, *, length: int) -> dict:
  """One layer's cache for the slots index_br selects, cut or zero-padded to `length` positions. One layer per call,
  the caller dropping the old layer before the next call, so a resize never holds a second copy of the whole cache."""
  def one(x):
    x = _per_block_take(x, index_br)
    x = x[:, :, :length] if x.shape[2] >= length else jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]), (0, 0)))
    return sharding.constrain(x, ("batch", "kv_heads", "cache_length", "head_dim"))
  return {name: one(x) for name, x in layer.items()}


@jax.jit
def slot_status(carry) -> jax.Array:
  """(3, slots) int32: done, pos, count: what the host schedules by."""
  return jnp.stack([carry["done"].astype(jnp.int32), carry["pos"], carry["count"]])


@jax.jit
def slot_outputs(carry, slots):
  """(tokens, log-probs) of the given slots."""
  return carry["tokens"][slots], carry["logprobs"][slots]
