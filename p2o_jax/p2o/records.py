"""Plain records passed between the GEPA engine, the evaluators that roll templates out, and the reflectors."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One greedy evaluation of (template, example): the unit GEPA counts as one metric call."""

  score: float  # binary reward from the verifier
  output: str  # the generated text
  feedback: str  # e.g. "Your final answer is incorrect. The correct answer is '42'."


@dataclasses.dataclass(frozen=True)
class FeedbackRecord:
  """What a reflector sees about one minibatch example: the input, what the policy wrote, and the verdict."""

  question: str
  output: str
  feedback: str
  score: float


@dataclasses.dataclass(frozen=True)
class ReflectionRequest:
  """Ask a reflector for an improved version of `template` given how it did on a minibatch."""

  template: str
  records: tuple[FeedbackRecord, ...]
