"""P^2O inside the GRPO trainer: templated rollouts for last epoch's hard set, context distillation, hard-set
collection, and GEPA + template assignment between epochs (../shared/P2O_SPEC.md sections 2-5).

Multi-host: each process rolls out its own queries, but the hard-set tracker and epoch statistics see the global batch
(every step gathers all processes' query ids and rewards), so all processes hold the same hard set and checkpointable
state. GEPA then runs in lockstep on every process (its evaluations are sharded sampler calls over identical request
lists); only the reflector's work that leaves the device (an HTTP teacher, the offline proposer) runs on process 0,
and its replies, like the final assignment and the saved search progress, are broadcast. Each process applies the
assignment to its own queries.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from p2o_jax import distributed, report
from p2o_jax.data.records import Query
from p2o_jax.metrics import Progress
from p2o_jax.p2o import gepa
from p2o_jax.p2o.assignment import assign_templates, greedy_set_cover, solved_sets
from p2o_jax.p2o.evaluator import SamplerEvaluator
from p2o_jax.p2o.hard_set import HardSetTracker
from p2o_jax.p2o.offline_proposer import DEFAULT_FRAGMENTS, FragmentProposer
from p2o_jax.p2o.self_ref import SelfReflector
from p2o_jax.p2o.teacher_ref import TeacherReflector, TeacherRefConfig
from p2o_jax.p2o.templates import apply_template
from p2o_jax.rl.losses import context_ratio_weights
from p2o_jax.rl.rollout import RowContexts, Rollouts
from p2o_jax.rl.trainer import Trainer, TrainerHooks
from p2o_jax.sampling import Sampler

log = logging.getLogger(__name__)
DISTILLATION_MODES = ("plain", "templated", "importance")
RATIO_MASK_MODES = ("hard", "soft", "off")
REFLECTORS = ("self", "teacher", "offline")


class _OnProcessZero:
  """Run an off-device reflector on process 0 only and broadcast its replies (and RNG state, if it has one) to all."""

  def __init__(self, inner):
    self.inner, self.stats = inner, inner.stats

  def state(self):
    return self.inner.state() if hasattr(self.inner, "state") else None

  def restore(self, state) -> None:
    if hasattr(self.inner, "restore"):
      self.inner.restore(state)

  def propose(self, requests):
    replies = self.inner.propose(requests) if jax.process_index() == 0 else None
    replies, state = distributed.broadcast_json([replies, self.state()])
    self.restore(state)
    return replies


def _write_json_atomically(path: pathlib.Path, payload: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(payload))
  os.replace(tmp, path)


def make_reflector(c, trainer: Trainer):
  p = c.p2o
  if p.reflector == "offline":
    fragments = tuple(f.strip() for f in p.offline_fragments.split("|") if f.strip()) or DEFAULT_FRAGMENTS
    return _OnProcessZero(FragmentProposer(fragments, seed=c.seed, max_template_chars=p.max_template_chars))
  if p.reflector == "teacher":
    t = p.teacher
    cfg = TeacherRefConfig(base_url=t.base_url, model=t.model, api_key_env=t.api_key_env or None,
                           timeout_s=t.timeout_s, max_retries=t.max_retries, max_concurrency=t.max_concurrency,
                           temperature=p.reflection_temperature, max_tokens=p.reflection_max_new_tokens,
                           max_template_chars=p.max_template_chars)
    return _OnProcessZero(TeacherReflector(cfg))
  sampler = Sampler(nnx.merge(trainer.graphdef, trainer.params), eos_ids=trainer.sampler.eos_ids, pad_id=trainer.sampler.pad_id,
                    max_prompt_len=p.reflection_max_prompt_len, mesh=trainer.mesh)
  sampler.set_params(trainer.ref_params)  # the frozen initial policy (P2OHooks.needs_reference_params)
  return SelfReflector(sampler, trainer.tokenizer, seed=c.seed, temperature=p.reflection_temperature,
                       max_new_tokens=p.reflection_max_new_tokens, max_template_chars=p.max_template_chars)


@dataclasses.dataclass
class _EpochStats:
  """Sums over the current epoch's steps for the templated-vs-plain comparison on assigned (hard) queries."""

  templated_rewards: float = 0.0
  templated_rows: int = 0
  plain_rewards: float = 0.0
  plain_rows: int = 0
  assigned_groups: int = 0
  assigned_groups_with_signal: int = 0


class P2OHooks(TrainerHooks):
  """State: this epoch's hard-set tracker, the templates assigned for this epoch, and a pending GEPA (if a run
  stopped between the end of an epoch and the end of its search)."""

  def __init__(self, c):
    p = c.p2o
    self.c, self.p = c, p
    self.tracker = HardSetTracker(p.hard_max_correct)
    self.assignment: dict[str, list[str]] = {}
    self.pending: dict[str, Any] | None = None
    self.gepa_seconds = 0.0
    self.epoch_stats = _EpochStats()
    self.gepa_cfg = gepa.GepaConfig(dev_size=p.gepa.dev_size, beam_width=p.gepa.beam_width,
                                    minibatch_size=p.gepa.minibatch_size, max_metric_calls=p.gepa.max_metric_calls,
                                    max_iters=p.gepa.max_iters, seed=c.seed)
    self.reflector = None
    self.needs_reference_params = p.reflector == "self"

  # ---- during an epoch ----------------------------------------------------------------------------------------

  def contexts(self, queries: Sequence[Query], user_turns: Sequence[str], group_size: int) -> RowContexts:
    generate, train = [], []
    for query, turn in zip(queries, user_turns):
      templates = self.assignment.get(query.id, [""] * group_size)
      for template in templates:
        templated = apply_template(template, turn)
        generate.append(templated)
        train.append(templated if self.p.distillation == "templated" else turn)
    return RowContexts(generate=generate, train=train)

  def train_inputs(self, rollouts, packed, old_logp):
    weights = np.ones(packed["response_mask"].shape, np.float32)
    templated = rollouts.is_templated()
    response_len = packed["response_mask"].shape[1]
    behaviour_logp = rollouts.sampler_logp[:, :response_len]
    metrics = {}
    if self.p.ratio_mask != "off":
      if templated.any():
        ratio_w = np.asarray(context_ratio_weights(jnp.asarray(old_logp), jnp.asarray(behaviour_logp),
                                                   low=self.p.ratio_low, high=self.p.ratio_high,
                                                   mode=self.p.ratio_mask))
        weights = np.where(templated[:, None], ratio_w, 1.0).astype(np.float32)
      valid = packed["response_mask"] & templated[:, None]
      # Counted over all processes, so every process takes part whether or not it has templated rows.
      masked, total = distributed.allgather(np.asarray([((weights == 0) & valid).sum(), valid.sum()], np.int32)
                                            ).sum(axis=0)
      if total:
        metrics["p2o/ratio_masked_token_fraction"] = float(masked / total)
    if self.p.distillation == "importance" and templated.any():
      # The behaviour policy is the templated context: the PPO ratio then carries pi(y|x) / pi_old(y|x~).
      old_logp = np.where(templated[:, None], behaviour_logp, old_logp).astype(np.float32)
    return old_logp, weights, metrics

  def observe(self, queries: Sequence[Query], rollouts: Rollouts) -> dict[str, float]:
    """Track the GLOBAL batch (all processes' rows, gathered in process order = the single-process order)."""
    k = rollouts.group_size
    query_ids = [i for ids in distributed.allgather_json([q.id for q in queries]) for i in ids]
    per_row = distributed.concat_rows(np.stack([rollouts.rewards, rollouts.is_templated()], axis=1).astype(np.float32))
    rewards, templated = per_row[:, 0], per_row[:, 1] > 0
    hard = self.tracker.observe(query_ids, rewards, k)
    rewards_gk = rewards.reshape(-1, k)
    templated_gk = templated.reshape(-1, k)
    s = self.epoch_stats
    for g, query_id in enumerate(query_ids):
      if query_id not in self.assignment:
        continue
      s.assigned_groups += 1
      s.assigned_groups_with_signal += int(rewards_gk[g].max() > rewards_gk[g].min())
      s.templated_rewards += float(rewards_gk[g][templated_gk[g]].sum())
      s.templated_rows += int(templated_gk[g].sum())
      s.plain_rewards += float(rewards_gk[g][~templated_gk[g]].sum())
      s.plain_rows += int((~templated_gk[g]).sum())
    return {"p2o/hard_in_batch": float(hard.mean()), "p2o/hard_set_size": float(len(self.tracker.ids))}

  def _epoch_summary(self) -> dict[str, float]:
    s = self.epoch_stats
    out = {"p2o/assigned_groups": float(s.assigned_groups)}
    if s.templated_rows:
      out["p2o/templated_success"] = s.templated_rewards / s.templated_rows
    if s.plain_rows:
      out["p2o/plain_success_on_assigned"] = s.plain_rewards / s.plain_rows
    if s.assigned_groups:
      out["p2o/assigned_nonzero_advantage_fraction"] = s.assigned_groups_with_signal / s.assigned_groups
    return out

  # ---- between epochs -----------------------------------------------------------------------------------------

  def on_epoch_end(self, epoch: int, step: int, trainer: Trainer) -> dict[str, float]:
    metrics = self._epoch_summary()
    self.epoch_stats = _EpochStats()
    hard_ids = self.tracker.ids
    self.tracker.reset()
    metrics["p2o/epoch_hard_set_size"] = float(len(hard_ids))
    if step >= trainer.total_steps:  # templates live one epoch, and none follows: a search would be wasted time
      log.info("epoch %d was the last: no GEPA after it", epoch)
      self.assignment = {}
      return metrics
    if len(hard_ids) < max(self.p.hard_min_count, 2):
      log.info("epoch %d: %d hard queries (< hard_min_count=%d): no GEPA, no templates next epoch", epoch,
               len(hard_ids), self.p.hard_min_count)
      self.assignment = {}
      metrics["p2o/gepa_skipped"] = 1.0
      return metrics
    self.pending = {"epoch": epoch, "step": step, "hard_ids": hard_ids}
    trainer.save(step)  # GEPA can take a while: a kill from here on resumes at the search, not the epoch
    return {**metrics, **self._finish_gepa(trainer)}

  def on_resume(self, trainer: Trainer) -> dict[str, float]:
    return self._finish_gepa(trainer) if self.pending else {}

  def _progress_path(self, trainer: Trainer) -> pathlib.Path:
    return trainer.workdir / "p2o" / "gepa_progress.json"

  def _load_progress(self, trainer: Trainer) -> tuple[gepa.GepaState | None, Any]:
    path = self._progress_path(trainer)
    # Process 0 wrote it; the other hosts need not share its filesystem.
    saved = json.loads(path.read_text()) if jax.process_index() == 0 and path.is_file() else None
    saved = distributed.broadcast_json(saved)
    if saved is None or saved["epoch"] != self.pending["epoch"] or saved["hard_ids"] != self.pending["hard_ids"]:
      return None, None
    log.info("resuming GEPA of epoch %d at iteration %d", saved["epoch"], saved["state"]["iteration"])
    return gepa.GepaState.from_dict(saved["state"]), saved["reflector"]

  def _save_progress(self, trainer: Trainer, state: gepa.GepaState) -> None:
    if jax.process_index() != 0:
      return
    payload = {**self.pending, "state": state.to_dict(), "reflector": self.reflector.state()}
    _write_json_atomically(self._progress_path(trainer), payload)  # a kill leaves the previous iteration's state

  def _finish_gepa(self, trainer: Trainer) -> dict[str, float]:
    start = time.perf_counter()
    epoch, hard_ids = self.pending["epoch"], self.pending["hard_ids"]
    hard_set = [trainer.query_by_id[i] for i in hard_ids]
    if self.reflector is None:
      self.reflector = make_reflector(self.c, trainer)
    state, reflector_state = self._load_progress(trainer)
    if state is None:
      state = gepa.init_state(len(hard_set), dataclasses.replace(self.gepa_cfg, seed=self.c.seed + epoch))
    else:
      self.reflector.restore(reflector_state)
    evaluator = SamplerEvaluator(trainer.sampler, trainer.tokenizer, hard_set, self.c.data.prompt_format,
                                 self.c.rollout.max_new_tokens, trainer.score)
    budget = self.gepa_cfg.max_metric_calls
    progress = Progress(budget, desc=f"gepa after epoch {epoch}", enabled=trainer.is_main,
                        start_step=min(state.metric_calls, budget))

    def on_iteration(s: gepa.GepaState) -> None:
      self._save_progress(trainer, s)
      progress.update(min(s.metric_calls, budget), iteration=s.iteration, candidates=len(s.candidates),
                      best_dev=f"{s.history[-1].best_mean_dev:.2f}")

    state = gepa.run_gepa(state, evaluator, self.reflector, [q.question for q in hard_set], self.gepa_cfg,
                          on_iteration=on_iteration)
    progress.close()
    self._save_progress(trainer, state)
    self.assignment = self._assign(state, hard_ids, epoch)
    self.pending = None
    seconds = time.perf_counter() - start
    self.gepa_seconds += seconds
    self._write_templates(trainer, epoch, state, hard_ids)
    best = gepa.best_candidate(state)
    self._record_best(trainer, epoch, state.candidates[best], float(state.scores_cd[best].mean()))
    return {"p2o/gepa_iterations": float(state.iteration), "p2o/gepa_metric_calls": float(state.metric_calls),
            "p2o/gepa_candidates": float(len(state.candidates)), "p2o/gepa_best_dev": float(
                state.scores_cd[best].mean()), "p2o/gepa_seed_dev": float(state.scores_cd[0].mean()),
            "p2o/gepa_seconds": seconds, "p2o/gepa_time_share": self.gepa_seconds / max(trainer.elapsed(), 1e-9),
            "p2o/assigned_queries": float(len(self.assignment)),
            "p2o/reflections_rejected": float(sum(h.rejected for h in state.history))}

  def _assign(self, state: gepa.GepaState, hard_ids: list[str], epoch: int) -> dict[str, list[str]]:
    rng = np.random.default_rng([self.c.seed, epoch])
    dev_ids = [hard_ids[i] for i in state.dev_idx]
    chosen = assign_templates(hard_ids, dev_ids, state.scores_cd, self.c.rollout.num_samples, rng,
                              same_template_in_group=self.p.same_template_in_group)
    assignment = {q: [state.candidates[i] for i in picks] for q, picks in chosen.items()}
    return distributed.broadcast_json(assignment)

  def _write_templates(self, trainer: Trainer, epoch: int, state: gepa.GepaState, hard_ids: list[str]) -> None:
    if jax.process_index() != 0:
      return
    means = state.scores_cd.mean(axis=1)
    cover = set(greedy_set_cover(solved_sets(state.scores_cd), means.tolist()))
    lines = [f"# GEPA after epoch {epoch}: {len(hard_ids)} hard queries, |D_dev|={len(state.dev_idx)}, "
             f"{state.iteration} iterations, {state.metric_calls} metric calls", ""]
    for i in np.argsort(-means, kind="stable"):
      tag = " [in set cover]" if i in cover else ""
      lines += [f"## candidate {i}: mean dev score {means[i]:.3f} (parent {state.parents[i]}){tag}",
                state.candidates[i] or "(empty template)", ""]
    lines += ["# best mean dev score after each iteration",
              " ".join(f"{h.best_mean_dev:.3f}" for h in state.history) or "(no iterations)"]
    out = trainer.workdir / "templates" / f"epoch_{epoch:03d}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")

  def _record_best(self, trainer: Trainer, epoch: int, template: str, dev_score: float) -> None:
    """Every search's best template, kept in one file (the GEPA progress file holds only the latest search)."""
    if jax.process_index() != 0:
      return
    path = trainer.workdir / report.SEARCH_BESTS
    bests = json.loads(path.read_text()) if path.is_file() else {}
    bests[str(epoch)] = {"template": template, "dev": dev_score}  # by epoch: a resumed search rewrites its entry
    _write_json_atomically(path, bests)

  # ---- checkpointed state -------------------------------------------------------------------------------------

  def state(self) -> dict[str, Any]:
    return {"tracker": self.tracker.state(), "assignment": self.assignment, "pending": self.pending,
            "gepa_seconds": self.gepa_seconds, "epoch_stats": dataclasses.asdict(self.epoch_stats)}

  def restore(self, state: dict[str, Any]) -> None:
    if not state:
      return
    self.tracker.restore(state["tracker"])
    self.assignment = state["assignment"]
    self.pending = state["pending"]
    self.gepa_seconds = state["gepa_seconds"]
    self.epoch_stats = _EpochStats(**state["epoch_stats"])
