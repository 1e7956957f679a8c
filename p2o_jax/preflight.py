"""Checks run before anything slow (a base-policy build, model loading, the first step), so that what would crash a
run after minutes of work fails in seconds with one line: the run directory, the chat template, the reward pool.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence

from p2o_jax.data.records import Query
from p2o_jax.models.tokenizer import chat_prompt_ids
from p2o_jax.rewards.functions import ScoreFn, as_scores

log = logging.getLogger(__name__)

_LENGTH_CHECK_BATCH = 4096  # prompts rendered and tokenized per call: bounded memory on 100k-query datasets


class PreflightError(RuntimeError):
  """Something the run needs is broken; the message says what and where."""


def check_writable_dir(path: str | pathlib.Path, what: str) -> None:
  """Create `path` and write a file in it (a local path; gs:// paths are left to orbax)."""
  if str(path).startswith("gs://"):
    return
  probe = pathlib.Path(path) / ".preflight"
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise PreflightError(f"{what} {path} is not writable: {e.strerror or e}") from e


def check_chat_template(tokenizer, user_turns: Sequence[str]) -> None:
  """Render the first user turns through the tokenizer's chat template, as every rollout will."""
  try:
    ids = chat_prompt_ids(tokenizer, list(user_turns))
  except ImportError as e:  # e.g. jinja2 missing: transformers needs it for every chat template
    raise PreflightError(f"the chat template cannot be rendered: {e}") from e
  if any(len(row) == 0 for row in ids):
    raise PreflightError("the chat template rendered a prompt to zero tokens")


def check_prompt_lengths(tokenizer, queries: Sequence[Query], prompt_format: str, max_prompt_len: int, *,
                         too_long: str = "error", enable_thinking: bool = False,
                         what: str = "training query") -> list[Query]:
  """The queries whose plain prompt (user turn `prompt_format`, chat template, generation prompt) fits in
  `max_prompt_len` tokens. One over it: a one-line PreflightError naming it (too_long="error", the authors' code: their
  RL dataset's truncation='error'), or it is dropped, counted and logged (too_long="skip", their
  filter_overlong_prompts). Each prompt is rendered once, in batched calls, as the rollouts will render it."""
  if too_long not in ("error", "skip"):
    raise ValueError(f"too_long must be 'error' or 'skip', got {too_long!r}")
  lengths: list[int] = []
  for start in range(0, len(queries), _LENGTH_CHECK_BATCH):
    batch = queries[start:start + _LENGTH_CHECK_BATCH]
    try:
      ids = chat_prompt_ids(tokenizer, [prompt_format.format(question=q.question) for q in batch],
                            enable_thinking=enable_thinking)
    except ImportError as e:  # e.g. jinja2 missing, as in check_chat_template
      raise PreflightError(f"the chat template cannot be rendered: {e}") from e
    lengths.extend(map(len, ids))
  over = [i for i, n in enumerate(lengths) if n > max_prompt_len]
  if not over:
    return list(queries)
  worst = max(over, key=lengths.__getitem__)
  if too_long == "error":
    first = over[0]
    raise PreflightError(f"{what} {queries[first].id!r} has a {lengths[first]}-token prompt, over "
                         f"rollout.max_prompt_len={max_prompt_len} ({len(over)} of {len(queries)} are, the longest "
                         f"{lengths[worst]} tokens); raise the limit or set data.too_long='skip' to drop them")
  log.warning("skipped %d of %d %s(s) whose prompt is over rollout.max_prompt_len=%d tokens (data.too_long='skip'; "
              "the longest: %r, %d tokens)", len(over), len(queries), what, max_prompt_len, queries[worst].id,
              lengths[worst])
  dropped = set(over)
  return [q for i, q in enumerate(queries) if i not in dropped]


def check_verifier(score: ScoreFn, queries: Sequence[Query]) -> None:
  """Score each query's own answer, boxed, through the reward pool: the workers start, import and answer, and every
  reward function shows the shape and type of what it returns (a wrong one is an error here, in seconds).

  A reference the correctness reward does not accept as equal to itself is only warned about (the data may use a
  grader that reads answers differently); a pool that cannot score at all is an error.
  """
  if not queries:
    return
  try:
    rewards = as_scores(score([f"\\boxed{{{q.answer}}}" for q in queries], queries), len(queries)).correctness
  except Exception as e:  # pylint: disable=broad-except
    raise PreflightError(f"the reward pool cannot score: {type(e).__name__}: {e}") from e
  rejected = [q.id for q, r in zip(queries, rewards) if r != 1.0]
  if rejected:
    log.warning("the verifier does not accept its own reference answer for %d of %d checked queries (ids %s): "
                "check data.answer_field and reward.fallback", len(rejected), len(queries), rejected[:3])
