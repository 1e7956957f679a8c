"""HF checkpoint save/load: our export loads in transformers unchanged, index-sharded files, and clear load errors."""

import json
import shutil

import hf_models
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from p2o_jax.models.config import ModelConfigError, load_hf_config
from p2o_jax.models.hf_checkpoint import CheckpointError, load_hf_model, save_hf_model

VARIANTS = ["llama_gqa", "llama_mqa", "qwen2", "qwen3"]


def _load_transformers(checkpoint) -> transformers.PreTrainedModel:
  return transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager").eval()


def _flat_params(model) -> dict[tuple, np.ndarray]:
  return {path: np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_model_loads_in_transformers_with_identical_weights_and_logits(tiny_hf_model, tmp_path, variant):
  checkpoint, reference = tiny_hf_model(variant)
  ours = load_hf_model(checkpoint)
  reloaded = _load_transformers(save_hf_model(ours, tmp_path / "export"))
  expected, got = reference.state_dict(), reloaded.state_dict()
  assert set(got) == set(expected)
  for name, tensor in expected.items():
    assert torch.equal(got[name], tensor), name
  tokens, valid = hf_models.left_padded_batch([6, 13, 2], reference.config.vocab_size, seed=5)
  diff = np.abs(hf_models.hf_logits(reloaded, tokens, valid) - hf_models.hf_logits(reference, tokens, valid))
  assert diff[valid].max() <= 1e-5
  assert load_hf_config(tmp_path / "export") == ours.cfg


def test_index_sharded_export_loads_in_transformers_and_back_into_identical_params(tiny_hf_model, tmp_path):
  checkpoint, reference = tiny_hf_model("qwen2")
  ours = load_hf_model(checkpoint)
  out = save_hf_model(ours, tmp_path / "sharded", max_shard_bytes=16 * 1024)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shard_files = sorted(p.name for p in out.glob("*.safetensors"))
  assert not (out / "model.safetensors").exists() and len(shard_files) > 2
  assert sorted(set(index["weight_map"].values())) == shard_files
  assert set(index["weight_map"]) == set(reference.state_dict())

  reloaded = _load_transformers(out)
  for name, tensor in reference.state_dict().items():
    assert torch.equal(reloaded.state_dict()[name], tensor), name
  expected, got = _flat_params(ours), _flat_params(load_hf_model(out))
  assert set(got) == set(expected)
  for path, value in expected.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_bf16_export_loads_in_transformers_as_rounded_weights(tiny_hf_model, tmp_path):
  checkpoint, reference = tiny_hf_model("qwen3")
  out = save_hf_model(load_hf_model(checkpoint), tmp_path / "bf16", dtype="bfloat16")
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  reloaded = _load_transformers(out)
  assert reloaded.dtype == torch.bfloat16
  for name, tensor in reference.state_dict().items():
    assert torch.equal(reloaded.state_dict()[name], tensor.to(torch.bfloat16)), name
  ours_bf16 = load_hf_model(out, param_dtype="bfloat16")
  assert all(v.dtype == jax.numpy.bfloat16 for v in _flat_params(ours_bf16).values())


# --- bad input ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def broken_checkpoint(tiny_hf_model, tmp_path):
  """A private copy of the qwen2 checkpoint that a test may damage."""
  return shutil.copytree(tiny_hf_model("qwen2")[0], tmp_path / "ckpt")


def _rewrite_tensors(checkpoint, edit) -> None:
  path = checkpoint / "model.safetensors"
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_architecture_is_a_config_error_naming_it(broken_checkpoint):
  config_path = broken_checkpoint / "config.json"
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "model_type": "gpt2"}))
  with pytest.raises(ModelConfigError, match="gpt2"):
    load_hf_model(broken_checkpoint)


def test_missing_weights_file_is_a_checkpoint_error(broken_checkpoint):
  (broken_checkpoint / "model.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model.safetensors"):
    load_hf_model(broken_checkpoint)


def test_missing_tensor_is_a_checkpoint_error_naming_it(broken_checkpoint):
  name = "model.layers.1.mlp.up_proj.weight"
  _rewrite_tensors(broken_checkpoint, lambda tensors: tensors.pop(name))
  with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
    load_hf_model(broken_checkpoint)


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.mlp.gate_proj.weight", (64, 31)),  # a plain transpose
    ("model.layers.0.self_attn.q_proj.weight", (31, 32)),  # split into heads, size still a multiple of head_dim
    ("model.layers.1.self_attn.k_proj.bias", (15,)),  # split into heads, size not divisible: the reshape itself fails
    ("model.layers.0.self_attn.k_proj.weight", (32, 16)),  # transposed (16, 32): reshapes cleanly into our layout
])
def test_wrong_shaped_tensor_is_a_checkpoint_error_naming_it(broken_checkpoint, name, shape):
  def replace(tensors):
    tensors[name] = np.zeros(shape, np.float32)

  _rewrite_tensors(broken_checkpoint, replace)
  with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
    load_hf_model(broken_checkpoint)
