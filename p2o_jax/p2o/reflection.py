"""What every GEPA reflector shares: the meta-prompt, reading the new template out of a reply, and the counters.

A reflector turns a ReflectionRequest (an instruction and how it did on a few examples) into a proposed new instruction.
The model that writes it may be the frozen reference policy (Self-Ref), an external chat endpoint (Teacher-Ref) or the
demo's offline fragment proposer; all of them go through `extract_fenced_template`, so a reply is accepted or rejected
by the same rule everywhere: the template is the text between the first and the last ``` of the reply.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from typing import Protocol

from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest

logger = logging.getLogger(__name__)

FENCE = "```"
EXTRACTION_REASONS = ("ok", "no_fence", "empty", "too_long")

# A language tag on the opening fence line ("```text", "```markdown"): one lower-case word and nothing else. A
# capitalised or multi-word first line is kept, since it is far more likely to be the start of the instruction itself.
_LANGUAGE_TAG = re.compile(r"[a-z][a-z0-9_+.-]*")


@dataclasses.dataclass
class ReflectionStats:
  """Counters every reflector keeps; `requests` == accepted + the rejections + calls that produced no reply."""

  requests: int = 0
  accepted: int = 0
  rejected_no_fence: int = 0
  rejected_empty: int = 0
  rejected_too_long: int = 0

  def count_extraction(self, reason: str) -> None:
    if reason not in EXTRACTION_REASONS:
      raise ValueError(f"unknown extraction reason {reason!r}; expected one of {EXTRACTION_REASONS}")
    if reason == "ok":
      self.accepted += 1
    else:
      field = f"rejected_{reason}"
      setattr(self, field, getattr(self, field) + 1)


class Reflector(Protocol):
  """Anything GEPA can ask for new templates: one batched call, None where a proposal was rejected."""

  stats: ReflectionStats

  def propose(self, requests: Sequence[ReflectionRequest]) -> list[str | None]:
    ...


def keep_tail(text: str, max_chars: int) -> str:
  """`text` cut to its last `max_chars` characters (where a final answer is), saying how much was left out."""
  if max_chars <= 0:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  if len(text) <= max_chars:
    return text
  omitted = len(text) - max_chars
  return f"[... the first {omitted} characters are left out ...]\n{text[-max_chars:]}"


def _format_example(index: int, record: FeedbackRecord, max_example_chars: int) -> str:
  verdict = "solved" if record.score > 0 else "not solved"
  return (
      f"## Example {index} ({verdict})\n"
      f"Problem:\n{record.question.strip()}\n\n"
      f"What the assistant wrote:\n{keep_tail(record.output.strip(), max_example_chars)}\n\n"
      f"Grader's feedback:\n{record.feedback.strip()}\n"
  )


def _describe_instruction(template: str) -> str:
  if not template.strip():
    return (
        "At the moment there is NO instruction: the problems were shown to the assistant on their own, with nothing "
        "placed before them.\n"
    )
  return f"The instruction currently placed before each problem is:\n{FENCE}\n{template.strip()}\n{FENCE}\n"


def build_reflection_prompt(request: ReflectionRequest, *, max_example_chars: int = 3000) -> str:
  """The meta-prompt asking a model to rewrite `request.template` after seeing how it did on `request.records`."""
  if max_example_chars <= 0:
    raise ValueError(f"max_example_chars must be positive, got {max_example_chars}")
  examples = "\n".join(_format_example(i + 1, r, max_example_chars) for i, r in enumerate(request.records))
  return (
      "An assistant solves problems after reading a short instruction placed in front of each problem. Your job is "
      "to write a better instruction for it.\n\n"
      f"{_describe_instruction(request.template)}\n"
      f"Here is how the assistant did on {len(request.records)} problem(s) this way. Each shows the "
      "problem, the assistant's answer (long answers keep only their end) and the grader's feedback.\n\n"
      f"{examples}\n"
      "Now look for what went wrong, and what went right, in these attempts. Then write a new instruction that would "
      "help the assistant on problems of this kind in general: describe a method, habits or checks, not the answers "
      "to these particular problems. Keep what already helps.\n"
      f"Reply with the new instruction inside one {FENCE} fenced block and put nothing else inside the fences."
  )


def _drop_language_tag(inner: str) -> str:
  first_line, newline, rest = inner.partition("\n")
  if newline and _LANGUAGE_TAG.fullmatch(first_line.strip()):
    return rest
  return inner


def extract_fenced_template(reply: str, *, max_chars: int = 2000) -> tuple[str | None, str]:
  """(template, reason): the text between the first and last ``` of `reply`; reason in EXTRACTION_REASONS."""
  if max_chars <= 0:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  first = reply.find(FENCE)
  last = reply.rfind(FENCE)
  if first < 0 or last < first + len(FENCE):
    return None, "no_fence"
  template = _drop_language_tag(reply[first + len(FENCE):last]).strip()
  if not template:
    return None, "empty"
  if len(template) > max_chars:
    return None, "too_long"
  return template, "ok"


def templates_from_replies(
    replies: Sequence[str | None], stats: ReflectionStats, *, max_chars: int = 2000
) -> list[str | None]:
  """Extract a template from each reply (None stays None), counting and logging every rejection in `stats`."""
  templates: list[str | None] = []
  for reply in replies:
    if reply is None:
      templates.append(None)
      continue
    template, reason = extract_fenced_template(reply, max_chars=max_chars)
    stats.count_extraction(reason)
    if template is None:
      logger.info("reflection reply rejected (%s, %d characters)", reason, len(reply))
    templates.append(template)
  return templates
