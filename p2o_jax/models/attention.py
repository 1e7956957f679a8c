"""Causal grouped-query attention, one entry point (`attend`) over interchangeable implementations.

Every implementation computes the same thing: query i of a row sits at key slot `q_offset + i` and attends to the keys
s <= q_offset + i of its own segment. `segments_bs` (b, s) gives each key slot's segment: 0 for padding, else an id
(a bool validity mask is one segment; packed SFT and train rows hold several). Segments may also be (b, s, 2) int:
[..., 0] the slot's own segment, [..., 1] another segment its query also attends to (a shared prompt prefix,
rl/sequence_packing.py); only "plain" and "chunked" take those (the others fall back to chunked). Masks are never
passed as (b, t, s) tensors: at 13k tokens one would take 170 MB per row, so each implementation builds what it
needs from the segments and offset. On every query that has a key to attend to they agree (to float rounding); a
query with none (a padding slot) gets a finite output whose value differs between implementations and must not be
used.

- "plain": the whole (t, s) score matrix in f32. The reference; fastest for short sequences and single-token decode.
  Memory O(b*h*t*s), forward and backward (the backward keeps the (t, s) probabilities).
- "chunked": XLA, any platform. A `lax.scan` over query chunks of CHUNK, each chunk's body under `jax.checkpoint`, so
  neither pass holds more than a few (b, h, CHUNK, s) buffers: O(b*h*CHUNK*s) temporaries. Exactly plain's arithmetic
  per query (fully masked padding rows included), so it matches plain to f32 rounding; t <= CHUNK *is* plain. The
  backward recomputes each chunk's scores (one more QK^T per chunk). Keys above the causal diagonal are not skipped
  (a scan needs one static key extent): half the score FLOPs are masked work, as in plain.
- "splash": TPU Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention), flash-style: O(blocks)
  memory, causal blocks skipped. Used where the queries are the keys (q_offset == 0 statically and t == s: training,
  log-probs, prefill); decode (t == 1) runs plain, other shapes chunked. Under an ambient mesh (`jax.set_mesh`) the
  per-device kernel runs in a `jax.shard_map` (`splash_layout`): batch over LOGICAL_RULES["batch"] and heads over
  "tensor" where they divide, replicated otherwise. Without an ambient mesh it is called directly. Sequences are padded
  to a multiple of 128 (segment 0) and blocks are the largest of SPLASH_BLOCKS dividing that. Padding queries
  (segment 0) attend to the padding keys before them (splash masks by segment equality, and a row must see a key).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` for GPU, flash-style. cuDNN's padding mask
  (PADDING_CAUSAL with per-row lengths) only describes right padding, and a boolean `mask` would be turned into a
  (b, h, t, s) bias (unbounded memory), so a bool-segment row (one segment, left and/or right padding, the RL rows) is
  first compacted: its valid tokens gathered to the front in order (a stable argsort), attended with the row's valid
  count as query and key length, and the outputs scattered back (padding queries get 0). Int segments (possibly
  several per row: packed SFT), non-bf16/f16 inputs (cuDNN has no f32 flash kernel), traced offsets and t != s run
  chunked; decode runs plain. Only lowerable on a GPU; its "xla" twin (`cudnn_attention(..., implementation="xla")`,
  same call, the full score matrix) is what the CPU tests compare with plain.

"auto" (AUTO_ATTENTION): splash on TPU, cuDNN on GPU, chunked on CPU: for t <= CHUNK (the CPU demos' ~100-300
tokens) chunked is plain itself, so nothing changes there, while a long CPU sequence gets bounded memory.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from p2o_jax import sharding

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked (padding) rows stay NaN-free
CHUNK = 512  # "chunked": queries per scan step (read at call time)
SPLASH_BLOCKS = (512, 256, 128)  # "splash": block sizes tried, largest first; sequences are padded to a multiple of 128


def query_segments(segments_bs: jax.Array, q_offset, t: int) -> jax.Array:
  """(b, t): the segment of each query (the segment of its own key slot)."""
  return jax.lax.dynamic_slice_in_dim(segments_bs.astype(jnp.int32), q_offset, t, axis=1)


def visible(segments_bs: jax.Array, q_offset, t: int) -> jax.Array:
  """(b, t, s) bool: which keys each query may attend to."""
  return _visible(query_segments(segments_bs, q_offset, t), segments_bs, q_offset)


def _visible(q_segments_bt: jax.Array, segments_bs: jax.Array, first_position) -> jax.Array:
  """(b, t, s) bool for queries of segments `q_segments_bt` at key slots first_position, first_position + 1, ..."""
  t, s = q_segments_bt.shape[1], segments_bs.shape[1]
  keys = segments_bs.astype(jnp.int32)
  causal = jnp.arange(s)[None, :] <= (first_position + jnp.arange(t))[:, None]
  if keys.ndim == 3:  # (own segment, shared prefix segment): a key of either is visible
    keys = keys[..., 0]
    same = ((q_segments_bt[:, :, None, 0] == keys[:, None, :]) | (q_segments_bt[:, :, None, 1] == keys[:, None, :]))
  else:
    same = q_segments_bt[:, :, None] == keys[:, None, :]
  return causal[None] & same & (keys > 0)[:, None, :]


def _softmax_attention(q_bkgtd, k_bksd, v_bksd, visible_bts, scale):
  """(b, kv, g, t, d) output of grouped queries (b, kv, g, t, d) over keys the (b, t, s) mask shows, scores in f32.

  Both products run with (b, kv) as batch axes and the query axes ahead of the contracted ones, so XLA:CPU emits
  plain batched matmuls. Writing the output straight in (b, t, kv, g, d) order instead makes it lower the products
  to loop fusions: 4x slower for a decode step, ~1.3x for a full sequence.
  """
  scores = jnp.einsum("bkgtd,bksd->bkgts", q_bkgtd, k_bksd).astype(jnp.float32) * scale
  scores = jnp.where(visible_bts[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bksd.dtype)
  return jnp.einsum("bkgts,bksd->bkgtd", probs, v_bksd)


def plain_attention(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale):
  """Softmax attention where each of the k kv-heads serves h/k query heads (GQA; MQA when k = 1)."""
  b, t, h, d = q_bthd.shape
  kv = k_bksd.shape[1]
  q = q_bthd.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # (b, kv, g, t, d); free when t = 1
  out = _softmax_attention(q, k_bksd, v_bksd, visible(segments_bs, q_offset, t), scale)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def decode_attention(q_b1hd, k_bksd, v_bksd, valid_bs, *, scale):
  """One query per row, each at its own position: attends the keys `valid_bs` marks (the row's filled cache); the
  engine's decode steps, whose rows sit at different positions. plain_attention's arithmetic, but the two products
  are written as broadcast multiplies and sums: with one query per row they are h/kv-row matmuls, which XLA:CPU ran
  as batched matmul calls ~7x slower than the fused multiply-reduce loops (48 rows, 128 keys, the demo's model)."""
  b, _, h, d = q_b1hd.shape
  kv = k_bksd.shape[1]
  q = q_b1hd.reshape(b, kv, h // kv, 1, d)
  scores = jnp.sum((q * k_bksd[:, :, None]).astype(jnp.float32), axis=-1) * scale  # (b, kv, g, s)
  scores = jnp.where(valid_bs[:, None, None, :], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bksd.dtype)
  out = jnp.sum(probs[..., None] * v_bksd[:, :, None], axis=-2)  # (b, kv, g, d)
  return out.reshape(b, 1, h, d)


def chunked_attention(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale, *, chunk: int | None = None):
  """plain_attention one query chunk at a time (scan), each chunk rematerialized in the backward pass."""
  chunk = chunk or CHUNK
  b, t, h, d = q_bthd.shape
  if t <= chunk:
    return plain_attention(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale)
  kv = k_bksd.shape[1]
  n = -(-t // chunk)
  pad = n * chunk - t
  # Query segments from the unpadded slice (dynamic_slice would clamp a padded one); padded queries are segment 0.
  q_segments = query_segments(segments_bs, q_offset, t)
  q_segments = jnp.pad(q_segments, ((0, 0), (0, pad)) + ((0, 0),) * (q_segments.ndim - 2))
  q = jnp.pad(q_bthd.reshape(b, t, kv, h // kv, d), ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
  q_chunks = q.reshape(b, n, chunk, kv, h // kv, d).transpose(1, 0, 3, 4, 2, 5)  # (n, b, kv, g, chunk, d)
  segment_chunks = jnp.moveaxis(q_segments.reshape(b, n, chunk, *q_segments.shape[2:]), 1, 0)  # (n, b, chunk[, 2])
  first_positions = q_offset + chunk * jnp.arange(n, dtype=jnp.int32)

  @jax.checkpoint
  def one_chunk(k, v, segments, q_c, q_segments_c, first_position):
    return _softmax_attention(q_c, k, v, _visible(q_segments_c, segments, first_position), scale)

  def step(carry, xs):
    return carry, one_chunk(k_bksd, v_bksd, segments_bs, *xs)

  _, out = jax.lax.scan(step, None, (q_chunks, segment_chunks, first_positions))  # (n, b, kv, g, chunk, d)
  return out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * chunk, h, d)[:, :t]


def _is_static_zero(q_offset) -> bool:
  return isinstance(q_offset, int) and q_offset == 0


def _fallback(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale):
  """For shapes the fused kernels do not take: plain for a decode step, chunked otherwise."""
  impl = plain_attention if q_bthd.shape[1] == 1 else chunked_attention
  return impl(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale)


def _splash_block(length: int) -> int:
  return next(b for b in SPLASH_BLOCKS if length % b == 0)


def _splash_per_device(q_bhtd, k_bksd, v_bksd, segments_bt, *, interpret: bool):
  """Splash over one device's rows and heads: q (b, h, t, d) already scaled, t a multiple of 128."""
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  h, t = q_bhtd.shape[1], q_bhtd.shape[2]
  block = _splash_block(t)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((t, t)) for _ in range(h)])
  # The MHA kernel takes GQA as is: k/v carry kv heads, each serving h/kv consecutive query heads.
  kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
  one_row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
  return jax.vmap(one_row)(q_bhtd, k_bksd, v_bksd, segments_bt)


def splash_layout(mesh, b: int, h: int, kv: int) -> tuple[PartitionSpec, PartitionSpec, int]:
  """shard_map specs of the (b, heads, t, d) arrays and of the (b, t) segments on `mesh`, and by how much to repeat
  the kv heads first: batch over LOGICAL_RULES["batch"] and heads over "tensor" where they divide. When "tensor"
  divides the query heads but not the kv heads, each kv head is repeated (a GQA group split into smaller groups with
  the same keys) until it does: a little more k/v per device instead of every device computing every head."""
  batch = sharding.logical_to_spec(("batch",), (b,), mesh)[0]
  tensor = mesh.shape.get("tensor", 1)
  heads, repeat = None, 1
  if tensor > 1 and h % tensor == 0:
    heads, repeat = "tensor", tensor // math.gcd(kv, tensor)
  return PartitionSpec(batch, heads, None, None), PartitionSpec(batch, None), repeat


def splash_attention(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale, *, interpret: bool = False):
  """Splash attention where the queries are the keys; other shapes go to plain (decode) or chunked."""
  b, t, h, d = q_bthd.shape
  kv, s = k_bksd.shape[1], k_bksd.shape[2]
  if not (_is_static_zero(q_offset) and t == s and t > 1 and segments_bs.ndim == 2):
    return _fallback(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale)
  pad = -t % 128  # padded slots are segment 0: no real query sees them
  segments = jnp.pad(segments_bs.astype(jnp.int32), ((0, 0), (0, pad)))
  q = jnp.pad((q_bthd * scale).astype(q_bthd.dtype).transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad), (0, 0)))
  k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k_bksd, v_bksd))
  run = functools.partial(_splash_per_device, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    heads_spec, segments_spec, repeat = splash_layout(mesh, b, h, kv)
    k, v = jnp.repeat(k, repeat, axis=1), jnp.repeat(v, repeat, axis=1)
    run = jax.shard_map(run, in_specs=(heads_spec, heads_spec, heads_spec, segments_spec), out_specs=heads_spec,
                        check_vma=False)
  out = run(q, k, v, segments)  # (b, h, t + pad, d)
  return out[:, :, :t].transpose(0, 2, 1, 3).astype(q_bthd.dtype)


def cudnn_attention(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale, *, implementation: str = "cudnn"):
  """jax.nn.dot_product_attention over each row's valid tokens compacted to the front (see the module docstring)."""
  t, s = q_bthd.shape[1], k_bksd.shape[2]
  supported = (_is_static_zero(q_offset) and t == s and t > 1 and segments_bs.dtype == jnp.bool_
               and (implementation != "cudnn" or q_bthd.dtype in (jnp.bfloat16, jnp.float16)))
  if not supported:
    return _fallback(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale)
  valid = segments_bs
  order = jnp.argsort(~valid, axis=1, stable=True)  # valid slots first, each group in sequence order
  gather = lambda x_btnd: jnp.take_along_axis(x_btnd, order[:, :, None, None], axis=1)
  q, k, v = gather(q_bthd), gather(k_bksd.transpose(0, 2, 1, 3)), gather(v_bksd.transpose(0, 2, 1, 3))
  lengths = valid.sum(axis=1, dtype=jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths, implementation=implementation)
  out = jnp.take_along_axis(out, jnp.argsort(order, axis=1)[:, :, None, None], axis=1)  # back to slot order
  return jnp.where(valid[:, :, None, None], out, 0).astype(q_bthd.dtype)


ATTENTIONS: dict[str, Callable] = {"plain": plain_attention, "chunked": chunked_attention,
                                   "splash": splash_attention, "cudnn": cudnn_attention}
# "auto" per platform: the memory-efficient implementation each platform has (chunked is plain for t <= CHUNK).
AUTO_ATTENTION = {"cpu": "chunked", "tpu": "splash", "gpu": "cudnn"}
ATTENTION_CHOICES = ("auto", *ATTENTIONS)


def resolve_attention(name: str, platform: str) -> str:
  """The implementation `name` ("auto" or one of ATTENTIONS) means on devices of `platform` ("cpu", "tpu", "gpu")."""
  return AUTO_ATTENTION.get(platform, "chunked") if name == "auto" else name


def attend(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, *, scale: float, impl: str = "plain"):
  """(b, t, h, d) attention output of queries (b, t, h, d) over keys/values (b, kv, s, d)."""
  return ATTENTIONS[impl](q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale)
