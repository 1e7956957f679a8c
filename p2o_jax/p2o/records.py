"""Plain records passed between the GEPA engine, the evaluators that roll templates out, and the reflectors."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One greedy evaluation of (template, example); every GEPA evaluation is counted in rollouts."""

  score: float  # binary reward from the verifier
  output: str  # the generated text
  feedback: str  # p2o_jax.p2o.templates.feedback_text: the verdict, always with the reference answer
  format_error: bool = False  # a wrong output with no final answer, or several \boxed (the feedback says so)


@dataclasses.dataclass(frozen=True)
class FeedbackRecord:
  """What a reflector sees about one minibatch example: the input, what the policy wrote, and the verdict.

  `question` is the user text WITHOUT the template; `format_error` outputs are cut harder when the reflection prompt
  is over its budget (p2o_jax/p2o/reflection.py).
  """

  question: str
  output: str
  feedback: str
  score: float
  format_error: bool = False


@dataclasses.dataclass(frozen=True)
class ReflectionRequest:
  """Ask a reflector for an improved version of `template` given how it did on a minibatch.

  `max_prompt_tokens`: the reflector's prompt limit the meta-prompt must fit (examples are cut only when over it);
  0: no limit.
  """

  template: str
  records: tuple[FeedbackRecord, ...]
  max_prompt_tokens: int = 0
