"""The built-in tiny policy: a plain Qwen2-architecture model over the character tokenizer, as a HF directory.

It travels the same path as a real checkpoint: written with `save_hf_model`, read back with `load_hf_model`, and
loadable by transformers. Until the SFT stage exists it is randomly initialized.
"""

from __future__ import annotations

import pathlib

from flax import nnx

from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.models.config import ModelConfig
from p2o_jax.models.decoder import Decoder
from p2o_jax.models.hf_checkpoint import save_hf_model


def builtin_model_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                         num_kv_heads: int = 2, intermediate_size: int = 512) -> ModelConfig:
  return ModelConfig(model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size,
                     intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, qkv_bias=True,
                     tie_word_embeddings=True, max_position_embeddings=512)


def build_builtin_checkpoint(out_dir: str | pathlib.Path, *, seed: int = 0, **size) -> pathlib.Path:
  """Write a randomly initialized built-in policy and its tokenizer to `out_dir` (a HF checkpoint directory)."""
  tokenizer = build_char_tokenizer()
  cfg = builtin_model_config(len(tokenizer), **size)
  model = Decoder(cfg, nnx.Rngs(seed))
  base = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
  return save_hf_model(model, out_dir, tokenizer=tokenizer, base_hf_config=base)
