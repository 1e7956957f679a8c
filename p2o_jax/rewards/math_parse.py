"""A small, safe recursive-descent parser from answer strings (plain text or LaTeX) to sympy objects.

Answers are untrusted model output, so nothing here calls eval/exec/sympify/parse_expr: every value is built with
sympy constructors from tokens we recognised ourselves, and anything unrecognised raises ParseError (scored 0).
Inputs are bounded in length, token count and nesting depth, and powers whose evaluation could explode are refused
before sympy builds them: `a^b` and `\\exp(b)` (and `e^b`) both count as a level of a power tower (at most
MAX_POWER_TOWER), and a numeric exponent or `\\exp` argument above MAX_EXPONENT in size is refused, so
`\\exp(\\exp(\\exp(100)))` fails at once instead of at the verifier pool's timeout.

Conventions (chosen for answer checking, not for typesetting):
- `1,234` is one number when the digits after every comma come in threes and it is outside brackets; `[0,100]` and
  `1, 234` are two values. A thin space or `{,}` between digit groups joins them too.
- `2^10` is 1024 (plain-text reading), `x^{10}` and `x**10` likewise; `\\frac12` is 1/2 as in TeX.
- A decimal is the exact rational it spells (0.5 = 1/2, 123456800.0 = 123456800); ParsedAnswer.decimal_places records
  how many digits each decimal literal states after its point, for the comparer's rule on bare decimals.
- An integer followed directly by a fraction of two integers is a mixed number: `2\\frac{1}{4}` = 9/4,
  `-2\\frac{1}{4}` = -9/4 (never the product 2/4). Only a proper fraction counts; `2\\frac{5}{4}` is refused.
- `\\sqrt[n]{a}` with odd n and a negative number a is the real root: `\\sqrt[3]{-8}` = -2.
- A trailing `%` is recorded in ParsedAnswer.is_percent and the value divided by 100; the comparer decides how a
  percentage matches (see equivalence.py).
- `\\ln` and a bare `\\log` are natural logarithms, `\\log_b x` has base b.
- `e` is Euler's number and `i` the imaginary unit; other single letters and Greek letters are symbols, `xy` is x*y.
- `x = 5` and `x \\in [1, 2)` give the right-hand side; only a single variable may stand on the left.
- `(a, b)` is a tuple; `[a, b]`, `[a, b)`, `(a, b]` are intervals (the comparer lets a 2-tuple match an open interval).
- A bare comma list `1, 2` is a FiniteSet (order-free, like `\\{1, 2\\}`).
- `\\text{...}`, `\\mathrm{...}`, `\\$`, degree marks and trailing words after a space (`5 cm`) are units and dropped.
"""

from __future__ import annotations

import dataclasses
import re

import sympy

MAX_INPUT_CHARS = 1_000
MAX_TOKENS = 400
MAX_DEPTH = 40  # brackets and nested atoms; keeps both our recursion and sympy's well inside Python's stack
MAX_EXPONENT = 10_000
MAX_POWER_BITS = 100_000  # rough size of an evaluated rational power: bits of its rational parts times |exponent|
MAX_POWER_TOWER = 2  # a^{b^c} is fine, a^{b^{c^d}} is refused
MAX_ROOT_INDEX = 100


class ParseError(ValueError):
  """The answer string is not something this parser accepts; it scores 0."""


@dataclasses.dataclass(frozen=True)
class ParsedAnswer:
  """A parsed answer: a sympy scalar, Tuple, Interval, Union or FiniteSet; percentages are already divided by 100."""

  value: sympy.Basic
  is_percent: bool = False
  decimal_places: tuple[int, ...] = ()  # per decimal literal, in order: digits stated after its point


@dataclasses.dataclass(frozen=True)
class _Token:
  kind: str  # num | letter | word | cmd | op | end
  text: str
  spaced: bool = False  # whitespace (or a dropped \text group) came right before it


_END = _Token("end", "")

_REPLACEMENTS = (
  ("\\!", ""), ("\\,", ""), ("{,}", ""), ("\\$", ""), ("$", ""), ("\\%", "%"),
  ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\degree", ""), ("°", ""),
  ("\\;", " "), ("\\:", " "), ("\\ ", " "), ("~", " "),
  ("π", "\\pi "), ("∞", "\\infty "), ("−", "-"), ("×", "\\times "), ("·", "\\cdot "), ("÷", "\\div "),
)  # fmt: skip
_TOKEN_RE = re.compile(
  r"(?P<space>\s+)|(?P<num>\d+(?:\.\d+)?|\.\d+)|(?P<cmd>\\(?:[A-Za-z]+|.))|(?P<word>[A-Za-z]+)"
  r"|(?P<op>\*\*|[-+*/^_=,()\[\]{}%])",
  re.DOTALL,
)
_GROUPED_NUMBER_RE = re.compile(r"\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?")
_OPENERS = frozenset({"(", "[", "{", "\\{"})
_CLOSERS = frozenset({")", "]", "}", "\\}"})

_FRACTIONS = frozenset({"frac", "dfrac", "tfrac", "cfrac"})
_FUNCTIONS = {"ln": sympy.log, "log": sympy.log, "exp": sympy.exp, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan}
_GREEK = frozenset(
  "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta kappa lambda mu nu xi rho sigma tau phi varphi "
  "chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split()
)
_LETTER_CONSTANTS = {"e": sympy.E, "i": sympy.I}
_COMMAND_CONSTANTS = {"pi": sympy.pi, "infty": sympy.oo}
_MULTIPLY_COMMANDS = frozenset({"cdot", "times"})
_OTHER_COMMANDS = frozenset({"sqrt", "div", "cup", "in"}) | _COMMAND_CONSTANTS.keys()
_BINARY_COMMANDS = _MULTIPLY_COMMANDS | {"div", "cup", "in"}
_IGNORED_COMMANDS = frozenset(
  "left right displaystyle textstyle quad qquad boxed mathbf textbf bf big Big bigl bigr Bigl Bigr".split()
)
_UNIT_GROUP_COMMANDS = frozenset("text textrm textnormal textup textit textsf mbox hbox mathrm".split())
_KNOWN_COMMANDS = _FRACTIONS | _FUNCTIONS.keys() | _GREEK | _MULTIPLY_COMMANDS | _OTHER_COMMANDS | {"{", "}"}
_NAMED_WORDS = {"pi": "pi", "sqrt": "sqrt", "inf": "infty", "infinity": "infty"} | {name: name for name in _FUNCTIONS}


def parse_answer(text: str) -> ParsedAnswer:
  """Parse one answer string; raises ParseError for anything unsupported, oversized or unsafe to build."""
  if len(text) > MAX_INPUT_CHARS:
    raise ParseError(f"answer longer than {MAX_INPUT_CHARS} characters")
  tokens = _tokenize(_normalize_spelling(text))
  is_percent = bool(tokens) and tokens[-1].text == "%"
  if is_percent:
    tokens.pop()
  if not tokens:
    raise ParseError("empty answer")
  parser = _Parser(tokens)
  try:
    value = parser.parse()
    if is_percent:
      value = _divide(value, sympy.Integer(100))
  except ParseError:
    raise
  except (TypeError, ValueError, ArithmeticError, RecursionError) as error:
    raise ParseError(f"sympy refused the value ({type(error).__name__})") from None
  if value.has(sympy.zoo, sympy.nan):
    raise ParseError("undefined value (division by zero or 0/0)")
  return ParsedAnswer(value, is_percent, tuple(parser.decimal_places))


def _normalize_spelling(text: str) -> str:
  for old, new in _REPLACEMENTS:
    text = text.replace(old, new)
  return text.strip().rstrip(".").strip()


def _tokenize(text: str) -> list[_Token]:
  """Tokens with units dropped and plain words split into letters; enforces the depth and token limits."""
  tokens: list[_Token] = []
  pos, depth, spaced = 0, 0, False
  while pos < len(text):
    grouped = _GROUPED_NUMBER_RE.match(text, pos) if depth == 0 else None
    match = grouped or _TOKEN_RE.match(text, pos)
    if match is None:
      raise ParseError(f"unexpected character {text[pos]!r}")
    pos = match.end()
    kind = "num" if grouped else match.lastgroup
    value = match.group().replace(",", "") if grouped else match.group()
    if kind == "space":
      spaced = True
      continue
    if kind == "cmd":
      name = value[1:]
      if name in _UNIT_GROUP_COMMANDS:
        pos, spaced = _skip_group(text, pos), True
        continue
      if name in _IGNORED_COMMANDS:
        if name in ("left", "right") and text.startswith(".", pos):
          pos += 1  # `\left.` is an invisible delimiter
        continue
      if name not in _KNOWN_COMMANDS:
        raise ParseError(f"unsupported LaTeX command \\{name}")
      kind, value = ("op", value) if name in "{}" else ("cmd", name)
    elif kind == "word" and value in _NAMED_WORDS:
      kind, value = "cmd", _NAMED_WORDS[value]
    depth += (value in _OPENERS) - (value in _CLOSERS) if kind == "op" else 0
    if depth > MAX_DEPTH:
      raise ParseError(f"brackets nested deeper than {MAX_DEPTH}")
    tokens.append(_Token(kind, value, spaced))
    spaced = False
    if len(tokens) > MAX_TOKENS:
      raise ParseError(f"answer longer than {MAX_TOKENS} tokens")
  return _split_words(_drop_trailing_units(tokens))


def _skip_group(text: str, pos: int) -> int:
  """Index just past the brace group starting at `pos` (after optional spaces)."""
  while pos < len(text) and text[pos].isspace():
    pos += 1
  if not text.startswith("{", pos):
    raise ParseError("\\text-like command without a {...} argument")
  depth = 0
  while pos < len(text):
    char = text[pos]
    pos += 2 if char == "\\" else 1
    depth += (char == "{") - (char == "}")
    if depth == 0:
      return pos
  raise ParseError("unbalanced braces in a \\text group")


def _drop_trailing_units(tokens: list[_Token]) -> list[_Token]:
  while len(tokens) > 1 and tokens[-1].kind == "word" and len(tokens[-1].text) > 1 and tokens[-1].spaced:
    tokens.pop()
  return tokens


def _split_words(tokens: list[_Token]) -> list[_Token]:
  """`xy` means x*y: a plain word becomes one letter token per character."""
  out: list[_Token] = []
  for token in tokens:
    if token.kind != "word":
      out.append(token)
      continue
    out.extend(_Token("letter", char, token.spaced and i == 0) for i, char in enumerate(token.text))
  return out


def _scalar(value: sympy.Basic) -> sympy.Expr:
  if not isinstance(value, sympy.Expr):
    raise ParseError("arithmetic on a tuple, interval or set")
  return value


def _divide(numerator: sympy.Basic, denominator: sympy.Basic) -> sympy.Expr:
  if _scalar(denominator).is_zero:
    raise ParseError("division by zero")
  return sympy.Mul(_scalar(numerator), sympy.Pow(denominator, -1))


def _rational_bits(value: sympy.Rational) -> int:
  return max(int(value.p).bit_length(), int(value.q).bit_length())


def _checked_power(base: sympy.Basic, exponent: sympy.Basic) -> sympy.Expr:
  """Pow(base, exponent), refused when sympy would evaluate it into something huge (it expands eagerly)."""
  base, exponent = _scalar(base), _scalar(exponent)
  if exponent.is_number:
    magnitude = abs(exponent.evalf(15))
    if not magnitude.is_finite or magnitude > MAX_EXPONENT:
      raise ParseError(f"exponent larger than {MAX_EXPONENT}")
    # (c*x)**n expands c**n eagerly, so every rational inside the base counts, not only a bare integer base.
    base_bits = sum(_rational_bits(atom) for atom in base.atoms(sympy.Rational))
    if base_bits * magnitude > MAX_POWER_BITS:
      raise ParseError("power too large to evaluate")
  return sympy.Pow(base, exponent)


def _number(text: str) -> sympy.Rational:
  """An integer or decimal token as the exact rational it spells: `0.50` is 1/2, `.25` is 1/4."""
  whole, _, fraction = text.partition(".")
  return sympy.Rational(int(whole + fraction or "0"), 10 ** len(fraction))


def _interval(start: sympy.Basic, end: sympy.Basic, left_open: bool, right_open: bool) -> sympy.Interval:
  interval = sympy.Interval(_scalar(start), _scalar(end), left_open, right_open)
  if not isinstance(interval, sympy.Interval):
    raise ParseError("empty or single-point interval")
  return interval


def _as_set(value: sympy.Basic) -> sympy.Set:
  """Operand of \\cup: a 2-tuple there can only be an open interval."""
  if isinstance(value, sympy.Tuple) and len(value) == 2:
    return _interval(value[0], value[1], True, True)
  if not isinstance(value, sympy.Set):
    raise ParseError("\\cup needs intervals or sets")
  return value


class _Parser:
  """Grammar (highest level first):
    answer  := item (',' item)*                  several items -> FiniteSet
    item    := [variable ('=' | '\\in')] union
    union   := expr ('\\cup' expr)*
    expr    := term (('+' | '-') term)*
    term    := signed (('*' | '/' | '\\cdot' | '\\times' | '\\div') signed | implicit factor)*
    signed  := ('+' | '-')* power
    power   := atom ['^' exponent]
    atom    := number | letter | greek | constant | function | \\frac | \\sqrt | brackets | {..} | \\{..\\}
  """

  def __init__(self, tokens: list[_Token]):
    self._tokens = tokens
    self._pos = 0
    self._depth = 0
    self._tower = 0
    self.decimal_places: list[int] = []

  def parse(self) -> sympy.Basic:
    items = [self._item()]
    while self._accept("op", ","):
      items.append(self._item())
    if self._peek() is not _END:
      raise ParseError(f"unexpected {self._peek().text!r}")
    return items[0] if len(items) == 1 else sympy.FiniteSet(*items)

  # --- token helpers ---
  def _peek(self) -> _Token:
    return self._tokens[self._pos] if self._pos < len(self._tokens) else _END

  def _advance(self) -> _Token:
    token = self._peek()
    self._pos += 1
    return token

  def _accept(self, kind: str, text: str) -> bool:
    token = self._peek()
    if token.kind == kind and token.text == text:
      self._pos += 1
      return True
    return False

  def _expect(self, kind: str, text: str) -> None:
    if not self._accept(kind, text):
      raise ParseError(f"expected {text!r}, found {self._peek().text or 'end of answer'!r}")

  # --- grammar ---
  def _item(self) -> sympy.Basic:
    start = self._pos
    if self._peek().kind == "letter" or (self._peek().kind == "cmd" and self._peek().text in _GREEK):
      self._advance()
      self._subscript()
      if self._accept("op", "=") or self._accept("cmd", "in"):
        return self._union()
    self._pos = start
    return self._union()

  def _union(self) -> sympy.Basic:
    parts = [self._expr()]
    while self._accept("cmd", "cup"):
      parts.append(self._expr())
    return parts[0] if len(parts) == 1 else sympy.Union(*(_as_set(part) for part in parts))

  def _expr(self) -> sympy.Basic:
    value = self._term()
    while self._peek().kind == "op" and self._peek().text in "+-":
      negate = self._advance().text == "-"
      right = _scalar(self._term())
      value = sympy.Add(_scalar(value), sympy.Mul(sympy.Integer(-1), right) if negate else right)
    return value

  def _term(self) -> sympy.Basic:
    start = self._pos
    value = self._signed()
    if self._is_integer_literal(start, self._pos) and self._mixed_fraction_ahead():
      fraction = self._atom()
      if not 0 < fraction < 1:
        raise ParseError("a whole number before an improper fraction is ambiguous")
      value = sympy.Add(value, -fraction if value.is_negative else fraction)
    while True:
      token = self._peek()
      if (token.kind, token.text) in (("op", "*"), ("cmd", "cdot"), ("cmd", "times")):
        self._advance()
        value = sympy.Mul(_scalar(value), _scalar(self._signed()))
      elif (token.kind, token.text) in (("op", "/"), ("cmd", "div")):
        self._advance()
        value = _divide(value, self._signed())
      elif self._starts_implicit_factor(token):
        value = sympy.Mul(_scalar(value), _scalar(self._power()))
      else:
        return value

  def _is_integer_literal(self, start: int, end: int) -> bool:
    """Tokens start..end are optional signs and then one integer (no decimal point)."""
    tokens = self._tokens[start:end]
    return (
      bool(tokens)
      and tokens[-1].kind == "num"
      and "." not in tokens[-1].text
      and all(token.kind == "op" and token.text in "+-" for token in tokens[:-1])
    )

  def _mixed_fraction_ahead(self) -> bool:
    """`\\frac{a}{b}` or `\\frac ab` with integer literals a and b comes next (and is not raised to a power)."""
    tokens = self._tokens[self._pos : self._pos + 8]
    if not tokens or tokens[0].kind != "cmd" or tokens[0].text not in _FRACTIONS:
      return False
    shape = [(token.kind, token.text if token.kind == "op" else "") for token in tokens[1:]]
    integers = [token for token in tokens[1:] if token.kind == "num"]
    if any("." in token.text for token in integers):
      return False
    braced = [("op", "{"), ("num", ""), ("op", "}"), ("op", "{"), ("num", ""), ("op", "}")]
    if shape[:6] == braced:
      following = tokens[7:8]
    elif shape[:1] == [("num", "")] and len(tokens[1].text) == 2:  # \frac12
      following = tokens[2:3]
    else:
      return False
    return not (following and following[0].text in ("^", "**"))

  @staticmethod
  def _starts_implicit_factor(token: _Token) -> bool:
    # A number never starts an implicit factor: "2 3" or "1 000" is ambiguous, so it stays an error.
    if token.kind == "letter":
      return True
    if token.kind == "op":
      return token.text in ("(", "{")
    return token.kind == "cmd" and token.text not in _BINARY_COMMANDS

  def _signed(self) -> sympy.Basic:
    negate = False
    while self._peek().kind == "op" and self._peek().text in "+-":
      negate ^= self._advance().text == "-"
    value = self._power()
    return sympy.Mul(sympy.Integer(-1), _scalar(value)) if negate else value

  def _power(self) -> sympy.Basic:
    base = self._atom()
    if not (self._accept("op", "^") or self._accept("op", "**")):
      return base
    self._tower += 1
    try:
      if self._tower > MAX_POWER_TOWER:
        raise ParseError(f"power tower higher than {MAX_POWER_TOWER}")
      exponent = self._group() if self._peek().text == "{" else self._signed()
    finally:
      self._tower -= 1
    return _checked_power(base, exponent)

  def _atom(self) -> sympy.Basic:
    self._depth += 1
    try:
      if self._depth > MAX_DEPTH:
        raise ParseError(f"answer nested deeper than {MAX_DEPTH}")
      return self._atom_at_depth()
    finally:
      self._depth -= 1

  def _atom_at_depth(self) -> sympy.Basic:
    token = self._advance()
    if token.kind == "num":
      if "." in token.text:
        self.decimal_places.append(len(token.text.partition(".")[2]))
      return _number(token.text)
    if token.kind == "letter":
      return self._letter(token.text)
    if token.kind == "cmd":
      return self._command(token.text)
    if token.text in ("(", "["):
      return self._brackets(token.text)
    if token.text == "{":
      self._pos -= 1
      return self._group()
    if token.text == "\\{":
      items = self._items()
      self._expect("op", "\\}")
      return sympy.FiniteSet(*items)
    raise ParseError(f"unexpected {token.text or 'end of answer'!r}")

  def _letter(self, letter: str) -> sympy.Expr:
    subscript = self._subscript()
    if subscript:
      return sympy.Symbol(f"{letter}_{subscript}")
    return _LETTER_CONSTANTS[letter] if letter in _LETTER_CONSTANTS else sympy.Symbol(letter)

  def _subscript(self) -> str:
    """Text of an optional `_1`, `_n` or `_{12}` after a variable."""
    if not self._accept("op", "_"):
      return ""
    braced = self._accept("op", "{")
    parts = [self._advance()]
    while braced and self._peek().kind in ("num", "letter"):
      parts.append(self._advance())
    if braced:
      self._expect("op", "}")
    if any(part.kind not in ("num", "letter") for part in parts):
      raise ParseError("subscripts must be letters or digits")
    return "".join(part.text for part in parts)

  def _command(self, name: str) -> sympy.Basic:
    if name in _FRACTIONS:
      numerator = self._macro_argument()
      return _divide(numerator, self._macro_argument())
    if name == "sqrt":
      return self._root()
    if name in _FUNCTIONS:
      return self._function(name)
    if name in _GREEK:
      subscript = self._subscript()
      return sympy.Symbol(f"{name}_{subscript}" if subscript else name)
    if name in _COMMAND_CONSTANTS:
      return _COMMAND_CONSTANTS[name]
    raise ParseError(f"unexpected \\{name}")

  def _root(self) -> sympy.Expr:
    index = sympy.Integer(2)
    if self._accept("op", "["):
      index = self._expr()
      self._expect("op", "]")
      if not (isinstance(index, sympy.Integer) and 2 <= index <= MAX_ROOT_INDEX):
        raise ParseError(f"root index must be an integer from 2 to {MAX_ROOT_INDEX}")
    radicand = _scalar(self._macro_argument())
    if index == 2:
      return sympy.sqrt(radicand)
    if index % 2 == 1 and radicand.is_number and radicand.is_extended_negative:
      return sympy.real_root(radicand, index)  # the real cube root of -8 is -2
    return sympy.root(radicand, index)

  def _function(self, name: str) -> sympy.Expr:
    base = None
    if name == "log" and self._accept("op", "_"):
      base = _scalar(self._macro_argument())
    if name == "exp":  # \exp(b) is e^b: one level of a power tower, and its argument is an exponent
      self._tower += 1
    try:
      if self._tower > MAX_POWER_TOWER:
        raise ParseError(f"power tower higher than {MAX_POWER_TOWER}")
      argument = _scalar(self._macro_argument() if self._peek().text == "{" else self._power())
    finally:
      if name == "exp":
        self._tower -= 1
    if name == "exp":
      return _checked_power(sympy.E, argument)
    return _FUNCTIONS[name](argument) if base is None else sympy.log(argument, base)

  def _macro_argument(self) -> sympy.Basic:
    """A TeX argument: a {group}, or one token — so `\\frac12` takes the digits 1 and 2 separately."""
    token = self._peek()
    if token.text == "{":
      return self._group()
    if token.kind == "num" and token.text[0].isdigit() and len(token.text) > 1:
      self._tokens[self._pos] = dataclasses.replace(token, text=token.text[1:])
      return sympy.Integer(int(token.text[0]))
    return self._atom()

  def _group(self) -> sympy.Basic:
    """`{...}`: TeX grouping of one value; `{1, 2}` (a list in braces) is a set."""
    self._expect("op", "{")
    items = self._items()
    self._expect("op", "}")
    return items[0] if len(items) == 1 else sympy.FiniteSet(*items)

  def _items(self) -> list[sympy.Basic]:
    items = [self._union()]
    while self._accept("op", ","):
      items.append(self._union())
    return items

  def _brackets(self, opener: str) -> sympy.Basic:
    items = self._items()
    closer = self._advance().text
    if closer not in (")", "]"):
      raise ParseError(f"expected ')' or ']', found {closer or 'end of answer'!r}")
    if len(items) == 1:
      if (opener, closer) in (("(", ")"), ("[", "]")):
        return items[0]
      raise ParseError("half-open brackets around a single value")
    if (opener, closer) == ("(", ")"):
      return sympy.Tuple(*items)
    if len(items) != 2:
      raise ParseError("an interval needs exactly two endpoints")
    return _interval(items[0], items[1], opener == "(", closer == ")")
