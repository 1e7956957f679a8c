"""The demo's offline fragment proposer: deterministic, stays in its pool, blind to answers, finds the trigger."""

import collections
import random

import pytest

from p2o_jax.p2o.offline_proposer import (
    DEFAULT_FRAGMENTS,
    FragmentProposer,
    apply_edit,
    edit_weights,
    feasible_edits,
    split_fragments,
)
from p2o_jax.p2o.records import FeedbackRecord, ReflectionRequest
from p2o_jax.p2o.reflection import ReflectionStats

WINNER = "Add the numbers one at a time and write every running total."
WINNER_PIECES = ["Add the numbers", "one at a time", "and write every running total."]


def _request(template: str, scores, answer: str = "15403") -> ReflectionRequest:
  records = tuple(
      FeedbackRecord(question=f"{i}+{answer}=", output=f"The answer is {i}", feedback=f"Correct: '{answer}'.", score=s)
      for i, s in enumerate(scores)
  )
  return ReflectionRequest(template=template, records=records)


def _random_requests(count: int, seed: int) -> list[ReflectionRequest]:
  rng = random.Random(seed)
  requests = []
  for _ in range(count):
    parent = rng.sample(DEFAULT_FRAGMENTS, rng.randint(0, 4))
    requests.append(_request(" ".join(parent), [rng.choice([0.0, 1.0]) for _ in range(3)]))
  return requests


def test_default_pool_holds_the_trigger_only_in_pieces():
  assert split_fragments(WINNER, DEFAULT_FRAGMENTS) == WINNER_PIECES
  for fragment in DEFAULT_FRAGMENTS:
    assert len(split_fragments(fragment, DEFAULT_FRAGMENTS)) == 1
    assert "one at a time and" not in fragment and "numbers one" not in fragment


def test_deterministic_given_seed_and_inputs():
  requests = _random_requests(40, seed=1)
  first = FragmentProposer(DEFAULT_FRAGMENTS, seed=7).propose(requests)
  again = FragmentProposer(DEFAULT_FRAGMENTS, seed=7).propose(requests)
  other = FragmentProposer(DEFAULT_FRAGMENTS, seed=8).propose(requests)
  assert first == again
  assert first != other


def test_blind_to_questions_outputs_and_answers():
  scores = [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]] * 5
  with_one = [_request("Be careful. Show your work.", s, answer="15403") for s in scores]
  with_other = [_request("Be careful. Show your work.", s, answer="99") for s in scores]
  assert FragmentProposer(DEFAULT_FRAGMENTS, 3).propose(with_one) == FragmentProposer(DEFAULT_FRAGMENTS, 3).propose(
      with_other
  )


def test_each_proposal_is_one_edit_inside_the_pool():
  requests = _random_requests(300, seed=2)
  proposer = FragmentProposer(DEFAULT_FRAGMENTS, seed=0, max_fragments=4)
  children = proposer.propose(requests)
  for request, child in zip(requests, children):
    parent = split_fragments(request.template, DEFAULT_FRAGMENTS)
    pieces = split_fragments(child, DEFAULT_FRAGMENTS)
    assert set(pieces) <= set(DEFAULT_FRAGMENTS) and WINNER not in pieces
    assert 1 <= len(pieces) <= 4 and len(set(pieces)) == len(pieces)
    assert pieces != parent
    # One add, drop, swap or move: the multisets differ by at most one piece on each side.
    removed = collections.Counter(parent) - collections.Counter(pieces)
    added = collections.Counter(pieces) - collections.Counter(parent)
    assert sum(removed.values()) <= 1 and sum(added.values()) <= 1
  assert proposer.stats == ReflectionStats(requests=300, accepted=300)


def test_output_goes_through_the_fence_rule():
  proposer = FragmentProposer(DEFAULT_FRAGMENTS, seed=0, max_template_chars=5)
  assert proposer.propose(_random_requests(10, seed=3)) == [None] * 10
  assert proposer.stats == ReflectionStats(requests=10, rejected_too_long=10)


def test_feedback_steers_the_kind_of_edit():
  parent = "Be careful. Show your work."

  def growth(scores):
    proposer = FragmentProposer(DEFAULT_FRAGMENTS, seed=5)
    children = proposer.propose([_request(parent, scores)] * 2000)
    sizes = collections.Counter(len(split_fragments(c, DEFAULT_FRAGMENTS)) - 2 for c in children)
    return sizes[1] / 2000, sizes[-1] / 2000

  grow_failed, shrink_failed = growth([0.0, 0.0, 0.0])
  grow_solved, shrink_solved = growth([1.0, 1.0, 1.0])
  assert grow_failed == pytest.approx(0.5, abs=0.04) and shrink_failed == pytest.approx(0.1, abs=0.03)
  assert grow_solved == pytest.approx(0.1, abs=0.03) and shrink_solved == pytest.approx(0.35, abs=0.04)


def _toy_scores(template: str) -> list[float]:
  """Three stand-in examples: solved by the first piece, the first two, or the exact trigger."""
  pieces = split_fragments(template, DEFAULT_FRAGMENTS)
  prefix = 0
  while prefix < min(len(pieces), 3) and pieces[prefix] == WINNER_PIECES[prefix]:
    prefix += 1
  return [float(prefix >= 1), float(prefix >= 2), float(pieces == WINNER_PIECES)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hill_climb_with_toy_scorer_finds_the_trigger(seed):
  proposer = FragmentProposer(DEFAULT_FRAGMENTS, seed=seed)
  best, best_scores = "", _toy_scores("")
  for _ in range(600):  # 30 seeds needed 26-440 proposals
    child, = proposer.propose([_request(best, best_scores)])
    child_scores = _toy_scores(child)
    if sum(child_scores) > sum(best_scores):  # GEPA's rule: strictly better on the minibatch
      best, best_scores = child, child_scores
    if best == WINNER:
      break
  assert best == WINNER


def test_split_fragments_hand_cases():
  assert split_fragments("", DEFAULT_FRAGMENTS) == []
  assert split_fragments("  Be careful.   Add the numbers\none at a time ", DEFAULT_FRAGMENTS) == [
      "Be careful.", "Add the numbers", "one at a time"
  ]
  # Words outside the pool group into one opaque piece; a fragment must end at a word boundary.
  assert split_fragments("Please now Be careful. Be careful.x", DEFAULT_FRAGMENTS) == [
      "Please now", "Be careful.", "Be careful.x"
  ]
  assert split_fragments("Add the numbers", ("Add", "Add the numbers")) == ["Add the numbers"]


def test_edit_rules_hand_cases():
  assert edit_weights([0.0, 0.0])["add"] == 0.5 and edit_weights([])["add"] == 0.5
  assert feasible_edits([], ["a"], 4) == ["add"]
  assert feasible_edits(["a"], [], 4) == []  # never reached: a pool of >= 2 leaves a drop or swap
  assert feasible_edits(["a", "b"], [], 2) == ["drop", "reorder"]
  assert feasible_edits(["a", "a"], ["c"], 2) == ["drop", "swap"]
  rng = random.Random(0)
  for _ in range(50):
    moved = apply_edit(["a", "b", "c"], "reorder", [], rng)
    assert sorted(moved) == ["a", "b", "c"] and moved != ["a", "b", "c"]
    assert apply_edit(["a", "b"], "swap", ["z"], rng) in (["z", "b"], ["a", "z"])
  with pytest.raises(ValueError, match="unknown edit"):
    apply_edit(["a"], "shuffle", [], rng)


@pytest.mark.parametrize(
    "fragments, max_fragments, message",
    [
        (["a", "a"], 4, "duplicate"),
        (["a", "b ```"], 4, "```"),
        (["a", " b"], 4, "outer whitespace"),
        (["a"], 4, "at least 2"),
        (["a", "b"], 0, "max_fragments"),
    ],
)
def test_bad_pool_is_rejected(fragments, max_fragments, message):
  with pytest.raises(ValueError, match=message):
    FragmentProposer(fragments, seed=0, max_fragments=max_fragments)


def test_state_round_trip_resumes_the_same_proposals():
  import json
  request = ReflectionRequest(template="Be careful.", records=(FeedbackRecord("Q: 1+2=", " 3", "correct", 1.0),))
  proposer = FragmentProposer(DEFAULT_FRAGMENTS, seed=5)
  proposer.propose([request] * 3)
  saved = json.loads(json.dumps(proposer.state()))
  expected = proposer.propose([request] * 5)
  resumed = FragmentProposer(DEFAULT_FRAGMENTS, seed=99)
  resumed.restore(saved)
  assert resumed.propose([request] * 5) == expected
