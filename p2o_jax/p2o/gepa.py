"""GEPA template search on the hard set: evolve prompt templates by reflection, keep the Pareto front on a dev split.

Host-side and device-agnostic: the trainer supplies an Evaluator (one batched greedy sampler call per `evaluate`) and a
Reflector (one batched call per `propose`). Every round of an iteration is one batched call: all parents' minibatch
rollouts, then all reflections, then all children's minibatch rollouts, then the dev rollouts of all accepted children.
The whole search state is a frozen GepaState that round-trips through plain JSON, so a run resumes bit-exactly.

Budget rule (metric calls = evaluated (template, example) pairs, the seed's dev evaluation included). An iteration
with W parents and minibatch size B costs at most W * (2B + |D_dev|): a parent rollout and a child rollout per
minibatch example (a rejected reply, None, skips the child's B), plus |D_dev| per accepted child. An iteration starts
iff fewer than `max_iters` ran, `metric_calls < max_metric_calls`, and the previous iteration's worst case fitted into
the budget when it started. An iteration whose worst case does not fit still runs, but as the last one (the authors'
"proceed with final iteration"), so a search ends below max_metric_calls + W * (2B + |D_dev|).
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


class Evaluator(Protocol):
  """Greedy rollouts of (template, hard-set index) pairs: one call is one batched sampler call on the device."""

  def evaluate(self, requests: Sequence[tuple[str, int]]) -> list[Rollout]:
    ...


@dataclasses.dataclass(frozen=True)
class GepaConfig:
  """GEPA knobs; defaults are the authors' (dev 300, beam 16, minibatch 3, their "heavy_4" budget at |D_dev|=300)."""

  dev_size: int = 300
  beam_width: int = 16
  minibatch_size: int = 3
  max_metric_calls: int = 11_040
  max_iters: int = 1_000  # effectively uncapped, as in the authors' code: the budget is what stops a search
  seed: int = 0

  def __post_init__(self):
    minimums = dict(dev_size=1, beam_width=1, minibatch_size=1, max_metric_calls=1, max_iters=0, seed=0)
    for name, minimum in minimums.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"GepaConfig.{name} must be an int >= {minimum}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class IterationLog:
  """What one iteration did; `tried` counts every proposal asked for, `rejected` the None replies among them."""

  parents: tuple[int, ...]
  tried: int
  rejected: int
  accepted: int
  best_mean_dev: float  # after the iteration
  metric_calls: int  # cumulative, after the iteration
  worst_case_fit: bool  # False marks the last iteration of a search


@dataclasses.dataclass(frozen=True)
class GepaState:
  """The whole search: candidates (index 0 is the empty template once the seed is scored) and their dev scores.

  `dev_idx`/`train_idx` are hard-set indices; column j of `scores_cd` is dev instance `dev_idx[j]`. The minibatch pool
  is a shuffled `train_idx` consumed from `pool_cursor`; `rng_state` is numpy's bit-generator state as JSON text.
  """

  dev_idx: tuple[int, ...]
  train_idx: tuple[int, ...]
  candidates: tuple[str, ...]
  parents: tuple[int | None, ...]
  scores_cd: np.ndarray
  iteration: int
  metric_calls: int
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

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON types only (lists, str, int, float, None)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return {
        **{name: list(value) if isinstance(value, tuple) else value for name, value in fields.items()},
        "scores_cd": self.scores_cd.tolist(),
        "history": [{**dataclasses.asdict(log), "parents": list(log.parents)} for log in self.history],
    }

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> GepaState:
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) != names:
      raise ValueError(f"GEPA state keys: missing {sorted(names - set(data))}, unknown {sorted(set(data) - names)}")
    history = tuple(IterationLog(**{**log, "parents": tuple(log["parents"])}) for log in data["history"])
    tuples = {name: tuple(data[name]) for name in ("dev_idx", "train_idx", "candidates", "parents", "pool_order")}
    return cls(**{**data, **tuples, "history": history})


def split_hard_set(n: int, dev_size: int, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(dev_idx, train_idx), each ascending: `dev_size` random indices, or half (n // 2) if n < 1.5 * dev_size."""
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
                   iteration=0, metric_calls=0, pool_order=tuple(rng.permutation(train_idx).tolist()), pool_cursor=0,
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
  """Score the empty template on all of D_dev; it becomes candidate 0."""
  if state.candidates:
    raise ValueError("the seed template is already scored")
  (rollouts,) = _evaluate_blocks(evaluator, [("", state.dev_idx)])
  return dataclasses.replace(state, candidates=("",), parents=(None,), scores_cd=[[r.score for r in rollouts]],
                             metric_calls=state.metric_calls + len(rollouts))


def _minibatch_size(state: GepaState, cfg: GepaConfig) -> int:
  return min(cfg.minibatch_size, len(state.train_idx))


def worst_case_calls(state: GepaState, cfg: GepaConfig) -> int:
  """The most metric calls the next iteration can spend: W * (2B + |D_dev|), W = parents it will select."""
  n_parents = min(cfg.beam_width, len(parent_weights(state.scores_cd)))
  return n_parents * (2 * _minibatch_size(state, cfg) + len(state.dev_idx))


def _draw_minibatches(state: GepaState, count: int, size: int,
                      rng: np.random.Generator) -> tuple[list[tuple[int, ...]], tuple[int, ...], int]:
  """`count` minibatches from the pool without reuse; an exhausted pool (fewer than `size` left) is reshuffled."""
  order, cursor, minibatches = state.pool_order, state.pool_cursor, []
  for _ in range(count):
    if cursor + size > len(order):
      order, cursor = tuple(rng.permutation(state.train_idx).tolist()), 0
    minibatches.append(order[cursor:cursor + size])
    cursor += size
  return minibatches, order, cursor


def _reflection_request(template: str, examples: Sequence[int], rollouts: Sequence[Rollout],
                        questions: Sequence[str]) -> ReflectionRequest:
  records = tuple(FeedbackRecord(question=questions[i], output=r.output, feedback=r.feedback, score=r.score)
                  for i, r in zip(examples, rollouts))
  return ReflectionRequest(template=template, records=records)


def _minibatch_score(rollouts: Sequence[Rollout]) -> float:
  return sum(r.score for r in rollouts)


def gepa_iteration(state: GepaState, evaluator: Evaluator, reflector: Reflector, questions: Sequence[str],
                   cfg: GepaConfig) -> GepaState:
  """One iteration: select parents, reflect on their minibatches, accept strict improvements, score them on D_dev.

  `questions[i]` is the question text of hard-set example i (the rollouts carry output and feedback).
  """
  if not state.candidates:
    raise ValueError("score the seed template (evaluate_seed) before running GEPA iterations")
  n_hard = len(state.dev_idx) + len(state.train_idx)
  if len(questions) < n_hard:
    raise ValueError(f"questions has {len(questions)} entries but the hard set has {n_hard}")
  worst_case_fit = state.metric_calls + worst_case_calls(state, cfg) <= cfg.max_metric_calls
  rng = _generator(state)
  parents = sample_parents(state.scores_cd, cfg.beam_width, rng)
  minibatches, pool_order, pool_cursor = _draw_minibatches(state, len(parents), _minibatch_size(state, cfg), rng)
  parent_templates = [state.candidates[p] for p in parents]

  parent_rollouts = _evaluate_blocks(evaluator, list(zip(parent_templates, minibatches)))
  requests = [_reflection_request(t, mb, rolls, questions)
              for t, mb, rolls in zip(parent_templates, minibatches, parent_rollouts)]
  proposals = list(reflector.propose(requests))
  if len(proposals) != len(requests):
    raise ValueError(f"reflector returned {len(proposals)} proposals for {len(requests)} requests")

  tried = [j for j, proposal in enumerate(proposals) if proposal is not None]
  child_rollouts = _evaluate_blocks(evaluator, [(proposals[j], minibatches[j]) for j in tried])
  accepted = [j for j, rolls in zip(tried, child_rollouts)
              if _minibatch_score(rolls) > _minibatch_score(parent_rollouts[j])]
  dev_rollouts = _evaluate_blocks(evaluator, [(proposals[j], state.dev_idx) for j in accepted])

  new_rows = [[r.score for r in rolls] for rolls in dev_rollouts]
  scores_cd = np.concatenate([state.scores_cd, np.array(new_rows, dtype=np.float64).reshape(-1, len(state.dev_idx))])
  metric_calls = state.metric_calls + sum(len(rolls) for rounds in (parent_rollouts, child_rollouts, dev_rollouts)
                                         for rolls in rounds)
  log = IterationLog(parents=tuple(parents), tried=len(proposals), rejected=len(proposals) - len(tried),
                     accepted=len(accepted), best_mean_dev=float(scores_cd.mean(axis=1).max()),
                     metric_calls=metric_calls, worst_case_fit=worst_case_fit)
  logger.debug("GEPA iteration %d: %s", state.iteration + 1, log)  # the trainer shows a progress line instead
  return dataclasses.replace(
      state, candidates=state.candidates + tuple(proposals[j] for j in accepted),
      parents=state.parents + tuple(parents[j] for j in accepted), scores_cd=scores_cd,
      iteration=state.iteration + 1, metric_calls=metric_calls, pool_order=pool_order, pool_cursor=pool_cursor,
      rng_state=_generator_state(rng), history=state.history + (log,))


def done(state: GepaState, cfg: GepaConfig) -> bool:
  """True once no further iteration may start under the budget rule in the module docstring."""
  if not state.candidates:
    return False
  last_was_final = bool(state.history) and not state.history[-1].worst_case_fit
  return state.iteration >= cfg.max_iters or state.metric_calls >= cfg.max_metric_calls or last_was_final


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
