"""The chunked LM head (p2o_jax.rl.logprobs.chunked_logprobs) against full-vocab references: values, gradients, bf16,
and the compiled memory of its gradient against the plain full-logits path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax.sharding import AbstractMesh

from p2o_jax.rl.logprobs import DEFAULT_CHUNK_TOKENS, chunked_logprobs, default_chunk_size
from p2o_jax.sharding import MESH_AXES

B, E, V = 3, 16, 50


def plain(hidden, w, targets, temperature):
  """Full (b, R, V) float32 logits as `Decoder.logits` builds them, jax.nn.log_softmax, take_along_axis."""
  b, r, e = hidden.shape
  logits = (hidden.reshape(-1, e) @ w.astype(hidden.dtype)).astype(jnp.float32).reshape(b, r, -1)
  logp_full = jax.nn.log_softmax(logits / temperature, axis=-1)
  logp = jnp.take_along_axis(logp_full, targets[..., None], axis=-1)[..., 0]
  return logp, -jnp.sum(jnp.exp(logp_full) * logp_full, axis=-1)


def make_inputs(r, seed=0, dtype=np.float32, scale=0.4):
  """hidden (B, r, E), w (E, V) with logits of a few units, targets (B, r), weights (B, r) for a scalar of the logp."""
  rs = np.random.RandomState(seed)
  hidden = rs.randn(B, r, E).astype(np.float32)
  w = (rs.randn(E, V) * scale).astype(np.float32)
  targets = rs.randint(0, V, (B, r)).astype(np.int32)
  weights = rs.randn(B, r).astype(np.float32)
  return jnp.asarray(hidden, dtype), jnp.asarray(w, dtype), jnp.asarray(targets), jnp.asarray(weights)


def values_and_grads(fn, hidden, w, targets, weights, temperature):
  """(logp, entropy, d/dh, d/dw) of sum(logp * weights)."""
  logp, entropy = fn(hidden, w, targets, temperature)
  scalar = lambda h, w_: jnp.sum(fn(h, w_, targets, temperature)[0] * weights)
  dh, dw = jax.grad(scalar, argnums=(0, 1))(hidden, w)
  return [np.asarray(x, np.float32) for x in (logp, entropy, dh, dw)]


@pytest.mark.parametrize("r, chunk, temperature", [
    (16, 4, 1.0),  # R a multiple of the chunk
    (13, 4, 0.7),  # R not a multiple: padded, then sliced
    (5, 8, 1.3),  # one chunk larger than R
    (7, 1, 0.7),  # one position per chunk
])
def test_matches_full_logits_reference(r, chunk, temperature):
  inputs = make_inputs(r)
  chunked = lambda h, w, t, temp: chunked_logprobs(h, w, t, temp, chunk_size=chunk)
  got = values_and_grads(chunked, *inputs, temperature)
  want = values_and_grads(plain, *inputs, temperature)
  for name, g, x in zip(("logp", "entropy", "d hidden", "d w"), got, want, strict=True):
    assert g.shape == x.shape, name
    np.testing.assert_allclose(g, x, atol=1e-5, rtol=0, err_msg=name)
  assert np.abs(want[3]).max() > 0.1  # a gradient that is actually there


def test_matches_a_numpy_derivation():
  """float64 NumPy: log-sum-exp, entropy -sum p log p, and the analytic gradient d logp / d logits = (onehot - p)/T."""
  temperature, r = 0.7, 10
  hidden, w, targets, weights = make_inputs(r, seed=3)
  h64, w64, t, g = (np.asarray(x, np.float64) for x in (hidden, w, targets, weights))
  t = t.astype(int)
  z = h64 @ w64 / temperature  # (B, r, V)
  m = z.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(z - m).sum(-1, keepdims=True)))[..., 0]
  logp_full = z - lse[..., None]
  p = np.exp(logp_full)
  logp = np.take_along_axis(logp_full, t[..., None], -1)[..., 0]
  entropy = -(p * logp_full).sum(-1)
  dz = g[..., None] * (np.eye(V)[t] - p) / temperature
  dh = dz @ w64.T
  dw = np.einsum("bre,brv->ev", h64, dz)
  chunked = lambda h, w_, t_, temp: chunked_logprobs(h, w_, t_, temp, chunk_size=3)
  got = values_and_grads(chunked, hidden, w, targets, weights, temperature)
  for name, a, b in zip(("logp", "entropy", "d hidden", "d w"), got, (logp, entropy, dh, dw), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=name)


@pytest.mark.slow
def test_large_logits_stay_finite():
  """Logits in the hundreds: the per-chunk log-sum-exp subtracts the max, so nothing overflows."""
  hidden, w, targets, weights = make_inputs(9, seed=1, scale=40.0)
  got = values_and_grads(lambda *a: chunked_logprobs(*a, chunk_size=4), hidden, w, targets, weights, 1.0)
  want = values_and_grads(plain, hidden, w, targets, weights, 1.0)
  assert np.abs(np.asarray(hidden) @ np.asarray(w)).max() > 300
  for name, a, b in zip(("logp", "entropy", "d hidden", "d w"), got, want, strict=True):
    assert np.isfinite(a).all(), name
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-5, err_msg=name)  # f32 eps x logits of ~1e3


@pytest.mark.slow
def test_bfloat16_inputs():
  """bf16 hidden and w: matmul in bf16, then float32 logits. Against float32 references on the same (bf16-exact)
  values the error is the bf16 rounding of the logits (relative 2^-8 each), so logp = z_t - lse and the entropy may
  be off by up to 2 * 2^-8 * max|logit / T| (here ~0.08 for logits / T of ~10); the bf16 gradients by 2% of their
  largest entry."""
  temperature = 0.7
  hidden, w, targets, weights = make_inputs(13, seed=2, dtype=jnp.bfloat16)
  chunked = lambda h, w_, t, temp: chunked_logprobs(h, w_, t, temp, chunk_size=4)
  got = values_and_grads(chunked, hidden, w, targets, weights, temperature)
  assert chunked_logprobs(hidden, w, targets, 1.0)[0].dtype == jnp.float32
  grad = jax.grad(lambda h, w_: jnp.sum(chunked(h, w_, targets, temperature)[0] * weights), (0, 1))
  assert [x.dtype for x in jax.eval_shape(grad, hidden, w)] == [jnp.bfloat16] * 2  # gradients in the inputs' dtypes
  max_logit = float(np.abs(np.asarray(hidden, np.float32) @ np.asarray(w, np.float32)).max()) / temperature
  value_tol = 2 * 2**-8 * max_logit
  want_f32 = values_and_grads(plain, hidden.astype(jnp.float32), w.astype(jnp.float32), targets, weights, temperature)
  want_bf16 = values_and_grads(plain, hidden, w, targets, weights, temperature)  # the same bf16 matmul, unchunked
  for want in (want_f32, want_bf16):
    tols = (value_tol, value_tol, 0.02 * np.abs(want[2]).max(), 0.02 * np.abs(want[3]).max())
    for name, a, b, atol in zip(("logp", "entropy", "d hidden", "d w"), got, want, tols, strict=True):
      np.testing.assert_allclose(a, b, atol=atol, rtol=0, err_msg=name)


def test_entropy_is_a_metric_without_gradient_and_optional():
  hidden, w, targets, _ = make_inputs(6)
  logp, entropy = chunked_logprobs(hidden, w, targets, 1.0, chunk_size=4)
  logp_only, none = chunked_logprobs(hidden, w, targets, 1.0, chunk_size=4, entropy=False)
  assert none is None
  np.testing.assert_array_equal(np.asarray(logp_only), np.asarray(logp))
  assert (np.asarray(entropy) > 0).all() and (np.asarray(entropy) <= np.log(V) + 1e-5).all()
  grads = jax.grad(lambda h, w_: jnp.sum(chunked_logprobs(h, w_, targets, 1.0, chunk_size=4)[1]), (0, 1))(hidden, w)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


def test_rejects_bad_shapes_and_chunk():
  hidden, w, targets, _ = make_inputs(6)
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_logprobs(hidden, w, targets, 1.0, chunk_size=0)
  with pytest.raises(ValueError, match="shapes"):
    chunked_logprobs(hidden, w.T, targets, 1.0)


def test_gradient_memory_is_bounded_by_the_chunk():
  """Compiled (CPU) gradient of sum(logp * weights) + the entropy metric at b=2, R=2048, V=32768, e=64: the plain path
  holds (b, R, V) float32 buffers (512 MiB each); the chunked one only (b, chunk, V) ones (64 MiB at chunk 256)."""
  b, r, v, e, chunk = 2, 2048, 32768, 64, 256
  shapes = (jax.ShapeDtypeStruct((b, r, e), jnp.float32), jax.ShapeDtypeStruct((e, v), jnp.float32),
            jax.ShapeDtypeStruct((b, r), jnp.int32), jax.ShapeDtypeStruct((b, r), jnp.float32))

  def temp_bytes(fn):
    def loss(hidden, w, targets, weights):
      logp, entropy = fn(hidden, w, targets, 0.7)
      return jnp.sum(logp * weights) + jax.lax.stop_gradient(jnp.mean(entropy))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_tensor = b * r * v * 4
  plain_bytes = temp_bytes(plain)
  chunked_bytes = temp_bytes(lambda *a: chunked_logprobs(*a, chunk_size=chunk))
  assert plain_bytes >= full_tensor  # the reference really does hold the full logits
  assert chunked_bytes < plain_bytes / 4, (chunked_bytes, plain_bytes)
  assert chunked_bytes < full_tensor / 2, (chunked_bytes, full_tensor)
  assert chunked_bytes < 3 * b * chunk * v * 4, chunked_bytes  # a couple of chunk-sized buffers, whatever R is


def test_the_default_chunk_holds_about_1024_tokens_per_device():
  """Chunks count tokens per device, not positions: 16 rows of one device share 1,024 tokens."""
  assert default_chunk_size(1) == DEFAULT_CHUNK_TOKENS == 1024
  assert default_chunk_size(16) == 64
  with jax.sharding.use_abstract_mesh(AbstractMesh((1, 4, 1), MESH_AXES)):
    assert default_chunk_size(16) == 256  # 4 rows per device
    assert default_chunk_size(6) == 170  # 6 rows do not split over 4 devices: every device holds them all
