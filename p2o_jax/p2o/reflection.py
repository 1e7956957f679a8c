"""What every GEPA reflector shares: the meta-prompt, reading the new template out of a reply, and the counters.

A reflector turns a ReflectionRequest (an instruction and how it did on a few examples) into a proposed new instruction.
The model that writes it may be the frozen reference policy (Self-Ref), an external chat endpoint (Teacher-Ref) or the
demo's offline fragment proposer; all of them go through `extract_fenced_template`, so a reply is read by the same
rule everywhere (the authors' code): with two or more ``` fences, the text between the first and the last; with fewer,
the whole reply. Only an empty result is rejected.

The meta-prompt has the layout of GEPA's default instruction-proposal prompt, as the authors use it: the current
instruction in a ``` block, the examples (`# Example i` / `## Inputs` / `## Generated Outputs` / `## Feedback`) in a
``` block, and "Provide the new instructions within ``` blocks." The examples are shown whole unless the prompt would
exceed the reflector's limit; then they are cut as the authors cut them (`_fit_examples`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Protocol

from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest

logger = logging.getLogger(__name__)

FENCE = "```"
EXTRACTION_REASONS = ("ok", "empty", "too_long")

# Truncation constants of the authors' reflection-prompt builder.
PROMPT_MARGIN_TOKENS = 500  # kept free below the limit (the chat template, counting slack)
COST_MARGIN = 1.2  # an example's estimated cost is its token count times this
FORMAT_ERROR_KEEP_TOKENS = 100  # an over-long format-error output keeps this many tokens at each end
KEEP_FRACTION = 0.4  # other over-long outputs keep this fraction of their share at each end
MIN_EXAMPLE_TOKENS = 100  # the least an over-long example gets
MIN_OUTPUT_TOKENS = 50
CUT_MARKER = "\n\n[... middle of the output cut ...]\n\n"
# Without the reflector's tokenizer (Teacher-Ref, the offline proposer) tokens are estimated as characters / 3: BPE
# vocabularies of LLMs average 3.5-4.5 characters per token on English and LaTeX, so the estimate over-counts and a
# prompt cut to fit it fits the real tokenizer too.
CHARS_PER_TOKEN = 3


@dataclasses.dataclass
class ReflectionStats:
  """Counters every reflector keeps; `requests` == accepted + the rejections + calls that produced no reply."""

  requests: int = 0
  accepted: int = 0
  rejected_empty: int = 0
  rejected_too_long: int = 0  # only with a template length cap (p2o.max_template_chars > 0)

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


class TokenCounter(Protocol):
  """Counts tokens and cuts text at token boundaries."""

  def count(self, text: str) -> int:
    ...

  def head(self, text: str, n: int) -> str:
    ...

  def tail(self, text: str, n: int) -> str:
    ...


class CharEstimate:
  """Tokens estimated as ceil(characters / CHARS_PER_TOKEN), for reflectors without a tokenizer."""

  def count(self, text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN)

  def head(self, text: str, n: int) -> str:
    return text[:max(n, 0) * CHARS_PER_TOKEN]

  def tail(self, text: str, n: int) -> str:
    return text[max(len(text) - n * CHARS_PER_TOKEN, 0):] if n > 0 else ""


class TokenizerCounter:
  """Exact counts with the reflector's own tokenizer (a transformers tokenizer: Self-Ref's reference policy)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def _ids(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text, add_special_tokens=False))

  def count(self, text: str) -> int:
    return len(self._ids(text))

  def head(self, text: str, n: int) -> str:
    return self.tokenizer.decode(self._ids(text)[:max(n, 0)])

  def tail(self, text: str, n: int) -> str:
    ids = self._ids(text)
    return self.tokenizer.decode(ids[max(len(ids) - n, 0):]) if n > 0 else ""


def keep_tail(text: str, max_chars: int) -> str:
  """`text` cut to its last `max_chars` characters (where a final answer is), saying how much was left out."""
  if max_chars <= 0:
    raise ValueError(f"max_chars must be positive, got {max_chars}")
  if len(text) <= max_chars:
    return text
  omitted = len(text) - max_chars
  return f"[... the first {omitted} characters are left out ...]\n{text[-max_chars:]}"


def _meta_prompt(template: str, examples: str) -> str:
  return (
      "I provided an assistant with the following instructions to perform a task for me:\n"
      f"{FENCE}\n{template.strip()}\n{FENCE}\n\n"
      "Below are examples of task inputs given to the assistant, with the assistant's response to each and feedback "
      "on how that response could be better:\n"
      f"{FENCE}\n{examples}\n{FENCE}\n\n"
      "Your task is to write a new instruction for the assistant.\n\n"
      "Read the inputs carefully: identify their format and infer a detailed description of the task I want the "
      "assistant to solve.\n\n"
      "Read all the assistant's responses and the feedback on them. Identify every niche and domain-specific fact "
      "about the task and put it in the instruction, since the assistant may not have it in the future. If the "
      "assistant used a strategy that generalizes, put that strategy in the instruction as well.\n\n"
      f"Provide the new instructions within {FENCE} blocks."
  )


def _render_example(index: int, record: FeedbackRecord) -> str:
  return (f"# Example {index}\n## Inputs\n{record.question.strip()}\n\n## Generated Outputs\n{record.output.strip()}\n\n"
          f"## Feedback\n{record.feedback.strip()}\n")


def _render_examples(records: Sequence[FeedbackRecord]) -> str:
  return "\n\n".join(_render_example(i + 1, r) for i, r in enumerate(records))


def _cut_middle(text: str, head: int, tail: int, tokens: TokenCounter) -> str:
  return f"{tokens.head(text, head).rstrip()}{CUT_MARKER}{tokens.tail(text, tail).lstrip()}"


def _cost(record: FeedbackRecord, tokens: TokenCounter, with_output: bool = True) -> int:
  parts = [record.question, record.output, record.feedback] if with_output else [record.question, record.feedback]
  return math.ceil(tokens.count("\n".join(parts)) * COST_MARGIN)


def _fit_examples(records: Sequence[FeedbackRecord], available: int,
                  tokens: TokenCounter) -> list[FeedbackRecord]:
  """The records with over-long outputs cut so the examples fit `available` tokens, as the authors' code cuts them.

  Each example may use a 1/n share; examples within their share stay whole. If the rest do not fit what is left,
  over-long format-error outputs keep their first and last FORMAT_ERROR_KEEP_TOKENS tokens, and if the others still
  do not fit, each keeps KEEP_FRACTION of an equal split of what remains at each end. The example order is kept (the
  authors' code moves the cut examples after the whole ones).
  """
  share = max(1, available // len(records))
  costs = [_cost(r, tokens) for r in records]
  over = [i for i, c in enumerate(costs) if c > share]
  remaining = available - sum(c for i, c in enumerate(costs) if i not in over)
  if remaining >= sum(costs[i] for i in over):
    return list(records)
  out = list(records)
  format_errors = [i for i in over if records[i].format_error]
  normal = [i for i in over if not records[i].format_error]
  for i in format_errors:
    output = records[i].output
    if tokens.count(output) > 2 * FORMAT_ERROR_KEEP_TOKENS:
      output = _cut_middle(output, FORMAT_ERROR_KEEP_TOKENS, FORMAT_ERROR_KEEP_TOKENS, tokens)
    out[i] = dataclasses.replace(records[i], output=output)
    remaining -= _cost(out[i], tokens)
  if not normal or remaining >= sum(costs[i] for i in normal):
    return out
  per_example = max(MIN_EXAMPLE_TOKENS, remaining // len(normal)) if remaining > 0 else MIN_EXAMPLE_TOKENS
  for i in normal:
    output_budget = max(MIN_OUTPUT_TOKENS, per_example - _cost(records[i], tokens, with_output=False))
    if tokens.count(records[i].output) > output_budget:
      keep = int((output_budget - tokens.count(CUT_MARKER)) * KEEP_FRACTION)
      out[i] = dataclasses.replace(records[i], output=_cut_middle(records[i].output, keep, keep, tokens))
  return out


def build_reflection_prompt(request: ReflectionRequest, *, max_prompt_tokens: int | None = None,
                            tokens: TokenCounter | None = None, max_example_chars: int = 0) -> str:
  """The meta-prompt asking a model to rewrite `request.template` after seeing how it did on `request.records`.

  `max_prompt_tokens` (default: `request.max_prompt_tokens`; 0: no limit) is the reflector's prompt limit. Only a
  prompt over it is cut: the examples get the limit less the meta-prompt and PROMPT_MARGIN_TOKENS (`_fit_examples`),
  and if the prompt is still too long, trailing examples are dropped, keeping at least one. `tokens` counts with the
  reflector's tokenizer (default: CharEstimate). `max_example_chars` > 0 also keeps only the last that many
  characters of every output, always (the pre-authors behaviour).
  """
  limit = request.max_prompt_tokens if max_prompt_tokens is None else max_prompt_tokens
  if limit < 0 or max_example_chars < 0:
    raise ValueError(f"max_prompt_tokens and max_example_chars must be >= 0, got {limit}, {max_example_chars}")
  records = list(request.records)
  if max_example_chars:
    records = [dataclasses.replace(r, output=keep_tail(r.output, max_example_chars)) for r in records]
  prompt = _meta_prompt(request.template, _render_examples(records))
  tokens = tokens or CharEstimate()
  if not limit or not records or tokens.count(prompt) <= limit:
    return prompt
  available = limit - tokens.count(_meta_prompt(request.template, "")) - PROMPT_MARGIN_TOKENS
  records = _fit_examples(records, available, tokens) if available > 0 else records[:1]
  prompt = _meta_prompt(request.template, _render_examples(records))
  while tokens.count(prompt) > limit and len(records) > 1:
    records.pop()
    prompt = _meta_prompt(request.template, _render_examples(records))
  if tokens.count(prompt) > limit:
    logger.info("reflection prompt of %d tokens is over the limit of %d even with one example",
                tokens.count(prompt), limit)
  return prompt


def extract_fenced_template(reply: str, *, max_chars: int = 0) -> tuple[str | None, str]:
  """(template, reason): the text between the first and the last ``` of `reply` if it has two or more, else the
  whole reply with backticks and whitespace stripped; a leading "markdown" tag is dropped. `reason` is one of
  EXTRACTION_REASONS; `max_chars` > 0 rejects a longer template ("too_long"), 0 is no cap."""
  if max_chars < 0:
    raise ValueError(f"max_chars must be >= 0, got {max_chars}")
  text = reply.strip()
  if text.count(FENCE) >= 2:
    text = text[text.find(FENCE) + len(FENCE):text.rfind(FENCE)].strip()
  else:
    text = text.strip("` \n").strip()
  if text[:len("markdown")].lower() == "markdown":
    text = text[len("markdown"):].strip()
  if not text:
    return None, "empty"
  if max_chars and len(text) > max_chars:
    return None, "too_long"
  return text, "ok"


def templates_from_replies(replies: Sequence[str | None], stats: ReflectionStats, *,
                           max_chars: int = 0) -> list[str | None]:
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
