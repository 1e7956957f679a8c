"""DAPO dynamic sampling in the trainer: zero-variance groups are dropped and refilled from further batches."""

import dataclasses

import numpy as np

from p2o_jax import sharding
from p2o_jax.config import base_config
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.records import Query
from p2o_jax.models.builtin import builtin_model_config
from p2o_jax.models.decoder import Decoder
from p2o_jax.policy import Policy
from p2o_jax.rl.dynamic_sampling import select_groups
from p2o_jax.rl.rollout import Rollouts
from p2o_jax.rl.trainer import Trainer, _Timer

K = 2


def fake_rollouts(queries, rewards_per_query):
  rows = len(queries) * K
  return Rollouts(group_size=K, answers=[q.answer for q in queries for _ in range(K)],
                  texts=[f"{q.id}-{j}" for q in queries for j in range(K)],
                  generate_prompt_ids=[[1]] * rows, train_prompt_ids=[[1]] * rows,
                  tokens=np.ones((rows, 3), np.int32), mask=np.ones((rows, 3), bool),
                  sampler_logp=np.zeros((rows, 3), np.float32),
                  rewards=np.asarray([r for q in queries for r in rewards_per_query[q.id]], np.float32))


def make_trainer(tmp_path, queries, max_batches):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  tokenizer = build_char_tokenizer()
  c = base_config()
  c.workdir = str(tmp_path)
  c.train.batch_size, c.rollout.num_samples, c.grpo.micro_batch_size = 2, K, 2
  c.grpo.dynamic_sampling, c.grpo.dynamic_sampling_max_batches = True, max_batches
  model = Decoder(builtin_model_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                       intermediate_size=64), nnx.Rngs(0))
  policy = Policy(model, tokenizer, mesh=sharding.make_mesh({}), max_prompt_len=c.rollout.max_prompt_len)
  trainer = Trainer(c, policy=policy, train_queries=queries, eval_sets={},
                    score=lambda texts, answers: np.zeros(len(texts)))
  trainer.iterator = trainer.pipeline.iterator()
  return trainer


def test_flat_groups_are_replaced_by_varied_ones_from_the_next_batches(tmp_path):
  queries = [Query(f"q{i}", f"Q{i}", "1") for i in range(8)]
  # q0..q7: which groups have reward variance (mixed 0/1) and which are flat.
  rewards = {"q0": [0, 0], "q1": [1, 1], "q2": [0, 1], "q3": [0, 0], "q4": [1, 0], "q5": [1, 1], "q6": [0, 1],
             "q7": [1, 0]}
  trainer = make_trainer(tmp_path, queries, max_batches=4)
  trainer.rollout = lambda batch, seed: fake_rollouts(batch, rewards)
  first = trainer.iterator.next()[2]
  kept, rollouts = trainer._dynamic_sampling(0, first, fake_rollouts(first, rewards), _Timer())  # pylint: disable=protected-access
  assert len(kept) == 2 and rollouts.num_rows == 2 * K
  assert all(rewards[q.id][0] != rewards[q.id][1] for q in kept)
  grouped = rollouts.rewards.reshape(-1, K)
  assert (grouped.max(axis=1) > grouped.min(axis=1)).all()
  assert [t.split("-")[0] for t in rollouts.texts] == [q.id for q in kept for _ in range(K)]


def test_without_enough_varied_groups_flat_ones_fill_the_batch(tmp_path):
  queries = [Query(f"q{i}", f"Q{i}", "1") for i in range(4)]
  rewards = {q.id: [0, 0] for q in queries}
  rewards["q2"] = [1, 0]
  trainer = make_trainer(tmp_path, queries, max_batches=2)
  trainer.rollout = lambda batch, seed: fake_rollouts(batch, rewards)
  first = trainer.iterator.next()[2]
  kept, rollouts = trainer._dynamic_sampling(0, first, fake_rollouts(first, rewards), _Timer())  # pylint: disable=protected-access
  assert len(kept) == 2 and rollouts.num_rows == 2 * K
  assert sum(rewards[q.id][0] != rewards[q.id][1] for q in kept) == 1
  state = trainer.iterator.state()  # it drew one more batch, as max_batches allows: the epoch's second and last
  assert (state["epoch"], state["step"]) == (1, 0)


def test_kept_groups_keep_their_templated_flags_and_reward_terms():
  queries = [Query(f"q{i}", f"Q{i}", "1") for i in range(2)]
  a = dataclasses.replace(fake_rollouts(queries[:1], {"q0": [0, 1]}), templated=np.array([True, False]),
                          reward_terms={"math": np.array([0, 1], np.float32)})
  b = dataclasses.replace(fake_rollouts(queries[1:], {"q1": [1, 0]}), templated=np.array([False, True]),
                          reward_terms={"math": np.array([1, 0], np.float32)})
  merged = select_groups([(b, 0), (a, 0)], K)
  assert merged.is_templated().tolist() == [False, True, True, False]  # not re-derived from the prompt ids
  assert merged.reward_terms["math"].tolist() == [1, 0, 0, 1]
