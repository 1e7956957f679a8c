"""Tests for the seqio evaluation-task registry (p2o_jax/data/seqio_tasks.py); TensorFlow is imported once."""

import fractions
import json
import subprocess
import sys

import pytest

from p2o_jax.data import seqio_tasks
from p2o_jax.data.records import Query, read_queries

ROWS = [
    {"uid": "aime-1", "problem": {"text": "What is 2+2?"}, "solution": {"final": 4}},
    {"uid": "aime-2", "problem": {"text": "Half of one?"}, "solution": {"final": "1/2"}},
    {"uid": "aime-3", "problem": {"text": "Name the letter after w."}, "solution": {"final": "x"}},
]
FIELDS = {"question_field": "problem.text", "answer_field": "solution.final", "id_field": "uid"}
PREDICTIONS = [" 4 ", "0.5", "y"]


def _write_jsonl(path, rows) -> str:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return str(path)


def _fraction_scores(predictions, targets) -> list[float]:
  """A stand-in verifier that knows 0.5 == 1/2; it only ever sees numerals, never evaluates text."""
  def value(text):
    try:
      return fractions.Fraction(text.strip())
    except ValueError:
      return text.strip()
  return [float(value(p) == value(t)) for p, t in zip(predictions, targets)]


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  """Two tasks on one tiny file: the default placeholder scorer and a plugged-in one. Imports TensorFlow once."""
  path = _write_jsonl(tmp_path_factory.mktemp("eval") / "aime_tiny.jsonl", ROWS)
  exact = seqio_tasks.register_eval_task("p2o_test_exact", path, **FIELDS)
  plugged = seqio_tasks.register_eval_task("p2o_test_plugged", path, score_fn=_fraction_scores, **FIELDS)
  return path, exact, plugged


def test_importing_the_data_modules_does_not_import_tensorflow():
  code = ("import sys, p2o_jax.data.seqio_tasks, p2o_jax.data.records; "
          "print(sorted(m for m in ('tensorflow', 'seqio') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert result.stdout.strip() == "[]"


def test_registered_task_is_a_seqio_task_with_plain_string_features(registered):
  import seqio
  _, exact, _ = registered
  assert exact == "p2o_test_exact"
  task = seqio.get_mixture_or_task(exact)
  assert set(task.output_features) == {"inputs", "targets"}
  assert all(isinstance(f.vocabulary, seqio.PassThroughVocabulary) for f in task.output_features.values())
  assert task.splits == (seqio_tasks.EVAL_SPLIT,)
  assert task.num_input_examples(seqio_tasks.EVAL_SPLIT) == 3


def test_eval_queries_read_back_the_file_in_order(registered):
  path, exact, _ = registered
  expected = [Query("aime-1", "What is 2+2?", "4"), Query("aime-2", "Half of one?", "1/2"),
              Query("aime-3", "Name the letter after w.", "x")]
  assert seqio_tasks.eval_queries(exact) == expected
  assert read_queries(path, **FIELDS).queries == expected


def test_default_metric_is_exact_match_after_strip(registered):
  _, exact, _ = registered
  # " 4 " matches "4" after strip; "0.5" is not the string "1/2"; "y" is wrong.
  assert seqio_tasks.score_task(exact, PREDICTIONS) == {"verified_accuracy": pytest.approx(1 / 3)}
  assert seqio_tasks.score_task(exact, ["4", "1/2", "x"]) == {"verified_accuracy": 1.0}


def test_plugged_in_scorer_decides_the_metric(registered):
  _, _, plugged = registered
  assert seqio_tasks.score_task(plugged, PREDICTIONS) == {"verified_accuracy": pytest.approx(2 / 3)}


def test_scorer_receives_predictions_then_targets_in_example_order(registered, tmp_path):
  calls = []

  def recording_scores(predictions, targets):
    calls.append((list(predictions), list(targets)))
    return [0.25, 1.0, 0.0]

  name = seqio_tasks.register_eval_task("p2o_test_recording", registered[0], score_fn=recording_scores, **FIELDS)
  assert seqio_tasks.score_task(name, PREDICTIONS) == {"verified_accuracy": pytest.approx(1.25 / 3)}
  assert calls == [(PREDICTIONS, ["4", "1/2", "x"])]


def test_scorer_returning_the_wrong_number_of_scores_is_refused():
  with pytest.raises(ValueError, match=r"shape \(2,\) for 3 predictions"):
    seqio_tasks.verified_accuracy(["a", "b", "c"], ["a", "b", "c"], score_fn=lambda p, t: [1.0, 1.0])


def test_registration_and_scoring_errors(registered, tmp_path):
  path, exact, _ = registered
  with pytest.raises(ValueError, match="'p2o_test_exact' is already registered"):
    seqio_tasks.register_eval_task(exact, path, **FIELDS)
  with pytest.raises(ValueError, match="no seqio task named 'p2o_test_nope'"):
    seqio_tasks.eval_queries("p2o_test_nope")
  with pytest.raises(ValueError, match="2 predictions for the 3 examples"):
    seqio_tasks.score_task(exact, ["4", "1/2"])
  with pytest.raises(FileNotFoundError):
    seqio_tasks.register_eval_task("p2o_test_missing", tmp_path / "missing.jsonl", **FIELDS)
  with pytest.raises(ValueError, match="none of its 1 rows"):
    seqio_tasks.register_eval_task("p2o_test_broken", _write_jsonl(tmp_path / "b.jsonl", [{"uid": "1"}]), **FIELDS)


def test_replace_swaps_in_a_new_file(registered, tmp_path):
  name = seqio_tasks.register_eval_task("p2o_test_replace", registered[0], **FIELDS)
  smaller = _write_jsonl(tmp_path / "one.jsonl", ROWS[:1])
  seqio_tasks.register_eval_task(name, smaller, replace=True, **FIELDS)
  assert seqio_tasks.eval_queries(name) == [Query("aime-1", "What is 2+2?", "4")]
