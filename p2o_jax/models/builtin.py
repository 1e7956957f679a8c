"""The built-in tiny policy: a plain Qwen2-architecture model over the character tokenizer, as a HF directory.

`build_base_policy` is the demo's "pre-training": random init, then our own SFT (p2o_jax/sft.py) on the synthetic
corpus (p2o_jax/data/corpus.py), so that, like a base LLM, the policy answers plainly (right on easy sums, at chance on
hard ones) and writes a scratchpad of running totals only when the instruction asks for that method. It travels the
path a real checkpoint travels: written with `save_hf_model`, read back with `load_hf_model`, loadable by transformers.
`cached_base_policy` builds it once per distinct `BasePolicySpec` and reuses it from then on.
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


def build_base_policy(out_dir: str | pathlib.Path, spec: BasePolicySpec, *, show_progress: bool = True) -> pathlib.Path:
  """Random init, SFT on `spec.num_examples` corpus examples (none when spec.sft.steps == 0), save as HF directory.

  `build_info.json` beside the weights records the spec and the SFT figures.
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
  info = {"spec": dataclasses.asdict(spec), "sft": stats, "seconds": time.perf_counter() - start}
  (path / BUILD_INFO).write_text(json.dumps(info, indent=2))
  return path


def cached_base_policy(cache_dir: str | pathlib.Path, spec: BasePolicySpec) -> pathlib.Path:
  """The base policy for `spec` under `cache_dir`, built on first use (the demo's: ~13.5 minutes on 2 idle cores),
  then reused."""
  path = pathlib.Path(cache_dir) / f"base-{spec.fingerprint()}"
  if not (path / "config.json").is_file():
    log.info("building the built-in base policy in %s (SFT, %d steps; cached for later runs)", path, spec.sft.steps)
    build_base_policy(path, spec)
  return path
