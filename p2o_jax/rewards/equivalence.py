"""Decide whether a predicted answer equals the reference answer, and turn that into the 0/1 math reward.

Runs inside a verifier worker (pool.py): it may be slow on adversarial input, and the pool's timeout bounds that.
Order of checks: normalized strings equal; else parse both (math_parse) and compare by kind:
- numbers: exact when both are rational; otherwise numerically, with relative tolerance REL_TOL when a decimal is
  involved (0.5 = 1/2, 3.14 != pi) and at 40 digits when both are exact (2*sqrt(2) = sqrt(8));
- expressions with variables: equal values at a few fixed points, then simplify(a - b) == 0 (the values alone
  decide when decimals are involved, since those need not cancel symbolically);
- tuples element-wise in order; intervals by endpoints and openness (a 2-tuple (a, b) matches the open interval);
  sets and interval unions order-free; a one-element set matches its element.
Percentages: `p%` matches both p/100 and p against a plain reference (the % read as a unit), so 10% = 0.1 = 10;
two percentages compare by value (10% != 0.1%).
The reference is expected to be a clean answer string (no \\boxed, no `####`).
"""

from __future__ import annotations

import sympy

from p2o_jax.rewards.extract import extract_answer
from p2o_jax.rewards.math_parse import ParseError, ParsedAnswer, parse_answer

REL_TOL = 1e-6
EXACT_REL_TOL = 1e-20
EVAL_DIGITS = 40
_NUM_SAMPLE_POINTS = 3
_TEXT_NOISE = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "$")
_INFINITIES = (sympy.oo, -sympy.oo, sympy.zoo)


def math_reward(response: str, reference: str, fallback: str = "none") -> float:
  """1.0 iff the final answer extracted from `response` equals `reference`, else 0.0."""
  answer = extract_answer(response, fallback)
  return 1.0 if answer is not None and answers_match(answer, reference) else 0.0


def answers_match(prediction: str, reference: str) -> bool:
  """Whether two answer strings are mathematically equal; unparseable answers only match as identical text."""
  normalized = _normalized_text(prediction)
  if normalized and normalized == _normalized_text(reference):
    return True
  try:
    predicted, expected = parse_answer(prediction), parse_answer(reference)
  except ParseError:
    return False
  return any(values_match(a, b) for a, b in _percent_readings(predicted, expected))


def values_match(a: sympy.Basic, b: sympy.Basic) -> bool:
  """Equality of two parsed values, by kind (see the module docstring)."""
  if a == b:
    return True
  if isinstance(a, sympy.Expr) and isinstance(b, sympy.Expr):
    return _scalars_match(a, b)
  if isinstance(a, sympy.Tuple) and isinstance(b, sympy.Tuple):
    return len(a) == len(b) and all(map(values_match, a, b))
  a_interval, b_interval = _interval_parts(a), _interval_parts(b)
  if a_interval and b_interval:
    same_openness = a_interval[2:] == b_interval[2:]
    return same_openness and all(map(_scalars_match, a_interval[:2], b_interval[:2]))
  if isinstance(a, (sympy.FiniteSet, sympy.Union)) and type(a) is type(b):
    return _unordered_match(a.args, b.args)
  if isinstance(a, sympy.FiniteSet) and len(a) == 1:
    return values_match(a.args[0], b)
  if isinstance(b, sympy.FiniteSet) and len(b) == 1:
    return values_match(a, b.args[0])
  return False


def _normalized_text(answer: str) -> str:
  text = "".join(answer.split())
  for noise in _TEXT_NOISE:
    text = text.replace(noise, "")
  for variant in ("\\dfrac", "\\tfrac"):
    text = text.replace(variant, "\\frac")
  if text.startswith("\\text{") and text.endswith("}"):
    text = text[len("\\text{") : -1]
  return text.rstrip(".")


def _percent_readings(predicted: ParsedAnswer, expected: ParsedAnswer) -> list[tuple[sympy.Basic, sympy.Basic]]:
  readings = [(predicted.value, expected.value)]
  hundred = sympy.Integer(100)
  if predicted.is_percent and not expected.is_percent:
    readings.append((sympy.Mul(predicted.value, hundred), expected.value))
  elif expected.is_percent and not predicted.is_percent:
    readings.append((predicted.value, sympy.Mul(expected.value, hundred)))
  return readings


def _interval_parts(value: sympy.Basic) -> tuple[sympy.Expr, sympy.Expr, bool, bool] | None:
  if isinstance(value, sympy.Interval):
    return value.start, value.end, bool(value.left_open), bool(value.right_open)
  if isinstance(value, sympy.Tuple) and len(value) == 2:
    return value[0], value[1], True, True
  return None


def _unordered_match(a_items: tuple[sympy.Basic, ...], b_items: tuple[sympy.Basic, ...]) -> bool:
  """Greedy matching: every item of a pairs with a distinct equal item of b."""
  if len(a_items) != len(b_items):
    return False
  unmatched = list(b_items)
  for item in a_items:
    partner = next((other for other in unmatched if values_match(item, other)), None)
    if partner is None:
      return False
    unmatched.remove(partner)
  return True


def _scalars_match(a: sympy.Expr, b: sympy.Expr) -> bool:
  if a == b:
    return True
  if a.free_symbols or b.free_symbols:
    return _symbolic_match(a, b)
  if (a.is_Rational and b.is_Rational) or a.has(*_INFINITIES) or b.has(*_INFINITIES):
    return False
  if a.has(sympy.Float) or b.has(sympy.Float):
    return _numerically_close(a, b, REL_TOL)
  # Exact constants agree to 40 digits only if they are equal; the floor of 1 lets a true zero written as a sum of
  # radicals (which evaluates to ~1e-40, not 0) still equal 0.
  return _numerically_close(a, b, EXACT_REL_TOL, min_scale=1)


def _symbolic_match(a: sympy.Expr, b: sympy.Expr) -> bool:
  # Values at a few fixed points first: cheap, and it rejects unequal pairs such as (x+1)^900 vs (x+1)^899 that
  # simplify would try to expand for a long time.
  if not _agree_at_sample_points(a, b):
    return False
  # Decimal coefficients (0.5x vs x/2) need not cancel symbolically; agreeing values are the test for them.
  if a.has(sympy.Float) or b.has(sympy.Float):
    return True
  return sympy.simplify(sympy.Add(a, sympy.Mul(sympy.Integer(-1), b))) == 0


def _agree_at_sample_points(a: sympy.Expr, b: sympy.Expr) -> bool:
  symbols = sorted(a.free_symbols | b.free_symbols, key=str)
  for point in range(_NUM_SAMPLE_POINTS):
    # Positive, non-integer and distinct per symbol, so that a singularity like 1/(x-1) is not hit by accident.
    values = {symbol: sympy.Rational(1237 + 1000 * point + 291 * k, 997) for k, symbol in enumerate(symbols)}
    if not _numerically_close(a.xreplace(values), b.xreplace(values), REL_TOL):
      return False
  return True


def _numerically_close(a: sympy.Expr, b: sympy.Expr, rel_tol: float, min_scale: int = 0) -> bool:
  """|a - b| <= rel_tol * max(|a|, |b|, min_scale), evaluated at EVAL_DIGITS digits; infinities and nan never match."""
  values = (a.evalf(EVAL_DIGITS), b.evalf(EVAL_DIGITS))
  if not all(value.is_number and value.is_finite for value in values):
    return False
  a_value, b_value = values
  try:
    return bool(abs(a_value - b_value) <= rel_tol * max(abs(a_value), abs(b_value), sympy.Integer(min_scale)))
  except TypeError:  # a comparison that does not evaluate to true or false
    return False
