"""Find the final answer in a model response: last \\boxed{...}, else GSM8K-style `####`, else a configurable fallback.

The response is untrusted. Every step is linear in the scanned length (one brace-matching pass, regexes without
nested quantifiers), and only the last MAX_SCAN_CHARS characters of a longer response are scanned: a final answer
lives at the end, and a response padded to megabytes must cost no more than one of normal size.
"""

from __future__ import annotations

import re

MAX_SCAN_CHARS = 20_000
FALLBACKS = ("none", "last_number")

# `\boxed` / `\fbox` as whole control words: `\boxedfoo` is a different macro.
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# The argument of a brace-less `\boxed 5`: one run of characters up to whitespace or math delimiters.
_BARE_ARGUMENT_RE = re.compile(r"[^\s$]+")
_SPACES_RE = re.compile(r"[ \t]*")
# A minus sign counts only where it cannot be subtraction ("3-5" ends in 5, not -5).
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w)\]}])-?\.\d+")


def check_fallback(fallback: str) -> None:
  """Raise ValueError unless `fallback` names a known fallback."""
  if fallback not in FALLBACKS:
    raise ValueError(f"unknown answer fallback {fallback!r}; expected one of {FALLBACKS}")


def extract_answer(text: str, fallback: str = "none") -> str | None:
  """The final answer in `text` (stripped), or None when there is none and the fallback finds none either."""
  check_fallback(fallback)
  tail = text[-MAX_SCAN_CHARS:]
  answer = last_boxed(tail)
  if answer is None:
    answer = _after_last_hashes(tail)
  if answer is None and fallback == "last_number":
    answer = _last_number(tail)
  return answer


def count_boxes(text: str) -> int:
  """How many `\\boxed` / `\\fbox` commands the scanned tail of `text` holds (well-formed or not)."""
  return len(_BOX_RE.findall(text[-MAX_SCAN_CHARS:]))


def _matching_braces(text: str) -> dict[int, int]:
  """Map the index of every grouping `{` to its matching `}` in one pass; `\\{` and `\\}` are literal braces."""
  matches: dict[int, int] = {}
  open_stack: list[int] = []
  index = 0
  while index < len(text):
    char = text[index]
    if char == "\\":
      index += 2  # a control symbol such as `\{` or `\\` never groups
      continue
    if char == "{":
      open_stack.append(index)
    elif char == "}" and open_stack:
      matches[open_stack.pop()] = index
    index += 1
  return matches


def last_boxed(text: str) -> str | None:
  """Content of the last well-formed, non-empty \\boxed{} in `text` (all of it: callers bound its length); a truncated
  last box falls back to the one before it."""
  starts = [match.end() for match in _BOX_RE.finditer(text)]
  if not starts:
    return None
  braces = _matching_braces(text)
  for start in reversed(starts):
    content = _box_argument(text, _SPACES_RE.match(text, start).end(), braces)
    if content:
      return content
  return None


def _box_argument(text: str, start: int, braces: dict[int, int]) -> str | None:
  if start < len(text) and text[start] == "{":
    end = braces.get(start)
    return None if end is None else text[start + 1 : end].strip()
  bare = _BARE_ARGUMENT_RE.match(text, start)
  return bare.group(0) if bare else None


def _after_last_hashes(text: str) -> str | None:
  start = text.rfind("####")
  if start < 0:
    return None
  line = text[start + 4 :].split("\n", 1)[0].strip()
  return line or None


def _last_number(text: str) -> str | None:
  numbers = _NUMBER_RE.findall(text)
  return numbers[-1].replace(",", "") if numbers else None
