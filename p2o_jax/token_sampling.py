"""Drawing one token per row from logits: greedy, temperature, top-k and top-p, each row with its own temperature and
its own uniform draw (so a row's token never depends on which other rows share its batch). Pure functions.

Each token comes with its log-probability under the distribution it was drawn from: log_softmax(logits / T)
restricted to the top-k / top-p set; for a greedy row (T = 0), log_softmax(logits).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits_bv, top_k: int, top_p, use_top_p: bool):
  """Mask (to -inf) the tokens outside the top-k set and outside the smallest set with probability >= top_p."""
  if top_k:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, -jnp.inf, logits_bv)
  if use_top_p:
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    kept = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # keep until the mass before a token reaches top_p
    threshold = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)
  return logits_bv


def first_argmax(x_bv):
  """jnp.argmax over the last axis (the first index of the maximum), as two plain reductions.

  XLA:CPU lowers argmax to one (value, index) reduction that takes ~2.5 ms per decode step over a 32k vocabulary at
  batch 32; a max, then the smallest index holding it, takes a third of that.
  """
  v = x_bv.shape[-1]
  best = jnp.max(x_bv, axis=-1, keepdims=True)
  index = jnp.min(jnp.where(x_bv == best, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.minimum(index, v - 1)  # a NaN row matches nowhere


def inverse_cdf_sample(uniform_b, probs_bv, block: int = 128):
  """One draw per row from `probs_bv` (rows sum to ~1) by inverting the CDF at that row's uniform in [0, 1).

  jax.random.categorical draws a Gumbel variate for every vocabulary entry, which dominates a decode step on CPU for
  large vocabularies; here the CDF is built two-level (block sums, then one block) so the cumulative sums stay short.
  """
  b, v = probs_bv.shape
  blocks = -(-v // block)
  p = jnp.pad(probs_bv, ((0, 0), (0, blocks * block - v))).reshape(b, blocks, block)
  mass = p.sum(axis=-1)
  cdf = jnp.cumsum(mass, axis=-1)
  u = uniform_b.astype(probs_bv.dtype)[:, None] * cdf[:, -1:]
  chosen_block = jnp.minimum(jnp.sum(cdf < u, axis=-1), blocks - 1)
  inner = jnp.take_along_axis(p, chosen_block[:, None, None], axis=1)[:, 0]
  before = jnp.take_along_axis(cdf - mass, chosen_block[:, None], axis=1)
  offset = jnp.minimum(jnp.sum(jnp.cumsum(inner, axis=-1) + before < u, axis=-1), block - 1)
  tokens = jnp.minimum(chosen_block * block + offset, v - 1)
  # Rounding can land the draw on a zero-probability (filtered or padding) entry: take the mode instead.
  drawn_p = jnp.take_along_axis(probs_bv, tokens[:, None], axis=-1)[:, 0]
  return jnp.where(drawn_p > 0, tokens, first_argmax(probs_bv))


def row_uniforms(base_key, rows_b, token_index_b):
  """One uniform per row from (base key, the row's index in its request, the token's index in the row): the same
  draw whatever slot or batch the row is decoded in."""
  def one(row, index):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base_key, row), index), (), jnp.float32)
  return jax.vmap(one)(rows_b, token_index_b)


def sample_tokens(logits_bv, uniform_b, temperature_b, top_p, *, kind: str, top_k: int, use_top_p: bool):
  """(tokens, log-probs) of one draw per row. kind: "greedy" (every row T = 0), "sample" (every row T > 0) or
  "mixed" (per row: T = 0 greedy, else sampled); static, so all-greedy and all-sampled calls skip the other path."""
  if kind == "greedy":
    tokens = first_argmax(logits_bv)
    return tokens.astype(jnp.int32), _take(jax.nn.log_softmax(logits_bv, axis=-1), tokens)
  greedy_b = temperature_b == 0
  scaled = logits_bv / jnp.where(greedy_b, 1.0, temperature_b)[:, None]
  logp = jax.nn.log_softmax(filter_logits(scaled, top_k, top_p, use_top_p), axis=-1)
  tokens = inverse_cdf_sample(uniform_b, jnp.exp(logp))
  token_logp = _take(logp, tokens)
  if kind == "mixed":
    argmax = first_argmax(logits_bv)
    tokens = jnp.where(greedy_b, argmax, tokens)
    token_logp = jnp.where(greedy_b, _take(jax.nn.log_softmax(logits_bv, axis=-1), argmax), token_logp)
  return tokens.astype(jnp.int32), token_logp


def _take(logp_bv, tokens_b):
  return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]
