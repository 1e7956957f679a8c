"""The decoder's architecture description, read from a Hugging Face `config.json` (Llama, Qwen2, Qwen3 families)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = ("none", "full", "save_dots")  # see p2o_jax.models.decoder.REMAT_POLICIES
CACHE_WRITES = ("scatter", "blend")  # see p2o_jax.models.decoder.write_rows


class ModelConfigError(ValueError):
  """A checkpoint's config.json describes something this decoder cannot run."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0  # llama3 only
  high_freq_factor: float = 4.0  # llama3 only
  original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture plus the numeric choices (param/compute dtype, remat) of one decoder-only model."""

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-6
  rope: RopeConfig = RopeConfig()
  tie_word_embeddings: bool = False
  qkv_bias: bool = False  # Qwen2 always; Llama/Qwen3 when attention_bias
  out_bias: bool = False  # o_proj bias: Llama/Qwen3 when attention_bias, never Qwen2
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3's per-head RMSNorm on queries and keys
  max_position_embeddings: int = 32768
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: str = "none"  # what each layer recomputes in the backward pass: REMAT_POLICIES
  attention: str = "plain"  # the implementation: a name in p2o_jax.models.attention.ATTENTIONS
  # How a decode step writes each row's new K/V at its own position: "scatter" (in place on CPU and GPU) or "blend"
  # (a select over the cache: in place on TPU, where XLA copies the whole cache for the scatter inside the decode loop)
  cache_write: str = "scatter"

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ModelConfigError(f"unsupported model_type {self.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(f"num_attention_heads={self.num_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_kv_heads}")
    if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
      raise ModelConfigError(f"unsupported rope type {self.rope.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    if self.remat not in REMAT_POLICIES:
      raise ModelConfigError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
    if self.cache_write not in CACHE_WRITES:
      raise ModelConfigError(f"cache_write={self.cache_write!r}; expected one of {CACHE_WRITES}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ModelConfigError(f"{name}={getattr(self, name)!r}; expected one of {tuple(_DTYPES)}")

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def num_params(self) -> int:
    attn = self.hidden_size * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    mlp = 3 * self.hidden_size * self.intermediate_size
    embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
    return self.num_layers * (attn + mlp) + embed


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
  # transformers >= 5 writes `rope_parameters`; older checkpoints carry `rope_theta` + `rope_scaling`.
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  merged = {**scaling, **params}
  theta = merged.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = merged.get("rope_type", merged.get("type", "default"))
  kwargs = {k: merged[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                   "original_max_position_embeddings") if k in merged}
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise ModelConfigError(f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
  return RopeConfig(theta=float(theta), rope_type=rope_type, **kwargs)


def from_hf_dict(hf: dict[str, Any], **overrides) -> ModelConfig:
  """Translate a transformers config dict; `overrides` set param_dtype, compute_dtype, remat, attention,
  cache_write."""
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ModelConfigError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
  if hf.get("use_sliding_window"):
    raise ModelConfigError("use_sliding_window=true is not supported (sliding-window attention)")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ModelConfigError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
  num_heads = hf["num_attention_heads"]
  return ModelConfig(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope=_rope_from_hf(hf),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
      out_bias=model_type != "qwen2" and bool(hf.get("attention_bias", False)),
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=model_type == "qwen3",
      max_position_embeddings=hf.get("max_position_embeddings", 32768),
      **overrides,
  )


def load_hf_config(checkpoint_dir: str | pathlib.Path, **overrides) -> ModelConfig:
  path = pathlib.Path(checkpoint_dir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not a Hugging Face checkpoint directory")
  return from_hf_dict(json.loads(path.read_text()), **overrides)
