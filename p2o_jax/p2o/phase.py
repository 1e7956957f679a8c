"""P^2O's prompt-optimization phase between two epochs (../shared/P2O_SPEC.md sections 3-4), as one function of an
explicit context: GEPA on the epoch's hard set with the frozen policy, then the greedy-set-cover template assignment
for the next epoch. It reads nothing but its `PhaseContext` and writes only the run directory's P^2O files: the
search's state, its candidates (templates/epoch_NNN.md) and its log (templates/epoch_NNN.jsonl: seed, every iteration's
parents and children with their templates, scores, cost and remaining budget, and a summary). A set cover left empty
(no template solves a dev query) means no templates next epoch, said in the log and as p2o/templates_skipped=1.

Resumable: the search's state is saved after every iteration (`RunDir.gepa_progress`); a phase started again for the
same epoch and hard set continues where it stopped. Multi-host: every process runs the phase in lockstep on the same
hard set, on rewards process 0 scored (p2o_jax/p2o/evaluator.py); process 0 writes the files, and what it read back or
decided is broadcast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from p2o_jax import distributed
from p2o_jax.data.records import Query
from p2o_jax.metrics import Progress
from p2o_jax.p2o import gepa
from p2o_jax.p2o.assignment import assign_templates, greedy_set_cover, solved_sets
from p2o_jax.p2o.evaluator import PolicyEvaluator
from p2o_jax.p2o.records import Rollout
from p2o_jax.p2o.templates import feedback_text, is_format_error
from p2o_jax.policy import Policy
from p2o_jax.run_dir import RunDir, write_atomically

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PhaseContext:
  config: ml_collections.ConfigDict
  epoch: int
  hard_set: Sequence[Query]  # the epoch's global hard set, in the order every process agrees on
  policy: Policy  # frozen for the phase: GEPA scores candidates with the current actor params
  reflector: Any  # p2o_jax.p2o.reflection.Reflector
  score: Callable[[Sequence[str], Sequence[str]], np.ndarray]
  run_dir: RunDir


@dataclasses.dataclass(frozen=True)
class PhaseResult:
  assignment: dict[str, list[str]]  # query id -> K templates for the next epoch
  metrics: dict[str, float]
  seconds: float


def gepa_config(c: ml_collections.ConfigDict, epoch: int) -> gepa.GepaConfig:
  g = c.p2o.gepa
  return gepa.GepaConfig(dev_size=g.dev_size, beam_width=g.beam_width, minibatch_size=g.minibatch_size,
                         max_metric_calls=g.max_metric_calls, max_iters=g.max_iters,
                         remove_dominated=g.remove_dominated,
                         reflection_max_prompt_tokens=c.p2o.reflection_max_prompt_len, seed=c.seed + epoch)


class FormatFeedback:
  """An evaluator whose rollouts carry the authors' full feedback: PolicyEvaluator's verdict says right or wrong;
  this one also tells a wrong output with no gradable answer (or several \\boxed) that its format is at fault."""

  def __init__(self, inner: gepa.Evaluator, hard_set: Sequence[Query], fallback: str):
    self.inner, self.hard_set, self.fallback = inner, hard_set, fallback

  def evaluate(self, requests: Sequence[tuple[str, int]]) -> list[Rollout]:
    out = []
    for (_, i), r in zip(requests, self.inner.evaluate(requests)):
      format_error = r.score <= 0 and is_format_error(r.output, self.fallback)
      feedback = feedback_text(r.score > 0, self.hard_set[i].answer, r.output, fallback=self.fallback)
      out.append(dataclasses.replace(r, feedback=feedback, format_error=format_error))
    return out


def run_phase(ctx: PhaseContext) -> PhaseResult:
  start = time.perf_counter()
  c, hard_ids = ctx.config, [q.id for q in ctx.hard_set]
  cfg = gepa_config(c, ctx.epoch)
  state, reflector_state = _load_progress(ctx.run_dir, ctx.epoch, hard_ids)
  if state is None:
    state = gepa.init_state(len(ctx.hard_set), cfg)
  else:
    ctx.reflector.restore(reflector_state)
  evaluator = FormatFeedback(
      PolicyEvaluator(ctx.policy, ctx.hard_set, c.data.prompt_format, c.rollout.max_new_tokens, ctx.score),
      ctx.hard_set, c.reward.fallback)
  stats_before = dataclasses.asdict(ctx.reflector.stats)
  if not state.candidates:
    state = gepa.evaluate_seed(state, evaluator)
    _save_progress(ctx, hard_ids, state)
  search_log = SearchLog(ctx.run_dir.templates(ctx.epoch).with_suffix(".jsonl"), ctx.epoch)
  search_log.restart(state)
  budget = state.budget
  progress = Progress(budget, desc=f"gepa after epoch {ctx.epoch}", enabled=jax.process_index() == 0,
                      start_step=min(state.metric_calls, budget))

  def on_iteration(s: gepa.GepaState) -> None:
    _save_progress(ctx, hard_ids, s)
    search_log.append(gepa.iteration_record(s, s.iteration))
    progress.update(min(s.metric_calls, budget), iteration=s.iteration, candidates=len(s.candidates),
                    best_dev=f"{s.history[-1].best_mean_dev:.2f}")

  # The user turn without the template is what the reflector sees as an example's input.
  questions = [c.data.prompt_format.format(question=q.question) for q in ctx.hard_set]
  state = gepa.run_gepa(state, evaluator, ctx.reflector, questions, cfg, on_iteration=on_iteration)
  progress.close()
  _save_progress(ctx, hard_ids, state)
  assignment = _assign(c, state, hard_ids, ctx.epoch)
  skipped = not assignment
  if skipped:
    log.warning("GEPA after epoch %d: no template solves any of the %d dev queries, so the set cover is empty; the "
                "next epoch rolls out without templates", ctx.epoch, len(state.dev_idx))
  best = gepa.best_candidate(state)
  search_log.append({**gepa.summary_record(state, cfg), "templates_skipped": skipped,
                     "assigned_queries": len(assignment)})
  if jax.process_index() == 0:
    _write_templates(ctx.run_dir, ctx.epoch, state, len(hard_ids))
    _record_best(ctx.run_dir, ctx.epoch, state.candidates[best], float(state.scores_cd[best].mean()))
  stats = {k: v - stats_before[k] for k, v in dataclasses.asdict(ctx.reflector.stats).items()}
  metrics = {"p2o/gepa_iterations": float(state.iteration), "p2o/gepa_metric_calls": float(state.metric_calls),
             "p2o/gepa_budget": float(state.budget), "p2o/gepa_rollouts": float(state.rollouts),
             "p2o/gepa_candidates": float(len(state.candidates)),
             "p2o/gepa_best_dev": float(state.scores_cd[best].mean()),
             "p2o/gepa_seed_dev": float(state.scores_cd[0].mean()), "p2o/assigned_queries": float(len(assignment)),
             "p2o/templates_skipped": float(skipped),
             "p2o/reflections_rejected": float(sum(h.rejected for h in state.history)),
             **{f"p2o/reflector/{k}": float(v) for k, v in stats.items()}}
  return PhaseResult(assignment, metrics, time.perf_counter() - start)


class SearchLog:
  """The search's JSONL log beside its templates file (templates/epoch_NNN.jsonl): a seed record, one record per
  iteration (gepa.iteration_record) and a summary. Process 0 writes it; a resumed search rewrites it from its state."""

  def __init__(self, path: pathlib.Path, epoch: int):
    self.path, self.epoch = path, epoch
    self.enabled = jax.process_index() == 0

  def restart(self, state: gepa.GepaState) -> None:
    records = [gepa.seed_record(state)] + [gepa.iteration_record(state, k + 1) for k in range(state.iteration)]
    if self.enabled:
      write_atomically(self.path, "".join(self._line(r) for r in records))

  def append(self, record: dict[str, Any]) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(self._line(record))

  def _line(self, record: dict[str, Any]) -> str:
    return json.dumps({"epoch": self.epoch, **record}) + "\n"


def _load_progress(run_dir: RunDir, epoch: int, hard_ids: list[str]) -> tuple[gepa.GepaState | None, Any]:
  path = run_dir.gepa_progress
  # Process 0 wrote it; the other hosts need not share its filesystem.
  saved = json.loads(path.read_text()) if jax.process_index() == 0 and path.is_file() else None
  saved = distributed.broadcast_json(saved)
  if saved is None or saved["epoch"] != epoch or saved["hard_ids"] != hard_ids:
    return None, None
  try:
    state = gepa.GepaState.from_dict(saved["state"])
  except (ValueError, TypeError, KeyError) as e:  # written by an older version of this file
    log.warning("GEPA progress of epoch %d is unreadable (%s): the search starts again", epoch, e)
    return None, None
  log.info("resuming GEPA of epoch %d at iteration %d", epoch, state.iteration)
  return state, saved["reflector"]


def _save_progress(ctx: PhaseContext, hard_ids: list[str], state: gepa.GepaState) -> None:
  if jax.process_index() != 0:
    return
  payload = {"epoch": ctx.epoch, "hard_ids": hard_ids, "state": state.to_dict(), "reflector": ctx.reflector.state()}
  write_atomically(ctx.run_dir.gepa_progress, json.dumps(payload))  # a kill leaves the previous iteration's state


def _assign(c: ml_collections.ConfigDict, state: gepa.GepaState, hard_ids: list[str],
            epoch: int) -> dict[str, list[str]]:
  rng = np.random.default_rng([c.seed, epoch])
  dev_ids = [hard_ids[i] for i in state.dev_idx]
  chosen = assign_templates(hard_ids, dev_ids, state.scores_cd, c.rollout.num_samples, rng,
                            same_template_in_group=c.p2o.same_template_in_sample)
  assignment = {q: [state.candidates[i] for i in picks] for q, picks in chosen.items()}
  return distributed.broadcast_json(assignment)


def _write_templates(run_dir: RunDir, epoch: int, state: gepa.GepaState, num_hard: int) -> None:
  means = state.scores_cd.mean(axis=1)
  cover = set(greedy_set_cover(solved_sets(state.scores_cd), means.tolist()))
  lines = [f"# GEPA after epoch {epoch}: {num_hard} hard queries, |D_dev|={len(state.dev_idx)}, "
           f"{state.iteration} iterations, {state.metric_calls} of {state.budget} metric calls charged, "
           f"{state.rollouts} rollouts", ""]
  for i in np.argsort(-means, kind="stable"):
    tag = " [in set cover]" if i in cover else ""
    lines += [f"## candidate {i}: mean dev score {means[i]:.3f} (parent {state.parents[i]}){tag}",
              state.candidates[i] or "(empty template)", ""]
  lines += ["# best mean dev score after each iteration",
            " ".join(f"{h.best_mean_dev:.3f}" for h in state.history) or "(no iterations)"]
  write_atomically(run_dir.templates(epoch), "\n".join(lines) + "\n")


def _record_best(run_dir: RunDir, epoch: int, template: str, dev_score: float) -> None:
  """Every search's best template, kept in one file (the GEPA progress file holds only the latest search)."""
  path = run_dir.search_bests
  bests = json.loads(path.read_text()) if path.is_file() else {}
  bests[str(epoch)] = {"template": template, "dev": dev_score}  # by epoch: a resumed search rewrites its entry
  write_atomically(path, json.dumps(bests))
