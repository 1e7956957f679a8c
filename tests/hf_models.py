"""Tiny random Hugging Face (PyTorch) models of every supported family, saved as checkpoint directories.

They are the reference for parity tests: built from transformers' own config classes, random-initialized, then every
parameter (norm scales and biases included) is perturbed, so a zero bias or a unit norm scale cannot hide a mapping bug.
`hf_logits` and `our_logits` are the two sides of a comparison on the same padded batch.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import numpy as np
import torch
import transformers
from flax import nnx
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from p2o_jax.models import decoder

_COMMON = dict(num_hidden_layers=2, intermediate_size=64, max_position_embeddings=512, rms_norm_eps=1e-6,
               attn_implementation="eager")

# Together the variants cover: GQA and MQA, tied and untied embeddings, Qwen2's qkv bias, Llama's attention_bias and
# mlp_bias, Qwen3's q/k norm with an explicit head_dim != hidden/heads, a non-default theta, llama3 and linear scaling.
VARIANTS: dict[str, tuple[type, dict]] = {
    # head_dim 16, theta 5e5: wavelengths 6 and 32 (kept), 167 (interpolated band 64..256), >= 862 (slowed by 8).
    "llama_gqa": (LlamaConfig, dict(
        vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=256))),
    "llama_mqa": (LlamaConfig, dict(
        vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen2": (Qwen2Config, dict(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=1000.0))),
    "qwen3": (Qwen3Config, dict(
        vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    # A vocabulary small enough to check the sampled distribution against softmax(logits) bin by bin.
    "qwen2_vocab16": (Qwen2Config, dict(
        vocab_size=16, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)),
}


def hf_config(variant: str) -> transformers.PretrainedConfig:
  config_class, kwargs = VARIANTS[variant]
  return config_class(**_COMMON, **kwargs)


def perturb_parameters(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
  """Add N(0, scale^2) noise to every parameter in place (tied weights are one parameter, perturbed once)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def build_hf_model(variant: str, seed: int = 0) -> transformers.PreTrainedModel:
  """A random-initialized, perturbed float32 model in eval mode."""
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(hf_config(variant), dtype=torch.float32)
  perturb_parameters(model, seed + 1)
  return model.eval()


def save_tiny_model(variant: str, out_dir: str | pathlib.Path, seed: int = 0
                    ) -> tuple[pathlib.Path, transformers.PreTrainedModel]:
  """Build `variant`, write it with `save_pretrained`; return the directory and the in-memory reference model."""
  model = build_hf_model(variant, seed)
  out_dir = pathlib.Path(out_dir)
  model.save_pretrained(out_dir)
  return out_dir, model


def random_prompts(lengths: list[int], vocab_size: int, pad_id: int = 0, seed: int = 0) -> list[list[int]]:
  """Random prompts of the given lengths whose ids avoid pad_id."""
  rng = np.random.default_rng(seed)
  prompts = [rng.integers(0, vocab_size - 1, size=length) for length in lengths]
  return [[int(i) + (i >= pad_id) for i in ids] for ids in prompts]


def pad_left(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pad to the longest prompt: tokens (b, width) int32 and valid (b, width) bool."""
  width = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  valid = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    valid[row, width - len(prompt):] = True
  return tokens, valid


def left_padded_batch(lengths: list[int], vocab_size: int, pad_id: int = 0, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
  return pad_left(random_prompts(lengths, vocab_size, pad_id, seed), pad_id)


def hf_positions(valid: np.ndarray) -> np.ndarray:
  """Position ids that skip left padding: cumsum(mask) - 1, clipped at 0."""
  return np.maximum(np.cumsum(valid, axis=1) - 1, 0)


def hf_logits(model: transformers.PreTrainedModel, tokens: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """transformers' forward on a padded batch: float32 logits (b, t, vocab)."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(tokens.astype(np.int64)),
                attention_mask=torch.from_numpy(valid.astype(np.int64)),
                position_ids=torch.from_numpy(hf_positions(valid).astype(np.int64)))
  return out.logits.float().numpy()


def our_logits(model: decoder.Decoder, tokens, valid) -> jax.Array:
  """Our teacher-forced forward (jitted: op-by-op dispatch is several times slower than compiling it once)."""
  graphdef, state = nnx.split(model)
  return _jitted_forward(graphdef, state, tokens, valid)


@functools.partial(jax.jit, static_argnames="graphdef")
def _jitted_forward(graphdef, state, tokens, valid):
  return decoder.forward(nnx.merge(graphdef, state), tokens, valid)
