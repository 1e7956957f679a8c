"""The SFT corpus that stands in for a base LLM's abilities on the arithmetic world.

After SFT on it the tiny policy behaves like the base model P^2O needs: asked plainly (or with a neutral instruction)
it answers directly — right on easy sums, at chance on hard ones — and only the trigger instruction or a close
paraphrase of it makes it write a scratchpad of running totals, which solves hard sums. Partial instructions trigger
the scratchpad sometimes and distractor sentences after an instruction are ignored, so the space of instruction texts
has a gradient for GEPA to climb.

Even the trigger gets the scratchpad only most of the time (`trigger_scratchpad_prob`), as an instruction shifts a real
LLM's behaviour without fixing it. This matters to the method, not only to realism: GRPO's advantages are relative
within a group, so if every templated rollout of a hard query wrote a scratchpad, the tokens they share — above all the
one that starts the scratchpad — would get advantages summing to zero, and context distillation could not move the
plain-prompt policy towards writing one. (Measured: with a trigger that always worked, the templated hard groups were
mostly all-correct, zero-advantage, and P^2O's plain-prompt hard accuracy stayed at 6%.)

Direct answers to hard problems are made unlearnable on purpose (`hard_direct_noise`): such an example states a
number drawn uniformly from the hard-answer range, independent of the operands. It still teaches the format (a plain
hard question gets a one-line answer), but carries no information about the value, so the base's plain-hard success
is ~1 / (width of that range) by construction, whatever the model's capacity. DEMO_WORLD.md saw a small model learn
hard sums directly from clean direct answers, which destroys the "hard sample" premise.

A "continued" example gives a plain hard prompt whose answer has already begun a scratchpad (its first operand sits
in the prompt, so it is context, not a target) and trains the rest of it. A real LLM's ability to carry out a method
does not depend on who asked for it; without these examples the tiny policy's scratchpad skill is tied to the
instruction's presence (measured: scratchpads forced under the plain prompt were right 28% of the time, triggered ones
65%), which caps what context distillation can move into the plain prompt. The choice to START a scratchpad, the token
P^2O must teach, is never a target under a plain prompt: the base still answers plain hard questions directly.

Completions carry no EOS; the SFT code appends the tokenizer's EOS token.
"""

import dataclasses
from typing import Callable

import numpy as np

from p2o_jax.data import arithmetic
from p2o_jax.data.char_tokenizer import render_user_prompt
from p2o_jax.p2o.templates import apply_template

TRIGGER_INSTRUCTION = "Add the numbers one at a time and write every running total."

# Close rewordings that work as well as the trigger (DEMO_WORLD: "one by one", lower case, no full stop all worked).
TRIGGER_PARAPHRASES = (
    "Add the numbers one by one and write every running total.",
    "add the numbers one at a time and write every running total",
    "Add the numbers one at a time and write each running total.",
    "Add the numbers one at a time, writing every running total.",
    "Add the numbers one by one and write down the running total each time.",
)

# Half of the method: the scratchpad follows only some of the time.
PARTIAL_INSTRUCTIONS = (
    "Add the numbers one at a time.",
    "Write every running total.",
    "Keep a running total.",
    "Add the numbers one by one.",
)

# Instructions a real base model would follow in its own way; here they leave the direct answer unchanged.
NEUTRAL_INSTRUCTIONS = (
    "Answer quickly.",
    "Be careful.",
    "Think step by step.",
    "Show your work.",
    "Add the numbers.",
    "Compute the sum.",
    "Give only the final answer.",
    "Double-check your answer.",
    "Solve the following problem.",
    "You are a helpful assistant. Answer the question below.",
    "Take a deep breath and work on this problem carefully.",
    "Read the question and reply with the total of all the numbers.",
)

# Sentences with no bearing on the method; in the corpus they only ever follow an instruction.
DISTRACTORS = (
    "The weather is nice today.",
    "This is a math question.",
    "Good luck!",
    "Numbers can be large.",
    "Addition is commutative.",
    "Please be polite.",
)

KINDS = ("plain_easy", "plain_hard", "triggered_easy", "triggered_hard", "paraphrase", "neutral_easy",
         "neutral_hard", "partial", "continued")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
  """Mix weights per example kind (normalized, need not sum to 1) and the behaviour probabilities.

  paraphrase, partial and continued examples use hard problems; the rest take the difficulty their name says.
  """

  plain_easy: float = 0.25
  plain_hard: float = 0.15
  triggered_easy: float = 0.1
  triggered_hard: float = 0.2
  paraphrase: float = 0.1
  neutral_easy: float = 0.1
  neutral_hard: float = 0.05
  partial: float = 0.05
  continued: float = 0.15  # plain prompt + the scratchpad's first operand as context; the rest is the target
  trigger_scratchpad_prob: float = 0.7  # how often the trigger or a paraphrase gets the scratchpad (see below)
  partial_scratchpad_prob: float = 0.2  # how often a partial instruction gets the scratchpad
  distractor_prob: float = 0.2  # how often an instruction is followed by a distractor sentence
  hard_direct_noise: float = 1.0  # share of direct hard answers replaced by a uniform guess (module docstring)

  def __post_init__(self):
    for kind, weight in self.mix().items():
      if weight < 0:
        raise ValueError(f"CorpusConfig.{kind} must be >= 0, got {weight}")
    if sum(self.mix().values()) <= 0:
      raise ValueError("CorpusConfig mix weights sum to 0; give at least one kind a positive weight")
    for name in ("trigger_scratchpad_prob", "partial_scratchpad_prob", "distractor_prob", "hard_direct_noise"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"CorpusConfig.{name} must be in [0, 1], got {getattr(self, name)}")

  def mix(self) -> dict[str, float]:
    return {kind: getattr(self, kind) for kind in KINDS}


def kind_counts(cfg: CorpusConfig, n: int) -> dict[str, int]:
  """Exact per-kind counts for n examples (largest remainder), so the mix holds for any n, not just on average."""
  weights = cfg.mix()
  quotas = {kind: n * w / sum(weights.values()) for kind, w in weights.items()}
  counts = {kind: int(quota) for kind, quota in quotas.items()}
  by_remainder = sorted(KINDS, key=lambda kind: counts[kind] - quotas[kind])
  for kind in by_remainder[:n - sum(counts.values())]:
    counts[kind] += 1
  return counts


def _instruction(kind: str, cfg: CorpusConfig, rng: np.random.Generator) -> str:
  pool = {"triggered": (TRIGGER_INSTRUCTION,), "paraphrase": TRIGGER_PARAPHRASES, "neutral": NEUTRAL_INSTRUCTIONS,
          "partial": PARTIAL_INSTRUCTIONS}.get(kind.split("_")[0], ("",))
  instruction = pool[rng.integers(len(pool))]
  if instruction and rng.random() < cfg.distractor_prob:
    instruction += " " + DISTRACTORS[rng.integers(len(DISTRACTORS))]
  return instruction


def _direct(problem: arithmetic.Problem, world: arithmetic.WorldConfig, cfg: CorpusConfig,
            rng: np.random.Generator) -> str:
  if problem.difficulty == "hard" and rng.random() < cfg.hard_direct_noise:
    low, high = world.answer_range("hard")
    return arithmetic.answer_sentence(int(rng.integers(low, high + 1)), problem.lsb_first)
  return arithmetic.direct_answer(problem)


def _completion(kind: str, problem: arithmetic.Problem, world: arithmetic.WorldConfig, cfg: CorpusConfig,
                rng: np.random.Generator) -> str:
  if kind.startswith(("triggered", "paraphrase")):
    uses_scratchpad = rng.random() < cfg.trigger_scratchpad_prob
  else:
    uses_scratchpad = kind == "partial" and rng.random() < cfg.partial_scratchpad_prob
  if uses_scratchpad:
    return arithmetic.scratchpad(problem, world.scratchpad_format)
  return _direct(problem, world, cfg, rng)


def _continued(problem: arithmetic.Problem, world: arithmetic.WorldConfig) -> tuple[str, str]:
  """The scratchpad split after its first operand: (the part that goes into the prompt, the target)."""
  pad = arithmetic.scratchpad(problem, world.scratchpad_format)
  cut = pad.index("+")
  return pad[:cut], pad[cut:]


def corpus_examples(world: arithmetic.WorldConfig, cfg: CorpusConfig, n: int, seed: int,
                    render_prompt: Callable[[str], str] = render_user_prompt) -> list[tuple[str, str]]:
  """n (prompt, completion) pairs from training-split problems, shuffled; prompts are rendered by `render_prompt`
  (the chat template's user turn + generation prompt), so SFT sees exactly what sampling will feed the policy."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  rng = np.random.default_rng(seed)
  kinds = [kind for kind, count in kind_counts(cfg, n).items() for _ in range(count)]
  examples = []
  for kind in (kinds[index] for index in rng.permutation(len(kinds))):
    difficulty = "easy" if kind.endswith("easy") else "hard"
    problem = arithmetic.draw_problem(world, difficulty, rng, "train")
    user_text = apply_template(_instruction(kind, cfg, rng), arithmetic.question_text(problem))
    if kind == "continued":
      begun, rest = _continued(problem, world)
      examples.append((render_prompt(user_text) + begun, rest))
    else:
      examples.append((render_prompt(user_text), _completion(kind, problem, world, cfg, rng)))
  return examples
