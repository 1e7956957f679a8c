"""Reward functions written the way TRL's GRPOTrainer users write them; imported by the verifier's worker processes
(multiprocessing hands them our sys.path), so the tests can name them by import path."""

import os
import re
import time


def digits_only(completions, **kwargs):
  """A format reward: 1.0 when the completion is nothing but digits, None for an empty completion (left out)."""
  del kwargs
  return [None if not c.strip() else float(c.strip().isdigit()) for c in completions]


def echo_columns(prompts, completions, answer, level, **kwargs):
  """Scores 1.0 iff it was given the prompt, the answer and the dataset's `level` column it expects."""
  del kwargs
  return [float(p == f"Q: {c}" and a == "7" and lv == 3) for p, c, a, lv in zip(prompts, completions, answer, level)]


def two_values(completions, **kwargs):
  del kwargs
  return [1.0, 0.0] * len(completions)


def a_string(completions, **kwargs):
  del kwargs
  return ["1.0" for _ in completions]


def string_on_bad(completions, **kwargs):
  """Well-behaved except on completions containing BAD, where it returns a string."""
  del kwargs
  return ["oops" if "BAD" in c else 1.0 for c in completions]


def raises_on_bad(completions, **kwargs):
  del kwargs
  if any("BAD" in c for c in completions):
    raise ZeroDivisionError("untrusted input broke trusted code")
  return [1.0 for _ in completions]


def hangs_on_slow(completions, **kwargs):
  del kwargs
  if any("SLOW" in c for c in completions):
    time.sleep(60)
  return [float(os.getpid() > 0) for _ in completions]


def answer_sentence(completions, **kwargs):
  """The built-in world's format: the completion ends with "The answer is <digits>"."""
  del kwargs
  return [float(bool(re.search(r"The answer is \d+\s*$", c))) for c in completions]


def even_length(completions, **kwargs):
  del kwargs
  return [float(len(c) % 2 == 0) for c in completions]


def has_digit(completions, **kwargs):
  del kwargs
  return [float(any(ch.isdigit() for ch in c)) for c in completions]
