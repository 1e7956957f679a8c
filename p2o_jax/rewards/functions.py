"""Reward functions: which ones a run uses, with what weight, and how one completion is scored by each.

A run's reward is a weighted sum of functions (`reward.functions`, e.g. "math" or "builtin_exact=1, boxed_format=0.1",
or a list passed from Python). Each entry is
- a built-in grader by name (GRADERS): `(completion, reference, fallback) -> float`, given the row's `answer`;
- an import path "package.module:function", or a module-level function object, following TRL's GRPOTrainer
  convention so functions written for it work unchanged: called with keyword arguments `prompts` (the plain user turn,
  never the template), `completions` (the response text) and every dataset column by name (`answer` is always the
  reference), each a list; it returns one float per completion, or None to leave that completion out of the sum.
  TRL's `completion_ids` and `trainer_state` are not passed: write `**kwargs` to accept what you do not use.

The FIRST listed function is the correctness reward: evaluation accuracy, P^2O's hard set ("correct" = its value > 0)
and GEPA's per-instance scores read it alone, while the policy is trained on the weighted sum (a format bonus must not
make a wrong answer "solved").

Functions run in the verifier pool's worker processes (pool.py), one completion per call, so a hang or crash costs
only that completion. The function is the user's trusted code; the completion it is given is not.
`score_item` is what a worker runs; it is pure and runs in-process in tests.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pickle
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

GRADERS = {
  "math": "p2o_jax.rewards.math_verify_grader:math_verify_reward",
  "equivalence": "p2o_jax.rewards.equivalence:math_reward",
  "builtin_exact": "p2o_jax.rewards.graders:builtin_exact",
  "boxed_format": "p2o_jax.rewards.graders:boxed_format",
}
PROMPTS, COMPLETIONS = "prompts", "completions"  # TRL's argument names; dataset columns never shadow them
_PATH_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")

# An entry as a user writes it: a name or path, a function, or either with a weight.
RewardEntry = str | Callable | tuple[str | Callable, float]


class RewardFunctionError(ValueError):
  """A reward function cannot be used: not found, not picklable, or it returned the wrong shape or type."""


@dataclasses.dataclass(frozen=True)
class RewardFunction:
  """One term of the reward: `target` is an import path or a module-level function; `grader` marks the built-in
  (completion, reference, fallback) signature, otherwise the TRL batch convention applies."""

  name: str
  target: str | Callable
  weight: float = 1.0
  grader: bool = False

  def load(self) -> Callable:
    return _import(self.target) if isinstance(self.target, str) else self.target


@dataclasses.dataclass(frozen=True)
class RewardScores:
  """Per completion: the weighted `total` the policy is trained on, and each function's values (NaN where it returned
  None), in the order the functions were listed."""

  total: np.ndarray  # (n,) float32
  by_function: dict[str, np.ndarray]  # name -> (n,) float32

  @property
  def correctness(self) -> np.ndarray:
    """The first listed function's values (None counts 0): what accuracy, the hard set and GEPA read as "solved"."""
    if not self.by_function:
      return self.total
    return np.nan_to_num(next(iter(self.by_function.values())), nan=0.0).astype(np.float32)

  def function_means(self) -> dict[str, float]:
    """Each function's mean over the completions it scored (NaN when it scored none)."""
    return {name: float(np.nanmean(v)) if np.isfinite(v).any() else math.nan for name, v in self.by_function.items()}


# What the trainer, GEPA's evaluator and the evaluation call: (completions, one Query per completion) -> rewards.
ScoreFn = Callable[[Sequence[str], Sequence[Any]], "RewardScores | np.ndarray"]


def query_columns(query: Any) -> dict[str, Any]:
  """What a reward function is given of a Query: its dataset columns, with `answer` always the reference."""
  return {**getattr(query, "columns", {}), "answer": query.answer}


def as_scores(result: RewardScores | Sequence[float] | np.ndarray, n: int) -> RewardScores:
  """A score function's result as RewardScores (a plain array of totals has no per-function values)."""
  scores = result if isinstance(result, RewardScores) else RewardScores(np.asarray(result, np.float32), {})
  if scores.total.shape != (n,):
    raise ValueError(f"the score function returned {scores.total.shape} rewards for {n} completions")
  return scores


def resolve(entries: str | Sequence[RewardEntry]) -> tuple[RewardFunction, ...]:
  """The reward functions of a config string ("math=1, boxed_format=0.1") or a Python list; one-line errors."""
  items = _parse_spec(entries) if isinstance(entries, str) else [_weighted(e) for e in entries]
  if not items:
    raise RewardFunctionError("reward.functions is empty: name at least one reward function (e.g. 'math')")
  functions = tuple(_resolve_one(target, weight) for target, weight in items)
  names = [f.name for f in functions]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise RewardFunctionError(f"reward function {duplicates[0]!r} is listed twice")
  return functions


def _parse_spec(spec: str) -> list[tuple[str, float]]:
  items = []
  for part in filter(None, (p.strip() for p in spec.split(","))):
    target, sep, weight = part.rpartition("=") if "=" in part else (part, "", "1")
    try:
      value = float(weight)
    except ValueError:
      raise RewardFunctionError(f"reward.functions: weight {weight!r} of {target!r} is not a number") from None
    items.append((target.strip(), value))
  return items


def _weighted(entry: RewardEntry) -> tuple[str | Callable, float]:
  if isinstance(entry, tuple):
    if len(entry) != 2:
      raise RewardFunctionError(f"reward function entry {entry!r} is not (function, weight)")
    return entry[0], float(entry[1])
  return entry, 1.0


def _resolve_one(target: str | Callable, weight: float) -> RewardFunction:
  if not math.isfinite(weight):
    raise RewardFunctionError(f"reward function {target!r}: weight {weight} is not finite")
  if isinstance(target, str):
    if target in GRADERS:
      function = RewardFunction(target, GRADERS[target], weight, grader=True)
    elif _PATH_RE.fullmatch(target):
      function = RewardFunction(target, target, weight)
    else:
      raise RewardFunctionError(f"unknown reward function {target!r}: expected one of {sorted(GRADERS)} or an "
                                "import path 'package.module:function'")
    function.load()  # a typo fails here, once, not in every worker
    return function
  if not callable(target):
    raise RewardFunctionError(f"reward function {target!r} is neither a name, an import path nor a function")
  name = getattr(target, "__name__", type(target).__name__)
  try:
    pickle.dumps(target)
  except (pickle.PicklingError, AttributeError, TypeError) as e:
    raise RewardFunctionError(f"reward function {name!r} runs in worker processes, so it must be a module-level "
                              f"function (a lambda or closure cannot be sent there): {e}") from None
  return RewardFunction(name, target, weight)


def _import(path: str) -> Callable:
  module_name, function_name = path.split(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise RewardFunctionError(f"reward function {path!r}: cannot import {module_name!r}: {e}") from None
  function = getattr(module, function_name, None)
  if not callable(function):
    raise RewardFunctionError(f"reward function {path!r}: {module_name} has no function {function_name!r}")
  return function


# ---- in a worker: one completion through every function ----------------------------------------------------------

def score_item(functions: Sequence[tuple[RewardFunction, Callable]], completion: str, prompt: str,
               columns: Mapping[str, Any], fallback: str) -> tuple[list[float | None], list[str]]:
  """(each function's value or None, each function's error: "" or why it scored 0).

  A function that raises scores 0 with its exception's type name. A result of the wrong shape or type is reported
  as "shape: ..." (the caller decides whether that is fatal).
  """
  values: list[float | None] = []
  errors: list[str] = []
  for function, call in functions:
    try:
      value = _call(function, call, completion, prompt, columns, fallback)
      error = ""
    except RewardFunctionError as e:
      value, error = 0.0, f"shape: {e}"
    except Exception as e:  # pylint: disable=broad-except  # untrusted input may break trusted code in any way
      value, error = 0.0, type(e).__name__
    values.append(value)
    errors.append(error)
  return values, errors


def _call(function: RewardFunction, call: Callable, completion: str, prompt: str, columns: Mapping[str, Any],
          fallback: str) -> float | None:
  if function.grader:
    return _checked_value(function, call(completion, str(columns.get("answer", "")), fallback))
  kwargs = {k: [v] for k, v in columns.items() if k not in (PROMPTS, COMPLETIONS)}
  result = call(prompts=[prompt], completions=[completion], **kwargs)
  if not isinstance(result, (list, tuple, np.ndarray)) or len(result) != 1:
    raise RewardFunctionError(f"reward function {function.name!r} returned {_short(result)} for 1 completion; "
                              "expected a list of 1 float (or None)")
  return _checked_value(function, result[0])


def _checked_value(function: RewardFunction, value: Any) -> float | None:
  if value is None and not function.grader:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise RewardFunctionError(f"reward function {function.name!r} returned {_short(value)}; expected a float")
  return float(value)


def _short(value: Any) -> str:
  text = repr(value)
  return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def weighted_total(functions: Sequence[RewardFunction], values_nf: np.ndarray) -> np.ndarray:
  """Per completion: the sum of weight x value over the functions that did not return None (NaN); float32."""
  weights = np.asarray([f.weight for f in functions], np.float64)
  terms = np.where(np.isnan(values_nf), 0.0, values_nf * weights[None, :])
  return terms.sum(axis=1).astype(np.float32)
