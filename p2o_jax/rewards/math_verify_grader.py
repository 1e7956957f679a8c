"""The `math` reward on Hugging Face's math-verify: 1.0 iff the final answer equals the reference, else 0.0.

    math_verify_reward(response, reference, fallback="none") -> float     (a VerifierPool score_fn)
    reference_parses(reference) -> bool                                    (lets `prepare` skip unusable rows)

Pipeline. The answer is found by our own `extract_answer` (last \\boxed{}, else `####`, else the fallback; linear time,
only the tail of the response is scanned), so math-verify never runs its regexes over a whole response. The answer
and the reference each go through math-verify's LaTeX path only, exactly as `math_verify.parse` treats a
`\\boxed{...}` match with `LatexExtractionConfig()` (normalize_latex with boxed="last", then latex2sympy, then the
last `=`-part if the whole does not parse), and the two sympy values are compared by `math_verify.verify(gold,
prediction)`. Answers longer than MAX_ANSWER_CHARS score 0 unparsed. A reference that does not parse scores 0.

Six deliberate departures from stock math-verify, each fixing a wrong verdict found in benchmarks/grader_agreement.py:
- Numbers are exact. A written decimal is the rational it spells (0.5 = 1/2, 123456800.0 = 123456800), built by
  `_exact_number` below instead of latex2sympy's `sympy.Number(text)`. Stock math-verify rounds floats to 6 decimal
  places before comparing, so it scores 0.1234564 vs 0.1234561 and 0.0000001 vs 0.0000002 as equal.
  A bare decimal answer (one decimal literal, possibly a percentage) against an exact value no decimal can spell (1/3,
  sqrt(2), pi) is then judged by the rule shared with our own grader, `equivalence.decimal_matches`: correctly rounded
  at its last stated digit and within 1e-6 relative, so 0.3333333 = 1/3 but 0.333 != 1/3 and 3.14 != pi.
- Odd roots of negative numbers are real: \\sqrt[3]{-8} = -2 (stock math-verify keeps sympy's principal complex root
  and scores it 0 against -2).
- Digits separated only by spacing: latex2sympy reads `1\\,000` and `3 000` as the product 1*0 = 0 (so both
  scored 1 against 0) and `2 3` as 5. A whole answer of 3-digit groups separated by spacing is one number
  (`1\\,000` = `1 000` = 1000, as our grader reads a thin space); any other digit-space-digit does not parse.
- Two plain numbers that math-verify calls equal must also be proven equal (simplify, or a minimal polynomial, as in
  our grader): its numeric test evaluates to 15 digits and chops, so it scored pi + 10^-50 = pi.
- Huge values do not parse: a power tower higher than math_parse.MAX_POWER_TOWER (exp counts as a level) or a
  numeric exponent above math_parse.MAX_EXPONENT, the same limits as our own parser. Stock math-verify builds
  9^{9^{9^9}} unevaluated and then spends its whole timeout evaluating it.
- No string fallback: values that do not parse never match, not even as identical text.

Security: model output never reaches eval/exec, sympy's `parse_expr` or `sympify` on a string. Audited for math-verify
0.8.0 / latex2sympy2_extended 1.10.2 (pinned together by math-verify), by grepping both for parse_expr, sympify,
eval, exec, lambdify and getattr:
- `math_verify.parser.parse_expr` is reached only through `ExprExtractionConfig` (extract_expr); we never call
  `math_verify.parse` at all, so no extraction config is ever used.
- latex2sympy builds every value from the ANTLR parse tree with sympy constructors (Symbol, Add, Mul, Pow, Function
  with a name, Matrix, Interval, ...). Its only string-to-sympy conversions are `sympy.Number(text)` for number tokens
  (in `parse_number` and `convert_number`; sympy.Number on a str calls sympify, which calls parse_expr). Both are
  overridden in `_ExactNumberConverter`, which accepts only `digits[.digits][e[+-]digits]` and builds
  Integer/Rational itself.
- latex2sympy's `parse_expr` in `_Latex2Sympy.__init__` runs only on `variable_values`, which we never pass.
- The remaining `sympify` calls (latex2sympy_extended/sets.py, logic.py) receive sympy objects, for which sympify is
  the identity. `\\gcd`/`\\lcm` arguments pass through sympy.nsimplify, which may sympify a formula string that
  mpmath.identify composed from a number and sympy's own constant names; no input text reaches it.
- math_verify.grader works on the sympy objects only (simplify, solve, evalf, str comparisons of symbol names).
tests/test_math_verify_grader.py replaces parse_expr and sympify with functions that raise and checks that LaTeX
answers still grade correctly.

Install. pyproject.toml asks for math-verify>=0.8,<0.9, which pins latex2sympy2_extended==1.10.2, which asks for
antlr4-python3-runtime>=4.9.3,<=4.13.2, so a fresh `pip install -e .` gets 4.13.2. Its generated parser imports
only under 4.9.3, 4.11.x or 4.13.2 (another version fails at import, in the pool's startup check). math-verify's
`antlr4-13-2` extra would pin it, but it asks latex2sympy2_extended for an extra spelled `antlr4_13_2`, which pip
does not find (a warning, no pin), so it is not used.

Timeouts. math-verify's own timeouts (signal.alarm) are switched off (timeout_seconds=None): they raise in any
thread but the main one, and an inner alarm(0) would cancel an outer alarm. The real bound is the verifier pool's
per-item timeout (SIGKILL of the worker). Pool workers call us in their main thread, so there we arm one soft
deadline of our own, SOFT_TIMEOUT_S for the whole item (ITIMER_REAL, only if no other real-time timer is pending):
a slow sympy comparison then scores 0 without costing a worker restart. It cannot interrupt one long C-level call (a
huge integer power), which the pool's kill still covers; off the main thread no soft deadline is armed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import signal
import threading

import sympy
from latex2sympy2_extended.latex2sympy2 import ConversionConfig, _Latex2Sympy, comma_number_regex
from latex2sympy2_extended.math_normalization import normalize_latex
from math_verify import LatexExtractionConfig, verify
from math_verify.grader import should_treat_as_complex
from math_verify.parser import get_last_eq

from p2o_jax.rewards.equivalence import decimal_matches, proven_equal
from p2o_jax.rewards.extract import extract_answer
from p2o_jax.rewards.math_parse import MAX_EXPONENT, MAX_POWER_TOWER

MAX_ANSWER_CHARS = 1_000
MAX_NUMBER_CHARS = 400  # digits in one number token; int() itself refuses more than 4300
MAX_DECIMAL_EXPONENT = 400  # |e| in 1.5e<e>
SOFT_TIMEOUT_S = 4.0  # below VerifierPool's default timeout_s=5.0

# What math_verify.parse applies to a `\boxed{...}` match under LatexExtractionConfig().
_NORMALIZATION = dataclasses.replace(LatexExtractionConfig().normalization_config, boxed="last")
_NUMBER_RE = re.compile(r"(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?")
_SPACING = r"(?:\s|\\[,;:! ]|~|\\q?quad(?![A-Za-z]))+"
_SPACED_THOUSANDS_RE = re.compile(rf"-?\d{{1,3}}(?:{_SPACING}\d{{3}})+(?:\.\d+)?")
_SPACED_DIGITS_RE = re.compile(rf"\d{_SPACING}\.?\d")


class _Deadline(BaseException):
  """The soft deadline passed; a BaseException so that math-verify's and sympy's `except Exception` let it through."""


class _DropTimeoutDisabledWarning(logging.Filter):
  """verify(timeout_seconds=None) warns once per process that timeouts are off; that is our documented choice."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Timeout is disabled")


logging.getLogger("math_verify.grader").addFilter(_DropTimeoutDisabledWarning())


@dataclasses.dataclass(frozen=True)
class _Parsed:
  value: sympy.Basic | sympy.MatrixBase
  decimal_places: tuple[int, ...]  # one entry per decimal literal in the answer: digits after its point (1.5e3: -2)


def math_verify_reward(response: str, reference: str, fallback: str = "none") -> float:
  """1.0 iff the final answer extracted from `response` equals `reference` (math-verify), else 0.0."""
  answer = extract_answer(response, fallback)
  if answer is None:
    return 0.0
  try:
    with _soft_deadline(SOFT_TIMEOUT_S):
      return 1.0 if _answers_match(answer, reference) else 0.0
  except _Deadline:
    return 0.0


def reference_parses(reference: str) -> bool:
  """Whether math-verify parses this reference answer; rows where it does not can never score 1."""
  try:
    with _soft_deadline(SOFT_TIMEOUT_S):
      return _parse(reference) is not None
  except _Deadline:
    return False


def _answers_match(answer: str, reference: str) -> bool:
  gold = _parse(reference)
  if gold is None:
    return False
  prediction = _parse(answer)
  if prediction is None:
    return False
  if verify(gold.value, prediction.value, timeout_seconds=None):
    return _confirmed(gold.value, prediction.value)
  return _bare_decimal_match(gold, prediction) or _bare_decimal_match(prediction, gold)


def _confirmed(gold, prediction) -> bool:
  """A `verify` verdict of equal, re-checked exactly when both sides are plain numbers (see the docstring)."""
  a, b = _number_value(gold), _number_value(prediction)
  if a is None or b is None or a == b:
    return True
  try:
    return proven_equal(a, b)
  except Exception:  # noqa: BLE001 - sympy failing to decide is not a proof
    return False


def _parse(answer: str) -> _Parsed | None:
  """math-verify's LaTeX parse of one answer, with exact numbers; None when it does not parse."""
  if not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
    return None
  if _SPACED_THOUSANDS_RE.fullmatch(answer.strip()):
    answer = re.sub(_SPACING, "", answer)
  elif _SPACED_DIGITS_RE.search(answer):
    return None
  try:
    latex = normalize_latex("\\boxed{" + answer + "}", _NORMALIZATION)
  except Exception:
    return None
  candidates = [latex] + ([get_last_eq(latex)] if get_last_eq(latex) != latex else [])
  for candidate in candidates:
    if not candidate:
      continue
    converter = _ExactNumberConverter(is_real=not should_treat_as_complex(candidate))
    try:
      value = converter.parse(candidate)
    except Exception:  # noqa: BLE001 - any failure on untrusted input means "does not parse"
      continue
    if value is None:
      continue
    try:
      if _too_large(value):
        return None
      value = _real_odd_roots(value)
    except Exception:  # noqa: BLE001
      return None
    return _Parsed(value, tuple(converter.decimal_places))
  return None


class _ExactNumberConverter(_Latex2Sympy):
  """latex2sympy's converter with its two `sympy.Number(text)` calls (sympify on a string) replaced."""

  def __init__(self, is_real: bool | None):
    super().__init__(variable_values=None, is_real=is_real, convert_degrees=False, config=ConversionConfig())
    self.decimal_places: list[int] = []

  def parse(self, latex_str: str):
    # The base class turns a whole-answer `1,234` (or `0,5`, a decimal comma) into a number with convert_number.
    if comma_number_regex.match(latex_str):
      text = latex_str.strip()
      text = text.replace(",", ".") if text.lstrip("-").startswith("0") else text.replace(",", "")
      negative = text.startswith("-")
      value = self._exact_number(text.lstrip("-"))
      return -value if negative else value
    return super().parse(latex_str)

  def parse_number(self, text: str):
    return self._exact_number(text.replace(",", ""))

  def _exact_number(self, text: str) -> sympy.Rational:
    text = text.replace(" ", "")
    match = _NUMBER_RE.fullmatch(text)
    if match is None or len(text) > MAX_NUMBER_CHARS or not any(ch.isdigit() for ch in text):
      raise ValueError("not a plain number")
    whole, fraction, exponent = match.group(1), match.group(2) or "", match.group(3)
    power = int(exponent) if exponent else 0
    if abs(power) > MAX_DECIMAL_EXPONENT:
      raise ValueError("decimal exponent too large")
    value = sympy.Rational(int(whole + fraction or "0"), 10 ** len(fraction)) * sympy.Rational(10) ** power
    if match.group(2) is not None or exponent:
      self.decimal_places.append(len(fraction) - power)
    return value


def _too_large(value) -> bool:
  """A power tower higher than MAX_POWER_TOWER, or a numeric exponent (or exp argument) above MAX_EXPONENT."""
  if not isinstance(value, sympy.Basic):
    return False
  if _tower_height(value) > MAX_POWER_TOWER:
    return True
  for node in sympy.preorder_traversal(value):
    exponent = node.exp if isinstance(node, sympy.Pow) else node.args[0] if isinstance(node, sympy.exp) else None
    if exponent is not None and exponent.is_number and not abs(exponent.evalf(15)) <= MAX_EXPONENT:
      return True
  return False


def _tower_height(expr) -> int:
  if isinstance(expr, sympy.Pow):
    return max(_tower_height(expr.base), 1 + _tower_height(expr.exp))
  if isinstance(expr, sympy.exp):
    return 1 + _tower_height(expr.args[0])
  return max((_tower_height(arg) for arg in getattr(expr, "args", ()) if isinstance(arg, sympy.Basic)), default=0)


def _real_odd_roots(value):
  """(-8)^(1/3) -> -2: an odd root of a negative number is the real one."""

  def is_negative_odd_root(expr) -> bool:
    return (
      isinstance(expr, sympy.Pow)
      and expr.exp.is_Rational
      and expr.exp.q % 2 == 1
      and expr.exp.q > 1
      and expr.base.is_number
      and bool(expr.base.is_extended_negative)
    )

  def real_root(expr):
    return sympy.Integer(-1) ** expr.exp.p * sympy.Pow(-expr.base, expr.exp)

  if not isinstance(value, sympy.Basic) or not value.has(sympy.Pow):
    return value
  return value.replace(is_negative_odd_root, real_root)


def _bare_decimal_match(decimal: _Parsed, exact: _Parsed) -> bool:
  """`decimal` is one decimal literal (or that percentage) and `exact` a number without decimals: the shared rule."""
  if len(decimal.decimal_places) != 1 or exact.decimal_places:
    return False
  value, other = _number_value(decimal.value), _number_value(exact.value)
  if value is None or other is None or not value.is_Rational:
    return False
  places = decimal.decimal_places[0]
  if _is_percentage(decimal.value):
    places += 2
  return decimal_matches(value, places, other)


def _number_value(value) -> sympy.Expr | None:
  if not isinstance(value, sympy.Expr) or value.free_symbols:
    return None
  try:
    value = value.doit()
  except Exception:
    return None
  return value if value.is_number else None


def _is_percentage(value) -> bool:
  return isinstance(value, sympy.Mul) and len(value.args) == 2 and value.args[1] == sympy.Rational(1, 100)


class _soft_deadline:  # noqa: N801 - used as a context manager, reads like contextlib's
  """Raise _Deadline in the main thread after `seconds`; a no-op elsewhere or when a real-time timer is in use."""

  def __init__(self, seconds: float):
    self._seconds = seconds
    self._armed = False
    self._previous_handler = None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_REAL)[0] > 0:
      return self
    self._previous_handler = signal.signal(signal.SIGALRM, _raise_deadline) or signal.SIG_DFL
    signal.setitimer(signal.ITIMER_REAL, self._seconds)
    self._armed = True
    return self

  def __exit__(self, *exc_info):
    if self._armed:
      signal.setitimer(signal.ITIMER_REAL, 0)
      signal.signal(signal.SIGALRM, self._previous_handler)
    return False


def _raise_deadline(signum, frame):
  raise _Deadline()
