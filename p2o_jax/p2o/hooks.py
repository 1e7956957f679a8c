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
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from p2o_jax import distributed
from p2o_jax.data.records import Query
from p2o_jax.p2o.distillation import DISTILLATIONS, RATIO_MASK_OFF
from p2o_jax.p2o.hard_set import HardSetTracker
from p2o_jax.p2o.phase import PhaseContext, run_phase
from p2o_jax.p2o.self_reflection import reflection_phase
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


def template_ratio_metrics(log_rho_bt: np.ndarray, templated_bt: np.ndarray, weights_bt: np.ndarray, *, low: float,
                           high: float, masked: bool) -> dict[str, float]:
  """The authors' per-step `template_ratio` log over the templated response tokens of all processes: rho's max, min,
  mean and std (unbiased, as torch's), the fractions below `low` and above `high`, and (with a ratio mask on) the
  fraction whose loss weight is not 1 (zeroed by the hard mask, rescaled by the soft one). {} without such tokens.

  A collective: every process calls it, with or without templated rows."""
  log_rho = log_rho_bt[templated_bt]
  rho = np.exp(log_rho.astype(np.float64))
  n = rho.size
  mean = rho.mean() if n else 0.0
  # The bounds compared in log space in the log-probs' dtype, as context_ratio_weights does: a rho at a bound is inside.
  below = log_rho < np.asarray(math.log(low), log_rho.dtype)
  above = log_rho > np.asarray(math.log(high), log_rho.dtype)
  local = np.asarray([n, rho.sum(), np.square(rho - mean).sum(), rho.max(initial=-np.inf), rho.min(initial=np.inf),
                      below.sum(), above.sum(), (weights_bt[templated_bt] != 1).sum()], np.float32)
  per_process = distributed.allgather(local).astype(np.float64)
  counts = per_process[:, 0]
  total = counts.sum()
  if not total:
    return {}
  mean = per_process[:, 1].sum() / total
  local_means = per_process[:, 1] / np.maximum(counts, 1)
  m2 = (per_process[:, 2] + counts * np.square(local_means - mean)).sum()  # Chan et al.'s parallel variance
  metrics = {
      "p2o/template_ratio/max": float(per_process[:, 3].max()),
      "p2o/template_ratio/min": float(per_process[:, 4].min()),
      "p2o/template_ratio/mean": float(mean),
      "p2o/template_ratio/std": float(np.sqrt(m2 / (total - 1))) if total > 1 else 0.0,
      "p2o/template_ratio/low_fraction": float(per_process[:, 5].sum() / total),
      "p2o/template_ratio/high_fraction": float(per_process[:, 6].sum() / total),
  }
  if masked:
    metrics["p2o/ratio_masked_token_fraction"] = float(per_process[:, 7].sum() / total)
  return metrics


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
    generate, train, templated = [], [], []
    for query, turn in zip(queries, user_turns):
      for template in self.templates_for(query.id, group_size):
        templated_turn = apply_template(template, turn)
        generate.append(templated_turn)
        train.append(templated_turn if self.distillation.train_on_template else turn)
        templated.append(templated_turn != turn)  # said explicitly: under "templated" distillation train == generate
    return RowContexts(generate=generate, train=train, templated=templated)

  def templates_for(self, query_id: str, group_size: int) -> list[str]:
    """The K templates a query's rollouts are generated from this epoch ("" = plain)."""
    if query_id not in self.assignment:
      return [""] * group_size
    templates = list(self.assignment[query_id])
    if self.p.left_1_no_template_rollout:  # the authors blank the last of the K at assignment; templates live an epoch
      templates[-1] = ""
    return templates

  def needs_old_logprobs(self, rollouts) -> bool:
    """Templated rows need their plain-context log-probs: the context ratio rho, its statistics, and "importance"
    distillation's mix of old log-probs."""
    return bool(rollouts.is_templated().any())

  def train_inputs(self, rollouts, packed, old_logp):
    """Context ratio mask (weights), the behaviour old log-probs of "importance" distillation, and with
    p2o.drop_failed_template_rollout the failed templated rows taken out of the loss: their response_mask is cleared in
    `packed` (the trainer builds the train batch from it after this call), so, as in the authors' code, they leave the
    token-mean's denominator too; their group's advantages were computed with them. "Failed": not correct by the
    correctness reward (the authors: total reward 0, the same when correctness is the only reward).

    The ratio rho = pi(y|x) / pi(y|x~) needs a row's log-probs on both contexts; rows trained on their template
    ("templated" distillation) have only x~, so there neither mask nor ratio statistics apply. Every metric is over all
    processes' rows (each process takes part in the gathers whether or not it holds templated rows)."""
    response_mask = packed["response_mask"]
    weights = np.ones(response_mask.shape, np.float32)
    templated = rollouts.is_templated()
    behaviour_logp = rollouts.sampler_logp[:, :response_mask.shape[1]]
    metrics = {}
    if old_logp is None:  # no process holds a templated row (needs_old_logprobs): nothing here applies
      return old_logp, weights, metrics
    if not self.distillation.train_on_template:
      if self.p.ratio_mask != RATIO_MASK_OFF and templated.any():
        ratio_w = np.asarray(context_ratio_weights(jnp.asarray(old_logp), jnp.asarray(behaviour_logp),
                                                   low=self.p.ratio_low, high=self.p.ratio_high,
                                                   mode=self.p.ratio_mask))
        weights = np.where(templated[:, None], ratio_w, 1.0).astype(np.float32)
      metrics.update(template_ratio_metrics(old_logp - behaviour_logp, response_mask & templated[:, None], weights,
                                            low=self.p.ratio_low, high=self.p.ratio_high,
                                            masked=self.p.ratio_mask != RATIO_MASK_OFF))
    if self.p.drop_failed_template_rollout:
      failed = templated & ~rollouts.correct()
      packed["response_mask"] = response_mask & ~failed[:, None]
      metrics["p2o/dropped_failed_templated_rows"] = float(distributed.allgather(np.int32(failed.sum())).sum())
    if self.distillation.behaviour_old_logp and templated.any():
      # The behaviour policy is the templated context: the PPO ratio then carries pi(y|x) / pi_old(y|x~).
      old_logp = np.where(templated[:, None], behaviour_logp, old_logp).astype(np.float32)
    return old_logp, weights, metrics

  def observe(self, queries: Sequence[Query], rollouts: Rollouts) -> dict[str, float]:
    """Track the GLOBAL batch (all processes' rows, gathered in process order = the single-process order)."""
    k = rollouts.group_size
    query_ids = [i for ids in distributed.allgather_json([q.id for q in queries]) for i in ids]
    # "Solved" is the correctness reward's verdict (the first reward function), not the weighted total.
    per_row = np.stack([rollouts.correct(), rollouts.is_templated()], axis=1).astype(np.float32)
    per_row = distributed.concat_rows(per_row)
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
    return {"p2o/hard_in_batch": float(hard.mean()), "p2o/hard_set_size": float(len(self.tracker.ids)),
            "p2o/templated_rows": float(templated.sum()),
            "p2o/templated_queries": float(templated_gk.any(axis=1).sum())}

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
    if self.reflector is None and self.p.search == "gepa":
      self.reflector = make_reflector(self.c, env.policy)
    ctx = PhaseContext(config=self.c, epoch=self.pending["epoch"],
                       hard_set=[env.query_by_id[i] for i in self.pending["hard_ids"]], policy=env.policy,
                       reflector=self.reflector, score=env.score, run_dir=env.run_dir)
    result = reflection_phase(ctx) if self.p.search == "self_reflection" else run_phase(ctx)
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
