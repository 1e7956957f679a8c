"""Where a P^2O template goes: in front of the user turn, separated by a blank line (the paper's T(x, z))."""

from __future__ import annotations

TEMPLATE_SEPARATOR = "\n\n"


def apply_template(template: str, user_turn: str) -> str:
  """The user turn x~ = T(x, z); the empty template leaves the turn unchanged."""
  return f"{template}{TEMPLATE_SEPARATOR}{user_turn}" if template else user_turn


def feedback_text(correct: bool, answer: str) -> str:
  """What GEPA's reflector reads about one rollout."""
  if correct:
    return "Your final answer is correct."
  return f"Your final answer is incorrect. The correct answer is '{answer}'."
