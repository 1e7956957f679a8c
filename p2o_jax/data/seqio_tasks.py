"""A seqio task registry for EVALUATION sets in local files, scored by a pluggable answer verifier.

Each task is one local .jsonl/.parquet file read by records.read_queries, so AIME/AMC/MATH500/Minerva/OlympiadBench
files with their own field names all reduce to (id, question, answer). The file is read once, at registration: a
missing or broken file fails there, not in the middle of an evaluation. Features are plain strings ("id", "inputs" =
question, "targets" = answer) under a PassThroughVocabulary: nothing to download, and the trainer's own tokenizer and
chat template do the encoding. The one metric, "verified_accuracy", is the mean of a scoring callable over the
(prediction, target) lists; it takes whole lists so the sandboxed verifier pool's `score(responses, references)`
plugs in as is. The default, exact string match after strip, is a placeholder for tests only ("1/2" != "0.5").

seqio imports TensorFlow (slow, and it would claim accelerator memory), so it is imported inside the functions,
never when this module is, and TensorFlow is kept off GPUs; the rest of the package never imports it.
"""

import functools
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from p2o_jax.data.records import Query, read_queries

EVAL_SPLIT = "test"
METRIC_NAME = "verified_accuracy"
# (predictions, targets) -> one score in [0, 1] per pair.
ScoreFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def exact_match_scores(predictions: Sequence[str], targets: Sequence[str]) -> list[float]:
  """Placeholder scorer for tests: 1.0 where the stripped strings are equal, else 0.0."""
  return [float(prediction.strip() == target.strip()) for prediction, target in zip(predictions, targets)]


def verified_accuracy(targets: Sequence[str], predictions: Sequence[str], *, score_fn: ScoreFn) -> dict[str, float]:
  """seqio metric fn (its argument names are seqio's contract): the mean of score_fn over the pairs."""
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
  scores = np.asarray(score_fn(list(predictions), list(targets)), dtype=np.float64)
  if scores.shape != (len(targets),):
    raise ValueError(f"score_fn returned scores of shape {scores.shape} for {len(targets)} predictions")
  return {METRIC_NAME: float(scores.mean())}


def _import_seqio():
  import seqio
  import tensorflow as tf

  try:
    # tf.data needs only the CPU; left alone, TensorFlow would reserve the GPU memory JAX is about to use.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow's devices were already initialized by an earlier user; too late to change
    pass
  return seqio, tf


def register_eval_task(name: str, path: str | pathlib.Path, *, question_field: str, answer_field: str,
                       id_field: str | None = None, score_fn: ScoreFn = exact_match_scores,
                       replace: bool = False) -> str:
  """Registers seqio task `name` over the queries of local file `path`; returns `name`."""
  seqio, tf = _import_seqio()
  if name in seqio.TaskRegistry.names() and not replace:
    raise ValueError(f"seqio task {name!r} is already registered; pass replace=True or choose another name")
  queries = read_queries(path, question_field=question_field, answer_field=answer_field, id_field=id_field).queries
  columns = {"id": [query.id for query in queries], "inputs": [query.question for query in queries],
             "targets": [query.answer for query in queries]}

  def dataset_fn(split: str, shuffle_files: bool):
    del split, shuffle_files  # one split, one in-memory shard
    return tf.data.Dataset.from_tensor_slices(columns)

  vocabulary = seqio.PassThroughVocabulary(size=0)
  features = {key: seqio.Feature(vocabulary, add_eos=False, dtype=tf.string, rank=0) for key in ("inputs", "targets")}
  source = seqio.FunctionDataSource(dataset_fn, splits=[EVAL_SPLIT], num_input_examples={EVAL_SPLIT: len(queries)})
  seqio.TaskRegistry.remove(name)  # a no-op unless replacing
  seqio.TaskRegistry.add(name, source=source, output_features=features,
                         metric_fns=[functools.partial(verified_accuracy, score_fn=score_fn)])
  return name


def _task(task_name: str):
  seqio, _ = _import_seqio()
  if task_name not in seqio.TaskRegistry.names():
    raise ValueError(f"no seqio task named {task_name!r}; register it with register_eval_task first")
  return seqio.TaskRegistry.get(task_name)


def eval_queries(task_name: str) -> list[Query]:
  """The task's examples, in file order, as the Queries the trainer samples from."""
  dataset = _task(task_name).get_dataset(sequence_length=None, split=EVAL_SPLIT, shuffle=False, use_cached=False)
  return [Query(example["id"].decode(), example["inputs"].decode(), example["targets"].decode())
          for example in dataset.as_numpy_iterator()]


def score_task(task_name: str, predictions: Sequence[str]) -> dict[str, float]:
  """Runs the task's metric fns on `predictions`, one string per example in eval_queries(task_name) order."""
  task = _task(task_name)
  targets = [query.answer for query in eval_queries(task_name)]
  if len(predictions) != len(targets):
    raise ValueError(f"{len(predictions)} predictions for the {len(targets)} examples of task {task_name!r}")
  if not all(isinstance(prediction, str) for prediction in predictions):
    raise ValueError(f"predictions for task {task_name!r} must all be strings")
  results: dict[str, float] = {}
  for metric_fn in task.predict_metric_fns:
    results.update(metric_fn(targets, list(predictions)))
  return results
