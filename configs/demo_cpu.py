"""The embedded default: the built-in arithmetic task and tiny policy, on CPU.

python -m p2o_jax.main --config configs/demo_cpu.py [--config.train.max_steps=4 ...] [--workdir DIR]
"""

import ml_collections

from p2o_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.workdir = "runs/demo_cpu"

  c.model.checkpoint = "builtin"
  c.data.source = "builtin"
  c.data.prompt_format = "{question}"
  c.data.builtin_train_size = 2048
  c.data.builtin_hard_fraction = 0.5

  c.rollout.max_prompt_len = 128
  c.rollout.max_new_tokens = 64
  c.rollout.num_samples = 6
  c.reward.fallback = "last_number"

  c.train.batch_size = 16
  c.train.epochs = 1
  c.train.max_steps = 40
  c.grpo.num_minibatches = 2
  c.grpo.micro_batch_size = 48
  c.optim.lr = 1e-4
  c.optim.warmup_ratio = 0.0

  c.eval.builtin_easy = 64
  c.eval.builtin_hard = 64
  c.eval.every_steps = 10
  return c
