"""Plain and templated accuracy of a built-in base policy on the demo's held-out splits, through the path training
uses (the held-out splits, the jitted sampler, the sandboxed verifier pool). Shared by the hardness and rebuild
tests."""

from __future__ import annotations

import contextlib
import functools
import pathlib

from conftest import DEMO_CONFIG
from p2o_jax import sharding
from p2o_jax.config import load_config_file
from p2o_jax.experiment import evaluate_with_templates, load_data
from p2o_jax.builders import build_reward_pool


@contextlib.contextmanager
def base_measurer(checkpoint: pathlib.Path):
  """Yields measure(template, sampled=False) -> {"builtin_easy": acc, "builtin_hard": acc}, memoized."""
  c = load_config_file(DEMO_CONFIG)
  _, eval_sets = load_data(c)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  c.reward.num_workers = 1
  with build_reward_pool(c) as pool:

    @functools.cache
    def measure(template: str, sampled: bool = False) -> dict[str, float]:
      run_config = c.copy_and_resolve_references()
      if sampled:  # every problem K times at the rollout temperature: what GRPO's rollouts see
        run_config.eval.small_set_size = 10**6
        run_config.eval.small_set_samples = c.rollout.num_samples
        run_config.eval.temperature = c.rollout.temperature
      return evaluate_with_templates(checkpoint, run_config, mesh, eval_sets, [template],
                                     pool.scorer(c.data.prompt_format))[0]

    yield measure
