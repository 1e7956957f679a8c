"""Causal grouped-query attention, one entry point (`attend`) over interchangeable implementations.

Every implementation computes the same thing: query i of a row sits at key slot `q_offset + i` and attends to the keys
s <= q_offset + i of its own segment. `segments_bs` (b, s) gives each key slot's segment: 0 for padding, else an id
(a bool validity mask is one segment; packed SFT rows hold several). Masks are never passed as (b, t, s) tensors: at
13k tokens one would take 170 MB per row, so each implementation builds what it needs from the segments and offset.

- "plain": the whole (t, s) score matrix in f32. The reference; fastest for short sequences and single-token decode.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so fully masked (padding) rows stay NaN-free


def query_segments(segments_bs: jax.Array, q_offset, t: int) -> jax.Array:
  """(b, t): the segment of each query (the segment of its own key slot)."""
  return jax.lax.dynamic_slice_in_dim(segments_bs.astype(jnp.int32), q_offset, t, axis=1)


def visible(segments_bs: jax.Array, q_offset, t: int) -> jax.Array:
  """(b, t, s) bool: which keys each query may attend to."""
  s = segments_bs.shape[1]
  keys = segments_bs.astype(jnp.int32)
  causal = jnp.arange(s)[None, :] <= (q_offset + jnp.arange(t))[:, None]
  same = query_segments(keys, q_offset, t)[:, :, None] == keys[:, None, :]
  return causal[None] & same & (keys > 0)[:, None, :]


def plain_attention(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale):
  """Softmax attention where each of the k kv-heads serves h/k query heads (GQA; MQA when k = 1).

  Both products run with (b, kv) as batch axes and the query axes ahead of the contracted ones, so XLA:CPU emits
  plain batched matmuls. Writing the output straight in (b, t, kv, g, d) order instead makes it lower the products
  to loop fusions: 4x slower for a decode step, ~1.3x for a full sequence.
  """
  b, t, h, d = q_bthd.shape
  kv = k_bksd.shape[1]
  q = q_bthd.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # (b, kv, g, t, d); free when t = 1
  scores = jnp.einsum("bkgtd,bksd->bkgts", q, k_bksd).astype(jnp.float32) * scale
  scores = jnp.where(visible(segments_bs, q_offset, t)[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bksd.dtype)
  out = jnp.einsum("bkgts,bksd->bkgtd", probs, v_bksd)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


ATTENTIONS: dict[str, Callable] = {"plain": plain_attention}
# "auto" per platform: the memory-efficient implementation each platform has.
AUTO_ATTENTION = {"cpu": "plain"}
ATTENTION_CHOICES = ("auto", *ATTENTIONS)


def resolve_attention(name: str, platform: str) -> str:
  """The implementation `name` ("auto" or one of ATTENTIONS) means on devices of `platform` ("cpu", "tpu", "gpu")."""
  return AUTO_ATTENTION.get(platform, "plain") if name == "auto" else name


def attend(q_bthd, k_bksd, v_bksd, segments_bs, q_offset, *, scale: float, impl: str = "plain"):
  """(b, t, h, d) attention output of queries (b, t, h, d) over keys/values (b, kv, s, d)."""
  return ATTENTIONS[impl](q_bthd, k_bksd, v_bksd, segments_bs, q_offset, scale)
