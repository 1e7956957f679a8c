"""Hugging Face checkpoint directories <-> our sharded NNX decoder.

Loading builds the model abstractly (nnx.eval_shape), then reads one safetensors tensor at a time and places it with
`jax.make_array_from_callback`, so each device receives only its shard and the host never holds a second full copy of
the model. Saving writes (index-sharded) safetensors, config.json and the tokenizer files so that
`transformers.AutoModelForCausalLM.from_pretrained` loads the directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from p2o_jax import distributed, sharding
from p2o_jax.models.config import ModelConfig, from_hf_dict, load_hf_config
from p2o_jax.models.decoder import Decoder

log = logging.getLogger(__name__)
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
  """A checkpoint directory is missing files or tensors, or a tensor has the wrong shape."""


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """How one of our parameters is stored in a HF checkpoint: its name and the layout changes in both directions."""

  hf_name: str
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same() -> tuple[Callable, Callable]:
  return (lambda w: w), (lambda p: p)


def _transposed() -> tuple[Callable, Callable]:
  return (lambda w: w.T), (lambda p: p.T)


def _heads_in(n: int, d: int) -> tuple[Callable, Callable]:
  # HF (n*d, embed) <-> ours (embed, n, d). Reshape first, then transpose: both are views on a memory map.
  return (lambda w: w.reshape(n, d, -1).transpose(2, 0, 1)), (lambda p: p.transpose(1, 2, 0).reshape(n * d, -1))


def _heads_out(n: int, d: int) -> tuple[Callable, Callable]:
  # HF (embed, n*d) <-> ours (n, d, embed).
  return (lambda w: w.reshape(-1, n, d).transpose(1, 2, 0)), (lambda p: p.transpose(2, 0, 1).reshape(-1, n * d))


def _heads_bias(n: int, d: int) -> tuple[Callable, Callable]:
  return (lambda w: w.reshape(n, d)), (lambda p: p.reshape(n * d))


def tensor_maps(cfg: ModelConfig) -> dict[tuple, TensorMap]:
  """Our flat parameter path -> how it is stored in a HF checkpoint."""
  h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  maps: dict[tuple, tuple[str, tuple[Callable, Callable]]] = {
      ("embed",): ("model.embed_tokens.weight", _same()),
      ("final_norm", "scale"): ("model.norm.weight", _same()),
  }
  if not cfg.tie_word_embeddings:
    maps[("lm_head",)] = ("lm_head.weight", _transposed())
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}", ("layers", i)
    layer = {
        ("input_norm", "scale"): ("input_layernorm.weight", _same()),
        ("post_attention_norm", "scale"): ("post_attention_layernorm.weight", _same()),
        ("attn", "q_proj"): ("self_attn.q_proj.weight", _heads_in(h, d)),
        ("attn", "k_proj"): ("self_attn.k_proj.weight", _heads_in(kv, d)),
        ("attn", "v_proj"): ("self_attn.v_proj.weight", _heads_in(kv, d)),
        ("attn", "o_proj"): ("self_attn.o_proj.weight", _heads_out(h, d)),
        ("mlp", "gate_proj"): ("mlp.gate_proj.weight", _transposed()),
        ("mlp", "up_proj"): ("mlp.up_proj.weight", _transposed()),
        ("mlp", "down_proj"): ("mlp.down_proj.weight", _transposed()),
    }
    if cfg.qkv_bias:
      layer[("attn", "q_bias")] = ("self_attn.q_proj.bias", _heads_bias(h, d))
      layer[("attn", "k_bias")] = ("self_attn.k_proj.bias", _heads_bias(kv, d))
      layer[("attn", "v_bias")] = ("self_attn.v_proj.bias", _heads_bias(kv, d))
    if cfg.out_bias:
      layer[("attn", "o_bias")] = ("self_attn.o_proj.bias", _same())
    if cfg.qk_norm:
      layer[("attn", "q_norm", "scale")] = ("self_attn.q_norm.weight", _same())
      layer[("attn", "k_norm", "scale")] = ("self_attn.k_norm.weight", _same())
    if cfg.mlp_bias:
      for name in ("gate", "up", "down"):
        layer[("mlp", f"{name}_bias")] = (f"mlp.{name}_proj.bias", _same())
    maps.update({ours + path: (f"{hf}.{name}", fns) for path, (name, fns) in layer.items()})
  return {path: TensorMap(name, *fns) for path, (name, fns) in maps.items()}


def _weight_files(checkpoint_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  """HF tensor name -> the safetensors file holding it (single file or index-sharded)."""
  index = checkpoint_dir / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = {name: checkpoint_dir / f for name, f in weight_map.items()}
    for f in set(files.values()):
      if not f.is_file():
        raise CheckpointError(f"{f} is listed in {index.name} but missing")
    return files
  single = checkpoint_dir / "model.safetensors"
  if not single.is_file():
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {checkpoint_dir} "
                          "(only safetensors checkpoints are supported)")
  with safe_open(single, framework="np") as f:
    return {name: single for name in f.keys()}


def load_hf_model(checkpoint_dir: str | os.PathLike, mesh: jax.sharding.Mesh | None = None,
                  **config_overrides) -> Decoder:
  """Load a HF Llama/Qwen2/Qwen3 checkpoint directory into a Decoder whose params are sharded over `mesh`.

  `config_overrides` set param_dtype / compute_dtype / remat. Without a mesh, params go to the default device.
  """
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  cfg = load_hf_config(checkpoint_dir, **config_overrides)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  mesh = mesh or sharding.make_mesh({}, jax.devices()[:1])
  shardings = sharding.state_shardings(abstract_state, mesh)
  files = _weight_files(checkpoint_dir)
  maps = tensor_maps(cfg)
  handles: dict[pathlib.Path, Any] = {}
  for path, variable in nnx.to_flat_state(abstract_state):
    tmap = maps[path]
    if tmap.hf_name not in files:
      raise CheckpointError(f"tensor {tmap.hf_name} is missing from {checkpoint_dir}")
    file = files[tmap.hf_name]
    if file not in handles:
      handles[file] = safe_open(file, framework="np")
    variable.set_value(_place_tensor(handles[file].get_tensor(tmap.hf_name), tmap, variable,
                                     _flat_lookup(shardings, path)))
  unused = set(files) - {m.hf_name for m in maps.values()}
  unused = {n for n in unused if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight"}
  if unused:
    log.warning("ignored %d tensors not used by the %s decoder, e.g. %s", len(unused), cfg.model_type,
                sorted(unused)[:3])
  return nnx.merge(graphdef, abstract_state)


def _flat_lookup(tree: nnx.State, path: tuple):
  node = tree
  for key in path:
    node = node[key]
  return node


def _place_tensor(tensor: np.ndarray, tmap: TensorMap, variable, target: jax.sharding.NamedSharding) -> jax.Array:
  # Check the stored (HF-layout) shape before any reshape: a transposed tensor could otherwise reshape "validly".
  expected = tuple(tmap.to_hf(np.empty(variable.shape, np.uint8)).shape)
  if tuple(tensor.shape) != expected:
    raise CheckpointError(f"tensor {tmap.hf_name} has shape {tensor.shape}; the config implies {expected}")
  ours = tmap.to_ours(tensor)
  dtype = variable.dtype
  return jax.make_array_from_callback(variable.shape, target,
                                      lambda index: np.ascontiguousarray(ours[index]).astype(dtype))


def to_hf_dict(cfg: ModelConfig, base: dict[str, Any] | None = None) -> dict[str, Any]:
  """A transformers config dict for `cfg`; keys of `base` (e.g. the loaded checkpoint's config) are kept."""
  hf = dict(base or {})
  hf.pop("rope_scaling", None)
  rope = {"rope_type": cfg.rope.rope_type, "rope_theta": cfg.rope.theta}
  if cfg.rope.rope_type == "linear":
    rope["factor"] = cfg.rope.factor
  if cfg.rope.rope_type == "llama3":
    rope.update(factor=cfg.rope.factor, low_freq_factor=cfg.rope.low_freq_factor,
                high_freq_factor=cfg.rope.high_freq_factor,
                original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
  hf.update(
      architectures=[_ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type, vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
      rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings, hidden_act="silu",
      max_position_embeddings=cfg.max_position_embeddings, rope_theta=cfg.rope.theta, rope_parameters=rope,
      attention_bias=cfg.out_bias or (cfg.qkv_bias and cfg.model_type != "qwen2"), mlp_bias=cfg.mlp_bias,
      torch_dtype=cfg.param_dtype)
  if cfg.rope.rope_type != "default":
    hf["rope_scaling"] = dict(rope)
  return hf


def save_hf_model(model: Decoder, out_dir: str | os.PathLike, *, tokenizer=None,
                  base_hf_config: dict[str, Any] | None = None, dtype: str | None = None,
                  max_shard_bytes: int = 2 * 1024**3) -> pathlib.Path:
  """Write `model` as a HF checkpoint directory (atomically: a temp dir renamed into place). Process 0 writes.

  Every process must call this (gathering a sharded array is a collective).
  """
  cfg: ModelConfig = model.cfg
  np_dtype = _NP_DTYPES[dtype or cfg.param_dtype]
  maps = tensor_maps(cfg)
  tensors = {maps[path].hf_name: np.ascontiguousarray(maps[path].to_hf(distributed.to_host(var[...]))
                                                       .astype(np_dtype))
             for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  out_dir = pathlib.Path(out_dir)
  if jax.process_index() != 0:
    return out_dir
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
  _write_safetensors(tensors, tmp, max_shard_bytes)
  hf = to_hf_dict(dataclasses.replace(cfg, param_dtype=dtype or cfg.param_dtype), base_hf_config)
  (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True))
  if tokenizer is not None:
    tokenizer.save_pretrained(tmp)
  if out_dir.exists():
    shutil.rmtree(out_dir)
  tmp.rename(out_dir)
  return out_dir


def _write_safetensors(tensors: dict[str, np.ndarray], out_dir: pathlib.Path, max_shard_bytes: int) -> None:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  if len(shards) == 1:
    save_file(shards[0], out_dir / "model.safetensors", metadata={"format": "pt"})
    return
  weight_map = {}
  for i, shard in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, out_dir / fname, metadata={"format": "pt"})
    weight_map.update({name: fname for name in shard})
  total = sum(t.nbytes for t in tensors.values())
  (out_dir / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def read_hf_config_dict(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
  return json.loads((pathlib.Path(checkpoint_dir) / "config.json").read_text())

