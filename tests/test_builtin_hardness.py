"""The demo's base policy keeps the built-in world honest: hard sums need the instruction the corpus taught.

Builds the base policy configs/demo_cpu.py describes (SFT, ~13.5 minutes on 2 idle cores) into the repository's cache
directory, where the demo command finds it afterwards, and measures it through the path training uses: the held-out
splits, the jitted sampler, the sandboxed verifier pool. If a change to the world, the corpus or the SFT recipe let the
base answer hard sums directly, or stopped the trigger instruction from working, P^2O's premise would be gone; these
assertions fail first.
"""

import functools

import pytest

from conftest import DEMO_CONFIG
from p2o_jax import sharding
from p2o_jax.config import load_config_file
from p2o_jax.data.corpus import PARTIAL_INSTRUCTIONS, TRIGGER_INSTRUCTION
from p2o_jax.experiment import evaluate_with_templates, load_data, resolve_checkpoint
from p2o_jax.rewards.pool import VerifierPool


@pytest.fixture(scope="module")
def measure():
  """measure(template, sampled=False) -> {"builtin_easy": acc, "builtin_hard": acc} for the demo's base policy."""
  c = load_config_file(DEMO_CONFIG)
  checkpoint = resolve_checkpoint(c)  # built once per spec, then reused from the cache
  _, eval_sets = load_data(c)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  with VerifierPool(num_workers=1, timeout_s=c.reward.timeout_s, fallback=c.reward.fallback) as verifier:

    @functools.cache
    def run(template: str, sampled: bool = False) -> dict[str, float]:
      run_config = c.copy_and_resolve_references()
      if sampled:  # every problem K times at the rollout temperature: what GRPO's rollouts see
        run_config.eval.small_set_size = 10**6
        run_config.eval.small_set_samples = c.rollout.num_samples
        run_config.eval.temperature = c.rollout.temperature
      return evaluate_with_templates(checkpoint, run_config, mesh, eval_sets, [template], verifier.score)[0]

    yield run


def test_plain_prompt_solves_easy_sums_but_not_hard_ones(measure):
  greedy, sampled = measure(""), measure("", sampled=True)
  assert greedy["builtin_easy"] >= 0.8
  assert greedy["builtin_hard"] <= 0.05
  # ~0 successes among GRPO's K rollouts: the hard split gives plain GRPO (almost) no signal.
  assert sampled["builtin_hard"] <= 0.05


def test_the_trigger_instruction_unlocks_hard_sums(measure):
  triggered = measure(TRIGGER_INSTRUCTION)
  assert triggered["builtin_hard"] >= 0.8  # measured 0.89 on the demo's base
  # Sampled, the trigger works most but not all of the time (corpus.trigger_scratchpad_prob), so templated groups
  # hold both outcomes, which is what gives context distillation a gradient.
  sampled = measure(TRIGGER_INSTRUCTION, sampled=True)["builtin_hard"]
  assert 0.3 <= sampled <= 0.97


def test_a_partial_instruction_helps_less_than_the_trigger(measure):
  """The instruction space has a gradient for GEPA to climb: half the method works sometimes."""
  partial = measure(PARTIAL_INSTRUCTIONS[0], sampled=True)["builtin_hard"]
  assert partial < measure(TRIGGER_INSTRUCTION, sampled=True)["builtin_hard"]
