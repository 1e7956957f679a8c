"""P^2O inside the GRPO trainer: templated rollouts for last epoch's hard set, context distillation and hard-set
collection during an epoch; between epochs the prompt-optimization phase (p2o_jax/p2o/phase.py) runs on what was
collected (../shared/P2O_SPEC.md sections 2-5).

Multi-host: each process rolls out its own queries, but the hard-set tracker and epoch statistics see the global batch
(every step gathers all processes' query ids and rewards), so all processes hold the same hard set and checkpointable
state, run the phase in lockstep and receive the same assignment. Each process applies it to its own queries.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from p2o_jax import distributed
from p2o_jax.data.records import Query
from p2o_jax.p2o.distillation import DISTILLATIONS, RATIO_MASK_OFF
from p2o_jax.p2o.hard_set import HardSetTracker
from p2o_jax.p2o.phase import PhaseContext, run_phase
from p2o_jax.p2o.reflectors import REFERENCE_REFLECTORS, make_reflector
from p2o_jax.p2o.templates import apply_template
from p2o_jax.rl.losses import context_ratio_weights
from p2o_jax.rl.rollout import RowContexts, Rollouts
from p2o_jax.rl.trainer import EpochEnv, TrainerHooks

log = logging.getLogger(__name__)


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
    self.distillation = DISTILLATIONS[p.distillation]
    self.tracker = HardSetTracker(p.hard_max_correct)
    self.assignment: dict[str, list[str]] = {}
    self.pending: dict[str, Any] | None = None
    self.gepa_seconds = 0.0
    self.epoch_stats = _EpochStats()
    self.reflector = None
    self.needs_reference_params = p.reflector in REFERENCE_REFLECTORS

  # ---- during an epoch ----------------------------------------------------------------------------------------

  def contexts(self, queries: Sequence[Query], user_turns: Sequence[str], group_size: int) -> RowContexts:
    generate, train = [], []
    for query, turn in zip(queries, user_turns):
      templates = self.assignment.get(query.id, [""] * group_size)
      for template in templates:
        templated = apply_template(template, turn)
        generate.append(templated)
        train.append(templated if self.distillation.train_on_template else turn)
    return RowContexts(generate=generate, train=train)

  def train_inputs(self, rollouts, packed, old_logp):
    weights = np.ones(packed["response_mask"].shape, np.float32)
    templated = rollouts.is_templated()
    response_len = packed["response_mask"].shape[1]
    behaviour_logp = rollouts.sampler_logp[:, :response_len]
    metrics = {}
    if self.p.ratio_mask != RATIO_MASK_OFF:
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
    if self.distillation.behaviour_old_logp and templated.any():
      # The behaviour policy is the templated context: the PPO ratio then carries pi(y|x) / pi_old(y|x~).
      old_logp = np.where(templated[:, None], behaviour_logp, old_logp).astype(np.float32)
    return old_logp, weights, metrics

  def observe(self, queries: Sequence[Query], rollouts: Rollouts) -> dict[str, float]:
    """Track the GLOBAL batch (all processes' rows, gathered in process order = the single-process order)."""
    k = rollouts.group_size
    query_ids = [i for ids in distributed.allgather_json([q.id for q in queries]) for i in ids]
    # "Solved" is the correctness reward's verdict (the first reward function), not the weighted total.
    per_row = distributed.concat_rows(np.stack([rollouts.correct(), rollouts.is_templated()], axis=1).astype(np.float32))
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

  def end_epoch(self, epoch: int, last: bool) -> dict[str, float]:
    metrics = self._epoch_summary()
    self.epoch_stats = _EpochStats()
    hard_ids = self.tracker.ids
    self.tracker.reset()
    metrics["p2o/epoch_hard_set_size"] = float(len(hard_ids))
    self.assignment = {}  # templates live one epoch; the phase (if any) assigns the next epoch's
    if last:  # no epoch follows: a search would be wasted time
      log.info("epoch %d was the last: no GEPA after it", epoch)
    elif len(hard_ids) < max(self.p.hard_min_count, 2):
      log.info("epoch %d: %d hard queries (< hard_min_count=%d): no GEPA, no templates next epoch", epoch,
               len(hard_ids), self.p.hard_min_count)
      metrics["p2o/gepa_skipped"] = 1.0
    else:
      self.pending = {"epoch": epoch, "hard_ids": hard_ids}
    return metrics

  def pending_phase(self) -> bool:
    return self.pending is not None

  def run_phase(self, env: EpochEnv) -> dict[str, float]:
    if self.reflector is None:
      self.reflector = make_reflector(self.c, env.policy)
    ctx = PhaseContext(config=self.c, epoch=self.pending["epoch"],
                       hard_set=[env.query_by_id[i] for i in self.pending["hard_ids"]], policy=env.policy,
                       reflector=self.reflector, score=env.score, run_dir=env.run_dir)
    result = run_phase(ctx)
    self.assignment, self.pending = result.assignment, None
    self.gepa_seconds += result.seconds
    return {**result.metrics, "p2o/gepa_seconds": result.seconds,
            "p2o/gepa_time_share": self.gepa_seconds / max(env.elapsed_s(), 1e-9)}

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
