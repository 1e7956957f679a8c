"""One Flax NNX decoder for the Llama, Qwen2 and Qwen3 families (GQA/MQA, RoPE, RMSNorm, SwiGLU).

Every parameter carries `logical_axes` metadata; `p2o_jax.sharding` maps those names onto mesh axes. Kernels keep heads
as their own axis ((embed, heads, head_dim) rather than (embed, heads*head_dim)) so the tensor axis can split heads.
The forward pass optionally reads and writes a KV cache: a list with one {"k", "v"} dict per layer, each
(batch, kv_heads, cache_len, head_dim), written at `cache_index`. Keeping kv_heads ahead of the sequence axis is the
layout the attention matmuls consume, so a decode step never transposes the whole cache. Attention is causal within
each key slot's segment (`segments`, (batch, keys): 0 = padding; a bool validity mask is one segment);
`p2o_jax.models.attention` builds the mask from it, never a (b, t, s) tensor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from p2o_jax import sharding
from p2o_jax.models.attention import attend, decode_attention
from p2o_jax.models.config import ModelConfig
from p2o_jax.models.rope import apply_rope, inverse_frequencies, rope_cos_sin

KVCache = list[dict[str, jax.Array]]


def _param(rngs: nnx.Rngs, shape, axes, cfg: ModelConfig, init: str = "normal") -> nnx.Param:
  if init == "ones":
    value = jnp.ones(shape, cfg.weight_dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, cfg.weight_dtype)
  else:  # transformers' default: N(0, 0.02)
    value = 0.02 * jax.random.normal(rngs.params(), shape, cfg.weight_dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, axis: str, cfg: ModelConfig, rngs: nnx.Rngs):
    self.eps = cfg.rms_norm_eps
    self.scale = _param(rngs, (dim,), (axis,), cfg, init="ones")

  def __call__(self, x):
    # As transformers: normalize in float32, cast back, then scale.
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (self.scale[...] * normed.astype(x.dtype)).astype(x.dtype)


def write_rows(cache_bksd: jax.Array, new_bkd: jax.Array, positions_b: jax.Array, how: str) -> jax.Array:
  """`cache_bksd` with row i's new_bkd[i] at position positions_b[i]. "scatter" touches only those slots; "blend"
  selects over the whole cache (every position read and written: it costs what attention's read of the cache costs),
  which the TPU compiler does in place where it copies the cache for the scatter (a second cache per chip)."""
  new = new_bkd.astype(cache_bksd.dtype)
  if how == "blend":
    at = jnp.arange(cache_bksd.shape[2])[None, None, :, None] == positions_b[:, None, None, None]
    return jnp.where(at, new[:, :, None, :], cache_bksd)
  return cache_bksd.at[jnp.arange(cache_bksd.shape[0]), :, positions_b].set(new)


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, h, kv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg = cfg
    self.q_proj = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), cfg)
    self.k_proj = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), cfg)
    self.v_proj = _param(rngs, (e, kv, d), ("embed", "kv_heads", "head_dim"), cfg)
    self.o_proj = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), cfg)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), cfg, init="zeros")
      self.k_bias = _param(rngs, (kv, d), ("kv_heads", "head_dim"), cfg, init="zeros")
      self.v_bias = _param(rngs, (kv, d), ("kv_heads", "head_dim"), cfg, init="zeros")
    if cfg.out_bias:
      self.o_bias = _param(rngs, (e,), ("embed",), cfg, init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(d, "head_dim", cfg, rngs)
      self.k_norm = RMSNorm(d, "head_dim", cfg, rngs)

  def _project(self, x, kernel, bias_name):
    e, heads, d = kernel.shape
    y = _matmul_2d(x, kernel[...].reshape(e, heads * d)).reshape(*x.shape[:-1], heads, d)
    if self.cfg.qkv_bias:
      y = y + getattr(self, bias_name)[...].astype(x.dtype)
    return y

  def _qkv(self, x_bte, cos, sin):
    """Queries (b, t, h, d) and keys, values (b, kv, t, d) of the tokens `x_bte`, RoPE applied."""
    q = self._project(x_bte, self.q_proj, "q_bias")
    k = self._project(x_bte, self.k_proj, "k_bias")
    v = self._project(x_bte, self.v_proj, "v_bias")
    if self.cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (b, kv, t, d): only the new tokens move

  def _output(self, out_bthd):
    b, t, h, d = out_bthd.shape
    out = _matmul_2d(out_bthd.reshape(b, t, h * d), self.o_proj[...].reshape(h * d, -1))
    return out + self.o_bias[...].astype(out.dtype) if self.cfg.out_bias else out

  def __call__(self, x_bte, cos, sin, segments_bs, layer_cache, cache_index):
    q, k, v = self._qkv(x_bte, cos, sin)
    if layer_cache is not None:
      cache_k = jax.lax.dynamic_update_slice_in_dim(layer_cache["k"], k.astype(layer_cache["k"].dtype), cache_index, 2)
      cache_v = jax.lax.dynamic_update_slice_in_dim(layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, 2)
      layer_cache = {"k": cache_k, "v": cache_v}
      if not _is_prefill(cache_index):  # a prefill's keys are its own tokens: no need to attend over the empty cache
        k, v = cache_k, cache_v
    segments_bs = segments_bs[:, :k.shape[2]]
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), segments_bs, cache_index, scale=self.cfg.head_dim ** -0.5,
                 impl=self.cfg.attention)
    return self._output(out), layer_cache

  def decode(self, x_b1e, cos, sin, layer_cache, positions_b):
    """One new token per row, each at its own cache position: written there, attending over the row's cache up to
    it. The engine keeps the cache as long as its longest live row needs, not the allocation."""
    q, k, v = self._qkv(x_b1e, cos, sin)
    layer_cache = {name: write_rows(layer_cache[name], new[:, :, 0], positions_b, self.cfg.cache_write)
                   for name, new in (("k", k), ("v", v))}
    valid = jnp.arange(layer_cache["k"].shape[2])[None, :] <= positions_b[:, None]
    out = decode_attention(q, layer_cache["k"].astype(q.dtype), layer_cache["v"].astype(q.dtype), valid,
                           scale=self.cfg.head_dim ** -0.5)
    return self._output(out), layer_cache


def _matmul_2d(x, kernel):
  """(..., in) @ (in, out) as one 2-D matmul. Given 3-D operands, XLA:CPU may transpose the *weights* to fit the
  activations' layout, in every decode step (~1 MB per layer at 50M) or in the slow gradient loops of training."""
  out = x.reshape(-1, x.shape[-1]) @ kernel.astype(x.dtype)
  return out.reshape(*x.shape[:-1], kernel.shape[-1])


def _is_prefill(cache_index) -> bool:
  return isinstance(cache_index, int) and cache_index == 0


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    e, f = cfg.hidden_size, cfg.intermediate_size
    self.cfg = cfg
    self.gate_proj = _param(rngs, (e, f), ("embed", "mlp"), cfg)
    self.up_proj = _param(rngs, (e, f), ("embed", "mlp"), cfg)
    self.down_proj = _param(rngs, (f, e), ("mlp", "embed"), cfg)
    if cfg.mlp_bias:
      self.gate_bias = _param(rngs, (f,), ("mlp",), cfg, init="zeros")
      self.up_bias = _param(rngs, (f,), ("mlp",), cfg, init="zeros")
      self.down_bias = _param(rngs, (e,), ("embed",), cfg, init="zeros")

  def __call__(self, x_bte):
    # Rows flattened (see _matmul_2d): with (b, t, e) operands XLA:CPU transposes the large gradients in slow loops.
    dt = x_bte.dtype
    x = x_bte.reshape(-1, x_bte.shape[-1])
    # One matmul for gate and up: a short-row (decode) matmul runs ~1.5x faster at twice the width on XLA:CPU.
    # Stacked, not concatenated, so a tensor-sharded "mlp" axis stays sharded the same way.
    kernel = jnp.stack([self.gate_proj[...], self.up_proj[...]], axis=1).astype(dt)  # (e, 2, f)
    gate_up = jnp.einsum("be,ecf->bcf", x, kernel)
    gate, up = gate_up[:, 0], gate_up[:, 1]
    if self.cfg.mlp_bias:
      gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
    out = (jax.nn.silu(gate) * up) @ self.down_proj[...].astype(dt)
    out = out + self.down_bias[...].astype(dt) if self.cfg.mlp_bias else out
    return out.reshape(x_bte.shape)


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, "embed", cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.post_attention_norm = RMSNorm(cfg.hidden_size, "embed", cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x, cos, sin, segments_bs, layer_cache, cache_index):
    return self._residual(x, lambda h: self.attn(h, cos, sin, segments_bs, layer_cache, cache_index))

  def decode(self, x, cos, sin, layer_cache, positions_b):
    return self._residual(x, lambda h: self.attn.decode(h, cos, sin, layer_cache, positions_b))

  def _residual(self, x, attention):
    attn_out, layer_cache = attention(self.input_norm(x))
    x = x + attn_out
    x = x + self.mlp(self.post_attention_norm(x))
    return sharding.constrain(x, ("batch", "length", "act_embed")), layer_cache


# What the backward pass may keep of a layer's forward instead of recomputing it (model.remat).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each layer's input: least memory
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the projections' outputs
}


def _rematerialized_scan(layers, policy: str, x, cos, sin, segments_bs):
  """All `layers` (no cache) as one lax.scan over their stacked params, each layer's activations recomputed in the
  backward pass as `policy` says.

  A scan, not a Python loop: the backward pass then runs strictly one layer at a time. Unrolled, XLA's scheduler
  hoisted many layers' recomputations at once (Qwen3-4B, one 16k-token row: 28 GB of temporaries on a v4 chip).
  Stacking costs one copy of the layer params (in the compute dtype, sharded like them). A pure jax.checkpoint over
  split states: nnx.remat mutates Params across trace levels, which fails inside lax.map and jax.eval_shape.
  """
  graphdef = nnx.split(layers[0])[0]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(nnx.split(layer)[1] for layer in layers))

  @functools.partial(jax.checkpoint, policy=REMAT_POLICIES[policy])
  def one_layer(x, state):
    return nnx.merge(graphdef, state)(x, cos, sin, segments_bs, None, 0)[0]

  return jax.lax.scan(lambda x, state: (one_layer(x, state), None), x, stacked)[0]


class Decoder(nnx.Module):
  """Causal LM: token ids -> logits (float32)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.hidden_size, "embed", cfg, rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg)

  def hidden_states(self, tokens_bt, positions_bt, segments_bs, cache: KVCache | None = None, cache_index=0):
    """Final-norm hidden states (b, t, embed) and the updated cache."""
    x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.cfg.dtype)
    x = sharding.constrain(x, ("batch", "length", "act_embed"))
    cos, sin = rope_cos_sin(positions_bt, inverse_frequencies(self.cfg.rope, self.cfg.head_dim))
    if self.cfg.remat != "none" and cache is None:  # the sampler (with a cache) takes no gradient
      return self.final_norm(_rematerialized_scan(self.layers, self.cfg.remat, x, cos, sin, segments_bs)), None
    new_cache = []
    for i, layer in enumerate(self.layers):
      x, layer_cache = layer(x, cos, sin, segments_bs, None if cache is None else cache[i], cache_index)
      new_cache.append(layer_cache)
    return self.final_norm(x), (None if cache is None else new_cache)

  def decode_step(self, tokens_b, positions_b, cache: KVCache):
    """Logits (b, vocab) for one new token per row at its own position, and the updated cache."""
    x = jnp.take(self.embed[...], tokens_b[:, None], axis=0).astype(self.cfg.dtype)
    cos, sin = rope_cos_sin(positions_b[:, None], inverse_frequencies(self.cfg.rope, self.cfg.head_dim))
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      x, layer_cache = layer.decode(x, cos, sin, layer_cache, positions_b)
      new_cache.append(layer_cache)
    return self.logits(self.final_norm(x))[:, 0], new_cache

  def unembedding(self) -> jax.Array:
    """The (embed, vocab) matrix that maps final hidden states to logits."""
    return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]

  def logits(self, hidden_bte):
    logits = _matmul_2d(hidden_bte, self.unembedding()).astype(jnp.float32)
    return sharding.constrain(logits, ("batch", "length", "vocab"))

  def __call__(self, tokens_bt, positions_bt, segments_bs, cache: KVCache | None = None, cache_index=0):
    hidden, cache = self.hidden_states(tokens_bt, positions_bt, segments_bs, cache, cache_index)
    return self.logits(hidden), cache


def positions_from_mask(valid_bt: jax.Array) -> jax.Array:
  """Position ids that ignore left padding: the first real token of every row is position 0."""
  return jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=1) - 1, 0)


def forward(model: Decoder, tokens_bt, valid_bt) -> jax.Array:
  """Teacher-forced logits (b, t, vocab) for a left- or right-padded batch without a cache."""
  return model(tokens_bt, positions_from_mask(valid_bt), valid_bt)[0]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> KVCache:
  shape = (batch, cfg.num_kv_heads, length, cfg.head_dim)
  axes = ("batch", "kv_heads", "cache_length", "head_dim")
  dtype = dtype or cfg.dtype
  return [{name: sharding.constrain(jnp.zeros(shape, dtype), axes) for name in ("k", "v")}
          for _ in range(cfg.num_layers)]


def cast_floating(tree, dtype):
  """`tree` with its floating arrays in `dtype` (integer arrays as they are): params in the compute dtype."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
