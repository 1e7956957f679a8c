"""The built-in arithmetic world: multi-operand sums with exact answers, a train/held-out partition, text formats.

Difficulty is the NUMBER of operands, not their length: hard problems (default 4-6 two-digit operands) are solved by
a scratchpad of running totals, and every step of that scratchpad ("102+78=180") is itself an easy problem (two
operands of 2-3 digits) that a tiny plain transformer masters. WorldConfig refuses worlds where a running total falls
outside the easy problems' operand range, because then the scratchpad would ask the model for arithmetic it was never
taught (the trap DEMO_WORLD.md measured).

With `lsb_first` every number in the world (operands, running totals, answers) is written least-significant digit
first: "Q: 72+18=" asks for 27+81 and "801" answers it. Each digit of a sum then depends only on digits already
written, which is what makes addition learnable for a tiny plain transformer in a few hundred SFT steps (the known
trick DEMO_WORLD.md points to; written most-significant first, the demo's base policy did not learn 3-digit sums in
600 steps). Reference answers are written the same way, so the ordinary numeric verifier scores them unchanged.

The train/held-out partition is a hash of the problem's operand multiset, so a problem and its reorderings always land
on the same side, in every run and every process.
"""

import dataclasses
import hashlib
from typing import Literal

import numpy as np

Difficulty = Literal["easy", "hard"]
Split = Literal["train", "held_out"]
DIFFICULTIES: tuple[Difficulty, ...] = ("easy", "hard")
SPLITS: tuple[Split, ...] = ("train", "held_out")
SCRATCHPAD_FORMATS = ("running_totals", "with_rest")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One sum: `operands` in order, the exact `answer`, a run-independent `id`, its difficulty and notation."""

  operands: tuple[int, ...]
  answer: int
  id: str
  difficulty: Difficulty
  lsb_first: bool = False


def _check_range(name: str, bounds: tuple[int, int], lowest: int) -> None:
  if len(bounds) != 2 or not all(isinstance(b, int) for b in bounds):
    raise ValueError(f"WorldConfig.{name} must be a (min, max) pair of ints, got {bounds!r}")
  if not lowest <= bounds[0] <= bounds[1]:
    raise ValueError(f"WorldConfig.{name} must satisfy {lowest} <= min <= max, got {bounds!r}")


def smallest_operand(digits: int) -> int:
  return 10 ** (digits - 1)


def largest_operand(digits: int) -> int:
  return 10**digits - 1


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """Operand-count and digit ranges (inclusive) per difficulty, and the share of problems held out for evaluation."""

  easy_operands: tuple[int, int] = (2, 2)
  easy_digits: tuple[int, int] = (2, 3)
  hard_operands: tuple[int, int] = (4, 6)
  hard_digits: tuple[int, int] = (2, 2)
  held_out_fraction: float = 0.1
  lsb_first: bool = False  # numbers written least-significant digit first (module docstring)
  # Easy problems shaped like one scratchpad step: a running total (easy_digits) plus one hard-size operand
  # (hard_digits). Far fewer distinct sums than two easy_digits operands, so the tiny policy masters them sooner.
  easy_as_step: bool = False
  # How a scratchpad is written (see `scratchpad`): "running_totals" ("2+1=3, 3+1=4, 4+5=9") or "with_rest"
  # ("2+1=3 [1+5], 3+1=4 [5], 4+5=9": every step also lists the operands still to add).
  scratchpad_format: str = "running_totals"

  def __post_init__(self):
    for name in ("easy_operands", "easy_digits", "hard_operands", "hard_digits"):
      object.__setattr__(self, name, tuple(getattr(self, name)))  # ConfigDicts hand over lists
    _check_range("easy_operands", self.easy_operands, 2)
    _check_range("hard_operands", self.hard_operands, 2)
    _check_range("easy_digits", self.easy_digits, 1)
    _check_range("hard_digits", self.hard_digits, 1)
    if self.easy_operands[0] != 2:
      raise ValueError(f"WorldConfig.easy_operands must start at 2 (scratchpad steps are 2-operand sums), "
                       f"got {self.easy_operands}")
    if self.hard_operands[0] <= self.easy_operands[1]:
      raise ValueError(f"WorldConfig.hard_operands {self.hard_operands} must all exceed easy_operands "
                       f"{self.easy_operands}")
    if self.easy_digits[0] > self.hard_digits[0]:
      raise ValueError(f"WorldConfig.easy_digits {self.easy_digits} must reach down to the smallest hard operand "
                       f"(hard_digits {self.hard_digits})")
    top_running_total = (self.hard_operands[1] - 1) * largest_operand(self.hard_digits[1])
    if largest_operand(self.easy_digits[1]) < top_running_total:
      raise ValueError(f"WorldConfig.easy_digits {self.easy_digits} cannot cover hard running totals up to "
                       f"{top_running_total}; raise easy_digits or lower hard_operands/hard_digits")
    _check_choice("WorldConfig.scratchpad_format", self.scratchpad_format, SCRATCHPAD_FORMATS)
    if not 0.0 < self.held_out_fraction < 1.0:
      raise ValueError(f"WorldConfig.held_out_fraction must be in (0, 1), got {self.held_out_fraction}")

  def operand_range(self, difficulty: Difficulty) -> tuple[int, int]:
    return _pick(difficulty, self.easy_operands, self.hard_operands)

  def digit_range(self, difficulty: Difficulty) -> tuple[int, int]:
    return _pick(difficulty, self.easy_digits, self.hard_digits)

  def answer_range(self, difficulty: Difficulty) -> tuple[int, int]:
    """Smallest and largest possible answer of a problem of this difficulty."""
    if difficulty == "easy" and self.easy_as_step:
      return (smallest_operand(self.easy_digits[0]) + smallest_operand(self.hard_digits[0]),
              largest_operand(self.easy_digits[1]) + largest_operand(self.hard_digits[1]))
    (fewest, most), (shortest, longest) = self.operand_range(difficulty), self.digit_range(difficulty)
    return fewest * smallest_operand(shortest), most * largest_operand(longest)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _pick(difficulty: Difficulty, easy, hard):
  _check_choice("difficulty", difficulty, DIFFICULTIES)
  return easy if difficulty == "easy" else hard


def problem_id(operands: tuple[int, ...]) -> str:
  return "add:" + "+".join(map(str, operands))


def make_problem(operands: tuple[int, ...], difficulty: Difficulty, lsb_first: bool = False) -> Problem:
  return Problem(tuple(operands), sum(operands), problem_id(operands), difficulty, lsb_first)


def split_of(operands: tuple[int, ...], cfg: WorldConfig) -> Split:
  """The partition a problem belongs to; sorting first keeps reorderings of one sum on the same side."""
  key = "+".join(map(str, sorted(operands))).encode()
  unit = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2.0**64
  return "held_out" if unit < cfg.held_out_fraction else "train"


def _draw_digits(cfg: WorldConfig, difficulty: Difficulty, rng: np.random.Generator) -> np.ndarray:
  """Digit count of each operand."""
  if difficulty == "easy" and cfg.easy_as_step:
    return np.asarray([rng.integers(cfg.easy_digits[0], cfg.easy_digits[1] + 1),
                       rng.integers(cfg.hard_digits[0], cfg.hard_digits[1] + 1)])
  fewest, most = cfg.operand_range(difficulty)
  shortest, longest = cfg.digit_range(difficulty)
  return rng.integers(shortest, longest + 1, size=int(rng.integers(fewest, most + 1)))


def _draw_operands(cfg: WorldConfig, difficulty: Difficulty, rng: np.random.Generator) -> tuple[int, ...]:
  digits = _draw_digits(cfg, difficulty, rng)
  # Uniform digit count first, then a uniform value of that length, so short operands are not swamped by long ones.
  return tuple(int(rng.integers(smallest_operand(d), largest_operand(d) + 1)) for d in digits)


def draw_problem(cfg: WorldConfig, difficulty: Difficulty, rng: np.random.Generator,
                 split: Split = "train") -> Problem:
  """One random problem of `difficulty` from `split` (rejection sampling on the hash partition)."""
  _check_choice("split", split, SPLITS)
  while True:
    operands = _draw_operands(cfg, difficulty, rng)
    if split_of(operands, cfg) == split:
      return make_problem(operands, difficulty, cfg.lsb_first)


def sample_problems(cfg: WorldConfig, difficulty: Difficulty, n: int, seed: int,
                    split: Split = "train") -> list[Problem]:
  """`n` distinct problems of `difficulty` from `split`, the same list for the same arguments."""
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  _check_choice("difficulty", difficulty, DIFFICULTIES)
  _check_choice("split", split, SPLITS)
  rng = np.random.default_rng([seed, DIFFICULTIES.index(difficulty), SPLITS.index(split)])
  problems: dict[str, Problem] = {}
  for _ in range(20 * n + 1000):
    if len(problems) == n:
      break
    problem = draw_problem(cfg, difficulty, rng, split)
    problems.setdefault(problem.id, problem)
  if len(problems) < n:
    raise ValueError(f"found only {len(problems)} distinct {difficulty} {split} problems, {n} requested; "
                     f"widen the world's operand/digit ranges")
  return list(problems.values())


def held_out_splits(cfg: WorldConfig, n_easy: int, n_hard: int, seed: int) -> tuple[list[Problem], list[Problem]]:
  """(easy, hard) evaluation problems, all from the held-out partition, so never among any training sample."""
  return (sample_problems(cfg, "easy", n_easy, seed, "held_out"),
          sample_problems(cfg, "hard", n_hard, seed, "held_out"))


def write_number(value: int, lsb_first: bool) -> str:
  return str(value)[::-1] if lsb_first else str(value)


def question_text(problem: Problem) -> str:
  return "Q: " + "+".join(write_number(x, problem.lsb_first) for x in problem.operands) + "="


def answer_sentence(value: int, lsb_first: bool = False) -> str:
  return f" The answer is {write_number(value, lsb_first)}"


def direct_answer(problem: Problem) -> str:
  return answer_sentence(problem.answer, problem.lsb_first)


def scratchpad(problem: Problem, fmt: str = "running_totals") -> str:
  """The worked solution, then the answer sentence (so the answer is the last number), in one of two formats.

  "running_totals": one 2-operand sum per step, " 2+1=3, 3+1=4, 4+5=9." Each step must fetch the next operand from
  the question by its index, a lookup the demo's tiny plain transformer got wrong on most hard sums.
  "with_rest": each step also lists the operands still to add, " 2+1=3 [1+5], 3+1=4 [5], 4+5=9." The next operand
  is then the first number in the brackets just written, and every sum sits right after its two addends, so no step
  needs a lookup by position or an addition at a distance.
  """
  _check_choice("scratchpad format", fmt, SCRATCHPAD_FORMATS)

  def num(value: int) -> str:
    return write_number(value, problem.lsb_first)

  total, steps = problem.operands[0], []
  for i, operand in enumerate(problem.operands[1:], start=2):
    step = f"{num(total)}+{num(operand)}={num(total + operand)}"
    rest = problem.operands[i:]
    if fmt == "with_rest" and rest:
      step += " [" + "+".join(map(num, rest)) + "]"
    steps.append(step)
    total += operand
  return " " + ", ".join(steps) + "." + answer_sentence(total, problem.lsb_first)


def to_records(problems: list[Problem]) -> list[dict[str, str]]:
  """JSONL-style rows; answers are strings, as in real math datasets."""
  return [{"id": p.id, "question": question_text(p), "answer": write_number(p.answer, p.lsb_first)} for p in problems]
