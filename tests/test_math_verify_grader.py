"""The math-verify reward against hand-checked cases, untrusted input, and inside the verifier pool."""

import pathlib
import time

import numpy as np
import pytest
import sympy
import sympy.parsing.sympy_parser

from p2o_jax.rewards import grader_cases, math_verify_grader
from p2o_jax.rewards.equivalence import answers_match
from p2o_jax.rewards.functions import RewardFunction
from p2o_jax.rewards.math_verify_grader import math_verify_reward, reference_parses
from p2o_jax.rewards.pool import VerifierPool

SCORE_FN = "p2o_jax.rewards.math_verify_grader:math_verify_reward"
PWNED = pathlib.Path("/tmp/p2o_pwned_math_verify")


def boxed(answer: str) -> str:
  return f"Let's think step by step. ... so the answer is \\boxed{{{answer}}}."


# (response, reference, reward) — each checked by hand.
REWARD_TABLE = [
  (boxed("\\frac{1}{2}"), "0.5", 1.0),
  (boxed("\\frac{1}{3}"), "0.5", 0.0),
  (boxed("42"), "42", 1.0),
  (boxed("41"), "42", 0.0),
  (boxed("-7"), "-7", 1.0),
  (boxed("7"), "-7", 0.0),
  (boxed("2\\sqrt{2}"), "\\sqrt{8}", 1.0),
  (boxed("x^2+2x+1"), "(x+1)^2", 1.0),
  (boxed("x^2+1"), "(x+1)^2", 0.0),
  (boxed("[1,2)"), "[1,2)", 1.0),
  (boxed("[1,2)"), "[1,2]", 0.0),
  ("first \\boxed{3}, then corrected: \\boxed{4}", "4", 1.0),  # the last box counts
  ("first \\boxed{4}, then corrected: \\boxed{3}", "4", 0.0),
  ("\\boxed{\\boxed{5}}", "5", 1.0),
  ("the answer is 5", "5", 0.0),  # no box, fallback "none": no answer
  ("Natalia sold 48 clips.\n#### 72", "72", 1.0),  # GSM8K-style `####`
  ("", "5", 0.0),
  (boxed(""), "5", 0.0),
  (boxed("5"), "", 0.0),
]


@pytest.mark.parametrize("response,reference,reward", REWARD_TABLE)
def test_reward_table(response, reference, reward):
  assert math_verify_reward(response, reference) == reward


def test_last_number_fallback():
  assert math_verify_reward("the answer is 5", "5", fallback="last_number") == 1.0
  assert math_verify_reward("the answer is 6", "5", fallback="last_number") == 0.0


@pytest.mark.parametrize("case", grader_cases.FALSE_POSITIVES, ids=lambda c: c.prediction)
def test_known_false_positives_score_zero_under_both_graders(case):
  start = time.monotonic()
  assert math_verify_reward(boxed(case.prediction), case.reference) == 0.0
  assert answers_match(case.prediction, case.reference) is False
  assert time.monotonic() - start < 1.0  # refused, not timed out


@pytest.mark.parametrize("case", grader_cases.RIGHT_ANSWERS, ids=lambda c: c.prediction)
def test_the_right_answers_next_to_them_score_one(case):
  assert math_verify_reward(boxed(case.prediction), case.reference) == 1.0
  assert answers_match(case.prediction, case.reference) is True


@pytest.mark.parametrize("case", grader_cases.PAIRS, ids=lambda c: f"{c.category}:{c.prediction}|{c.reference}")
def test_hand_labelled_pairs(case):
  reward = math_verify_reward(boxed(case.prediction), case.reference)
  if (case.prediction, case.reference) in grader_cases.MATH_VERIFY_KNOWN_MISSES:
    assert case.equal and reward == 0.0  # a documented miss of a right answer, never a wrong answer scored 1
  else:
    assert reward == float(case.equal)


def test_known_misses_are_in_the_table():
  pairs = {(case.prediction, case.reference) for case in grader_cases.PAIRS}
  assert set(grader_cases.MATH_VERIFY_KNOWN_MISSES) <= pairs


def test_decimals_follow_the_shared_rule():
  assert math_verify_reward(boxed("1.41421356237"), "\\sqrt{2}") == 1.0  # correctly rounded, 12 digits
  # sqrt(2) = 1.41421356...: to 7 places it rounds to 1.4142136; the truncation 1.4142135 is 6.2e-8 off (> 5e-8).
  assert math_verify_reward(boxed("1.4142136"), "\\sqrt{2}") == 1.0
  assert math_verify_reward(boxed("1.4142135"), "\\sqrt{2}") == 0.0
  assert math_verify_reward(boxed("3.14159265359"), "\\pi") == 1.0
  assert math_verify_reward(boxed("33.333333\\%"), "\\frac{1}{3}") == 1.0  # 0.33333333: 8 places
  assert math_verify_reward(boxed("123456789.0"), "123456789") == 1.0
  assert math_verify_reward(boxed("2.5"), "2.50") == 1.0
  assert math_verify_reward(boxed("1,234,567"), "1234567") == 1.0
  assert math_verify_reward(boxed("1 000 000"), "1000000") == 1.0  # spaced thousands are one number


def test_reference_parses():
  assert reference_parses("\\frac{1}{2}")
  assert reference_parses("(-\\infty, 3]")
  assert reference_parses("72")
  assert not reference_parses("")
  assert not reference_parses("\\frac{1}{")
  assert not reference_parses("9^{9^{9^{9}}}")
  assert not reference_parses("3 000 and 4")  # digits separated by a space are ambiguous
  assert not reference_parses("x" * (math_verify_grader.MAX_ANSWER_CHARS + 1))
  assert math_verify_reward(boxed("5"), "\\frac{1}{") == 0.0  # an unparsable reference scores 0


UNTRUSTED = [
  "\\boxed{__import__('os').system('touch /tmp/p2o_pwned_math_verify')}",
  "\\boxed{eval(\"__import__('os').system('touch /tmp/p2o_pwned_math_verify')\")}",
  "\\boxed{exec('import os')}",
  "\\boxed{9^{9^{9^{9}}}}",
  "\\boxed{10^{10^{10}}}",
  "\\boxed{\\exp(\\exp(\\exp(100)))}",
  "\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}",
  "\\boxed{" + "(" * 2000 + "1" + ")" * 2000 + "}",
  "\\boxed{1}" + "\\boxed{" * 100_000,  # 700 KB of unclosed boxes after a closed one
  "x" * 1_000_000 + "\\boxed{" + "9" * 500 + "}",
  "\\def\\a{\\a\\a}\\a \\boxed{\\def\\a{\\a\\a}\\a}",
]


@pytest.mark.parametrize("response", UNTRUSTED, ids=range(len(UNTRUSTED)))
def test_untrusted_input_scores_zero_quickly_and_runs_nothing(response):
  PWNED.unlink(missing_ok=True)
  start = time.monotonic()
  assert math_verify_reward(response, "1") == 0.0
  assert time.monotonic() - start < math_verify_grader.SOFT_TIMEOUT_S
  assert not PWNED.exists()


def test_never_parses_strings_with_sympy(monkeypatch):
  """With parse_expr and sympify unusable, LaTeX answers still grade correctly: nothing reaches them."""
  import importlib

  import latex2sympy2_extended.latex2sympy2
  import math_verify.parser

  sympify_module = importlib.import_module("sympy.core.sympify")  # the attribute of sympy.core is the function
  numbers_module = importlib.import_module("sympy.core.numbers")
  calls = []
  original_sympify = sympify_module.sympify

  def forbidden_parse_expr(*args, **kwargs):
    calls.append(args)
    raise AssertionError("parse_expr called")

  def guarded_sympify(a, *args, **kwargs):
    if isinstance(a, str):  # sympify on sympy objects is the identity and harmless; on text it would parse
      calls.append(a)
      raise AssertionError("sympify called on a string")
    return original_sympify(a, *args, **kwargs)

  monkeypatch.setattr(sympy.parsing.sympy_parser, "parse_expr", forbidden_parse_expr)
  monkeypatch.setattr(math_verify.parser, "parse_expr", forbidden_parse_expr)
  monkeypatch.setattr(latex2sympy2_extended.latex2sympy2, "parse_expr", forbidden_parse_expr)
  for module in (sympy, sympify_module, numbers_module):
    monkeypatch.setattr(module, "sympify", guarded_sympify)
  cases = [
    ("\\frac{1}{2}", "0.5", 1.0),
    ("12.5\\%", "\\frac{1}{8}", 1.0),
    ("1,234", "1234", 1.0),
    ("2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("x^2+2x+1", "(x+1)^2", 1.0),
    ("\\{1, 2\\}", "\\{2, 1\\}", 1.0),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", 1.0),
    ("0.3333333", "\\frac{1}{3}", 1.0),
    ("3", "4", 0.0),
    ("__import__('os')", "1", 0.0),
  ]
  for prediction, reference, reward in cases:
    assert math_verify_reward(boxed(prediction), reference) == reward, prediction
  assert calls == []


def test_soft_deadline_scores_zero_and_restores_the_timer(monkeypatch):
  import signal

  def slow(*args):
    time.sleep(5)
    return True

  monkeypatch.setattr(math_verify_grader, "SOFT_TIMEOUT_S", 0.2)
  monkeypatch.setattr(math_verify_grader, "_answers_match", slow)
  handler = signal.getsignal(signal.SIGALRM)
  start = time.monotonic()
  assert math_verify_reward(boxed("1"), "1") == 0.0
  assert time.monotonic() - start < 2.0
  assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
  assert signal.getsignal(signal.SIGALRM) == handler


def test_scores_a_batch_inside_the_verifier_pool():
  PWNED.unlink(missing_ok=True)
  responses = [boxed("\\frac{2}{4}"), boxed("3"), boxed("\\sqrt[3]{-8}"), boxed("2\\frac{1}{4}"), "no box",
               UNTRUSTED[0], UNTRUSTED[3], boxed("(-\\infty, 0) \\cup (1, \\infty)")]
  references = ["0.5", "4", "-2", "\\frac{9}{4}", "1", "1", "1", "(1,\\infty) \\cup (-\\infty,0)"]
  expected = [1, 0, 1, 1, 0, 0, 0, 1]
  functions = (RewardFunction("math_verify", SCORE_FN, grader=True),)
  with VerifierPool(num_workers=2, timeout_s=10.0, functions=functions) as pool:
    np.testing.assert_array_equal(pool.score(responses, references), expected)
    assert (pool.stats.scored, pool.stats.timeouts, pool.stats.errors) == (len(responses), 0, 0)
  with VerifierPool(num_workers=1, timeout_s=10.0, functions="math") as pool:  # the built-in name
    np.testing.assert_array_equal(pool.score(responses, references), expected)
  assert not PWNED.exists()
