"""Our decoder's logits and RoPE frequencies against transformers' PyTorch implementation on tiny random checkpoints."""

import copy

import hf_models
import numpy as np
import pytest
import torch
from transformers import modeling_rope_utils

from p2o_jax.models.config import from_hf_dict
from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.rope import inverse_frequencies

PARITY_VARIANTS = ["llama_gqa", "llama_mqa", "qwen2", "qwen3"]
PROMPT_LENGTHS = [7, 16, 1, 11, 3]  # mixed, left-padded to 16; one row is a single token


def _max_valid_diff(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> float:
  return float(np.abs(a - b)[valid].max())


def _batch(model):
  return hf_models.left_padded_batch(PROMPT_LENGTHS, model.config.vocab_size, seed=3)


def test_variants_cover_the_advertised_features(tiny_hf_model):
  cfgs = {v: load_hf_model(tiny_hf_model(v)[0]).cfg for v in PARITY_VARIANTS}
  assert cfgs["llama_gqa"].num_kv_heads == 2 and cfgs["llama_gqa"].tie_word_embeddings
  assert cfgs["llama_gqa"].out_bias and cfgs["llama_gqa"].qkv_bias and cfgs["llama_gqa"].mlp_bias
  assert cfgs["llama_gqa"].rope.rope_type == "llama3" and cfgs["llama_gqa"].rope.factor == 8.0
  assert cfgs["llama_mqa"].num_kv_heads == 1 and not cfgs["llama_mqa"].tie_word_embeddings
  assert cfgs["llama_mqa"].rope.rope_type == "linear" and cfgs["llama_mqa"].rope.factor == 2.0
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].out_bias and cfgs["qwen2"].rope.theta == 1000.0
  assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 16 != cfgs["qwen3"].hidden_size // cfgs["qwen3"].num_heads


@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_f32_logits_match_transformers_on_left_padded_batch(tiny_hf_model, variant):
  checkpoint, reference = tiny_hf_model(variant)
  tokens, valid = _batch(reference)
  expected = hf_models.hf_logits(reference, tokens, valid)
  got = np.asarray(hf_models.our_logits(load_hf_model(checkpoint), tokens, valid))
  assert got.dtype == np.float32 and got.shape == expected.shape
  assert _max_valid_diff(got, expected, valid) <= 1e-4


@pytest.mark.parametrize("variant", ["llama_gqa", "qwen3"])  # every bias, and q/k norm: the casts that could slip
def test_bf16_compute_is_close_to_f32(tiny_hf_model, variant):
  """bf16 activations must cost about what they cost transformers, neither nothing (= bf16 silently unused) nor more."""
  checkpoint, reference = tiny_hf_model(variant)
  tokens, valid = _batch(reference)
  f32 = hf_models.hf_logits(reference, tokens, valid)
  hf_bf16_error = _max_valid_diff(hf_models.hf_logits(copy.deepcopy(reference).to(torch.bfloat16), tokens, valid),
                                  f32, valid)
  ours = np.asarray(hf_models.our_logits(load_hf_model(checkpoint, compute_dtype="bfloat16"), tokens, valid))
  our_error = _max_valid_diff(ours, f32, valid)
  # bf16 keeps 8 mantissa bits (~4e-3 relative per rounding); transformers itself lands at 1-3% of the logit range
  # here, so 3x its error is loose for a correct cast chain yet far below what a mis-cast (garbage) produces.
  assert 1e-3 < our_error <= 3 * hf_bf16_error
  assert our_error <= 0.1 * np.abs(f32[valid]).max()


def _transformers_inv_freq(reference) -> np.ndarray:
  hf_cfg = reference.config
  rope_type = hf_cfg.rope_parameters["rope_type"]
  if rope_type == "default":
    return reference.model.rotary_emb.inv_freq.numpy()  # the buffer transformers' forward rotates with
  inv_freq, attention_factor = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
  assert attention_factor == 1.0  # we apply no cos/sin scaling, so transformers must not either
  return inv_freq.numpy()


@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_inverse_frequencies_match_transformers_rope_init(tiny_hf_model, variant):
  _, reference = tiny_hf_model(variant)
  cfg = from_hf_dict(reference.config.to_dict())
  np.testing.assert_allclose(inverse_frequencies(cfg.rope, cfg.head_dim), _transformers_inv_freq(reference),
                             rtol=1e-6, atol=0)


def test_llama3_variant_exercises_all_three_frequency_bands():
  """Kept (ratio 1), slowed (1/factor) and interpolated (in between) frequencies all occur, so parity means something."""
  cfg = from_hf_dict(hf_models.hf_config("llama_gqa").to_dict())
  unscaled = 1.0 / cfg.rope.theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
  ratio = inverse_frequencies(cfg.rope, cfg.head_dim) / unscaled
  assert np.isclose(ratio, 1.0).any() and np.isclose(ratio, 1 / 8).any()
  assert ((ratio > 1 / 8 + 1e-3) & (ratio < 1 - 1e-3)).any()
