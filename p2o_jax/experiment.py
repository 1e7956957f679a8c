"""Assemble a run from its config: mesh, policy, tokenizer, training and evaluation data, verifier, trainer."""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from p2o_jax import report, sharding
from p2o_jax.config import ConfigError, builtin_world, validate
from p2o_jax.data import arithmetic
from p2o_jax.data.records import Query, builtin_queries, read_queries
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.evaluation import EvalProtocol, evaluate_set
from p2o_jax.models.builtin import BasePolicySpec, SHIPPED_BASE_DIR, base_policy_dir, shipped_base_matches
from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.tokenizer import load_tokenizer, stop_token_ids
from p2o_jax.p2o.hooks import P2OHooks
from p2o_jax.p2o.templates import apply_template
from p2o_jax.preflight import check_chat_template, check_verifier, check_writable_dir
from p2o_jax.rewards.pool import VerifierPool
from p2o_jax.rl.trainer import Trainer, TrainerHooks
from p2o_jax.sampling import Sampler
from p2o_jax.sft import SFTConfig

log = logging.getLogger(__name__)


def base_policy_spec(c: ml_collections.ConfigDict) -> BasePolicySpec:
  b = c.builtin
  sft = SFTConfig(steps=b.sft_steps, lr=b.sft_lr, rows=b.sft_rows, row_len=b.sft_row_len, seed=b.sft_seed)
  return BasePolicySpec(world=builtin_world(c), sft=sft, num_examples=b.sft_examples, num_layers=b.num_layers,
                        hidden_size=b.hidden_size)


def user_checkpoint(c: ml_collections.ConfigDict) -> pathlib.Path:
  """config.model.checkpoint as a HF directory (not "builtin"); ConfigError when it is not one."""
  path = pathlib.Path(c.model.checkpoint)
  if not (path / "config.json").is_file():
    raise ConfigError(f"config.model.checkpoint: {path} is not a Hugging Face checkpoint directory")
  return path


def policy_checkpoint(c: ml_collections.ConfigDict, *, rebuild_base: bool = False) -> pathlib.Path:
  """The policy's HF directory. For "builtin": the base shipped with the package when the config's `builtin` section
  is the demo's, else a cached build of it; a missing one is BUILT here (announced: it takes minutes)."""
  if c.model.checkpoint != "builtin":
    return user_checkpoint(c)
  return base_policy_dir(c.model.builtin_cache_dir, base_policy_spec(c), rebuild=rebuild_base)


def preflight_tokenizer(c: ml_collections.ConfigDict, rebuild_base: bool = False):
  """The run's tokenizer, available before any base build: the built-in policy's is the character tokenizer."""
  if c.model.checkpoint != "builtin":
    return load_tokenizer(user_checkpoint(c))
  if not rebuild_base and shipped_base_matches(base_policy_spec(c)):
    return load_tokenizer(SHIPPED_BASE_DIR)
  return build_char_tokenizer()


def preflight(c: ml_collections.ConfigDict, train: Sequence[Query], score, *, rebuild_base: bool = False) -> None:
  """Everything that could fail after minutes of work, checked in seconds (p2o_jax/preflight.py)."""
  check_writable_dir(c.workdir, "config.workdir")
  check_writable_dir(c.train.checkpoint_dir or pathlib.Path(c.workdir) / "checkpoints", "the checkpoint directory")
  sample = list(train[:4])
  check_chat_template(preflight_tokenizer(c, rebuild_base), [c.data.prompt_format.format(question=q.question)
                                                             for q in sample])
  check_verifier(score, sample)


def _read(path: str, c: ml_collections.ConfigDict) -> list[Query]:
  result = read_queries(path, question_field=c.data.question_field, answer_field=c.data.answer_field,
                        id_field=c.data.id_field or None)
  if result.skipped:
    log.warning("%s: skipped %d broken rows", path, result.skipped)
  return result.queries


def parse_eval_sets(spec: str) -> dict[str, str]:
  """"name=path,name2=path2" -> {name: path}."""
  sets = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ConfigError(f"config.eval.sets: {item!r} is not name=path")
    sets[name] = path
  return sets


def load_data(c: ml_collections.ConfigDict) -> tuple[list[Query], dict[str, list[Query]]]:
  """(training queries, evaluation sets by name)."""
  eval_sets = {name: _read(path, c) for name, path in parse_eval_sets(c.eval.sets).items()}
  if c.data.source == "file":
    return _read(c.data.train_path, c), eval_sets
  world = builtin_world(c)
  n_hard = int(round(c.data.builtin_train_size * c.data.builtin_hard_fraction))
  train = (builtin_queries(world, "easy", c.data.builtin_train_size - n_hard, c.seed)
           + builtin_queries(world, "hard", n_hard, c.seed + 1))
  easy, hard = arithmetic.held_out_splits(world, c.eval.builtin_easy, c.eval.builtin_hard, seed=c.seed)
  for name, problems in (("builtin_easy", easy), ("builtin_hard", hard)):
    if problems:
      eval_sets[name] = [Query(r["id"], r["question"], r["answer"]) for r in arithmetic.to_records(problems)]
  return train, eval_sets


def evaluate_with_templates(checkpoint: pathlib.Path, c: ml_collections.ConfigDict, mesh, eval_sets,
                            templates: Sequence[str], score) -> list[dict[str, float]]:
  """Per template: {eval set: accuracy} of the policy at `checkpoint` with the template in front of every question
  (the model is loaded once for all of them)."""
  model = load_hf_model(checkpoint, mesh=mesh, param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype)
  tokenizer = load_tokenizer(checkpoint)
  sampler = Sampler(model, eos_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                    max_prompt_len=c.rollout.max_prompt_len, mesh=mesh)
  protocol = EvalProtocol.from_config(c)
  results = []
  for template in templates:
    prompt_format = apply_template(template.replace("{", "{{").replace("}", "}}"), c.data.prompt_format)
    results.append({name: evaluate_set(sampler, tokenizer, queries, prompt_format, protocol, score,
                                       seed=c.seed)["accuracy"] for name, queries in eval_sets.items()})
  return results


def evaluate_search_bests(checkpoint: pathlib.Path, c: ml_collections.ConfigDict, mesh, eval_sets,
                          score) -> list[dict[str, Any]]:
  """The starting policy with each GEPA search's best template (each distinct template evaluated once)."""
  bests = report.search_bests(c.workdir)
  distinct = list(dict.fromkeys(best["template"] for best in bests))
  accuracy = dict(zip(distinct, evaluate_with_templates(checkpoint, c, mesh, eval_sets, distinct, score)))
  return [{**best, "accuracy": accuracy[best["template"]]} for best in bests]


def run_training(c: ml_collections.ConfigDict, hooks: TrainerHooks | None = None, *,
                 rebuild_base: bool = False) -> dict[str, Any]:
  validate(c, jax.device_count())
  mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
  train, eval_sets = load_data(c)
  with VerifierPool(num_workers=c.reward.num_workers, timeout_s=c.reward.timeout_s,
                    fallback=c.reward.fallback) as verifier:
    preflight(c, train, verifier.score, rebuild_base=rebuild_base)
    checkpoint = policy_checkpoint(c, rebuild_base=rebuild_base)
    model = load_hf_model(checkpoint, mesh=mesh, param_dtype=c.model.param_dtype,
                          compute_dtype=c.model.compute_dtype, remat=c.model.remat)
    tokenizer = load_tokenizer(checkpoint)
    log.info("policy %s (%s, %.2fM params) on mesh %s; %d training queries; eval sets %s", checkpoint,
             model.cfg.model_type, model.cfg.num_params / 1e6, dict(mesh.shape), len(train),
             {k: len(v) for k, v in eval_sets.items()})
    if c.p2o.enabled and hooks is None:
      hooks = P2OHooks(c)
    start = time.perf_counter()
    trainer = Trainer(c, model=model, tokenizer=tokenizer, mesh=mesh, train_queries=train, eval_sets=eval_sets,
                      score=verifier.score, hooks=hooks)
    history = trainer.run()
    wall_seconds = time.perf_counter() - start
    if c.eval.base_with_template and eval_sets:
      # The efficiency's reference is the best ANY search found, not the last search's best (often a weaker clause:
      # the last search runs on what the trained policy still fails).
      history["base_with_search_bests"] = evaluate_search_bests(checkpoint, c, mesh, eval_sets, verifier.score)
      history["base_with_best_template"] = report.best_with_template(history["base_with_search_bests"])
  if jax.process_index() == 0:
    pathlib.Path(c.workdir, "history.json").write_text(json.dumps(history, indent=2))
    text = report.render_report(c.workdir, history, wall_seconds, history.get("base_with_best_template"))
    log.info("report: %s\n%s", report.write_report(c.workdir, text), text)
  return history
