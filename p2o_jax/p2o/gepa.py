"""GEPA template search on the hard set: evolve prompt templates by reflection, keep the Pareto front on a dev split.

Host-side and device-agnostic: the trainer supplies an Evaluator (one batched greedy sampler call per `evaluate`) and a
Reflector (one batched call per `propose`). Every round of an iteration is one batched call: all parents' minibatch
rollouts, then all reflections, then all children's minibatch rollouts, then the dev rollouts of all accepted children.
The whole search state is a frozen GepaState that round-trips through plain JSON, so a run resumes bit-exactly.

Budget, as the authors' code counts it (`metric_calls`): the budget is `max_metric_calls`, or 23 x |D_dev| + 4140
when that is 0 (dspy's auto-budget of the authors' "heavy_4" setting). The seed's dev evaluation and iterations 1-2
are free; each later iteration costs B x (number of parents) + (number of accepted children) x |D_dev|, B the
configured minibatch size: the children's minibatch rollouts are not charged, and a parent whose reflection came back
empty is. A search stops when the remaining budget is <= 0, the train split is empty, no parent is selected, or (only
if `max_iters` > 0) after `max_iters` iterations. `rollouts` counts every (template, example) evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from p2o_jax.p2o.pareto import parent_weights, sample_parents
from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest, Rollout
from p2o_jax.p2o.reflection import Reflector

logger = logging.getLogger(__name__)

# dspy's GEPA.auto_budget for 72 candidates ("heavy_4", the authors' scripts), minibatch 35 and a full evaluation
# every 5 trials: |D_dev| + 72 x 5 + 108 x 35 + (109 // 5 + 1) x |D_dev|.
BUDGET_PER_DEV_INSTANCE = 23
BUDGET_BASE = 4140
FREE_ITERATIONS = 2


class Evaluator(Protocol):
  """Greedy rollouts of (template, hard-set index) pairs: one call is one batched sampler call on the device."""

  def evaluate(self, requests: Sequence[tuple[str, int]]) -> list[Rollout]:
    ...


@dataclasses.dataclass(frozen=True)
class GepaConfig:
  """GEPA knobs; defaults are the authors' (dev 300, beam 16, minibatch 3, the "heavy_4" budget, no iteration cap)."""

  dev_size: int = 300
  beam_width: int = 16
  minibatch_size: int = 3
  max_metric_calls: int = 0  # 0: BUDGET_PER_DEV_INSTANCE x |D_dev| + BUDGET_BASE
  max_iters: int = 0  # 0: no cap; the budget stops a search
  remove_dominated: bool = False  # True: the gepa package's parent pool (pareto.prune_dominated)
  reflection_max_prompt_tokens: int = 0  # the reflector's prompt limit (examples are cut to fit it); 0: none
  seed: int = 0

  def __post_init__(self):
    minimums = dict(dev_size=1, beam_width=1, minibatch_size=1, max_metric_calls=0, max_iters=0,
                    reflection_max_prompt_tokens=0, seed=0)
    for name, minimum in minimums.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"GepaConfig.{name} must be an int >= {minimum}, got {value!r}")
    if not isinstance(self.remove_dominated, bool):
      raise ValueError(f"GepaConfig.remove_dominated must be a bool, got {self.remove_dominated!r}")


def search_budget(cfg: GepaConfig, n_dev: int) -> int:
  """The metric-call budget of a search with `n_dev` dev instances."""
  return cfg.max_metric_calls or BUDGET_PER_DEV_INSTANCE * n_dev + BUDGET_BASE


@dataclasses.dataclass(frozen=True)
class IterationLog:
  """What one iteration did, per parent j: its minibatch and score, the child its reflection proposed (None: the reply
  was empty) and the child's minibatch score, whether it was accepted; then the accepted children's candidate indices
  and mean dev scores, and the iteration's cost and the budget left after it."""

  parents: tuple[int, ...]
  minibatches: tuple[tuple[int, ...], ...]
  parent_scores: tuple[float, ...]
  children: tuple[str | None, ...]
  child_scores: tuple[float | None, ...]
  accepted: tuple[bool, ...]
  new_candidates: tuple[int, ...]
  dev_scores: tuple[float, ...]
  best_mean_dev: float  # after the iteration
  cost: int
  remaining: int
  rollouts: int  # cumulative, after the iteration

  @property
  def rejected(self) -> int:
    """Reflections that came back empty."""
    return sum(child is None for child in self.children)

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), **{f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)
                                           if isinstance(getattr(self, f.name), tuple)},
            "minibatches": [list(mb) for mb in self.minibatches]}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> IterationLog:
    tuples = {f.name: tuple(data[f.name]) for f in dataclasses.fields(cls) if isinstance(data[f.name], list)}
    return cls(**{**data, **tuples, "minibatches": tuple(tuple(mb) for mb in data["minibatches"])})


@dataclasses.dataclass(frozen=True)
class GepaState:
  """The whole search: candidates (index 0 is the empty template once the seed is scored) and their dev scores.

  `dev_idx`/`train_idx` are hard-set indices; column j of `scores_cd` is dev instance `dev_idx[j]`. Minibatches are
  taken in turn from `pool_order` (a shuffled `train_idx`) at `pool_cursor`, so no train example is reused until the
  split is used up; from then on (cursor at the end) each is drawn from the whole split. `metric_calls` is what the
  budget has been charged, `rollouts` every evaluation; `rng_state` is numpy's bit-generator state as JSON text.
  """

  dev_idx: tuple[int, ...]
  train_idx: tuple[int, ...]
  candidates: tuple[str, ...]
  parents: tuple[int | None, ...]
  scores_cd: np.ndarray
  iteration: int
  budget: int
  metric_calls: int
  rollouts: int
  pool_order: tuple[int, ...]
  pool_cursor: int
  rng_state: str
  history: tuple[IterationLog, ...]

  def __post_init__(self):
    scores_cd = np.array(self.scores_cd, dtype=np.float64)
    if scores_cd.size == 0:
      scores_cd = scores_cd.reshape(0, len(self.dev_idx))
    expected = (len(self.candidates), len(self.dev_idx))
    if scores_cd.shape != expected or len(self.parents) != len(self.candidates):
      raise ValueError(f"GepaState scores_cd {scores_cd.shape} / {len(self.parents)} parents do not match {expected}")
    scores_cd.flags.writeable = False
    object.__setattr__(self, "scores_cd", scores_cd)

  @property
  def remaining(self) -> int:
    return self.budget - self.metric_calls

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON types only (lists, str, int, float, None)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {
        **{name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()},
        "scores_cd": self.scores_cd.tolist(),
        "history": [log.to_dict() for log in self.history],
    }

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> GepaState:
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:
      raise ValueError(f"GEPA state keys: missing {sorted(names - set(data))}, unknown {sorted(set(data) - names)}")
    history = tuple(IterationLog.from_dict(log) for log in data["history"])
    tuples = {name: tuple(data[name]) for name in ("dev_idx", "train_idx", "candidates", "parents", "pool_order")}
    return cls(**{**data, **tuples, "history": history})


def split_hard_set(n: int, dev_size: int, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(dev_idx, train_idx), each ascending, from a seeded shuffle: half (n // 2) to dev if n < 1.5 x dev_size, else
  `dev_size` (= min(dev_size, n // 2) there); the authors' rule for their dev_ratio=300 (|H| < 450: 50/50)."""
  if n < 2:
    raise ValueError(f"the hard set needs at least 2 examples to split into dev and train, got {n}")
  n_dev = n // 2 if 2 * n < 3 * dev_size else dev_size
  order = rng.permutation(n)
  return tuple(sorted(order[:n_dev].tolist())), tuple(sorted(order[n_dev:].tolist()))


def _generator(state: GepaState) -> np.random.Generator:
  bit_generator = np.random.PCG64()
  bit_generator.state = json.loads(state.rng_state)
  return np.random.Generator(bit_generator)


def _generator_state(rng: np.random.Generator) -> str:
  return json.dumps(rng.bit_generator.state)


def init_state(n_hard: int, cfg: GepaConfig) -> GepaState:
  """A fresh search over a hard set of `n_hard` examples: split, shuffled minibatch pool, no candidates yet."""
  rng = np.random.default_rng(cfg.seed)
  dev_idx, train_idx = split_hard_set(n_hard, cfg.dev_size, rng)
  return GepaState(dev_idx=dev_idx, train_idx=train_idx, candidates=(), parents=(), scores_cd=np.zeros((0, 0)),
                   iteration=0, budget=search_budget(cfg, len(dev_idx)), metric_calls=0, rollouts=0,
                   pool_order=tuple(rng.permutation(train_idx).tolist()), pool_cursor=0,
                   rng_state=_generator_state(rng), history=())


def _evaluate_blocks(evaluator: Evaluator, blocks: Sequence[tuple[str, Sequence[int]]]) -> list[list[Rollout]]:
  """Rollouts of each (template, examples) block, all blocks in ONE evaluator call (none if there are no blocks)."""
  requests = [(template, i) for template, examples in blocks for i in examples]
  if not requests:
    return [[] for _ in blocks]
  rollouts = evaluator.evaluate(requests)
  if len(rollouts) != len(requests):
    raise ValueError(f"evaluator returned {len(rollouts)} rollouts for {len(requests)} requests")
  out, start = [], 0
  for _, examples in blocks:
    out.append(list(rollouts[start:start + len(examples)]))
    start += len(examples)
  return out


def evaluate_seed(state: GepaState, evaluator: Evaluator) -> GepaState:
  """Score the empty template on all of D_dev; it becomes candidate 0 (free: the budget is not charged)."""
  if state.candidates:
    raise ValueError("the seed template is already scored")
  (rollouts,) = _evaluate_blocks(evaluator, [("", state.dev_idx)])
  return dataclasses.replace(state, candidates=("",), parents=(None,), scores_cd=[[r.score for r in rollouts]],
                             rollouts=state.rollouts + len(rollouts))


def _draw_minibatches(state: GepaState, count: int, size: int,
                      rng: np.random.Generator) -> tuple[list[tuple[int, ...]], int]:
  """`count` minibatches of `size`, in turn from the unused part of the pool; once fewer than `size` are unused, the
  pool counts as used up (cursor at its end) and every minibatch is drawn from the whole train split."""
  cursor, minibatches = state.pool_cursor, []
  for _ in range(count):
    if cursor + size <= len(state.pool_order):
      minibatches.append(state.pool_order[cursor:cursor + size])
      cursor += size
    else:
      cursor = len(state.pool_order)
      minibatches.append(tuple(rng.choice(state.train_idx, size=size, replace=False).tolist()))
  return minibatches, cursor


def _reflection_request(template: str, examples: Sequence[int], rollouts: Sequence[Rollout],
                        questions: Sequence[str], max_prompt_tokens: int) -> ReflectionRequest:
  records = tuple(FeedbackRecord(question=questions[i], output=r.output, feedback=r.feedback, score=r.score,
                                 format_error=r.format_error)
                  for i, r in zip(examples, rollouts))
  return ReflectionRequest(template=template, records=records, max_prompt_tokens=max_prompt_tokens)


def _minibatch_score(rollouts: Sequence[Rollout]) -> float:
  return float(sum(r.score for r in rollouts))


def stop_reason(state: GepaState, cfg: GepaConfig) -> str | None:
  """Why no further iteration may start ("budget", "train_split_empty", "no_parent", "max_iters"), or None."""
  if not state.candidates:
    return None
  if state.remaining <= 0:
    return "budget"
  if not state.train_idx:
    return "train_split_empty"
  if not parent_weights(state.scores_cd, remove_dominated=cfg.remove_dominated):
    return "no_parent"
  if cfg.max_iters and state.iteration >= cfg.max_iters:
    return "max_iters"
  return None


def done(state: GepaState, cfg: GepaConfig) -> bool:
  return stop_reason(state, cfg) is not None


def gepa_iteration(state: GepaState, evaluator: Evaluator, reflector: Reflector, questions: Sequence[str],
                   cfg: GepaConfig) -> GepaState:
  """One iteration: select parents, reflect on their minibatches, accept strict improvements, score them on D_dev.

  `questions[i]` is the user text of hard-set example i without any template (the rollouts carry output and
  feedback).
  """
  if not state.candidates:
    raise ValueError("score the seed template (evaluate_seed) before running GEPA iterations")
  n_hard = len(state.dev_idx) + len(state.train_idx)
  if len(questions) < n_hard:
    raise ValueError(f"questions has {len(questions)} entries but the hard set has {n_hard}")
  rng = _generator(state)
  parents = sample_parents(state.scores_cd, cfg.beam_width, rng, remove_dominated=cfg.remove_dominated)
  minibatches, pool_cursor = _draw_minibatches(state, len(parents), min(cfg.minibatch_size, len(state.train_idx)),
                                               rng)
  parent_templates = [state.candidates[p] for p in parents]

  parent_rollouts = _evaluate_blocks(evaluator, list(zip(parent_templates, minibatches)))
  requests = [_reflection_request(t, mb, rolls, questions, cfg.reflection_max_prompt_tokens)
              for t, mb, rolls in zip(parent_templates, minibatches, parent_rollouts)]
  proposals = list(reflector.propose(requests))
  if len(proposals) != len(requests):
    raise ValueError(f"reflector returned {len(proposals)} proposals for {len(requests)} requests")

  tried = [j for j, proposal in enumerate(proposals) if proposal is not None]
  child_rollouts = dict(zip(tried, _evaluate_blocks(evaluator, [(proposals[j], minibatches[j]) for j in tried])))
  parent_scores = [_minibatch_score(rolls) for rolls in parent_rollouts]
  child_scores = [_minibatch_score(child_rollouts[j]) if j in child_rollouts else None for j in range(len(parents))]
  accepted = [j for j in tried if child_scores[j] > parent_scores[j]]
  dev_rollouts = _evaluate_blocks(evaluator, [(proposals[j], state.dev_idx) for j in accepted])

  new_rows = [[r.score for r in rolls] for rolls in dev_rollouts]
  scores_cd = np.concatenate([state.scores_cd, np.array(new_rows, dtype=np.float64).reshape(-1, len(state.dev_idx))])
  cost = 0 if state.iteration < FREE_ITERATIONS else (
      cfg.minibatch_size * len(parents) + len(accepted) * len(state.dev_idx))
  rollouts = state.rollouts + sum(len(rolls) for rolls in parent_rollouts) + sum(
      len(rolls) for rolls in child_rollouts.values()) + sum(len(rolls) for rolls in dev_rollouts)
  log = IterationLog(
      parents=tuple(parents), minibatches=tuple(minibatches), parent_scores=tuple(parent_scores),
      children=tuple(proposals), child_scores=tuple(child_scores),
      accepted=tuple(j in accepted for j in range(len(parents))),
      new_candidates=tuple(range(len(state.candidates), len(state.candidates) + len(accepted))),
      dev_scores=tuple(float(np.mean(row)) for row in new_rows), best_mean_dev=float(scores_cd.mean(axis=1).max()),
      cost=cost, remaining=state.remaining - cost, rollouts=rollouts)
  logger.debug("GEPA iteration %d: %s", state.iteration + 1, log)  # the trainer shows a progress line instead
  return dataclasses.replace(
      state, candidates=state.candidates + tuple(proposals[j] for j in accepted),
      parents=state.parents + tuple(parents[j] for j in accepted), scores_cd=scores_cd,
      iteration=state.iteration + 1, metric_calls=state.metric_calls + cost, rollouts=rollouts,
      pool_cursor=pool_cursor, rng_state=_generator_state(rng), history=state.history + (log,))


def run_gepa(state: GepaState, evaluator: Evaluator, reflector: Reflector, questions: Sequence[str], cfg: GepaConfig,
             on_iteration: Callable[[GepaState], None] | None = None) -> GepaState:
  """Score the seed if needed, then iterate until `done`; `on_iteration(state)` runs after every iteration."""
  if not state.candidates:
    state = evaluate_seed(state, evaluator)
  while not done(state, cfg):
    state = gepa_iteration(state, evaluator, reflector, questions, cfg)
    if on_iteration is not None:
      on_iteration(state)
  return state


def best_candidate(state: GepaState) -> int:
  """Index of the candidate with the highest mean dev score (ties: the lowest index)."""
  if not state.candidates:
    raise ValueError("no candidates yet: score the seed template first")
  return int(np.argmax(state.scores_cd.mean(axis=1)))


# ---- the search log: one JSON record for the seed, one per iteration, one summary ------------------------------------

def seed_record(state: GepaState) -> dict[str, Any]:
  return {"event": "seed", "dev_size": len(state.dev_idx), "train_size": len(state.train_idx),
          "budget": state.budget, "dev_score": float(state.scores_cd[0].mean())}


def iteration_record(state: GepaState, iteration: int) -> dict[str, Any]:
  """Iteration `iteration` (1-based) of `state.history` with the template texts spelled out."""
  log = state.history[iteration - 1]
  new = iter(zip(log.new_candidates, log.dev_scores))
  steps = []
  for j, parent in enumerate(log.parents):
    candidate, dev_score = next(new) if log.accepted[j] else (None, None)
    steps.append({"parent": parent, "parent_template": state.candidates[parent], "minibatch": list(log.minibatches[j]),
                  "parent_score": log.parent_scores[j], "child_template": log.children[j],
                  "child_score": log.child_scores[j], "accepted": log.accepted[j], "candidate": candidate,
                  "dev_score": dev_score})
  return {"event": "iteration", "iteration": iteration, "parents": steps, "accepted": sum(log.accepted),
          "empty_reflections": log.rejected, "best_dev_score": log.best_mean_dev, "cost": log.cost,
          "remaining_budget": log.remaining, "rollouts": log.rollouts}


def summary_record(state: GepaState, cfg: GepaConfig) -> dict[str, Any]:
  best = best_candidate(state)
  return {"event": "summary", "best_template": state.candidates[best], "best_candidate": best,
          "best_dev_score": float(state.scores_cd[best].mean()), "candidates": len(state.candidates),
          "iterations": state.iteration, "metric_calls": state.metric_calls, "budget": state.budget,
          "rollouts": state.rollouts, "stop_reason": stop_reason(state, cfg)}
