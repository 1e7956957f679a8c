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
