"""One process of a small multi-process run, launched by tests/test_multihost.py: `python multihost_worker.py SPEC`.

SPEC is JSON: {"mode": "grpo" | "p2o", "policy_dir", "data_dir", "workdir", "out", "num_processes", "process_id",
"coordinator"}, optionally "disagree": true. The number of CPU devices comes from XLA_FLAGS in the environment. "grpo"
runs the real experiment path (`run_training`: VerifierPool, orbax checkpoints, lockstep evaluation, HF export); "p2o"
builds the trainer directly with a deterministic stand-in verifier (as tests/test_p2o_e2e.py does) so that GEPA finds
templates worth assigning. With "disagree", process 1's verifier times out on every item (scores 0): the processes'
own scores of GEPA's lockstep rollouts differ, as a per-item timeout can make them differ on real hosts. The process
writes what it saw to SPEC["out"]: its local query ids, templated rows and reward sums per step, the run history, P^2O's
hard set and template assignment after each epoch, and each GEPA search's final state and metrics.

The __main__ guard matters: the verifier pool's forkserver workers re-import this file.
"""

import hashlib
import json
import sys

import numpy as np

K = 4


def synthetic_score(texts, queries):
  """About a third of all responses 'solve' their query, deterministically (see tests/test_p2o_e2e.py)."""
  return np.asarray([hashlib.sha256(f"{t}|{a}".encode()).digest()[0] % 3 == 0 for t, a in zip(texts, (q.answer for q in queries))],
                    np.float32)


def timed_out_score(texts, queries):
  """A verifier on which every item timed out (scored 0), where `synthetic_score` solves about a third."""
  del queries
  return np.zeros(len(texts), np.float32)


def make_config(spec):
  from p2o_jax.config import base_config  # pylint: disable=import-outside-toplevel
  c = base_config()
  c.workdir = spec["workdir"]
  c.model.checkpoint = spec["policy_dir"]
  c.data.source, c.data.train_path = "file", f"{spec['data_dir']}/train.jsonl"
  c.data.id_field, c.data.prompt_format = "id", "{question}"
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples, c.rollout.temperature = 128, 8, K, 1.0
  c.reward.fallback, c.reward.num_workers = "last_number", 1
  c.grpo.micro_batch_size, c.grpo.num_minibatches = 4, 2
  c.optim.lr, c.optim.warmup_ratio = 1e-2, 0.0
  c.train.batch_size, c.train.max_steps, c.train.checkpoint_every = 4, 3, 2
  # 4 problems x 4 samples: the rollouts' batch shape, so evaluation reuses the rollouts' compiled sampler.
  c.eval.sets, c.eval.small_set_samples = f"held_out={spec['data_dir']}/eval.jsonl", K
  if spec["mode"] == "p2o":
    c.train.max_steps, c.train.epochs = 0, 3  # 3 x (two steps, then GEPA and the assignment)
    c.p2o.enabled, c.p2o.reflector, c.p2o.hard_max_correct, c.p2o.hard_min_count = True, "offline", K - 1, 2
    # One-character fragments (spaces are not tokens): every templated prompt stays in the plain prompts' length
    # bucket, so GEPA and templated rollouts add no compiled programs beyond the greedy sampler.
    c.p2o.offline_fragments = "A|B|C|D"
    c.p2o.gepa.dev_size, c.p2o.gepa.beam_width, c.p2o.gepa.minibatch_size = 4, 4, 1
    c.p2o.gepa.max_iters, c.p2o.gepa.max_metric_calls = 8, 100
  if spec["num_processes"] > 1:
    c.distributed.coordinator_address = spec["coordinator"]
    c.distributed.num_processes, c.distributed.process_id = spec["num_processes"], spec["process_id"]
    c.train.checkpoint_dir = f"{spec['workdir']}/checkpoints"  # shared: both processes run on this machine
  else:
    c.distributed.initialize = "never"
  return c


def recording(base):
  """`base` hooks that also record this process's query ids of every rollout and (P^2O) each epoch's hard set."""

  class Recording(base):

    def __init__(self, *args):
      super().__init__(*args)
      self.seen, self.templated_rows, self.hard_sets, self.assignments = [], [], [], []
      self.local_rewards, self.phase_metrics = [], []

    def contexts(self, queries, user_turns, group_size):
      self.seen.append([q.id for q in queries])
      contexts = super().contexts(queries, user_turns, group_size)
      self.templated_rows.append(sum(g != t for g, t in zip(contexts.generate, contexts.train)))
      return contexts

    def observe(self, queries, rollouts):
      self.local_rewards.append(float(rollouts.rewards.sum()))
      return super().observe(queries, rollouts)

    def end_epoch(self, epoch, last):
      if hasattr(self, "tracker"):
        self.hard_sets.append(self.tracker.ids)
      metrics = super().end_epoch(epoch, last)
      if hasattr(self, "tracker") and not self.pending_phase():
        self.assignments.append(self.assignment)
      return metrics

    def run_phase(self, env):
      metrics = super().run_phase(env)
      self.assignments.append(self.assignment)
      self.phase_metrics.append(metrics)
      return metrics

  return Recording


def record_searches():
  """Every GEPA search's final state on this process, as a list filled in while the run goes (`gepa.run_gepa`,
  wrapped where the phase looks it up)."""
  from p2o_jax.p2o import gepa  # pylint: disable=import-outside-toplevel
  searches, run_gepa = [], gepa.run_gepa

  def recorded(*args, **kwargs):
    state = run_gepa(*args, **kwargs)
    searches.append(state.to_dict())
    return state

  gepa.run_gepa = recorded
  return searches


def run_p2o(c, hooks, score):
  # pylint: disable=import-outside-toplevel
  from p2o_jax import sharding
  from p2o_jax.builders import build_policy
  from p2o_jax.experiment import load_data
  from p2o_jax.rl.trainer import Trainer
  policy = build_policy(c, c.model.checkpoint, sharding.make_mesh({"data": -1}))
  train, eval_sets = load_data(c)
  trainer = Trainer(c, policy=policy, train_queries=train, eval_sets=eval_sets, score=score, hooks=hooks)
  return trainer.run()


def main(spec):
  # pylint: disable=import-outside-toplevel
  from p2o_jax import distributed
  from p2o_jax.config import validate, validate_distributed
  c = make_config(spec)
  validate_distributed(c)
  distributed.initialize(c.distributed)  # before any other JAX call, as the CLI does
  import jax
  from p2o_jax.experiment import run_training
  from p2o_jax.p2o.hooks import P2OHooks
  from p2o_jax.rl.trainer import TrainerHooks
  validate(c, jax.device_count())
  searches = []
  if spec["mode"] == "p2o":
    hooks = recording(P2OHooks)(c)
    searches = record_searches()
    disagree = spec.get("disagree") and jax.process_index() == 1
    history = run_p2o(c, hooks, timed_out_score if disagree else synthetic_score)
  else:
    hooks = recording(TrainerHooks)()
    history = run_training(c, hooks)
  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "seen": hooks.seen, "templated_rows": hooks.templated_rows, "history": history,
            "hard_sets": hooks.hard_sets, "assignments": hooks.assignments, "local_rewards": hooks.local_rewards,
            "phase_metrics": hooks.phase_metrics, "searches": searches}
  with open(spec["out"], "w", encoding="utf-8") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(json.loads(sys.argv[1]))
