"""The paper's teacher-distilled SFT baseline: supervised fine-tuning of the starting policy on a teacher's CORRECT
solutions to the training queries, under the plain prompt, then the same evaluation as the RL runs.

Traces: on the built-in task the oracle scratchpad plays the teacher (every training problem's worked solution, in
the world's scratchpad format); on files, the column `teacher_sft.trace_field` (e.g. DeepMath-103K's `r1_solution_1`),
kept only where the correctness reward accepts the trace's final answer. The run directory holds what a comparison
reads: metrics.jsonl with the evaluation before and after, history.json, and the policy exported as an HF directory.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from p2o_jax import builders, sharding
from p2o_jax.data import arithmetic
from p2o_jax.data.pipeline import EpochBatches
from p2o_jax.data.records import Query
from p2o_jax.evaluation import EvalProtocol, evaluate_set
from p2o_jax.metrics import MetricsWriter
from p2o_jax.models.hf_checkpoint import save_hf_model
from p2o_jax.models.tokenizer import chat_prompt_ids
from p2o_jax.rewards.functions import ScoreFn, as_scores
from p2o_jax.run_dir import RunDir
from p2o_jax.sft import SFTConfig, train_sft_ids

log = logging.getLogger(__name__)


def oracle_traces(problems: Sequence[arithmetic.Problem], scratchpad_format: str) -> dict[str, str]:
  """{problem id: its worked scratchpad solution}: the built-in task's teacher."""
  return {p.id: arithmetic.scratchpad(p, scratchpad_format) for p in problems}


def column_traces(queries: Sequence[Query], field: str, score: ScoreFn) -> dict[str, str]:
  """{query id: the row's `field` text} for the rows whose trace the correctness reward accepts."""
  with_trace = [q for q in queries if isinstance(q.columns.get(field), str) and q.columns[field].strip()]
  if not with_trace:
    raise ValueError(f"teacher_sft.trace_field {field!r}: no training row has a text in that column")
  traces = [q.columns[field] for q in with_trace]
  correct = as_scores(score(traces, with_trace), len(traces)).correctness > 0
  log.info("teacher traces: %d of %d rows with a %r trace are correct", int(correct.sum()), len(traces), field)
  return {q.id: t for q, t, ok in zip(with_trace, traces, correct) if ok}


def sft_examples(tokenizer, queries: Sequence[Query], traces: dict[str, str], prompt_format: str, *,
                 enable_thinking: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
  """(ids, loss mask) per traced query: the plain prompt rendered as every rollout renders it, then trace + EOS."""
  traced = [q for q in queries if q.id in traces]
  prompts = chat_prompt_ids(tokenizer, [prompt_format.format(question=q.question) for q in traced],
                            enable_thinking=enable_thinking)
  examples = []
  for query, prompt in zip(traced, prompts):
    target = tokenizer.encode(traces[query.id], add_special_tokens=False) + [tokenizer.eos_token_id]
    examples.append((np.asarray(prompt + target, np.int32), np.asarray([0] * len(prompt) + [1] * len(target), bool)))
  return examples


def sft_config(c: ml_collections.ConfigDict, updates_of_rl_run: int) -> SFTConfig:
  t = c.teacher_sft
  return SFTConfig(steps=t.steps or updates_of_rl_run, rows=t.rows,
                   row_len=t.row_len or c.rollout.max_prompt_len + c.rollout.max_new_tokens, lr=t.lr or c.optim.lr,
                   warmup_steps=0, weight_decay=c.optim.weight_decay, grad_clip=c.optim.grad_clip, seed=c.seed)


def _evaluate(policy, eval_sets: dict[str, list[Query]], c, score: ScoreFn) -> dict[str, float]:
  protocol = EvalProtocol.from_config(c)
  return {f"eval/{name}/accuracy": evaluate_set(policy, queries, c.data.prompt_format, protocol, score,
                                                seed=c.seed)["accuracy"] for name, queries in eval_sets.items()}


def run_teacher_sft(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """Evaluate the starting policy, SFT it on the teacher's traces, evaluate again; the run's history."""
  # Imported here: experiment imports the trainer, and this module is imported by the comparison's reader too.
  # pylint: disable=import-outside-toplevel
  from p2o_jax.experiment import builtin_train_problems, load_data, policy_checkpoint
  run_dir = RunDir.from_config(c)
  train, eval_sets = load_data(c)
  mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
  checkpoint = policy_checkpoint(c) or builders.build_builtin_base(c, rebuilding=False)
  policy = builders.build_policy(c, checkpoint, mesh)
  writer = MetricsWriter(run_dir.root)
  start = time.perf_counter()
  with builders.build_reward_pool(c) as pool:
    score = pool.scorer(c.data.prompt_format)
    if c.data.source == "builtin":
      traces = oracle_traces(builtin_train_problems(c), c.builtin.scratchpad_format)
    else:
      traces = column_traces(train, c.teacher_sft.trace_field, score)
    before = _evaluate(policy, eval_sets, c, score)
    writer.write(0, before)
    model = policy.model()
    steps_of_rl_run = builders.optimizer_updates(c, _rl_steps(c, train))
    examples = sft_examples(policy.tokenizer, train, traces, c.data.prompt_format,
                            enable_thinking=c.model.enable_thinking)
    log.info("teacher-distilled SFT on %d traces of %d training queries", len(examples), len(train))
    summary = train_sft_ids(model, examples, sft_config(c, steps_of_rl_run), show_progress=True)
    policy.set_params(nnx.split(model)[1])
    after = _evaluate(policy, eval_sets, c, score)
  final_step = _rl_steps(c, train)  # plotted at the RL runs' last step: the same budget of updates
  writer.write(final_step, after)
  writer.close()
  history = {"method": "teacher_sft", "traces": len(examples), "sft": summary, "eval_at_start": before,
             "eval_at_end": after, "wall_seconds": time.perf_counter() - start,
             "final_export": str(save_hf_model(model, run_dir.export("final"), tokenizer=policy.tokenizer))}
  run_dir.history.write_text(json.dumps(history, indent=2))
  return history


def _rl_steps(c: ml_collections.ConfigDict, train: Sequence[Query]) -> int:
  """The number of steps the RL runs of the same config take (as rl/trainer.py counts them)."""
  batches = EpochBatches(list(train), global_batch_size=c.train.batch_size, seed=c.seed)
  return c.train.max_steps or c.train.epochs * batches.steps_per_epoch
