"""Decide whether a predicted answer equals the reference answer, and turn that into the 0/1 math reward.

Runs inside a verifier worker (pool.py): it may be slow on adversarial input, and the pool's timeout bounds that.
Order of checks: normalized strings equal; else parse both (math_parse) and compare by kind:
- numbers: every written decimal is the exact rational it spells (math_parse), so 0.5 = 1/2 and 123456800.0 !=
  123456789. Two rationals compare exactly. Other exact constants must agree to 40 digits relative to the largest
  term (a cheap rejection) and then be proven equal: simplify(a - b) == 0, or for algebraic numbers a minimal
  polynomial t (2*sqrt(2) = sqrt(8), sqrt(2) + sqrt(3) = sqrt(5 + 2 sqrt(6)); pi != pi + 10^-50);
- the decimal rule, for an answer that is one bare decimal (or that percentage) against an exact number without
  decimals (`decimal_matches`): a decimal that states k digits after its point matches a value v iff
  |d - v| <= 10^-k / 2 (v rounds to d at d's last stated digit) and |d - v| <= REL_TOL * |v| (at least ~7
  significant digits), and a v with a terminating decimal expansion (an integer, 1/8) must equal d exactly. So
  0.33333333 = 1/3 and 1.41421356237 = sqrt(2), but 0.333 != 1/3, 3.14 != pi, 123456800.0 != 123456789 and
  1.234568 != 1.2345675. Decimals inside larger expressions, tuples, sets and intervals only compare exactly;
- expressions with variables: values at a few fixed points as a cheap rejection, then simplify(a - b) == 0 always
  decides (0.5x + 10^-9 != x/2 though they agree at every sample point to 1e-6);
- tuples element-wise in order; intervals by endpoints and openness (a 2-tuple (a, b) matches the open interval);
  sets and interval unions order-free; a one-element set matches its element.
Percentages: `p%` matches both p/100 and p against a plain reference (the % read as a unit), so 10% = 0.1 = 10;
two percentages compare by value (10% != 0.1%).
The reference is expected to be a clean answer string (no \\boxed, no `####`).

What this grader is for, now that math-verify is the `math` reward (p2o_jax/rewards/math_verify_grader.py): the
optional `equivalence` reward, `p2o_jax.rewards.equivalence:math_reward`. Measured by `python -m
benchmarks.grader_agreement` on the 72 hand-labelled pairs of p2o_jax/rewards/grader_cases.py: it agrees with
math-verify on 62/72 and is right on 64/72 (math-verify 70/72). It is better where the answer is plain text rather
than LaTeX: `p%` against a plain reference (50% = 50, which math-verify scores 0) and plain-text powers (`2**10`,
which math-verify could read only through sympy's parse_expr, never allowed here). It is worse on what math-verify's
larger grammar covers and ours refuses: matrices (`pmatrix` vs `bmatrix`, or entries written differently), `\\pm`,
an equation with its sides swapped (`y = 2x + 3` vs `2x + 3 = y`), a unit with a power (`6\\text{ m}^2`) and a
choice in `\\text{(B)}`. On integer answers (the built-in arithmetic task) the two agree on all 300 benchmark items
and ours is faster per item. Both score every known false positive 0. Use it for plain-text answers, or as a
small grader whose whole input language is listed above; otherwise use `math`.
"""

from __future__ import annotations

import sympy

from p2o_jax.rewards.extract import extract_answer
from p2o_jax.rewards.math_parse import ParseError, ParsedAnswer, parse_answer

REL_TOL = 1e-6
EXACT_REL_TOL = 1e-20
EVAL_DIGITS = 40
_ALGEBRAIC_VARIABLE = sympy.Dummy("t")
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
  for (a, a_places), (b, b_places) in _percent_readings(predicted, expected):
    if values_match(a, b) or _bare_decimal_match(a, a_places, b, b_places):
      return True
    if _bare_decimal_match(b, b_places, a, a_places):
      return True
  return False


def decimal_matches(decimal: sympy.Rational, places: int, exact: sympy.Expr) -> bool:
  """The decimal rule (module docstring): does the decimal `decimal`, written with `places` digits after its point,
  equal the exact number `exact`? Shared with math_verify_grader."""
  if decimal == exact:
    return True
  if not (isinstance(exact, sympy.Expr) and exact.is_number) or exact.has(*_INFINITIES, sympy.nan):
    return False
  if exact.is_Rational and _terminates(exact):
    return False  # a value a decimal can spell must be spelled exactly
  digits = max(EVAL_DIGITS, places + EVAL_DIGITS // 2)
  try:
    difference, magnitude = abs((exact - decimal).evalf(digits)), abs(exact.evalf(digits))
    if not (difference.is_number and difference.is_finite and magnitude.is_number and magnitude.is_finite):
      return False
    half_unit = sympy.Rational(1, 2) * sympy.Rational(10) ** -places
    return bool(difference <= half_unit) and bool(difference <= REL_TOL * magnitude)
  except TypeError:  # a comparison that does not evaluate to true or false
    return False


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


_Reading = tuple[sympy.Basic, int | None]  # a value, and the places of its one bare decimal (None if it is not one)


def _percent_readings(predicted: ParsedAnswer, expected: ParsedAnswer) -> list[tuple[_Reading, _Reading]]:
  a, b = _bare_decimal_places(predicted), _bare_decimal_places(expected)
  readings = [((predicted.value, a), (expected.value, b))]
  hundred = sympy.Integer(100)
  if predicted.is_percent and not expected.is_percent:
    readings.append(((sympy.Mul(predicted.value, hundred), _shift(a, -2)), (expected.value, b)))
  elif expected.is_percent and not predicted.is_percent:
    readings.append(((predicted.value, a), (sympy.Mul(expected.value, hundred), _shift(b, -2))))
  return readings


def _bare_decimal_places(parsed: ParsedAnswer) -> int | None:
  """Digits after the point of the answer's value when the answer is one decimal literal (percentages: +2)."""
  if len(parsed.decimal_places) != 1 or not parsed.value.is_Rational:
    return None
  return parsed.decimal_places[0] + (2 if parsed.is_percent else 0)


def _shift(places: int | None, by: int) -> int | None:
  return None if places is None else places + by


def _bare_decimal_match(a: sympy.Basic, a_places: int | None, b: sympy.Basic, b_places: int | None) -> bool:
  """a is a bare decimal and b an exact number written without decimals."""
  if a_places is None or b_places is not None or not isinstance(b, sympy.Expr) or b.free_symbols:
    return False
  return decimal_matches(a, a_places, b)


def _terminates(value: sympy.Rational) -> bool:
  """Whether the rational has a finite decimal expansion (its denominator is 2^i 5^j)."""
  q = int(value.q)
  for prime in (2, 5):
    while q % prime == 0:
      q //= prime
  return q == 1


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
  # 40 digits relative to the largest term, so that a true zero written as a sum of radicals (which evaluates to
  # ~1e-40, not 0) passes while pi * 10^-30 != 0; agreeing digits only let the proof run, they prove nothing.
  if not _numerically_close(a, b, EXACT_REL_TOL, min_scale=_largest_term(a, b)):
    return False
  return proven_equal(a, b)


def _largest_term(*values: sympy.Expr) -> sympy.Expr:
  terms = [term for value in values for term in sympy.Add.make_args(value)]
  return max((abs(term.evalf(EVAL_DIGITS)) for term in terms), default=sympy.Integer(0))


def proven_equal(a: sympy.Expr, b: sympy.Expr) -> bool:
  """simplify(a - b) == 0, or for algebraic numbers a minimal polynomial of t (sympy proves both exactly); shared
  with math_verify_grader."""
  difference = sympy.simplify(sympy.Add(a, sympy.Mul(sympy.Integer(-1), b)))
  if difference == 0:
    return True
  if difference.free_symbols or not difference.is_algebraic:
    return False
  try:
    return sympy.minimal_polynomial(difference, _ALGEBRAIC_VARIABLE) == _ALGEBRAIC_VARIABLE
  except (NotImplementedError, ValueError, TypeError):
    return False


def _symbolic_match(a: sympy.Expr, b: sympy.Expr) -> bool:
  # Values at a few fixed points first: cheap, and it rejects unequal pairs such as (x+1)^900 vs (x+1)^899 that
  # simplify would try to expand for a long time.
  if not _agree_at_sample_points(a, b):
    return False
  # Decimals are exact rationals (math_parse), so 0.5x - x/2 cancels, and 0.5x + 10^-9 - x/2 does not.
  return sympy.simplify(sympy.Add(a, sympy.Mul(sympy.Integer(-1), b))) == 0


def _agree_at_sample_points(a: sympy.Expr, b: sympy.Expr) -> bool:
  symbols = sorted(a.free_symbols | b.free_symbols, key=str)
  for point in range(_NUM_SAMPLE_POINTS):
    # Positive, non-integer and distinct per symbol, so that a singularity like 1/(x-1) is not hit by accident.
    values = {symbol: sympy.Rational(1237 + 1000 * point + 291 * k, 997) for k, symbol in enumerate(symbols)}
    if not _numerically_close(a.xreplace(values), b.xreplace(values), REL_TOL):
      return False
  return True


def _numerically_close(a: sympy.Expr, b: sympy.Expr, rel_tol: float, min_scale: sympy.Expr | int = 0) -> bool:
  """|a - b| <= rel_tol * max(|a|, |b|, min_scale), evaluated at EVAL_DIGITS digits; infinities and nan never match."""
  values = (a.evalf(EVAL_DIGITS), b.evalf(EVAL_DIGITS))
  if not all(value.is_number and value.is_finite for value in values):
    return False
  a_value, b_value = values
  try:
    scale = max(abs(a_value), abs(b_value), sympy.Integer(min_scale) if isinstance(min_scale, int) else min_scale)
    return bool(abs(a_value - b_value) <= rel_tol * scale)
  except TypeError:  # a comparison that does not evaluate to true or false
    return False
