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

import ml_collections

from p2o_jax.config import base_config
from p2o_jax.data.records import Query
from p2o_jax.p2o import phase
from p2o_jax.p2o.gepa import (GepaConfig, GepaState, best_candidate, done, evaluate_seed, gepa_iteration, init_state,
                              run_gepa, search_budget, split_hard_set, stop_reason)
from p2o_jax.p2o.pareto import sample_parents
from p2o_jax.p2o.records import ReflectionRequest, Rollout
from p2o_jax.p2o.reflection import ReflectionStats
from p2o_jax.run_dir import RunDir

VOCAB = ("carry", "align", "check", "expand", "regroup", "verify")
N_HARD = 60
QUESTIONS = [f"question {i}" for i in range(N_HARD)]
CFG = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=3_000, max_iters=40, seed=0)
UNCAPPED = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3)  # the authors' budget, no iteration cap


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
  """The seed plus six one-word candidates, each alone on the fronts of its word's instances."""
  state = init_state(N_HARD, cfg)
  templates = ("",) + VOCAB
  scores_cd = [[float(solves(t, i)) for i in state.dev_idx] for t in templates]
  return dataclasses.replace(state, candidates=templates, parents=(None,) + (0,) * len(VOCAB), scores_cd=scores_cd,
                             rollouts=len(templates) * len(state.dev_idx))


def test_split_rule():
  # |H| < 450: 50/50 (dev gets the smaller half); otherwise min(300, |H| / 2) = 300.
  for n, n_dev in ((1000, 300), (600, 300), (450, 300), (449, 224), (10, 5), (3, 1)):
    dev, train = split_hard_set(n, 300, np.random.default_rng(0))
    assert len(dev) == n_dev and len(train) == n - n_dev
    assert list(dev) == sorted(dev) and sorted(dev + train) == list(range(n))
  # A seeded shuffle: the same seed gives the same split, another seed another one.
  assert split_hard_set(1000, 300, np.random.default_rng(1)) == split_hard_set(1000, 300, np.random.default_rng(1))
  assert split_hard_set(1000, 300, np.random.default_rng(1)) != split_hard_set(1000, 300, np.random.default_rng(2))
  with pytest.raises(ValueError, match="at least 2"):
    split_hard_set(1, 300, np.random.default_rng(0))
  state = init_state(N_HARD, CFG)
  assert len(state.dev_idx) == 24 and sorted(state.pool_order) == list(state.train_idx)


@pytest.mark.parametrize("field,value", [("dev_size", 0), ("beam_width", 0), ("minibatch_size", -1),
                                         ("max_metric_calls", -1), ("max_iters", -1), ("seed", -1), ("dev_size", 2.5),
                                         ("remove_dominated", 1), ("reflection_max_prompt_tokens", -1)])
def test_config_rejects_bad_values(field, value):
  with pytest.raises(ValueError, match=f"GepaConfig.{field}"):
    GepaConfig(**{field: value})


def test_default_budget_is_the_authors_formula_and_an_explicit_one_wins():
  assert GepaConfig().max_metric_calls == 0 and GepaConfig().max_iters == 0
  assert search_budget(GepaConfig(), 300) == 11_040
  assert search_budget(GepaConfig(), 24) == 23 * 24 + 4140
  assert search_budget(GepaConfig(max_metric_calls=500), 300) == 500
  assert init_state(N_HARD, UNCAPPED).budget == 23 * 24 + 4140
  assert init_state(N_HARD, CFG).budget == 3_000


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


def test_each_round_is_one_batched_call_and_every_rollout_is_counted():
  evaluator = WordEvaluator()
  seeded = evaluate_seed(init_state(N_HARD, CFG), evaluator)
  assert evaluator.calls == [[("", i) for i in seeded.dev_idx]]
  assert seeded.rollouts == 24 and seeded.metric_calls == 0  # the seed's dev evaluation is free

  state, reflector, evaluator = rich_state(CFG), WordReflector(), WordEvaluator()
  n_dev, widths = len(state.dev_idx), []
  for _ in range(12):
    n_calls, before = len(evaluator.calls), state
    state = gepa_iteration(state, evaluator, reflector, QUESTIONS, CFG)
    log, calls, (replies,) = state.history[-1], evaluator.calls[n_calls:], reflector.calls[-1:]
    parents, w = list(log.parents), len(log.parents)
    widths.append(w)
    # Parents come from the stored rng state.
    rng = np.random.Generator(np.random.PCG64())
    rng.bit_generator.state = json.loads(before.rng_state)
    assert parents == sample_parents(before.scores_cd, CFG.beam_width, rng)
    tried = [j for j, reply in enumerate(replies) if reply is not None]
    assert list(log.children) == replies and log.rejected == w - len(tried)

    parent_call = calls[0]
    assert len(parent_call) == w * 3
    blocks = [parent_call[3 * j:3 * j + 3] for j in range(w)]
    assert [{t for t, _ in b} for b in blocks] == [{before.candidates[p]} for p in parents]
    mbs = [tuple(i for _, i in b) for b in blocks]
    assert list(log.minibatches) == mbs
    parent_sums = [sum(solves(t, i) for t, i in b) for b in blocks]
    assert list(log.parent_scores) == parent_sums

    child_call = calls[1] if tried else []
    assert child_call == [(replies[j], i) for j in tried for i in mbs[j]]
    accepted = [j for j in tried if sum(solves(replies[j], i) for i in mbs[j]) > parent_sums[j]]
    assert [j for j, a in enumerate(log.accepted) if a] == accepted
    dev_calls = calls[1 + bool(tried):]
    assert dev_calls == ([[(replies[j], i) for j in accepted for i in state.dev_idx]] if accepted else [])
    assert len(calls) == 1 + bool(tried) + bool(accepted)

    assert state.candidates == before.candidates + tuple(replies[j] for j in accepted)
    assert state.parents == before.parents + tuple(parents[j] for j in accepted)
    assert log.new_candidates == tuple(range(len(before.candidates), len(state.candidates)))
    assert state.rollouts - before.rollouts == sum(map(len, calls)) == 3 * w + 3 * len(tried) + n_dev * len(accepted)
    assert log.rollouts == state.rollouts
    assert log.best_mean_dev == state.scores_cd.mean(axis=1).max()
  assert widths[0] == CFG.beam_width and sum(widths) >= 24


def test_dominated_candidates_stay_in_the_parent_pool():
  # "align carry" solves everything "carry" and "align" solve: the gepa package prunes both; the authors keep them.
  # The seed solves nothing and every dev instance is solved by some word, so the seed is on no front.
  state = rich_state(CFG)
  templates = state.candidates + ("align carry",)
  scores_cd = [[float(solves(t, i)) for i in state.dev_idx] for t in templates]
  state = dataclasses.replace(state, candidates=templates, parents=state.parents + (1,), scores_cd=scores_cd)
  cfg = dataclasses.replace(CFG, beam_width=16)
  after = gepa_iteration(state, WordEvaluator(), WordReflector(), QUESTIONS, cfg)
  assert after.history[0].parents == (1, 2, 3, 4, 5, 6, 7)  # the whole pool: it has <= beam_width candidates
  pruned = gepa_iteration(state, WordEvaluator(), WordReflector(), QUESTIONS,
                          dataclasses.replace(cfg, remove_dominated=True))
  assert pruned.history[0].parents == (3, 4, 5, 6, 7)


def test_budget_charges_from_the_third_iteration_and_stops_at_zero():
  cfg = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=200, seed=3)
  state = run_gepa(rich_state(cfg), WordEvaluator(), WordReflector(seed=1), QUESTIONS, cfg)
  history = state.history
  expected = [0 if k < 2 else 3 * len(log.parents) + sum(log.accepted) * 24 for k, log in enumerate(history)]
  assert [log.cost for log in history] == expected and sum(expected) == state.metric_calls
  assert [log.remaining for log in history] == [200 - sum(expected[:k + 1]) for k in range(len(history))]
  # Every iteration but the last started with budget left; the last one used it up.
  assert all(log.remaining > 0 for log in history[:-1]) and history[-1].remaining <= 0
  assert stop_reason(state, cfg) == "budget" and state.remaining == history[-1].remaining
  # Children's minibatch rollouts are not charged: the rollouts exceed what the budget counts.
  assert state.rollouts > state.metric_calls


def test_empty_reflections_are_charged_and_counted():
  evaluator = WordEvaluator()
  state = evaluate_seed(init_state(N_HARD, UNCAPPED), evaluator)
  for k in range(4):
    n_calls, charged, rollouts = len(evaluator.calls), state.metric_calls, state.rollouts
    state = gepa_iteration(state, evaluator, WordReflector(no_reply_rate=1.0), QUESTIONS, UNCAPPED)
    log = state.history[-1]
    assert len(evaluator.calls) == n_calls + 1
    assert log.children == (None,) and log.rejected == 1 and not any(log.accepted)  # only the seed: one parent
    assert state.rollouts - rollouts == 3
    assert state.metric_calls - charged == (0 if k < 2 else 3)
  assert state.candidates == ("",)


def test_no_iteration_cap_by_default_and_max_iters_caps():
  state = evaluate_seed(init_state(N_HARD, UNCAPPED), WordEvaluator())
  state = dataclasses.replace(state, iteration=10_000)
  assert not done(state, UNCAPPED)
  cfg = dataclasses.replace(UNCAPPED, max_iters=3)
  seen = []
  state = run_gepa(init_state(N_HARD, cfg), WordEvaluator(), WordReflector(), QUESTIONS, cfg,
                   on_iteration=lambda s: seen.append(s.iteration))
  assert state.iteration == 3 and seen == [1, 2, 3] and stop_reason(state, cfg) == "max_iters"


def test_minibatches_do_not_reuse_examples_until_the_split_is_used_up_then_draw_from_all():
  cfg = dataclasses.replace(UNCAPPED, beam_width=1)
  state = evaluate_seed(init_state(N_HARD, cfg), WordEvaluator())
  minibatches = []
  for _ in range(24):
    state = gepa_iteration(state, WordEvaluator(), WordReflector(no_reply_rate=1.0), QUESTIONS, cfg)
    minibatches += state.history[-1].minibatches
  assert all(len(mb) == len(set(mb)) == 3 for mb in minibatches)
  first_pass = [i for mb in minibatches[:12] for i in mb]
  assert sorted(first_pass) == list(state.train_idx)  # 36 train examples: 12 minibatches, none repeated
  assert state.pool_cursor == len(state.pool_order)  # used up for good: no second pass over a reshuffled pool
  later = [i for mb in minibatches[12:] for i in mb]
  assert set(later) <= set(state.train_idx) and len(set(later)) < len(later)  # drawn from the whole split again


def test_a_partly_used_pool_draws_from_the_whole_split():
  # 7 train examples, minibatches of 3: two from the pool, then (1 unused < 3) every one from all 7.
  cfg = GepaConfig(dev_size=300, beam_width=1, minibatch_size=3, max_metric_calls=10**6, seed=0)
  state = evaluate_seed(init_state(14, cfg), WordEvaluator())
  assert len(state.train_idx) == 7
  for _ in range(3):
    state = gepa_iteration(state, WordEvaluator(), WordReflector(no_reply_rate=1.0), QUESTIONS, cfg)
  mbs = [log.minibatches[0] for log in state.history]
  assert mbs[:2] == [state.pool_order[:3], state.pool_order[3:6]]
  assert state.pool_cursor == 7 and set(mbs[2]) <= set(state.train_idx)


def test_train_split_empty_stops_the_search():
  state = evaluate_seed(init_state(N_HARD, UNCAPPED), WordEvaluator())
  assert stop_reason(dataclasses.replace(state, train_idx=(), pool_order=()), UNCAPPED) == "train_split_empty"
  assert stop_reason(state, UNCAPPED) is None


def test_reflection_requests_carry_the_prompt_limit():
  cfg = dataclasses.replace(CFG, reflection_max_prompt_tokens=777)
  seen = []

  class Spy(WordReflector):
    def propose(self, requests):
      seen.extend(requests)
      return super().propose(requests)

  gepa_iteration(evaluate_seed(init_state(N_HARD, cfg), WordEvaluator()), WordEvaluator(), Spy(), QUESTIONS, cfg)
  assert seen and all(r.max_prompt_tokens == 777 for r in seen)
  assert [rec.question for rec in seen[0].records] == [QUESTIONS[i] for i in init_state(N_HARD, cfg).pool_order[:3]]


def test_same_seed_gives_identical_state():
  def run(seed):
    cfg = GepaConfig(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=600, max_iters=40, seed=seed)
    return run_gepa(rich_state(cfg), WordEvaluator(), WordReflector(), QUESTIONS, cfg).to_dict()

  assert run(0) == run(0)
  assert run(0) != run(1)


def test_resume_from_json_mid_run_equals_uninterrupted_run():
  snapshots = []
  full = run_gepa(rich_state(CFG), WordEvaluator(), WordReflector(), QUESTIONS, CFG,
                  on_iteration=lambda s: snapshots.append(json.dumps(s.to_dict())))
  assert len(snapshots) == full.iteration > 6
  restored = GepaState.from_dict(json.loads(snapshots[2]))
  assert json.dumps(restored.to_dict()) == snapshots[2] and len(restored.history[-1].parents) > 1
  resumed = run_gepa(restored, WordEvaluator(), WordReflector(), QUESTIONS, CFG)
  assert resumed.to_dict() == full.to_dict()


def test_best_candidate_breaks_ties_by_lowest_index():
  state = dataclasses.replace(init_state(4, CFG), candidates=("", "a", "b", "c"), parents=(None, 0, 0, 1),
                              scores_cd=[[0, 1], [1, 0], [1, 1], [1, 1]])
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


# ---- the phase: the search log, and an empty set cover -----------------------------------------------------------------

HARD_SET = [Query(f"q{i}", QUESTIONS[i], needed_word(i)) for i in range(N_HARD)]


def phase_config(**gepa_keys) -> ml_collections.ConfigDict:
  c = base_config()
  c.data.prompt_format = "Solve: {question}"
  c.p2o.gepa.update(dict(dev_size=24, beam_width=4, minibatch_size=3, max_metric_calls=300, **gepa_keys))
  return c


def run_phase(tmp_path, monkeypatch, c, evaluator, reflector):
  # The phase's evaluator would roll out with a policy; the word world answers instead (FormatFeedback still wraps it).
  monkeypatch.setattr(phase, "PolicyEvaluator", lambda *args: evaluator)
  reflector.stats = ReflectionStats()
  reflector.state, reflector.restore = (lambda: None), (lambda s: None)
  ctx = phase.PhaseContext(config=c, epoch=2, hard_set=HARD_SET, policy=None, reflector=reflector, score=None,
                           run_dir=RunDir(tmp_path))
  return phase.run_phase(ctx)


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_phase_writes_a_search_log_that_reads_back(tmp_path, monkeypatch):
  c = phase_config()
  result = run_phase(tmp_path, monkeypatch, c, WordEvaluator(), WordReflector())
  state = GepaState.from_dict(json.loads((tmp_path / "p2o" / "gepa_progress.json").read_text())["state"])
  records = read_jsonl(tmp_path / "templates" / "epoch_002.jsonl")
  assert [r["event"] for r in records] == ["seed"] + ["iteration"] * state.iteration + ["summary"]
  assert all(r["epoch"] == 2 for r in records)
  seed, iterations, summary = records[0], records[1:-1], records[-1]
  assert seed["budget"] == 300 and seed["dev_size"] == 24 and seed["dev_score"] == 0.0
  best_so_far = 0.0
  for k, (record, log) in enumerate(zip(iterations, state.history)):
    assert record["iteration"] == k + 1 and len(record["parents"]) == len(log.parents)
    for j, step in enumerate(record["parents"]):
      assert step["parent"] == log.parents[j] and step["parent_template"] == state.candidates[log.parents[j]]
      assert step["parent_score"] == log.parent_scores[j] == sum(solves(step["parent_template"], i)
                                                                  for i in step["minibatch"])
      assert step["child_template"] == log.children[j] and step["child_score"] == log.child_scores[j]
      if step["child_template"] is not None:
        assert step["child_score"] == sum(solves(step["child_template"], i) for i in step["minibatch"])
      assert step["accepted"] == (step["child_score"] is not None and step["child_score"] > step["parent_score"])
      if step["accepted"]:
        assert state.candidates[step["candidate"]] == step["child_template"]
        assert step["dev_score"] == pytest.approx(state.scores_cd[step["candidate"]].mean())
      else:
        assert step["candidate"] is None and step["dev_score"] is None
    best_so_far = max([best_so_far] + [s["dev_score"] for s in record["parents"] if s["accepted"]])
    assert record["best_dev_score"] == pytest.approx(best_so_far)
    assert record["cost"] == log.cost and record["remaining_budget"] == log.remaining == 300 - sum(
        h.cost for h in state.history[:k + 1])
  best = best_candidate(state)
  assert summary["best_template"] == state.candidates[best] and summary["best_candidate"] == best
  assert summary["best_dev_score"] == pytest.approx(state.scores_cd[best].mean())
  assert (summary["candidates"], summary["iterations"], summary["metric_calls"], summary["rollouts"]) == (
      len(state.candidates), state.iteration, state.metric_calls, state.rollouts)
  assert summary["stop_reason"] == "budget" and summary["templates_skipped"] is False
  assert result.metrics["p2o/templates_skipped"] == 0.0 and result.assignment
  assert result.metrics["p2o/gepa_metric_calls"] == state.metric_calls and result.metrics["p2o/gepa_budget"] == 300


def test_phase_shows_the_reflector_user_turns_and_the_authors_feedback(tmp_path, monkeypatch):
  seen = []

  class Spy(WordReflector):
    def propose(self, requests):
      seen.extend(requests)
      return super().propose(requests)

  run_phase(tmp_path, monkeypatch, phase_config(max_iters=1), WordEvaluator(), Spy())
  record = seen[0].records[0]
  i = QUESTIONS.index(record.question.removeprefix("Solve: "))
  assert record.question == f"Solve: question {i}"  # the user turn, without the template
  # "my answer to i" has no answer to grade: a format error, with the reference answer.
  assert record.format_error and f"The correct answer is '{needed_word(i)}'." in record.feedback
  assert "format" in record.feedback and record.feedback.endswith("Reward (answer_score) = 0.00")


def test_empty_set_cover_skips_templates_and_says_so(tmp_path, monkeypatch, caplog):
  class NeverSolves(WordEvaluator):
    def evaluate(self, requests):
      return [dataclasses.replace(r, score=0.0) for r in super().evaluate(requests)]

  with caplog.at_level("WARNING"):
    result = run_phase(tmp_path, monkeypatch, phase_config(), NeverSolves(), WordReflector())
  assert result.assignment == {} and result.metrics["p2o/templates_skipped"] == 1.0
  assert "set cover is empty" in caplog.text
  summary = read_jsonl(tmp_path / "templates" / "epoch_002.jsonl")[-1]
  assert summary["event"] == "summary" and summary["templates_skipped"] is True and summary["assigned_queries"] == 0
