"""Agreement of our own grader (`equivalence`) with the math-verify reward (`math`), on hand-labelled answer pairs.

    python -m benchmarks.grader_agreement

Prints, as markdown tables:
(a) the known false positives (wrong answers one grader once scored 1) with every grader's score; all must be 0;
(b) the pair table of p2o_jax/rewards/grader_cases.py (equivalent and non-equivalent forms by category) with the hand
    label, math-verify's judgment (our wrapper, math_verify_grader.math_verify_reward), ours
    (equivalence.math_reward) and stock math-verify (`parse` with LatexExtractionConfig and `verify`, for reference),
    then the share of pairs where ours agrees with math-verify and each grader's accuracy against the hand labels,
    overall and per category;
(c) integer answers as on the built-in arithmetic task: agreement and time per item of both graders.
Every answer is given to the graders as a response ending in \\boxed{answer}. Runs in-process, a few seconds.
"""

from __future__ import annotations

import collections
import logging
import random
import time
from collections.abc import Callable, Sequence

from benchmarks.common import markdown_table
from p2o_jax.rewards import grader_cases
from p2o_jax.rewards.equivalence import math_reward
from p2o_jax.rewards.math_verify_grader import math_verify_reward

Grader = Callable[[str, str], float]


def _response(answer: str) -> str:
  return f"... so the answer is \\boxed{{{answer}}}."


def ours(prediction: str, reference: str) -> float:
  return math_reward(_response(prediction), reference)


def math_verify(prediction: str, reference: str) -> float:
  return math_verify_reward(_response(prediction), reference)


def stock_math_verify(prediction: str, reference: str) -> float | None:
  """Stock math-verify on the boxed answer (LaTeX extraction only; no parse_expr). None for the huge inputs it would
  spend its whole timeout on."""
  from math_verify import LatexExtractionConfig, parse, verify

  if any(marker in prediction for marker in ("9^{9^", "\\exp(\\exp(\\exp")):
    return None
  config = [LatexExtractionConfig()]
  gold = parse(_response(reference), extraction_config=config, parsing_timeout=None)
  predicted = parse(_response(prediction), extraction_config=config, parsing_timeout=None)
  return float(verify(gold, predicted, timeout_seconds=None))


def _fmt(value: float | None) -> str:
  return "-" if value is None else str(int(value))


def _tex(text: str) -> str:
  return "`" + text.replace("|", "\\|") + "`"


def false_positive_table(cases: Sequence[grader_cases.Case]) -> str:
  rows = []
  for case in cases:
    start = time.perf_counter()
    scores = (math_verify(case.prediction, case.reference), ours(case.prediction, case.reference))
    seconds = time.perf_counter() - start
    rows.append([_tex(case.prediction), _tex(case.reference), *map(_fmt, scores),
                 _fmt(stock_math_verify(case.prediction, case.reference)), f"{seconds:.2f}", case.note])
  return markdown_table(["prediction", "reference", "math-verify", "ours", "stock math-verify", "s (both)", "note"],
                        rows)


def pair_tables(cases: Sequence[grader_cases.Case]) -> tuple[str, str]:
  rows, by_category = [], collections.defaultdict(list)
  for case in cases:
    mv, own, stock = (math_verify(case.prediction, case.reference), ours(case.prediction, case.reference),
                      stock_math_verify(case.prediction, case.reference))
    by_category[case.category].append((case.equal, mv, own, stock))
    rows.append([case.category, _tex(case.prediction), _tex(case.reference), str(int(case.equal)), _fmt(mv),
                 _fmt(own), _fmt(stock), "" if mv == own else "differs"])
  pairs = markdown_table(["category", "prediction", "reference", "hand label", "math-verify", "ours",
                          "stock math-verify", ""], rows)
  summary_rows = [_summary_row(category, results) for category, results in by_category.items()]
  summary_rows.append(_summary_row("**all**", [r for results in by_category.values() for r in results]))
  summary = markdown_table(["category", "pairs", "ours agrees with math-verify", "math-verify correct",
                            "ours correct", "stock math-verify correct"], summary_rows)
  return pairs, summary


def _summary_row(category: str, results: list) -> list[str]:
  n = len(results)

  def share(count: int) -> str:
    return f"{count}/{n} ({100 * count / n:.0f}%)"

  return [category, str(n), share(sum(mv == own for _, mv, own, _ in results)),
          share(sum(mv == label for label, mv, _, _ in results)),
          share(sum(own == label for label, _, own, _ in results)),
          share(sum(stock == label for label, _, _, stock in results))]


def integer_sweep(n: int = 300, seed: int = 0) -> str:
  """Integer references as on the built-in task, answered right (in several spellings) or off by a little."""
  rng = random.Random(seed)
  items = []
  for _ in range(n):
    value = rng.randint(-999, 99_999)
    form = rng.choice(["{v}", "{v:,}", "{v}.0", "{v} + 0", "{w}", "{w:,}"])
    items.append((form.format(v=value, w=value + rng.choice([-10, -1, 1, 10])), str(value)))
  rows = []
  for name, grader in (("math-verify", math_verify), ("ours", ours)):
    start = time.perf_counter()
    scores = [grader(prediction, reference) for prediction, reference in items]
    rows.append((name, scores, (time.perf_counter() - start) / n * 1e3))
  agree = sum(a == b for a, b in zip(rows[0][1], rows[1][1]))
  return markdown_table(["grader", "items", "scored 1", "agrees with the other", "ms per item"],
                        [[name, n, int(sum(scores)), f"{agree}/{n}", f"{ms:.2f}"] for name, scores, ms in rows])


def main() -> None:
  logging.getLogger("math_verify").setLevel(logging.ERROR)  # stock parse/verify warn that their timeouts are off
  print("## (a) Known false positives: every grader must score 0 (and the right answers next to them 1)\n")
  print(false_positive_table(grader_cases.FALSE_POSITIVES + grader_cases.RIGHT_ANSWERS))
  print("\n## (b) Hand-labelled pairs\n")
  pairs, summary = pair_tables(grader_cases.PAIRS)
  print(pairs)
  print("\n### Agreement with math-verify and accuracy against the hand labels\n")
  print(summary)
  print("\nmath-verify's known misses (pinned in tests/test_math_verify_grader.py):")
  for (prediction, reference), why in grader_cases.MATH_VERIFY_KNOWN_MISSES.items():
    print(f"- `{prediction}` vs `{reference}`: {why}")
  print("\n## (c) Integer answers (the built-in arithmetic task's kind)\n")
  print(integer_sweep())


if __name__ == "__main__":
  main()
