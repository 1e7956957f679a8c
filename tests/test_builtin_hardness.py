"""The demo's base policy keeps the built-in world honest: hard sums need the instruction the corpus taught.

Measures the base shipped with the package (the one configs/demo_cpu.py runs from) through the path training uses. If
a change to the world, the corpus or the SFT recipe let the base answer hard sums directly, or stopped the trigger
instruction from working, P^2O's premise would be gone; these assertions fail first.
"""

import pytest

from base_measure import base_measurer
from p2o_jax.data.corpus import PARTIAL_INSTRUCTIONS, TRIGGER_INSTRUCTION
from p2o_jax.models.builtin import SHIPPED_BASE_DIR

pytestmark = pytest.mark.slow  # ~75 s: the held-out splits sampled greedily and K times, plain and templated


@pytest.fixture(scope="module")
def measure():
  with base_measurer(SHIPPED_BASE_DIR) as run:
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
