"""Small built-in graders, `(completion, reference, fallback) -> float` like every name in functions.GRADERS.

`builtin_exact` is all the built-in arithmetic task needs (its answers are integers), without the sympy or LaTeX
machinery of the `math` grader; `boxed_format` is the format half of the authors' DeepMath reward (exactly one box).
"""

from __future__ import annotations

from p2o_jax.rewards.extract import count_boxes, extract_answer


def builtin_exact(completion: str, reference: str, fallback: str = "none") -> float:
  """1.0 iff the extracted answer is the reference's exact text. The built-in world writes every answer one canonical
  way, and in its least-significant-digit-first notation "01" (10) and "001" (100) differ, so no numeric reading."""
  answer = extract_answer(completion, fallback)
  return float(answer is not None and answer.strip() == reference.strip())


def boxed_format(completion: str, reference: str = "", fallback: str = "none") -> float:
  """1.0 iff the completion holds exactly one non-empty \\boxed{...} (the reference is not looked at)."""
  del reference, fallback
  return float(count_boxes(completion) == 1 and extract_answer(completion) is not None)
