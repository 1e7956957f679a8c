"""Rotary position embeddings as Hugging Face computes them (half-split rotation), incl. Llama-3 and linear scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from p2o_jax.models.config import RopeConfig


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
  """Per-pair rotation frequencies (head_dim // 2,), float32, with the configured scaling applied."""
  inv_freq = 1.0 / (rope.theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  if rope.rope_type == "linear":
    return (inv_freq / rope.factor).astype(np.float32)
  if rope.rope_type == "llama3":
    return _llama3_scaling(inv_freq, rope).astype(np.float32)
  return inv_freq.astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
  # Long wavelengths are slowed by `factor`, short ones kept, and the band between is interpolated smoothly.
  old_len = rope.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = old_len / rope.low_freq_factor
  high_freq_wavelen = old_len / rope.high_freq_factor
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
  smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled)


def rope_cos_sin(positions_bt: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """cos/sin tables (b, t, head_dim) in float32 for integer positions."""
  angles = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_bthd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
  half = x_bthd.shape[-1] // 2
  rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
  cos, sin = cos_btd[:, :, None, :], sin_btd[:, :, None, :]
  return (x_bthd * cos.astype(x_bthd.dtype) + rotated * sin.astype(x_bthd.dtype)).astype(x_bthd.dtype)
