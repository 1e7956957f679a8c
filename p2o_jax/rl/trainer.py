"""The RLVR training loop: queries -> K rollouts (one `Policy.generate` call) -> verifier -> group advantages -> policy
update.

Everything a step needs is derived from (config, step, data-iterator state), so a run resumed from a checkpoint
continues exactly as if it had never stopped. `TrainerHooks` is the seam P^2O plugs into: which context each row is
generated from and trained on, per-token loss weights, what to observe about each batch, and a phase between epochs
(given an explicit `EpochEnv`, never the trainer itself). The trainer decides when to checkpoint.

Multi-process: each process draws its contiguous share of every global batch, rolls out, verifies and computes
advantages for its own queries only (a group never spans processes), and feeds its rows into the global train arrays
(p2o_jax/rl/batch_layout.py); logged rollout metrics are over the global batch. Evaluation and exports run in
lockstep; only process 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from p2o_jax import builders, distributed, sharding
from p2o_jax.checkpoint import Checkpointer
from p2o_jax.data.pipeline import EpochBatches
from p2o_jax.data.records import Query
from p2o_jax.evaluation import EvalProtocol, evaluate_set
from p2o_jax.metrics import MetricsWriter, Progress
from p2o_jax.models.hf_checkpoint import save_hf_model
from p2o_jax.policy import Policy
from p2o_jax.rewards.functions import RewardScores, ScoreFn
from p2o_jax.rl.advantages import advantage_estimator
from p2o_jax.rl.dynamic_sampling import refill_flat_groups
from p2o_jax.rl.rollout import RowContexts, Rollouts, collect_rollouts, plain_contexts
from p2o_jax.rl.sequence_packing import PackedShape
from p2o_jax.run_dir import RunDir
from p2o_jax.sampling import SamplingConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EpochEnv:
  """What a phase between epochs may use: the policy (frozen meanwhile), the verifier, the run directory, the training
  queries by id, and a clock of the run's wall time."""

  policy: Policy
  score: ScoreFn
  run_dir: RunDir
  query_by_id: dict[str, Query]
  elapsed_s: Callable[[], float]


class TrainerHooks:
  """Plain GRPO. P^2O overrides these; every method must be deterministic given its own saved state."""

  needs_reference_params = False  # keep a frozen copy of the initial params (e.g. for a Self-Ref reflector)

  def contexts(self, queries: Sequence[Query], user_turns: Sequence[str], group_size: int) -> RowContexts:
    return plain_contexts(user_turns, group_size)

  def needs_old_logprobs(self, rollouts: Rollouts) -> bool:
    """Whether train_inputs needs this process's rows' old log-probs recomputed on their train contexts."""
    return False

  def train_inputs(self, rollouts: Rollouts, packed: dict[str, np.ndarray], old_logp: np.ndarray | None
                   ) -> tuple[np.ndarray | None, np.ndarray, dict[str, float]]:
    """(old log-probs, per-token loss weights, metrics) for the packed train rows; old_logp None: not computed (the
    update uses its own). A hook may also clear tokens of `packed["response_mask"]` to take them out of the loss and
    its token-mean denominator: the train batch is built from `packed` after this call."""
    return old_logp, np.ones(packed["response_mask"].shape, np.float32), {}

  def observe(self, queries: Sequence[Query], rollouts: Rollouts) -> dict[str, float]:
    """Called on every process with its local batch; returned metrics must already be global (process 0 logs)."""
    return {}

  def end_epoch(self, epoch: int, last: bool) -> dict[str, float]:
    """Epoch `epoch` ended (`last`: no epoch follows); metrics about it. May leave a phase pending."""
    return {}

  def pending_phase(self) -> bool:
    """Work to do before the next epoch (the trainer checkpoints first, so a killed run resumes at the phase)."""
    return False

  def run_phase(self, env: EpochEnv) -> dict[str, float]:
    return {}

  def state(self) -> dict[str, Any]:
    return {}

  def restore(self, state: dict[str, Any]) -> None:
    del state


@dataclasses.dataclass
class _Timer:
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)

  def add(self, name: str, start: float) -> None:
    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class Trainer:

  def __init__(self, c, *, policy: Policy, train_queries: Sequence[Query], eval_sets: dict[str, Sequence[Query]],
               score: ScoreFn, hooks: TrainerHooks | None = None):
    self.c, self.policy, self.score = c, policy, score
    # Evaluation is lockstep (every process scores the same responses); scored once, so every process agrees on the
    # best dev accuracy and takes the same export("best") collective.
    self.lockstep_score = distributed.scored_on_process_zero(score)
    self.hooks = hooks or TrainerHooks()
    self.eval_sets = eval_sets
    self.run_dir = RunDir.from_config(c)
    self.is_main = jax.process_index() == 0
    self.pipeline = EpochBatches(list(train_queries), global_batch_size=c.train.batch_size, seed=c.seed,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    self.layout = builders.build_batch_layout(policy.mesh)
    self.packer = builders.build_packer(c, policy.sampler.cfg, policy.mesh, policy.pad_id)
    self.total_steps = c.train.max_steps or c.train.epochs * self.pipeline.steps_per_epoch
    self.optimizer = builders.build_optimizer(c, self.total_steps)
    self.opt_state = sharding.init_optimizer_state(self.optimizer, policy.params, policy.mesh)
    self.train_step = builders.build_train_step(c, policy.graphdef, self.optimizer, policy.mesh)
    self.logprobs = builders.build_logprob_fn(c, policy.graphdef, policy.mesh)
    # The initial policy, frozen: the KL reference and P^2O's Self-Ref reflector. A resumed run rebuilds it from the
    # same checkpoint directory, so it is never saved.
    if c.grpo.kl_coef > 0 or self.hooks.needs_reference_params:
      policy.freeze_reference()
    self.sampling = SamplingConfig(c.rollout.max_new_tokens, c.rollout.temperature, c.rollout.top_p, c.rollout.top_k)
    self.eval_protocol = EvalProtocol.from_config(c)
    self.checkpointer = Checkpointer(self.run_dir.checkpoints, keep=c.train.keep_checkpoints)
    self.query_by_id = {q.id: q for q in train_queries}
    self.best_dev: float | None = None
    self._last_saved_step: int | None = None
    self._verify_seconds = 0.0
    self._started = time.perf_counter()

  # ---- one step -------------------------------------------------------------------------------------------------

  def user_turns(self, queries: Sequence[Query]) -> list[str]:
    return [self.c.data.prompt_format.format(question=q.question) for q in queries]

  def rollout(self, queries: Sequence[Query], seed) -> Rollouts:
    contexts = self.hooks.contexts(queries, self.user_turns(queries), self.c.rollout.num_samples)
    return collect_rollouts(self.policy, contexts, queries, self.c.rollout.num_samples, self.sampling, seed,
                            self._timed_score)

  def _timed_score(self, texts: Sequence[str], queries: Sequence[Query]) -> RewardScores | np.ndarray:
    start = time.perf_counter()
    rewards = self.score(texts, queries)
    self._verify_seconds += time.perf_counter() - start
    return rewards

  def update(self, rollouts: Rollouts, timer: _Timer) -> dict[str, float]:
    """Advantages, old (and reference) log-probs on the TRAIN contexts, then ppo_epochs x num_minibatches steps."""
    g = self.c.grpo
    start = time.perf_counter()
    advantages = np.asarray(advantage_estimator(g.advantage)(jnp.asarray(rollouts.rewards), rollouts.group_size))
    rows = rollouts.num_rows * jax.process_count()  # every process holds the same number of rows
    micro = g.micro_batch_size
    # Every process packs to the same shape: its arrays are one slice of the global ones.
    shape = self.packer.shape(rollouts.train_prompt_ids, rollouts.mask)
    shape = PackedShape(*(int(n) for n in distributed.allgather(shape.as_array()).max(axis=0)))
    packed = self.packer.pack(rollouts.train_prompt_ids, rollouts.tokens, rollouts.mask, shape)
    whole = self.layout.to_device(packed, (rows // micro,))
    old_logp = self._old_logprobs(rollouts, whole, packed["response_mask"].shape[1])
    old_logp, weights, hook_metrics = self.hooks.train_inputs(rollouts, packed, old_logp)
    batch = {**packed, "advantages": advantages.astype(np.float32), "token_weights": weights}
    if old_logp is not None:
      batch["old_logp"] = old_logp
    if g.kl_coef > 0:
      batch["ref_logp"] = self.layout.to_host_rows(self.logprobs(self.policy.ref_params, whole), 1)
    timer.add("logprobs", start)
    start = time.perf_counter()
    minibatches = self.layout.to_device(batch, (g.num_minibatches, rows // g.num_minibatches // micro))
    sums: dict[str, float] = {}
    params = self.policy.params
    for _ in range(g.ppo_epochs):
      for i in range(g.num_minibatches):
        mb = jax.tree.map(lambda x: x[i], minibatches)
        params, self.opt_state, metrics = self.train_step(params, self.opt_state, mb)
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + float(distributed.to_host(v))
    self.policy.set_params(params)
    timer.add("update", start)
    n = g.ppo_epochs * g.num_minibatches
    metrics = {f"train/{k}": v / n for k, v in sums.items() if k != "update_skipped"}
    metrics["train/updates_skipped"] = sums.get("update_skipped", 0.0)
    metrics["train/tokens"] = float(distributed.allgather(np.int32(packed["response_mask"].sum())).sum())
    return {**metrics, **hook_metrics}

  def _old_logprobs(self, rollouts: Rollouts, whole, response_len: int) -> np.ndarray | None:
    """The old log-probs grpo.old_logprobs asks for (None: the update's own); see config.py. Every process takes the
    same branch: the log-prob pass is a collective."""
    g = self.c.grpo
    hooks_need = bool(distributed.allgather(np.int32(self.hooks.needs_old_logprobs(rollouts))).max())
    single_update = g.ppo_epochs * g.num_minibatches == 1
    if g.old_logprobs == "recompute" or hooks_need or (g.old_logprobs == "auto" and not single_update):
      return self.layout.to_host_rows(self.logprobs(self.policy.params, whole), 1)
    if g.old_logprobs == "sampler":
      return np.where(rollouts.mask[:, :response_len], rollouts.sampler_logp[:, :response_len], 0.0).astype(np.float32)
    return None

  def step(self, step: int, queries: Sequence[Query]) -> dict[str, float]:
    timer = _Timer()
    self._verify_seconds = 0.0
    truncated_before = self.policy.prompts_truncated
    start = time.perf_counter()
    rollouts = self.rollout(queries, self._seed(step, 0))
    timer.add("generate", start)
    if self.c.grpo.dynamic_sampling:
      queries, rollouts = self._dynamic_sampling(step, queries, rollouts, timer)
    timer.seconds["rewards"] = self._verify_seconds  # the rollout time above includes the rewards: split them out
    timer.seconds["generate"] -= self._verify_seconds
    metrics = _rollout_metrics(rollouts)  # a collective: over the global batch
    # Templated prompts over rollout.max_prompt_len lose their first tokens (as the authors' code does); counted here.
    truncated = np.int32(self.policy.prompts_truncated - truncated_before)
    metrics["rollout/prompts_truncated"] = float(distributed.allgather(truncated).sum())
    metrics.update(self.hooks.observe(queries, rollouts))
    metrics.update(self.update(rollouts, timer))
    total = sum(timer.seconds.values())
    metrics.update({f"time/{k}_s": v for k, v in timer.seconds.items()})
    metrics["time/step_s"] = total
    metrics["train/tokens_per_s"] = metrics["train/tokens"] / max(total, 1e-9)
    return metrics

  def _seed(self, step: int, attempt: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.c.seed), step), attempt)

  def _dynamic_sampling(self, step, queries, rollouts, timer) -> tuple[list[Query], Rollouts]:
    def draw(attempt: int) -> tuple[list[Query], Rollouts]:
      start = time.perf_counter()
      more = self.iterator.next()[2]
      more_rollouts = self.rollout(more, self._seed(step, attempt))
      timer.add("generate", start)
      return more, more_rollouts

    return refill_flat_groups(queries, rollouts, draw, wanted=self.pipeline.local_batch_size,
                              max_batches=self.c.grpo.dynamic_sampling_max_batches)

  # ---- the loop -------------------------------------------------------------------------------------------------

  def restore_or_start(self) -> int:
    latest = self.checkpointer.latest_step()
    if latest is None:
      self.iterator = self.pipeline.iterator()
      return 0
    state, meta = self.checkpointer.restore(latest, {"params": self.policy.params, "opt_state": self.opt_state})
    self.opt_state = state["opt_state"]
    self.policy.set_params(state["params"])
    self.iterator = self.pipeline.iterator(meta["data"])
    self.best_dev = meta.get("best_dev")
    self.hooks.restore(meta.get("hooks", {}))
    return int(meta["step"])

  def elapsed(self) -> float:
    """Wall time of this process's run so far."""
    return time.perf_counter() - self._started

  def save(self, step: int) -> None:
    """Checkpoint at `step` (once per step: a second call for the same step is a no-op)."""
    if step == self._last_saved_step:
      return
    self._last_saved_step = step
    meta = {"step": step, "data": self.iterator.state(), "best_dev": self.best_dev, "seed": self.c.seed,
            "hooks": self.hooks.state()}
    self.checkpointer.save(step, {"params": self.policy.params, "opt_state": self.opt_state}, meta)

  def evaluate(self, step: int) -> dict[str, float]:
    metrics = {}
    for name, queries in self.eval_sets.items():
      result = evaluate_set(self.policy, queries, self.c.data.prompt_format, self.eval_protocol,
                            self.lockstep_score, seed=self.c.seed)
      metrics[f"eval/{name}/accuracy"] = result["accuracy"]
    if metrics:
      dev = float(np.mean(list(metrics.values())))
      metrics["eval/mean_accuracy"] = dev
      if self.best_dev is None or dev > self.best_dev:
        self.best_dev = dev
        self.export("best")
    return metrics

  def export(self, name: str):
    return save_hf_model(self.policy.model(), self.run_dir.export(name), tokenizer=self.policy.tokenizer,
                         dtype=self.c.train.export_dtype or None)

  def epoch_env(self) -> EpochEnv:
    return EpochEnv(policy=self.policy, score=self.score, run_dir=self.run_dir, query_by_id=self.query_by_id,
                    elapsed_s=self.elapsed)

  def end_epoch(self, epoch: int, step: int) -> dict[str, float]:
    metrics = self.hooks.end_epoch(epoch, last=step >= self.total_steps)
    if self.hooks.pending_phase():
      self.save(step)  # the phase can take a while: a kill from here on resumes at it, not at the epoch's start
      start = time.perf_counter()
      metrics.update(self.hooks.run_phase(self.epoch_env()))
      metrics["time/gepa_s"] = time.perf_counter() - start
    return metrics

  def run(self) -> dict[str, Any]:
    """Train to total_steps (resuming from the latest checkpoint), evaluating, checkpointing and exporting."""
    with frozen_heap():
      return self._run()

  def _run(self) -> dict[str, Any]:
    c = self.c
    start_step = self.restore_or_start()
    # Records are numbered by completed steps; the checkpoint at `start_step` already includes that step's record.
    writer = MetricsWriter(self.run_dir.root, enabled=self.is_main, resume_step=start_step + 1)
    progress = Progress(self.total_steps, desc="train", enabled=self.is_main, start_step=start_step)
    history: dict[str, Any] = {}
    if start_step == 0 and self.eval_sets:
      history["eval_at_start"] = self.evaluate(0)
      writer.write(0, history["eval_at_start"])
    self._last_saved_step = start_step if start_step else None
    resumed = self.hooks.run_phase(self.epoch_env()) if start_step and self.hooks.pending_phase() else {}
    if resumed:
      writer.write(start_step, resumed)
    step = start_step
    while step < self.total_steps:
      epoch, _, queries = self.iterator.next()
      metrics = self.step(step, queries)
      step += 1
      metrics["epoch"] = float(epoch)
      if c.eval.every_steps and step % c.eval.every_steps == 0 and step < self.total_steps:
        metrics.update(self.evaluate(step))
      writer.write(step, metrics)
      progress.update(step, **_progress_fields(metrics))
      if self.iterator.epoch_finished:  # written as its own record: a kill during GEPA must not lose the step's
        epoch_metrics = self.end_epoch(epoch, step)
        if epoch_metrics:
          writer.write(step, epoch_metrics)
      if step % c.train.checkpoint_every == 0 or step == self.total_steps:
        self.save(step)
    if start_step < self.total_steps and self.eval_sets:
      history["eval_at_end"] = self.evaluate(self.total_steps)
      writer.write(self.total_steps, history["eval_at_end"])
    history["final_export"] = str(self.export("final"))
    progress.close()
    writer.close()
    self.checkpointer.close()
    return history


@contextlib.contextmanager
def frozen_heap():
  """The objects alive on entry (modules, the model, the tokenizer, compiled programs: ~360k with the demo's policy)
  are left out of the garbage collector's passes until exit. Without this, every full collection scans them all, a
  pause longer than a whole demo step, and on a multi-host run a pause on one host holds up the others at the next
  collective. Objects still die as their references go; only reference cycles among these wait for the exit."""
  gc.collect()
  gc.freeze()
  try:
    yield
  finally:
    gc.unfreeze()


def _progress_fields(metrics: dict[str, float]) -> dict[str, str]:
  fields = {"reward": f"{metrics['rollout/reward_mean']:.3f}",
            "zero_adv": f"{metrics['rollout/zero_advantage_fraction']:.2f}"}
  if "p2o/hard_set_size" in metrics:
    fields["hard"] = str(int(metrics["p2o/hard_set_size"]))
  return fields


def _rollout_metrics(rollouts: Rollouts) -> dict[str, float]:
  """Means over the global batch: every process's rows are gathered (groups stay whole: K rows of one process)."""
  k = rollouts.group_size
  terms = list(rollouts.reward_terms.items())
  per_row = np.stack([rollouts.rewards, rollouts.mask.sum(axis=1), rollouts.correct(), *(v for _, v in terms)],
                     axis=1).astype(np.float32)
  gathered = distributed.concat_rows(per_row)
  rewards_gk, lengths = gathered[:, 0].reshape(-1, k), gathered[:, 1].astype(np.float64)
  correct_gk = gathered[:, 2].reshape(-1, k) > 0
  metrics = {
      "rollout/reward_mean": float(rewards_gk.mean()),
      f"rollout/pass_at_{k}": float(correct_gk.any(axis=1).mean()),
      "rollout/zero_advantage_fraction": float((rewards_gk.max(axis=1) == rewards_gk.min(axis=1)).mean()),
      "rollout/response_length": float(lengths.mean()),
  }
  global_terms = RewardScores(gathered[:, 0], {name: gathered[:, 3 + i] for i, (name, _) in enumerate(terms)})
  metrics.update({f"reward/{name}_mean": mean for name, mean in global_terms.function_means().items()})
  return metrics
