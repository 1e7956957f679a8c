"""Answer extraction, the safe parser and answer equivalence against hand-checked cases."""

import time

import pytest
import sympy

from p2o_jax.rewards import extract
from p2o_jax.rewards.equivalence import answers_match, math_reward
from p2o_jax.rewards.extract import extract_answer
from p2o_jax.rewards.math_parse import MAX_INPUT_CHARS, ParseError, parse_answer

# (prediction, reference, equal?) — each checked by hand.
EQUIVALENCE_TABLE = [
  # numbers: integers, decimals, thousands separators, fractions
  ("42", "42", True),
  ("-7", "-7.0", True),
  ("0.5", "1/2", True),
  ("\\frac{1}{2}", "0.5", True),
  ("\\dfrac{3}{4}", "\\tfrac34", True),
  ("\\frac12", "2/4", True),
  ("1,000", "1000", True),
  ("1{,}234{,}567", "1234567", True),
  ("1\\,000", "1000", True),
  ("0.3333", "\\frac{1}{3}", False),  # 1e-4 relative error
  ("0.33333333", "\\frac{1}{3}", True),  # 1e-8 relative error, inside 1e-6
  ("2", "3", False),
  ("1/3", "0.333", False),
  ("12", "21", False),
  # a decimal is the rational it spells; a bare one matches 1/3 or sqrt(2) only correctly rounded at its last digit
  ("123456800.0", "123456789", False),  # within 1e-6 relative, but wrong in the digits it states
  ("123456789.0", "123456789", True),
  ("0.1234564", "0.1234561", False),  # two decimals compare exactly
  ("1.234568", "1.2345675", False),  # a reference that is a terminating decimal must be written exactly
  ("0.333", "\\frac{1}{3}", False),  # correctly rounded, but 1e-3 relative error
  ("1.4142136", "\\sqrt{2}", True),  # sqrt(2) = 1.41421356...: rounded at the 7th place
  ("1.4142135", "\\sqrt{2}", False),  # truncated: 6.2e-8 off, more than half a unit (5e-8) of the 7th place
  ("33.333333\\%", "\\frac{1}{3}", True),  # 0.33333333, 8 places
  # mixed numbers: an integer directly before a fraction of integers
  ("2\\frac{1}{4}", "\\frac{1}{2}", False),  # not the product 2 * 1/4
  ("2\\frac{1}{4}", "\\frac{9}{4}", True),
  ("-2\\frac{1}{4}", "-2.25", True),
  ("2\\frac12", "2.5", True),
  ("2\\frac{x}{4}", "\\frac{x}{2}", True),  # not integers: a product
  # exact constants must be proven equal, not just agree numerically
  ("\\pi \\cdot 10^{-30}", "0", False),
  ("\\pi + 10^{-50}", "\\pi", False),
  ("\\sqrt[3]{-8}", "-2", True),  # the real cube root
  ("\\sqrt[3]{-27}", "3", False),
  # radicals, pi, powers, implicit multiplication
  ("2\\sqrt{2}", "\\sqrt{8}", True),
  ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", True),
  ("\\sqrt[3]{27}", "3", True),
  ("\\sqrt{2}+\\sqrt{3}", "\\sqrt{5+2\\sqrt{6}}", True),
  ("\\sqrt{2}", "1.41421356237", True),
  ("\\sqrt{2}", "1.414", False),
  ("3.14", "\\pi", False),
  ("3.14159265359", "\\pi", True),
  ("2\\pi", "\\pi \\cdot 2", True),
  ("2^{10}", "1024", True),
  ("2**10", "2^10", True),
  ("3 \\times 4", "12", True),
  ("-2^2", "-4", True),
  ("\\left(\\frac{1}{2}\\right)^{2}", "0.25", True),
  # symbolic expressions
  ("x^2+2x+1", "(x+1)^2", True),
  ("x^2+1", "(x+1)^2", False),
  ("0.5x", "\\frac{x}{2}", True),
  ("0.5x + 10^{-9}", "\\frac{x}{2}", False),  # agrees at every sample point to 1e-9; simplify decides
  ("2a+b", "b+2a", True),
  ("x", "y", False),
  ("\\frac{x^2-1}{x-1}", "x+1", True),
  ("\\sqrt{x^2}", "x", False),  # not for negative x
  ("(x+1)^{900}", "(x+1)^{899}", False),  # rejected by values at sample points before simplify could expand it
  ("3+4i", "4i+3", True),
  ("e^{i\\pi}", "-1", True),
  ("\\ln 8", "3\\ln 2", True),
  # equations, units, decorations
  ("x = 5", "5", True),
  ("y=2x+3", "3+2x", True),
  ("x = 1 \\text{ or } x = 2", "2", False),  # hedging over two values is not an answer
  ("5 \\text{ cm}", "5", True),
  ("12 apples", "12", True),
  ("\\$5.00", "5", True),
  ("90^\\circ", "90", True),
  ("\\text{(C)}", "(C)", True),
  ("\\boxed{7}", "7", True),
  # percentages: p% matches p/100 and p against a plain reference; two percentages compare by value
  ("50\\%", "\\frac{1}{2}", True),
  ("50\\%", "50", True),
  ("10%", "0.1", True),
  ("10%", "0.01", False),
  ("10%", "0.1%", False),
  ("25", "25\\%", True),
  # infinity and intervals
  ("\\infty", "\\infty", True),
  ("-\\infty", "\\infty", False),
  ("[1,2)", "[1,2]", False),
  ("[1, 2)", "\\left[1,2\\right)", True),
  ("(0.5, 1]", "(\\frac12, 1]", True),
  ("(-\\infty, 3)", "(-\\infty,3)", True),
  ("(-\\infty, 0) \\cup (1, \\infty)", "(1,\\infty) \\cup (-\\infty,0)", True),
  ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty, 0] \\cup (1, \\infty)", False),
  ("x \\in [0, 1]", "[0,1]", True),
  # tuples, sets, lists
  ("(1,2)", "(2,1)", False),
  ("(1, 2)", "\\left( 1, 2 \\right)", True),
  ("(1,2)", "(1,2,3)", False),
  ("\\{1,2\\}", "\\{2,1\\}", True),
  ("\\{1,2\\}", "\\{1,3\\}", False),
  ("1, 2, 3", "\\{3, 2, 1\\}", True),
  ("3, 1, 2", "1, 2, 3", True),
  ("\\{2\\}", "2", True),
  ("\\{1,2\\}", "2", False),
  ("(1,2)", "\\{1,2\\}", False),
  # unparseable text only matches itself
  ("\\text{yes}", "\\text{yes}", True),
  ("\\operatorname{foo}", "3", False),
]


@pytest.mark.parametrize("prediction,reference,expected", EQUIVALENCE_TABLE)
def test_equivalence_table(prediction, reference, expected):
  assert answers_match(prediction, reference) is expected
  assert answers_match(reference, prediction) is expected  # the relation is symmetric


def test_table_is_large_and_balanced():
  outcomes = [expected for _, _, expected in EQUIVALENCE_TABLE]
  assert len(EQUIVALENCE_TABLE) >= 40 and outcomes.count(False) >= 15


# --- extraction ---
@pytest.mark.parametrize(
  "text,expected",
  [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{\\left(2\\right)}}", "\\frac{\\sqrt{3}}{\\left(2\\right)}"),  # nested braces
    ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last box wins
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close the box
    ("$\\boxed 5$", "5"),
    ("\\fbox{12}", "12"),
    ("\\boxed{7} and a truncated \\boxed{\\frac{1", "7"),  # an unclosed last box falls back to the one before
    ("\\boxed{ }", None),  # an empty box is no answer
    ("\\boxedx{3}", None),  # another macro, not \boxed
    ("Natalia sold 48 clips.\n#### 72\n", "72"),
    ("#### 1 \n then #### 2", "2"),
    ("no answer here 17", None),
  ],
)
def test_extract_answer(text, expected):
  assert extract_answer(text) == expected


@pytest.mark.parametrize(
  "text,expected",
  [
    ("it costs 12 then 15 dollars", "15"),
    ("total: 1,234,567 items", "1234567"),
    ("temperature fell to -3.5 today", "-3.5"),
    ("3-5 days", "5"),  # a minus after a digit is subtraction, not a sign
    ("nothing numeric", None),
    ("\\boxed{9} beats the last number 10", "9"),
  ],
)
def test_last_number_fallback(text, expected):
  assert extract_answer(text, fallback="last_number") == expected


def test_unknown_fallback_is_named():
  with pytest.raises(ValueError, match="last_word"):
    extract_answer("\\boxed{1}", fallback="last_word")


def test_only_the_tail_of_a_long_response_is_scanned():
  filler = "x" * extract.MAX_SCAN_CHARS
  assert extract_answer("\\boxed{5}" + filler) is None
  assert extract_answer(filler * 50 + "\\boxed{5}") == "5"


def test_math_reward_extracts_then_matches():
  assert math_reward("... so \\boxed{\\dfrac{1}{2}}", "0.5") == 1.0
  assert math_reward("... so \\boxed{\\dfrac{1}{3}}", "0.5") == 0.0
  assert math_reward("the answer is 0.5", "1/2") == 0.0
  assert math_reward("the answer is 0.5", "1/2", fallback="last_number") == 1.0
  assert math_reward("\\boxed{\\def\\x{1}\\x}", "1") == 0.0  # ParseError scores 0


# --- the parser builds sympy objects itself ---
def test_parser_values_and_kinds():
  x = sympy.Symbol("x")
  assert parse_answer("\\frac{3}{6}").value == sympy.Rational(1, 2)
  assert parse_answer("2x^2").value == 2 * x**2
  assert parse_answer("x_{12}").value == sympy.Symbol("x_12")
  assert parse_answer("[1, 2)").value == sympy.Interval.Ropen(1, 2)
  assert parse_answer("(1, 2)").value == sympy.Tuple(1, 2)
  assert parse_answer("\\{3, 1\\}").value == sympy.FiniteSet(1, 3)
  assert parse_answer("\\log_2 8").value == 3
  percent = parse_answer("12.5\\%")
  assert percent.is_percent and abs(percent.value - sympy.Rational(1, 8)) < 1e-15


@pytest.mark.parametrize(
  "text,reason",
  [
    ("\\def\\a{\\a\\a}\\a", "\\\\def"),
    ("\\newcommand{\\x}{1}", "\\\\newcommand"),
    ("__import__('os').system('true')", "character"),
    ("10**10**10", "exponent"),
    ("2^{20000}", "exponent"),
    ("9^{9^{9^9}}", "tower"),
    ("\\exp(\\exp(\\exp(100)))", "tower"),
    ("e^{\\exp(\\exp(x))}", "tower"),
    ("\\exp(\\exp(100))", "exponent"),
    ("2\\frac{5}{4}", "ambiguous"),
    ("(2^{5000})^{5000}", "too large"),
    ("(2^{5000}x)^{10000}", "too large"),  # (c*x)^n would expand c^n eagerly
    ("(" * 100 + "1" + ")" * 100, "nested"),
    ("{" * 300 + "1" + "}" * 300, "nested"),
    ("\\sqrt" * 60 + "{2}", "nested"),
    ("1" * (MAX_INPUT_CHARS + 1), "characters"),
    ("+".join(["1"] * 300), "tokens"),
    ("\\frac{1}{0}", "division by zero"),
    ("1 2", "unexpected"),  # adjacent numbers are ambiguous
    ("(1,2) + 1", "arithmetic"),
    ("[2, 1]", "interval"),
    ("\\text{only words}", "empty"),
  ],
)
def test_parser_refusals(text, reason):
  with pytest.raises(ParseError, match=reason):
    parse_answer(text)


@pytest.mark.parametrize(
  "answer", ["\\exp(\\exp(\\exp(100)))", "\\exp(\\exp(\\exp(\\exp(x))))", "e^{e^{e^{100}}}", "\\exp(10^{9})"]
)
def test_huge_exponentials_are_refused_at_once(answer):
  start = time.monotonic()
  assert math_reward(f"\\boxed{{{answer}}}", "1") == 0.0
  assert time.monotonic() - start < 1.0  # refused by the parser, not left to the pool's timeout


def test_decimals_are_exact_and_counted():
  parsed = parse_answer("0.50")
  assert parsed.value == sympy.Rational(1, 2) and parsed.decimal_places == (2,)
  assert parse_answer("1.5x + 2.25").decimal_places == (1, 2)
  assert parse_answer("123456800.0").value == 123456800


def test_parse_error_is_a_value_error():
  assert issubclass(ParseError, ValueError)
