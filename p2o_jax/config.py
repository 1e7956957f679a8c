"""Up-front validation of a run's ml_collections config: every problem is a one-line error naming the key."""

from __future__ import annotations

import ml_collections

from p2o_jax.models.config import SUPPORTED_MODEL_TYPES  # noqa: F401  (documented choices live with the model)

_DTYPES = ("float32", "bfloat16")


class ConfigError(ValueError):
  """The run's config is malformed; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raise ConfigError for the first impossible value or combination."""
  _require(c.model.param_dtype in _DTYPES, "model.param_dtype", f"{c.model.param_dtype!r} not in {_DTYPES}")
  _require(c.model.compute_dtype in _DTYPES, "model.compute_dtype", f"{c.model.compute_dtype!r} not in {_DTYPES}")
  for axis in ("data", "fsdp", "tensor"):
    size = c.mesh[axis]
    _require(size == -1 or size >= 1, f"mesh.{axis}", f"{size} must be >= 1 or -1 (all remaining devices)")
  r = c.rollout
  _require(r.max_prompt_len >= 1, "rollout.max_prompt_len", f"{r.max_prompt_len} must be >= 1")
  _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", f"{r.max_new_tokens} must be >= 1")
  _require(r.temperature >= 0, "rollout.temperature", f"{r.temperature} must be >= 0 (0 = greedy)")
  _require(0 < r.top_p <= 1, "rollout.top_p", f"{r.top_p} must be in (0, 1]")
  _require(r.top_k >= 0, "rollout.top_k", f"{r.top_k} must be >= 0 (0 = off)")
  _require(r.num_samples >= 1, "rollout.num_samples", f"{r.num_samples} must be >= 1")
