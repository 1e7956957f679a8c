"""GEPA search engine on a toy world with a known best template.

Templates are space-separated words; hard example i is solved iff the template contains VOCAB[i % 6], so the template
holding all six words solves every dev instance. The toy reflector reads the needed word out of the feedback of a
failed minibatch example and adds it, or swaps it in for a word it already has (so candidates become incomparable and
the Pareto front holds several), or gives no reply; deterministic given its own seed and the request, so it needs no
state of its own to resume.
"""

import dataclasses
import json
import re
import zlib

import numpy as np
import pytest

from p2o_jax.p2o.gepa import (GepaConfig, GepaState, best_candidate, done, evaluate_seed, gepa_iteration, init_state,
                              run_gepa, split_hard_set)
from p2o_jax.p2o.pareto import parent_weights, sample_parents
from p2o_jax.p2o.records import ReflectionRequest, Rollout

VOCAB = ("carry", "align", "check", "expand", "regroup", "verify")
N_HARD = 60
QUESTIONS = [f"question {i}" for i in range(N_HARD)]
CFG = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=3_000, max_iters=40, seed=0)


def needed_word(i: int) -> str:
  return VOCAB[i % len(VOCAB)]


def solves(template: str, i: int) -> bool:
  return needed_word(i) in template.split()


class WordEvaluator:

  def __init__(self):
    self.calls: list[list[tuple[str, int]]] = []

  def evaluate(self, requests):
    self.calls.append(list(requests))
    return [Rollout(score=float(solves(t, i)), output=f"my answer to {i}",
                    feedback="Correct." if solves(t, i) else f"Incorrect: the method needs '{needed_word(i)}'.")
            for t, i in requests]


class WordReflector:

  def __init__(self, seed: int = 0, no_reply_rate: float = 0.2, swap_rate: float = 0.3):
    self.seed, self.no_reply_rate, self.swap_rate = seed, no_reply_rate, swap_rate
    self.calls: list[list[str | None]] = []

  def propose(self, requests):
    replies = [self._propose_one(r) for r in requests]
    self.calls.append(replies)
    return replies

  def _propose_one(self, request: ReflectionRequest) -> str | None:
    key = zlib.crc32("|".join([request.template, *(r.question for r in request.records)]).encode())
    rng = np.random.default_rng([self.seed, key])
    words = request.template.split()
    hints = sorted({re.search(r"'(\w+)'", r.feedback).group(1) for r in request.records if r.score < 1})
    roll = rng.random()
    if not hints or roll < self.no_reply_rate:
      return None
    if roll < self.no_reply_rate + self.swap_rate and words:
      words.pop(int(rng.integers(len(words))))
    return " ".join(sorted(words + [str(rng.choice(hints))]))


def rich_state(cfg: GepaConfig) -> GepaState:
  """The seed plus six one-word candidates, each alone on the fronts of its word's instances: six survivors."""
  state = init_state(N_HARD, cfg)
  templates = ("",) + VOCAB
  scores_cd = [[float(solves(t, i)) for i in state.dev_idx] for t in templates]
  return dataclasses.replace(state, candidates=templates, parents=(None,) + (0,) * len(VOCAB), scores_cd=scores_cd,
                             metric_calls=len(templates) * len(state.dev_idx))


def test_split_rule():
  for n, n_dev in ((1000, 300), (450, 300), (449, 224), (10, 5), (3, 1)):
    dev, train = split_hard_set(n, 300, np.random.default_rng(0))
    assert len(dev) == n_dev and len(train) == n - n_dev
    assert list(dev) == sorted(dev) and sorted(dev + train) == list(range(n))
  assert split_hard_set(1000, 300, np.random.default_rng(1)) != split_hard_set(1000, 300, np.random.default_rng(2))
  with pytest.raises(ValueError, match="at least 2"):
    split_hard_set(1, 300, np.random.default_rng(0))
  state = init_state(N_HARD, CFG)
  assert len(state.dev_idx) == 24 and sorted(state.pool_order) == list(state.train_idx)


@pytest.mark.parametrize("field,value", [("dev_size", 0), ("beam_width", 0), ("minibatch_size", -1),
                                         ("max_metric_calls", 0), ("max_iters", -1), ("seed", -1), ("dev_size", 2.5)])
def test_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"GepaConfig.{field}"):
    GepaConfig(**{field: value})


def test_finds_the_template_that_solves_every_dev_instance():
  state = run_gepa(init_state(N_HARD, CFG), WordEvaluator(), WordReflector(), QUESTIONS, CFG)
  assert {needed_word(i) for i in state.dev_idx} == set(VOCAB)
  best = best_candidate(state)
  assert state.scores_cd[best].mean() == 1.0 and set(state.candidates[best].split()) == set(VOCAB)
  assert state.candidates[0] == "" and state.parents[0] is None
  # Every row is that template's true dev score, column j being hard example dev_idx[j].
  for template, row in zip(state.candidates, state.scores_cd):
    np.testing.assert_array_equal(row, [solves(template, i) for i in state.dev_idx])
  assert all(p is not None and p < c for c, p in enumerate(state.parents) if c > 0)


def test_each_round_is_one_batched_call_and_metric_calls_are_exact():
  evaluator = WordEvaluator()
  seeded = evaluate_seed(init_state(N_HARD, CFG), evaluator)
  assert evaluator.calls == [[("", i) for i in seeded.dev_idx]] and seeded.metric_calls == 24

  state, reflector, evaluator = rich_state(CFG), WordReflector(), WordEvaluator()
  n_dev, minibatches, widths = len(state.dev_idx), [], []
  for _ in range(12):
    n_calls, before = len(evaluator.calls), state
    state = gepa_iteration(state, evaluator, reflector, QUESTIONS, CFG)
    log, calls, (replies,) = state.history[-1], evaluator.calls[n_calls:], reflector.calls[-1:]
    parents, w = list(log.parents), len(log.parents)
    widths.append(w)
    # Parents come from the stored rng state, and a draw among more survivors than the beam advances it.
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = json.loads(before.rng_state)
    assert parents == sample_parents(before.scores_cd, CFG.beam_width, rng)
    assert state.rng_state != before.rng_state or len(parent_weights(before.scores_cd)) <= CFG.beam_width
    tried = [j for j, reply in enumerate(replies) if reply is not None]
    assert len(replies) == w == log.tried and log.rejected == w - len(tried)

    parent_call = calls[0]
    assert len(parent_call) == w * 3
    blocks = [parent_call[3 * j:3 * j + 3] for j in range(w)]
    assert [{t for t, _ in b} for b in blocks] == [{before.candidates[p]} for p in parents]
    mbs = [tuple(i for _, i in b) for b in blocks]
    minibatches += mbs
    parent_sums = [sum(solves(t, i) for t, i in b) for b in blocks]

    child_call = calls[1] if tried else []
    assert child_call == [(replies[j], i) for j in tried for i in mbs[j]]
    accepted = [j for j in tried if sum(solves(replies[j], i) for i in mbs[j]) > parent_sums[j]]
    assert log.accepted == len(accepted)
    dev_calls = calls[1 + bool(tried):]
    assert dev_calls == ([[(replies[j], i) for j in accepted for i in state.dev_idx]] if accepted else [])
    assert len(calls) == 1 + bool(tried) + bool(accepted)

    assert state.candidates == before.candidates + tuple(replies[j] for j in accepted)
    assert state.parents == before.parents + tuple(parents[j] for j in accepted)
    assert state.metric_calls - before.metric_calls == sum(map(len, calls)) == (
        3 * w + 3 * len(tried) + n_dev * len(accepted))
    assert log.metric_calls == state.metric_calls
    assert log.best_mean_dev == state.scores_cd.mean(axis=1).max()
  assert widths[0] == CFG.beam_width and sum(widths) >= 24
  # The pool is drawn without reuse: 36 train examples make exactly 12 minibatches per pass.
  for start in range(0, len(minibatches) - 11, 12):
    assert sorted(i for mb in minibatches[start:start + 12] for i in mb) == list(state.train_idx)


def test_budget_is_exceeded_by_at_most_the_last_iteration():
  cfg = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=600, max_iters=100, seed=3)
  start = rich_state(cfg)
  state = run_gepa(start, WordEvaluator(), WordReflector(seed=1), QUESTIONS, cfg)
  starts = [start.metric_calls] + [log.metric_calls for log in state.history[:-1]]
  worst = [len(log.parents) * (2 * 3 + 24) for log in state.history]
  fits = [s + w <= cfg.max_metric_calls for s, w in zip(starts, worst)]
  assert [log.worst_case_fit for log in state.history] == fits
  assert all(fits[:-1]) and all(s < cfg.max_metric_calls for s in starts)
  assert not fits[-1] or state.metric_calls >= cfg.max_metric_calls
  assert state.metric_calls < cfg.max_metric_calls + worst[-1]
  assert done(state, cfg) and 1 < state.iteration < cfg.max_iters and max(worst) == 4 * 30


def test_iteration_cap_stops_the_search():
  cfg = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=10**6, max_iters=3, seed=0)
  seen = []
  state = run_gepa(init_state(N_HARD, cfg), WordEvaluator(), WordReflector(), QUESTIONS, cfg,
                   on_iteration=lambda s: seen.append(s.iteration))
  assert state.iteration == 3 and seen == [1, 2, 3]


def test_rejected_replies_are_counted_and_cost_no_metric_calls():
  evaluator = WordEvaluator()
  state = evaluate_seed(init_state(N_HARD, CFG), evaluator)
  for _ in range(3):
    n_calls, calls_before = len(evaluator.calls), state.metric_calls
    state = gepa_iteration(state, evaluator, WordReflector(no_reply_rate=1.0), QUESTIONS, CFG)
    log = state.history[-1]
    assert len(evaluator.calls) == n_calls + 1
    assert log.tried == log.rejected == 1 and log.accepted == 0  # only the seed exists, so one parent
    assert state.metric_calls - calls_before == 3
  assert state.candidates == ("",)


def test_same_seed_gives_identical_state():
  def run(seed):
    cfg = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=1_500, max_iters=40, seed=seed)
    return run_gepa(rich_state(cfg), WordEvaluator(), WordReflector(), QUESTIONS, cfg).to_dict()

  assert run(0) == run(0)
  assert run(0) != run(1)


def test_resume_from_json_mid_run_equals_uninterrupted_run():
  snapshots = []
  full = run_gepa(rich_state(CFG), WordEvaluator(), WordReflector(), QUESTIONS, CFG,
                  on_iteration=lambda s: snapshots.append(json.dumps(s.to_dict())))
  assert len(snapshots) == full.iteration > 6
  # Iteration 3 sits mid-beam: several survivors, so the parent draw depends on the restored rng state.
  restored = GepaState.from_dict(json.loads(snapshots[2]))
  assert json.dumps(restored.to_dict()) == snapshots[2] and len(restored.history[-1].parents) > 1
  resumed = run_gepa(restored, WordEvaluator(), WordReflector(), QUESTIONS, CFG)
  assert resumed.to_dict() == full.to_dict()


def test_best_candidate_breaks_ties_by_lowest_index():
  state = GepaState(dev_idx=(0, 1), train_idx=(2, 3), candidates=("", "a", "b", "c"), parents=(None, 0, 0, 1),
                    scores_cd=[[0, 1], [1, 0], [1, 1], [1, 1]], iteration=0, metric_calls=0, pool_order=(2, 3),
                    pool_cursor=0, rng_state=init_state(4, CFG).rng_state, history=())
  assert best_candidate(state) == 2


def test_bad_state_and_input_are_rejected():
  state = init_state(N_HARD, CFG)
  data = state.to_dict()
  with pytest.raises(ValueError, match="missing \\['rng_state'\\]"):
    GepaState.from_dict({k: v for k, v in data.items() if k != "rng_state"})
  with pytest.raises(ValueError, match="scores_cd"):
    GepaState.from_dict({**data, "scores_cd": [[1.0] * 24]})
  with pytest.raises(ValueError, match="seed template"):
    gepa_iteration(state, WordEvaluator(), WordReflector(), QUESTIONS, CFG)
  with pytest.raises(ValueError, match="questions has 10"):
    gepa_iteration(evaluate_seed(state, WordEvaluator()), WordEvaluator(), WordReflector(), QUESTIONS[:10], CFG)
