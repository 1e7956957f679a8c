"""The built-in tiny policy: a plain Qwen2-architecture model over the character tokenizer, as a HF directory.

`build_base_policy` is the demo's "pre-training": random init, then our own SFT (p2o_jax/sft.py) on the synthetic
corpus (p2o_jax/data/corpus.py), so that, like a base LLM, the policy answers plainly (right on easy sums, at chance on
hard ones) and writes a scratchpad of running totals only when the instruction asks for that method. It travels the
path a real checkpoint travels: written with `save_hf_model`, read back with `load_hf_model`, loadable by transformers.

The demo's base ships with the package (`SHIPPED_BASE_DIR`, a few MB): built once, it is the same base on every
machine, so the demo's outcome does not depend on the CPU that would otherwise build it (float rounding in 1,500 SFT
steps gave visibly different bases). `find_base_policy` returns it when the spec's fingerprint matches, or a cached
build of another spec; building one (`build_cached_base_policy`) is a separate, announced step with a progress bar.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import time

from flax import nnx

from p2o_jax.data.arithmetic import WorldConfig
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.corpus import CorpusConfig, corpus_examples
from p2o_jax.models.config import ModelConfig
from p2o_jax.models.decoder import Decoder
from p2o_jax.models.hf_checkpoint import save_hf_model
from p2o_jax.sft import SFTConfig, train_sft

log = logging.getLogger(__name__)
BUILD_INFO = "build_info.json"
WEIGHTS_FILE = "model.safetensors"
SHIPPED_BASE_DIR = pathlib.Path(__file__).resolve().parent / "builtin_base"
# Measured: the demo's base (1,500 steps of 16 x 256 tokens, 998k parameters) took 800-900 s on 2 idle cores.
SFT_SECONDS_PER_STEP = 0.6


def builtin_model_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                         num_kv_heads: int = 2, intermediate_size: int = 512) -> ModelConfig:
  return ModelConfig(model_type="qwen2", vocab_size=vocab_size, hidden_size=hidden_size,
                     intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, head_dim=hidden_size // num_heads, qkv_bias=True,
                     tie_word_embeddings=True, max_position_embeddings=512)


def _save(model: Decoder, tokenizer, out_dir: str | pathlib.Path) -> pathlib.Path:
  base = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
  return save_hf_model(model, out_dir, tokenizer=tokenizer, base_hf_config=base)


def build_builtin_checkpoint(out_dir: str | pathlib.Path, *, seed: int = 0, **size) -> pathlib.Path:
  """Write a RANDOMLY initialized built-in policy and its tokenizer to `out_dir` (tests use it as a tiny policy)."""
  tokenizer = build_char_tokenizer()
  return _save(Decoder(builtin_model_config(len(tokenizer), **size), nnx.Rngs(seed)), tokenizer, out_dir)


@dataclasses.dataclass(frozen=True)
class BasePolicySpec:
  """Everything that determines the base policy; its fingerprint names the cache entry."""

  world: WorldConfig = WorldConfig()
  corpus: CorpusConfig = CorpusConfig()
  sft: SFTConfig = SFTConfig()
  num_examples: int = 50_000
  num_layers: int = 4
  hidden_size: int = 128

  def fingerprint(self) -> str:
    return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def file_sha256(path: str | pathlib.Path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def build_base_policy(out_dir: str | pathlib.Path, spec: BasePolicySpec, *, show_progress: bool = True) -> pathlib.Path:
  """Random init, SFT on `spec.num_examples` corpus examples (none when spec.sft.steps == 0), save as HF directory.

  `build_info.json` beside the weights records the spec, its fingerprint, the weights' sha256 and the SFT figures.
  """
  start = time.perf_counter()
  tokenizer = build_char_tokenizer()
  cfg = builtin_model_config(len(tokenizer), num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                             intermediate_size=4 * spec.hidden_size)
  model = Decoder(cfg, nnx.Rngs(spec.sft.seed))
  stats = {}
  if spec.sft.steps:
    examples = corpus_examples(spec.world, spec.corpus, spec.num_examples, seed=spec.sft.seed)
    stats = train_sft(model, tokenizer, examples, spec.sft, show_progress=show_progress)
  path = _save(model, tokenizer, out_dir)
  info = {"fingerprint": spec.fingerprint(), "spec": dataclasses.asdict(spec),
          "weights_sha256": file_sha256(path / WEIGHTS_FILE), "sft": stats,
          "seconds": time.perf_counter() - start}
  (path / BUILD_INFO).write_text(json.dumps(info, indent=2))
  return path


def build_info(path: str | pathlib.Path) -> dict:
  """A base directory's build_info.json ({} when it has none)."""
  info_path = pathlib.Path(path) / BUILD_INFO
  return json.loads(info_path.read_text()) if info_path.is_file() else {}


def shipped_base_matches(spec: BasePolicySpec) -> bool:
  return build_info(SHIPPED_BASE_DIR).get("fingerprint") == spec.fingerprint()


def estimated_build_minutes(spec: BasePolicySpec) -> float:
  """Rough wall time of `build_base_policy` on 2 CPU cores (scales with tokens per step and model width)."""
  tokens = spec.sft.rows * spec.sft.row_len / (16 * 256)
  size = spec.num_layers * spec.hidden_size ** 2 / (4 * 128 ** 2)
  return spec.sft.steps * SFT_SECONDS_PER_STEP * tokens * max(size, 0.1) / 60


def cached_base_path(cache_dir: str | pathlib.Path, spec: BasePolicySpec) -> pathlib.Path:
  return pathlib.Path(cache_dir) / f"base-{spec.fingerprint()}"


def find_base_policy(cache_dir: str | pathlib.Path, spec: BasePolicySpec) -> pathlib.Path | None:
  """The base policy for `spec` if it exists: the shipped one when its fingerprint matches, else a cached build;
  None when it must be built first (`build_cached_base_policy`)."""
  if shipped_base_matches(spec):
    log.info("built-in base policy: the one shipped with the package (%s, fingerprint %s)", SHIPPED_BASE_DIR,
             spec.fingerprint())
    return SHIPPED_BASE_DIR
  path = cached_base_path(cache_dir, spec)
  return path if (path / "config.json").is_file() else None


def build_cached_base_policy(cache_dir: str | pathlib.Path, spec: BasePolicySpec, why: str) -> pathlib.Path:
  """Build the base policy for `spec` into `cache_dir` (replacing any earlier build), announced with its cost."""
  path = cached_base_path(cache_dir, spec)
  log.warning("building the built-in base policy (%s): SFT, %d steps, about %.0f minutes on 2 CPU cores; it is "
              "cached in %s for later runs", why, spec.sft.steps, estimated_build_minutes(spec), path)
  return build_base_policy(path, spec)
