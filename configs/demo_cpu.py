"""The embedded default: the built-in arithmetic task and tiny policy, on CPU.

python -m p2o_jax.main --config configs/demo_cpu.py [--config.rollout.max_new_tokens=32 ...]
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/demo_cpu"

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = "builtin"  # "builtin" or a Hugging Face checkpoint directory
  c.model.builtin_cache_dir = ".cache/p2o_jax/builtin_policy"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "float32"
  c.model.remat = False

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.rollout = ml_collections.ConfigDict()
  c.rollout.max_prompt_len = 64
  c.rollout.max_new_tokens = 96
  c.rollout.temperature = 0.6
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.num_samples = 6  # K rollouts per query

  c.eval = ml_collections.ConfigDict()
  c.eval.num_easy = 64
  c.eval.num_hard = 64
  return c
