"""Where a P^2O template goes (the paper's T(x, z)), and the feedback GEPA's reflector reads about one rollout."""

from __future__ import annotations

from p2o_jax.rewards.extract import count_boxes, extract_answer

TEMPLATE_SEPARATOR = "\n\n"


def apply_template(template: str, user_turn: str) -> str:
  """The user turn x~ = T(x, z); the empty template leaves the turn unchanged."""
  return f"{template}{TEMPLATE_SEPARATOR}{user_turn}" if template else user_turn


def is_format_error(output: str, fallback: str = "none") -> bool:
  """No final answer to grade (no \\boxed, no ####, nothing `fallback` finds) or several \\boxed.

  The authors' graders give format_score 0 for "no box or several boxes"; the answer fallback of our extraction
  (p2o_jax/rewards/extract.py) widens "no box" to "no answer found", so a task graded without boxes (the built-in
  demo's last number) is not a format error throughout.
  """
  return count_boxes(output) > 1 or extract_answer(output, fallback) is None


def feedback_text(correct: bool, answer: str, output: str | None = None, *, fallback: str = "none") -> str:
  """What GEPA's reflector reads about one rollout, as the authors' code writes it: the verdict, always with the
  reference answer, then the reward. A wrong `output` that is a format error (`is_format_error`) gets a message
  asking to check the output format instead; without `output` there is no format check."""
  answer = str(answer).strip()
  if correct:
    verdict = f"Your final answer is correct. The correct answer is '{answer}'."
  elif output is not None and is_format_error(output, fallback):
    verdict = ("Your output could not be graded: it gives no final answer in the required format, or several "
               f"(e.g. more than one \\boxed{{}}).\nThe correct answer is '{answer}'.\n\nCompare your reasoning "
               "with the correct answer, and check your output format.")
  else:
    verdict = f"Your final answer is incorrect. The correct answer is '{answer}'."
  return f"{verdict}\n\nReward (answer_score) = {float(correct):.2f}"
