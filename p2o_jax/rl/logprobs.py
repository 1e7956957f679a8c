"""Per-token log-probabilities (and entropies) of responses under a policy, on packed train rows.

The transformer runs on rows of packed (prompt + response) sequences (rl/sequence_packing.py); the hidden state that
predicts each response token is gathered into a (rows, R) response layout, and only those positions go through the LM
head. Log-probs use logits / temperature, the same distribution the sampler drew from, so an untouched policy has
ratio exactly 1.

The LM head is applied a chunk of sequence positions at a time (`chunked_logprobs`): a full (rows, R, vocab) float32
tensor is never built, neither in the forward pass nor in the backward pass. For Qwen3-4B (vocab 151,936) at
R = 12,288 one such tensor is 7 GiB per row; a chunk of 1,024 tokens per device is 0.58 GiB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from p2o_jax import sharding
from p2o_jax.models.decoder import Decoder
from p2o_jax.rl.sequence_packing import gather_predicted

# Tokens (rows x positions) per device in one LM-head chunk. Each live (tokens, vocab) float32 buffer is then
# 1,024 x 151,936 x 4 B = 0.58 GiB for Qwen3-4B (the backward pass holds two or three: logits, softmax, their
# gradient), against 7 GiB per row for a whole 12,288-token response. A chunk's matmul is still 1,024 tokens long,
# plenty to keep a TPU's matrix units busy. Counted in tokens, not positions: 16 rows of a 512-token response per
# device in one position chunk would be 5 GiB per buffer.
DEFAULT_CHUNK_TOKENS = 1024
# The backward pass recomputes each chunk's logits, unless every chunk's softmax together fits in this many bytes per
# device: then the forward keeps them (one LM-head matmul of four saved: at 50M parameters, vocab 32,000 and 2,048
# response tokens, 0.25 GiB kept and the CPU update 4.18 -> 4.06 s in benchmarks/grpo_step_bench.py). Qwen3-4B's
# 12k-token rows never fit.
KEEP_SOFTMAX_BYTES = 256 << 20


def batch_cells() -> int:
  """Cells per micro-batch (rl/sequence_packing.py): one per device on the ambient mesh's batch axes."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else sharding.batch_divisor(mesh)


def default_chunk_size(rows: int) -> int:
  """Positions per chunk so that a chunk holds about DEFAULT_CHUNK_TOKENS tokens per device, the `rows` split over
  the ambient mesh's batch axes."""
  divisor = batch_cells()
  rows_per_device = rows // divisor if rows % divisor == 0 else rows
  return max(DEFAULT_CHUNK_TOKENS // max(rows_per_device, 1), 1)


def response_hidden(model: Decoder, batch) -> jax.Array:
  """Final hidden states (b, R, embed): for each response token, the one that predicts it. `batch` holds the packed
  tokens, positions and segments and the response layout's predictor (sequence_packing.pack_sequences)."""
  hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segments"])
  return gather_predicted(hidden, batch["predictor"], batch_cells())


def chunked_logprobs(hidden_bre, unembedding_ev, targets_br, temperature: float, *,
                     chunk_size: int | None = None, entropy: bool = True):
  """(log-prob of each target, entropy of each position's distribution), both (b, R) float32, under
  softmax(hidden @ unembedding / temperature), computed `chunk_size` positions at a time.

  The matmul runs in hidden's dtype (the unembedding is cast to it, as `Decoder.logits` does) and the logits are
  cast to float32 before the log-sum-exp. Gradients flow to `hidden_bre` and `unembedding_ev` through the log-probs
  (an analytic custom VJP, d logp / d logits = (onehot - softmax) / T, that recomputes each chunk's logits unless
  all chunks' softmax fit in KEEP_SOFTMAX_BYTES per device); the
  entropy is a metric and carries no gradient (stop_gradient). `entropy=False` skips it and returns None in its place.
  R need not be a multiple of `chunk_size` (positions per chunk; None: `default_chunk_size`).
  """
  b, r, e = hidden_bre.shape
  if unembedding_ev.shape[0] != e or targets_br.shape != (b, r):
    raise ValueError(f"shapes: hidden {hidden_bre.shape}, unembedding {unembedding_ev.shape}, targets "
                     f"{targets_br.shape}")
  chunk_size = default_chunk_size(b) if chunk_size is None else chunk_size
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  chunk = min(chunk_size, r)
  n = -(-r // chunk)
  pad = n * chunk - r
  if pad:
    hidden_bre = jnp.pad(hidden_bre, ((0, 0), (0, pad), (0, 0)))
    targets_br = jnp.pad(targets_br, ((0, 0), (0, pad)))
  # (n, b, chunk, ...): the scan runs over the leading axis.
  hidden_nbce = hidden_bre.reshape(b, n, chunk, e).swapaxes(0, 1)
  targets_nbc = targets_br.astype(jnp.int32).reshape(b, n, chunk).swapaxes(0, 1)
  keep_softmax = n * b * chunk * unembedding_ev.shape[1] * 4 <= KEEP_SOFTMAX_BYTES * batch_cells()
  logp_nbc, entropy_nbc = _chunked(hidden_nbce, unembedding_ev, targets_nbc, float(temperature), entropy,
                                   keep_softmax)
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :r]
  return unchunk(logp_nbc), (None if entropy_nbc is None else jax.lax.stop_gradient(unchunk(entropy_nbc)))


def _chunk_logits(hidden_bce, w_ev, temperature: float):
  """float32 logits / T (b, c, V) of one chunk; w already in hidden's dtype. One 2-D matmul (see `_matmul_2d`)."""
  b, c, e = hidden_bce.shape
  logits = (hidden_bce.reshape(b * c, e) @ w_ev).astype(jnp.float32).reshape(b, c, -1)
  return sharding.constrain(logits / temperature, ("batch", "length", "vocab"))


def _like_unembedding(x_ev):
  # The gradient accumulator sharded as the parameter (lm_head, or the tied embedding transposed), not replicated:
  # left to itself XLA all-reduces each chunk's (embed, vocab) gradient over the fsdp axis.
  return sharding.constrain(x_ev, ("embed", "vocab"))


def _target_mask(targets_bc, vocab: int):
  # A comparison against an iota, not a gather: with the vocab axis sharded it reduces shard-locally.
  return jax.lax.broadcasted_iota(jnp.int32, (*targets_bc.shape, vocab), 2) == targets_bc[..., None]


def _forward(hidden_nbce, w_ev, targets_nbc, temperature: float, with_entropy: bool, keep_softmax: bool):
  """(logp, entropy or None, log-sum-exp), each (n, b, c) float32, and the softmax (n, b, c, V) or None."""
  w = w_ev.astype(hidden_nbce.dtype)

  def body(_, chunk):
    h, targets = chunk
    z = _chunk_logits(h, w, temperature)
    m = jnp.max(z, axis=-1, keepdims=True)
    u = z - m  # <= 0: exp never overflows
    e_u = jnp.exp(u)
    s = jnp.sum(e_u, axis=-1)
    log_s = jnp.log(s)
    logp = jnp.sum(jnp.where(_target_mask(targets, z.shape[-1]), u, 0.0), axis=-1) - log_s
    lse = m[..., 0] + log_s
    # -sum p log p with p = exp(u) / s and log p = u - log s; u carries no large offset, so no cancellation.
    ent = log_s - jnp.sum(e_u * u, axis=-1) / s if with_entropy else None
    return None, (logp, ent, lse, e_u / s[..., None] if keep_softmax else None)

  _, (logp, ent, lse, softmax) = jax.lax.scan(body, None, (hidden_nbce, targets_nbc))
  return logp, ent, lse, softmax


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(hidden_nbce, w_ev, targets_nbc, temperature: float, with_entropy: bool, keep_softmax: bool):
  logp, ent, _, _ = _forward(hidden_nbce, w_ev, targets_nbc, temperature, with_entropy, False)
  return logp, ent


def _chunked_fwd(hidden_nbce, w_ev, targets_nbc, temperature: float, with_entropy: bool, keep_softmax: bool):
  logp, ent, lse, softmax = _forward(hidden_nbce, w_ev, targets_nbc, temperature, with_entropy, keep_softmax)
  return (logp, ent), (hidden_nbce, w_ev, targets_nbc, lse, softmax)  # a (.., vocab) array only if kept


def _chunked_bwd(temperature: float, with_entropy: bool, keep_softmax: bool, residuals, cotangents):
  """Per chunk: the softmax (kept, or recomputed from the logits), d logp / d logits = (onehot - softmax) / T, then
  d hidden and d w by matmul. The entropy's cotangent is ignored: the public function hands the entropy out through
  stop_gradient."""
  del with_entropy
  hidden_nbce, w_ev, targets_nbc, lse_nbc, softmax_nbcv = residuals
  g_logp_nbc = cotangents[0]
  dt = hidden_nbce.dtype
  w = w_ev.astype(dt)
  acc_dtype = jnp.promote_types(w_ev.dtype, jnp.float32)
  e = hidden_nbce.shape[-1]

  def body(dw_ev, chunk):
    h, targets, lse, g, p = chunk
    if not keep_softmax:
      p = jnp.exp(_chunk_logits(h, w, temperature) - lse[..., None])
    dz = (g[..., None] * (_target_mask(targets, p.shape[-1]).astype(jnp.float32) - p)) / temperature
    dz = dz.astype(dt).reshape(-1, p.shape[-1])  # the transpose of the float32 cast in `_chunk_logits`
    dh = (dz @ w.T).reshape(h.shape)
    dw_ev = dw_ev + jnp.matmul(h.reshape(-1, e).T, dz, preferred_element_type=acc_dtype)
    return _like_unembedding(dw_ev), dh

  kept = softmax_nbcv if keep_softmax else jnp.zeros(lse_nbc.shape, jnp.float32)  # a placeholder scanned alongside
  dw_ev, dh_nbce = jax.lax.scan(body, _like_unembedding(jnp.zeros(w_ev.shape, acc_dtype)),
                                (hidden_nbce, targets_nbc, lse_nbc, g_logp_nbc.astype(jnp.float32), kept))
  return dh_nbce.astype(hidden_nbce.dtype), dw_ev.astype(w_ev.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
