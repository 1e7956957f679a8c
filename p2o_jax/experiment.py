"""Assemble a run from its config: mesh, training and evaluation data, verifier, preflight checks, the policy (the
built-in base: shipped, cached, or built here, announced), the trainer; then the report."""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from p2o_jax import builders, report, sharding
from p2o_jax.builders import build_builtin_base, policy_checkpoint
from p2o_jax.config import builtin_world, validate, validate_distributed
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data import arithmetic
from p2o_jax.data.records import Query, problem_queries, read_queries
from p2o_jax.evaluation import EvalProtocol, builtin_sets, evaluate_set, parse_eval_sets
from p2o_jax.models.tokenizer import load_tokenizer
from p2o_jax.p2o.hooks import P2OHooks
from p2o_jax.preflight import check_chat_template, check_prompt_lengths, check_verifier, check_writable_dir
from p2o_jax.rewards.functions import RewardEntry
from p2o_jax.rl.trainer import Trainer, TrainerHooks
from p2o_jax.run_dir import RunDir

log = logging.getLogger(__name__)


def preflight(c: ml_collections.ConfigDict, train: Sequence[Query], score, tokenizer) -> None:
  """Everything that could fail after minutes of work, checked in seconds (p2o_jax/preflight.py)."""
  run_dir = RunDir.from_config(c)
  check_writable_dir(run_dir.root, "config.workdir")
  check_writable_dir(run_dir.checkpoints, "the checkpoint directory")
  sample = list(train[:4])
  check_chat_template(tokenizer, [c.data.prompt_format.format(question=q.question) for q in sample])
  check_verifier(score, sample)


def _read(path: str, c: ml_collections.ConfigDict, messages_field: str = "") -> list[Query]:
  result = read_queries(path, question_field=c.data.question_field, answer_field=c.data.answer_field,
                        id_field=c.data.id_field or None, messages_field=messages_field or None)
  if result.skipped:
    log.warning("%s: skipped %d broken rows", path, result.skipped)
  return result.queries


def load_data(c: ml_collections.ConfigDict, tokenizer=None) -> tuple[list[Query], dict[str, list[Query]]]:
  """(training queries, evaluation sets by name), each query's plain prompt checked against rollout.max_prompt_len
  with `tokenizer` (default: the policy checkpoint's): over it is an error or, with data.too_long="skip", dropped."""
  eval_sets = {**{name: _read(path, c) for name, path in parse_eval_sets(c.eval.sets).items()}, **builtin_sets(c)}
  if c.data.source == "file":
    train = _read(c.data.train_path, c, c.data.messages_field)
  else:
    train = problem_queries(builtin_train_problems(c))
  if tokenizer is None:
    checkpoint = policy_checkpoint(c)  # None: a built-in base still to build, whose tokenizer is the character one
    tokenizer = load_tokenizer(checkpoint) if checkpoint else build_char_tokenizer()

  def fitting(queries: list[Query], what: str) -> list[Query]:
    return check_prompt_lengths(tokenizer, queries, c.data.prompt_format, c.rollout.max_prompt_len,
                                too_long=c.data.too_long, enable_thinking=c.model.enable_thinking, what=what)

  return (fitting(train, "training query"),
          {name: fitting(queries, f"eval set {name!r} query") for name, queries in eval_sets.items()})


def builtin_train_problems(c: ml_collections.ConfigDict) -> list[arithmetic.Problem]:
  """The built-in task's training problems: easy ones, then hard ones (config.data.builtin_*)."""
  world = builtin_world(c)
  n_hard = int(round(c.data.builtin_train_size * c.data.builtin_hard_fraction))
  return (arithmetic.sample_problems(world, "easy", c.data.builtin_train_size - n_hard, c.seed)
          + arithmetic.sample_problems(world, "hard", n_hard, c.seed + 1))


def evaluate_with_templates(checkpoint: pathlib.Path, c: ml_collections.ConfigDict, mesh, eval_sets,
                            templates: Sequence[str], score) -> list[dict[str, float]]:
  """Per template: {eval set: accuracy} of the policy at `checkpoint` with the template in front of every question
  (the model is loaded once for all of them)."""
  policy = builders.build_policy(c, checkpoint, mesh)
  protocol = EvalProtocol.from_config(c)
  return [{name: evaluate_set(policy, queries, c.data.prompt_format, protocol, score, template=template,
                              seed=c.seed)["accuracy"] for name, queries in eval_sets.items()}
          for template in templates]


def evaluate_search_bests(checkpoint: pathlib.Path, c: ml_collections.ConfigDict, mesh, eval_sets,
                          score) -> list[dict[str, Any]]:
  """The starting policy with each GEPA search's best template (each distinct template evaluated once)."""
  bests = report.search_bests(RunDir.from_config(c))
  distinct = list(dict.fromkeys(best["template"] for best in bests))
  accuracy = dict(zip(distinct, evaluate_with_templates(checkpoint, c, mesh, eval_sets, distinct, score)))
  return [{**best, "accuracy": accuracy[best["template"]]} for best in bests]


def run_training(c: ml_collections.ConfigDict, hooks: TrainerHooks | None = None, *, rebuild_base: bool = False,
                 reward_functions: str | list[RewardEntry] | None = None) -> dict[str, Any]:
  """Train as configured; `reward_functions` (names, import paths, module-level functions, each optionally with a
  weight, see rewards/functions.py) replaces config.reward.functions."""
  validate(c, jax.device_count())
  validate_distributed(c, jax.process_count())  # a count JAX detected itself (TPU slice, SLURM) is only known now
  mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
  train, eval_sets = load_data(c)
  with builders.build_reward_pool(c, reward_functions) as pool:
    score = pool.scorer(c.data.prompt_format)
    checkpoint = None if rebuild_base else policy_checkpoint(c)
    # A base still to build is the built-in policy, whose tokenizer is the character tokenizer.
    preflight(c, train, score, load_tokenizer(checkpoint) if checkpoint else build_char_tokenizer())
    if checkpoint is None:  # the explicit, announced step: minutes of SFT (the demo's base ships built)
      checkpoint = build_builtin_base(c, rebuilding=rebuild_base)
    policy = builders.build_policy(c, checkpoint, mesh)
    model_cfg = policy.model().cfg
    log.info("policy %s (%s, %.2fM params) on mesh %s; %d training queries; eval sets %s", checkpoint,
             model_cfg.model_type, model_cfg.num_params / 1e6, dict(mesh.shape), len(train),
             {k: len(v) for k, v in eval_sets.items()})
    if c.p2o.enabled and hooks is None:
      hooks = P2OHooks(c)
    start = time.perf_counter()
    trainer = Trainer(c, policy=policy, train_queries=train, eval_sets=eval_sets, score=score, hooks=hooks)
    history = trainer.run()
    wall_seconds = time.perf_counter() - start
    if c.eval.base_with_template and eval_sets:
      # The efficiency's reference is the best ANY search found, not the last search's best (often a weaker clause:
      # the last search runs on what the trained policy still fails).
      history["base_with_search_bests"] = evaluate_search_bests(checkpoint, c, mesh, eval_sets, score)
      history["base_with_best_template"] = report.best_with_template(history["base_with_search_bests"])
  if jax.process_index() == 0:
    run_dir = RunDir.from_config(c)
    run_dir.history.write_text(json.dumps(history, indent=2))
    text = report.render_report(run_dir, history, wall_seconds, history.get("base_with_best_template"))
    run_dir.report.write_text(text)
    log.info("report: %s\n%s", run_dir.report, text)
  return history
