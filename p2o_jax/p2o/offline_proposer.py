"""The demo's offline stand-in for a reflection model: it edits an instruction as a sequence of pool fragments.

No model writes anything here, and nothing pretends otherwise. `FragmentProposer` reads the parent instruction as a
list of fragments (sentences or clauses from a configurable pool), then adds, drops, swaps or moves one fragment. The
feedback only steers WHICH kind of edit it prefers, through the minibatch scores; it never reads the questions, the
outputs or the reference answers in the feedback text. Its reply is a fenced block, parsed by the same
`extract_fenced_template` as a real model's reply, so GEPA's path through it is the one a model would take.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from p2o_jax.p2o.records import ReflectionRequest
from p2o_jax.p2o.reflection import FENCE, ReflectionStats, templates_from_replies

# Pieces, not finished instructions. The demo world's trigger is "Add the numbers one at a time and write every running
# total."; held as one fragment, a single "add" edit would find it and there would be nothing left to search for. Split
# into three clauses, it is reachable only by putting the right pieces in the right order among distractors the world
# treats as neutral or misleading, which is the structure the feasibility study measured (a partial instruction
# triggers the method sometimes; a distractor placed before the trigger tends to break it).
DEFAULT_FRAGMENTS = (
    "Add the numbers",
    "one at a time",
    "and write every running total.",
    "Be careful.",
    "Answer quickly.",
    "Show your work.",
    "Think step by step.",
    "Check your answer.",
    "Write only the final answer.",
    "Do it in your head.",
    "Take your time.",
    "Look at the last digit first.",
)

EDITS = ("add", "drop", "swap", "reorder")


def edit_weights(scores: Sequence[float]) -> dict[str, float]:
  """How strongly to prefer each edit given the parent's minibatch scores.

  All failed: the instruction is missing something, so grow it. Some solved: it is partly right, so favour local edits
  that keep what it has (insert one piece, move one) over dropping. All solved: little to gain; trim or reorder.
  """
  solved = sum(score > 0 for score in scores)
  if solved == 0:
    return {"add": 0.5, "swap": 0.3, "reorder": 0.1, "drop": 0.1}
  if solved < len(scores):
    return {"add": 0.35, "swap": 0.25, "reorder": 0.25, "drop": 0.15}
  return {"add": 0.1, "swap": 0.2, "reorder": 0.35, "drop": 0.35}


def split_fragments(template: str, pool: Sequence[str]) -> list[str]:
  """`template` as a list of pool fragments, longest match first; words outside the pool group into opaque pieces."""
  by_length = sorted(pool, key=len, reverse=True)
  pieces: list[str] = []
  opaque: list[str] = []
  pos = 0
  while pos < len(template):
    if template[pos].isspace():
      pos += 1
      continue
    match = next((f for f in by_length if _matches_at(template, pos, f)), None)
    if match is None:
      word_end = _next_space(template, pos)
      opaque.append(template[pos:word_end])
      pos = word_end
      continue
    if opaque:
      pieces.append(" ".join(opaque))
      opaque = []
    pieces.append(match)
    pos += len(match)
  if opaque:
    pieces.append(" ".join(opaque))
  return pieces


def _matches_at(text: str, pos: int, fragment: str) -> bool:
  end = pos + len(fragment)
  return text.startswith(fragment, pos) and (end == len(text) or text[end].isspace())


def _next_space(text: str, pos: int) -> int:
  while pos < len(text) and not text[pos].isspace():
    pos += 1
  return pos


def feasible_edits(fragments: Sequence[str], unused: Sequence[str], max_fragments: int) -> list[str]:
  """The edits that give a different, non-empty instruction of at most `max_fragments` pieces."""
  feasible = {
      "add": bool(unused) and len(fragments) < max_fragments,
      "drop": len(fragments) >= 2,
      "swap": bool(unused) and len(fragments) >= 1,
      "reorder": len(set(fragments)) >= 2,
  }
  return [edit for edit in EDITS if feasible[edit]]


def apply_edit(fragments: Sequence[str], edit: str, unused: Sequence[str], rng: random.Random) -> list[str]:
  """`fragments` with one `edit` applied at positions (and a new piece from `unused`) drawn from `rng`."""
  child = list(fragments)
  if edit == "add":
    child.insert(rng.randint(0, len(child)), rng.choice(unused))
  elif edit == "drop":
    del child[rng.randrange(len(child))]
  elif edit == "swap":
    child[rng.randrange(len(child))] = rng.choice(unused)
  elif edit == "reorder":
    moved = child.pop(rng.randrange(len(child)))
    new_slots = [i for i in range(len(child) + 1) if child[:i] + [moved] + child[i:] != list(fragments)]
    child.insert(rng.choice(new_slots), moved)
  else:
    raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")
  return child


def _validate_pool(fragments: Sequence[str]) -> tuple[str, ...]:
  pool = tuple(fragments)
  for fragment in pool:
    if not isinstance(fragment, str) or not fragment.strip() or fragment != fragment.strip():
      raise ValueError(f"fragment pool entries must be non-empty strings without outer whitespace, got {fragment!r}")
    if FENCE in fragment:
      raise ValueError(f"fragment {fragment!r} contains ``` and would break the fenced reply")
  if len(set(pool)) != len(pool):
    raise ValueError("fragment pool has duplicate entries")
  if len(pool) < 2:
    raise ValueError(f"fragment pool needs at least 2 fragments, got {len(pool)}")
  return pool


class FragmentProposer:
  """Offline reflector: one seeded fragment edit of the parent per request, returned as a fenced reply and parsed."""

  def __init__(self, fragments: Sequence[str], seed: int, max_fragments: int = 4, *, max_template_chars: int = 0):
    if max_fragments < 1:
      raise ValueError(f"max_fragments must be >= 1, got {max_fragments}")
    self.fragments = _validate_pool(fragments)
    self.max_fragments = max_fragments
    self.max_template_chars = max_template_chars
    self.stats = ReflectionStats()
    self._rng = random.Random(seed)

  def __repr__(self) -> str:
    return f"FragmentProposer({len(self.fragments)} fragments, max_fragments={self.max_fragments})"

  def state(self) -> list:
    """The RNG state as JSON-able lists: saved with GEPA's state so a resumed search proposes the same edits."""
    version, internal, gauss = self._rng.getstate()
    return [version, list(internal), gauss]

  def restore(self, state: list) -> None:
    version, internal, gauss = state
    self._rng.setstate((version, tuple(internal), gauss))

  def propose(self, requests: Sequence[ReflectionRequest]) -> list[str | None]:
    """One edited instruction per request, in order; deterministic given the seed and the sequence of requests."""
    self.stats.requests += len(requests)
    replies = [self._reply(request) for request in requests]
    return templates_from_replies(replies, self.stats, max_chars=self.max_template_chars)

  def _reply(self, request: ReflectionRequest) -> str:
    parent = split_fragments(request.template, self.fragments)
    unused = [f for f in self.fragments if f not in parent]
    edits = feasible_edits(parent, unused, self.max_fragments)
    weights = edit_weights([record.score for record in request.records])
    edit = self._rng.choices(edits, weights=[weights[e] for e in edits])[0]
    child = apply_edit(parent, edit, unused, self._rng)
    return f"{FENCE}\n{' '.join(child)}\n{FENCE}"
