"""Entry point: python -m p2o_jax.main --config configs/demo_cpu.py [--config.a.b=value ...] [--workdir DIR]

Today this loads (or builds) the policy, places it on the configured mesh, and measures its plain-prompt accuracy on the
built-in task's held-out easy and hard splits with the jitted sampler. The GRPO / P^2O trainer plugs in here.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from p2o_jax import sharding
from p2o_jax.config import ConfigError, validate
from p2o_jax.data.arithmetic import WorldConfig, held_out_splits, question_text
from p2o_jax.models.builtin import build_builtin_checkpoint
from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions, load_tokenizer, stop_token_ids
from p2o_jax.sampling import Sampler, SamplingConfig

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir).")
log = logging.getLogger("p2o_jax")


def resolve_checkpoint(model_cfg) -> pathlib.Path:
  """The policy's HF directory; the built-in one is built once and cached."""
  if model_cfg.checkpoint != "builtin":
    path = pathlib.Path(model_cfg.checkpoint)
    if not (path / "config.json").is_file():
      raise ConfigError(f"config.model.checkpoint: {path} is not a Hugging Face checkpoint directory")
    return path
  path = pathlib.Path(model_cfg.builtin_cache_dir)
  if not (path / "config.json").is_file():
    log.info("building the built-in policy in %s", path)
    build_builtin_checkpoint(path)
  return path


def last_integer(text: str) -> int | None:
  digits = "".join(ch if ch.isdigit() else " " for ch in text).split()
  return int(digits[-1]) if digits else None


def evaluate_builtin(sampler: Sampler, tokenizer, problems, rollout) -> float:
  """Greedy plain-prompt accuracy on built-in problems (the last integer of the completion must be the sum)."""
  prompts = chat_prompt_ids(tokenizer, [question_text(p) for p in problems])
  out = sampler.generate(prompts, SamplingConfig(max_new_tokens=rollout.max_new_tokens, temperature=0.0))
  texts = decode_completions(tokenizer, out.tokens, out.lengths)
  return float(np.mean([last_integer(t) == p.answer for t, p in zip(texts, problems)]))


def run(c) -> dict:
  validate(c)
  workdir = pathlib.Path(c.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
  checkpoint = resolve_checkpoint(c.model)
  model = load_hf_model(checkpoint, mesh=mesh, param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype,
                        remat=c.model.remat)
  tokenizer = load_tokenizer(checkpoint)
  log.info("policy %s: %s, %.2fM params, mesh %s", checkpoint, model.cfg.model_type, model.cfg.num_params / 1e6,
           dict(mesh.shape))
  sampler = Sampler(model, eos_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                    max_prompt_len=c.rollout.max_prompt_len, mesh=mesh)
  easy, hard = held_out_splits(WorldConfig(), c.eval.num_easy, c.eval.num_hard, seed=c.seed)
  start = time.perf_counter()
  report = {"checkpoint": str(checkpoint), "easy_accuracy": evaluate_builtin(sampler, tokenizer, easy, c.rollout),
            "hard_accuracy": evaluate_builtin(sampler, tokenizer, hard, c.rollout)}
  report["eval_seconds"] = round(time.perf_counter() - start, 2)
  (workdir / "report.json").write_text(json.dumps(report, indent=2))
  print(f"plain-prompt accuracy: easy {report['easy_accuracy']:.1%}, hard {report['hard_accuracy']:.1%} "
        f"({report['eval_seconds']}s); report in {workdir / 'report.json'}")
  return report


def main(argv) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    c = _CONFIG.value
    c = None if c is None else c.copy_and_resolve_references()
  except OSError as e:  # ml_collections defers a config file's load error to the first access
    sys.exit(f"error: cannot load --config: {_one_line(e)}")
  if c is None:
    sys.exit("error: --config is required, e.g. --config configs/demo_cpu.py")
  if _WORKDIR.value:
    c.workdir = _WORKDIR.value
  try:
    run(c)
  except ConfigError as e:
    sys.exit(f"error: {e}")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with config typos (unknown key, wrong type) reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: bad command-line flag or config override: {_one_line(e)}")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).replace("\\n", " ").split()).strip("'\"")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
