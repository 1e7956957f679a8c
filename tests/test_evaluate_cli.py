"""The evaluation CLI (p2o_jax/evaluation.py): accuracies against an independent re-computation on an HF directory and
on orbax checkpoints (whose params, not the HF directory's, must be the ones evaluated), the protocol per set size,
field auto-detection, seqio and fallback reading the same queries, and one-line errors through the real command."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flax import nnx

from p2o_jax import checkpoint, evaluation, experiment, sharding
from p2o_jax.data import sources
from p2o_jax.checkpoint import Checkpointer
from p2o_jax.config import ConfigError, base_config
from p2o_jax.evaluation import EvalProtocol
from p2o_jax.metrics import TENSORBOARD_DIRNAME, read_metrics
from p2o_jax.models.builtin import build_builtin_checkpoint
from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions, load_tokenizer, stop_token_ids
from p2o_jax.rewards.equivalence import math_reward
from p2o_jax.rl.optimizer import make_optimizer
from p2o_jax.sampling import Sampler, SamplingConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
MAX_NEW, SAMPLES, TEMPERATURE, SMALL_SET_SIZE = 6, 3, 0.6, 4
SMALL_ROWS = [{"question": f"Q: {a}+{b}=", "answer": str(a + b)} for a, b in ((1, 2), (30, 4), (5, 66))]
LARGE_ROWS = [{"problem": f"Q: {a}+{a}=", "answer": str(2 * a)} for a in (7, 12, 41, 3, 25)]


def parity_score(responses, references) -> np.ndarray:
  """A deterministic stand-in verifier that a random policy passes about half the time, differently per problem."""
  return np.asarray([float((sum(map(ord, r)) + int(a)) % 2 == 0) for r, a in zip(responses, references)], np.float32)


def write_jsonl(path: pathlib.Path, rows) -> pathlib.Path:
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  large = root / "large.parquet"
  pq.write_table(pa.Table.from_pylist(LARGE_ROWS), large)
  return {"policy": build_builtin_checkpoint(root / "hf", **TINY), "large": large, "root": root,
          "small": write_jsonl(root / "small.jsonl", SMALL_ROWS)}


def make_config(files, sets: str):
  c = base_config()
  c.model.checkpoint = str(files["policy"])
  c.data.train_path = "unused.jsonl"  # validate() wants one; evaluation never reads it
  c.data.prompt_format = "{question}"
  c.rollout.max_prompt_len, c.rollout.max_new_tokens = 32, MAX_NEW
  c.eval.sets, c.eval.temperature = sets, TEMPERATURE
  c.eval.small_set_size, c.eval.small_set_samples = SMALL_SET_SIZE, SAMPLES
  c.reward.num_workers = 1
  return c


def both_sets(files) -> str:
  return f"small={files['small']},large={files['large']}"


def on_answers(score):
  """A (responses, references) stand-in as the evaluation calls a score function: (responses, queries)."""
  return lambda responses, queries: score(responses, [q.answer for q in queries])


def demo_verifier_score(responses, references) -> np.ndarray:
  """The verifier pool's function called directly, with configs/demo_cpu.py's fallback."""
  return np.asarray([math_reward(r, a, "last_number") for r, a in zip(responses, references)], np.float32)


def independent_accuracy(model, tokenizer, rows, question_field: str, score=parity_score) -> tuple[float, list[str]]:
  """Accuracy of `rows` by hand: protocol chosen here from the set size, one sampler call, scores averaged."""
  small = len(rows) < SMALL_SET_SIZE
  cfg, n = (SamplingConfig(MAX_NEW, temperature=TEMPERATURE), SAMPLES) if small else (SamplingConfig(MAX_NEW, 0.0), 1)
  sampler = Sampler(model, eos_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id, max_prompt_len=32,
                    mesh=sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
  out = sampler.generate(chat_prompt_ids(tokenizer, [r[question_field] for r in rows]), cfg, n=n, seed=0)
  texts = decode_completions(tokenizer, out.tokens, out.lengths)
  scores = score(texts, [r["answer"] for r in rows for _ in range(n)])
  return float(scores.reshape(len(rows), n).mean(axis=1).mean()), texts


def test_protocol_label_follows_the_set_size():
  protocol = EvalProtocol(8, temperature=0.6, small_set_size=100, small_set_samples=16)
  assert [evaluation.protocol_label(protocol, n) for n in (1, 30, 99, 100, 500)] == (
      ["mean@16 T=0.6"] * 3 + ["greedy"] * 2)
  assert evaluation.protocol_label(EvalProtocol(8, temperature=1.0, small_set_size=10, small_set_samples=4), 9) == \
      "mean@4 T=1"


def test_question_field_falls_back_between_problem_and_question(files, tmp_path):
  assert evaluation.question_field_for(files["small"], "problem") == "question"  # jsonl with only "question"
  assert evaluation.question_field_for(files["small"], "question") == "question"
  assert evaluation.question_field_for(files["large"], "question") == "problem"  # parquet with only "problem"
  both = write_jsonl(tmp_path / "both.jsonl", [{"problem": "p", "question": "q", "answer": "1"}])
  assert evaluation.question_field_for(both, "question") == "question"  # the configured field wins when present
  assert evaluation.question_field_for(files["small"], "prompt.0.content") == "prompt.0.content"  # only problem/question
  assert evaluation.question_field_for(tmp_path / "missing.jsonl", "problem") == "problem"  # read_queries reports it


def test_builtin_splits_are_the_ones_training_evaluates():
  c = base_config()
  c.data.source, c.data.builtin_train_size = "builtin", 8
  c.eval.builtin_easy, c.eval.builtin_hard = 3, 2
  _, training_sets = experiment.load_data(c)
  sets = evaluation.builtin_sets(c)
  assert sets == training_sets and {name: len(queries) for name, queries in sets.items()} == {
      "builtin_easy": 3, "builtin_hard": 2}
  c.data.source = "file"
  assert evaluation.builtin_sets(c) == {}


@pytest.mark.slow
def test_hf_directory_matches_an_independent_computation(files):
  c = make_config(files, both_sets(files))
  results = evaluation.run_evaluation(c, files["policy"], score=on_answers(parity_score))
  model, tokenizer = load_hf_model(files["policy"]), load_tokenizer(files["policy"])
  small, _ = independent_accuracy(model, tokenizer, SMALL_ROWS, "question")
  large, _ = independent_accuracy(model, tokenizer, LARGE_ROWS, "problem")
  sets = results["sets"]
  assert sets["small"] == {"accuracy": pytest.approx(small), "num_problems": 3, "samples_per_problem": SAMPLES,
                           "protocol": "mean@3 T=0.6", "source": str(files["small"])}
  assert sets["large"] == {"accuracy": pytest.approx(large), "num_problems": 5, "samples_per_problem": 1,
                           "protocol": "greedy", "source": str(files["large"])}
  assert 0 < small + large < 2  # the scorer is not saturated: a wrong prompt or answer would move the numbers
  assert results["checkpoint_kind"] == "hf" and results["orbax_step"] is None
  assert results["config"]["eval.small_set_size"] == SMALL_SET_SIZE


@pytest.mark.slow
def test_seqio_and_the_fallback_read_the_same_queries(files, monkeypatch, caplog):
  c = make_config(files, both_sets(files))
  paths = {"small": str(files["small"]), "large": str(files["large"])}
  via_seqio = evaluation.read_file_sets(paths, c)
  import seqio  # pylint: disable=import-outside-toplevel  (imported by read_file_sets above)
  assert "p2o_jax_eval.small" in seqio.TaskRegistry.names()
  monkeypatch.setitem(sys.modules, "seqio", None)  # "not installed"
  with caplog.at_level(logging.INFO, logger="p2o_jax.evaluation"):
    direct = evaluation.read_file_sets(paths, c)
  assert "seqio is not available" in caplog.text
  assert direct == via_seqio
  assert [q.question for q in direct["small"]] == [r["question"] for r in SMALL_ROWS]
  assert [q.answer for q in direct["large"]] == [r["answer"] for r in LARGE_ROWS]


@pytest.fixture(scope="module")
def orbax_run(files):
  """A run directory with two steps whose params are two different perturbations of the HF directory's."""
  model = load_hf_model(files["policy"])
  _, params = nnx.split(model)
  opt_state = make_optimizer(lr=1e-3, total_steps=1).init(params)
  perturbed = {}
  checkpointer = Checkpointer(files["root"] / "run" / "checkpoints", async_save=False)
  for step in (1, 2):
    rng = np.random.default_rng(step)
    perturbed[step] = jax.tree.map(lambda x: x + rng.normal(0.0, 0.5, x.shape).astype(x.dtype), params)
    checkpointer.save(step, {"params": perturbed[step], "opt_state": opt_state}, {"step": step})
  checkpointer.close()
  return files["root"] / "run", perturbed


@pytest.mark.parametrize("where, step", [("run", 2), ("checkpoints", 2), ("checkpoints/1", 1)])
def test_orbax_locations_restore_that_steps_params(files, orbax_run, where, step):
  run_dir, perturbed = orbax_run
  path = run_dir if where == "run" else run_dir / where
  location = evaluation.locate_checkpoint(path)
  assert location == checkpoint.OrbaxStep((run_dir / "checkpoints"), step)
  policy, tokenizer_dir = evaluation.load_policy(location, make_config(files, ""), sharding.make_mesh({}))
  assert tokenizer_dir == files["policy"]
  restored, expected = jax.tree.leaves(policy.params), jax.tree.leaves(perturbed[step])
  assert len(restored) == len(expected)
  for got, want in zip(restored, expected):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.slow
def test_orbax_run_evaluates_the_checkpoint_params_not_the_hf_ones(files, orbax_run):
  run_dir, perturbed = orbax_run
  c = make_config(files, f"large={files['large']}")
  results = evaluation.run_evaluation(c, run_dir, score=on_answers(parity_score))
  assert results["checkpoint_kind"] == "orbax" and results["orbax_step"] == 2
  base = load_hf_model(files["policy"])
  graphdef, _ = nnx.split(base)
  tokenizer = load_tokenizer(files["policy"])
  expected, trained_texts = independent_accuracy(nnx.merge(graphdef, perturbed[2]), tokenizer, LARGE_ROWS, "problem")
  _, base_texts = independent_accuracy(base, tokenizer, LARGE_ROWS, "problem")
  assert trained_texts != base_texts  # the check below can tell the two policies apart
  assert results["sets"]["large"]["accuracy"] == pytest.approx(expected)


def test_orbax_params_of_another_architecture_are_an_error(files, orbax_run, tmp_path):
  hf_config = json.loads((files["policy"] / "config.json").read_text())
  (tmp_path / "wider").mkdir()
  (tmp_path / "wider" / "config.json").write_text(json.dumps({**hf_config, "intermediate_size": 96}))
  c = make_config(files, "")
  c.model.checkpoint = str(tmp_path / "wider")  # the architecture is all that is read from it
  with pytest.raises(evaluation.EvalInputError, match=r"do not fit the architecture .*wider.*: parameter "
                     r"layers\.0\.mlp\.down_proj\.value has shape \(64, 32\) in the checkpoint, \(96, 32\)"):
    evaluation.load_policy(evaluation.locate_checkpoint(orbax_run[0]), c, sharding.make_mesh({}))


def test_params_must_match_one_to_one():
  wanted = {("embed", "value"): (10, 4), ("layers", "0", "w", "value"): (4, 4)}
  checkpoint.check_params_match(dict(wanted), wanted)
  with pytest.raises(ValueError, match=r"parameter layers\.0\.w\.value is not in the checkpoint"):
    checkpoint.check_params_match({("embed", "value"): (10, 4)}, wanted)
  with pytest.raises(ValueError, match=r"embed\.value has shape \(10, 8\) in the checkpoint, \(10, 4\) in the model"):
    checkpoint.check_params_match({**wanted, ("embed", "value"): (10, 8)}, wanted)
  with pytest.raises(ValueError, match=r"1 parameter arrays the model lacks, e\.g\. layers\.1\.w\.value"):
    checkpoint.check_params_match({**wanted, ("layers", "1", "w", "value"): (4, 4)}, wanted)


def test_bad_inputs_raise_errors_that_name_them(files, tmp_path):
  broken = write_jsonl(tmp_path / "broken.jsonl", [{"problem": "no answer"}, {"answer": "1"}])
  corrupt = tmp_path / "corrupt.parquet"
  corrupt.write_bytes(b"not parquet")
  cases = [
      (f"b={broken}", files["policy"], evaluation.EvalInputError, "eval set 'b'.*none of its 2 rows is usable"),
      (f"c={corrupt}", files["policy"], evaluation.EvalInputError, "eval set 'c'.*: Parquet magic bytes not found"),
      (f"m={tmp_path / 'missing.jsonl'}", files["policy"], evaluation.EvalInputError, "eval set 'm'.*not found"),
      (f"t={tmp_path / 'set.txt'}", files["policy"], evaluation.EvalInputError, "unsupported query file extension"),
      ("small", files["policy"], ConfigError, "config.eval.sets: 'small' is not name=path"),
      ("", files["policy"], evaluation.EvalInputError, "nothing to evaluate"),
      (f"s={files['small']}", tmp_path / "nope", evaluation.EvalInputError, "does not exist"),
      (f"s={files['small']}", tmp_path, evaluation.EvalInputError, "expected a Hugging Face directory"),
  ]
  (tmp_path / "set.txt").write_text("{}")
  for sets, checkpoint, error, message in cases:
    with pytest.raises(error, match=message) as caught:
      evaluation.run_evaluation(make_config(files, sets), checkpoint, score=on_answers(parity_score), include_builtin=False)
    assert "\n" not in str(caught.value)


def cli(files, *args: str, env=None) -> subprocess.Popen:
  overrides = {"model.checkpoint": files["policy"], "data.source": "file", "data.train_path": "unused.jsonl",
               "rollout.max_prompt_len": 32, "rollout.max_new_tokens": MAX_NEW, "eval.small_set_size": SMALL_SET_SIZE,
               "eval.small_set_samples": SAMPLES, "reward.num_workers": 1}
  command = [sys.executable, "-m", "p2o_jax.evaluate", "--config", str(ROOT / "configs" / "demo_cpu.py"),
             *[f"--config.{k}={v}" for k, v in overrides.items()], *args]
  return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=files["root"],
                          env=env)


@pytest.mark.slow
def test_cli_writes_json_and_table_and_fails_in_one_line(files, tmp_path):
  # A seqio that fails to import: the command must fall back to read_queries (and skips TensorFlow's import time).
  # One set only: the protocols per set size are checked in-process; here the command's plumbing is.
  (tmp_path / "no_seqio").mkdir()
  (tmp_path / "no_seqio" / "seqio.py").write_text("raise ImportError('seqio is disabled in this test')\n")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "no_seqio"), str(ROOT)])}
  output = tmp_path / "out" / "results.json"
  runs = [cli(files, f"--checkpoint={files['policy']}", f"--sets=large={files['large']}", f"--output={output}",
              env=env),
          cli(files, f"--checkpoint={tmp_path / 'nope'}", f"--sets=small={files['small']}")]
  expected, _ = independent_accuracy(load_hf_model(files["policy"]), load_tokenizer(files["policy"]), LARGE_ROWS,
                                     "problem", score=demo_verifier_score)  # while the commands run
  (stdout, stderr), *failures = [run.communicate(timeout=300) for run in runs]
  assert runs[0].returncode == 0, stderr[-3000:]
  results = json.loads(output.read_text())
  large = results["sets"]["large"]
  assert list(results["sets"]) == ["large"] and (large["num_problems"], large["protocol"]) == (5, "greedy")
  assert large["accuracy"] == pytest.approx(expected) and results["checkpoint"] == str(files["policy"])
  assert evaluation.render_table(results) in stdout
  assert "seqio is not available" in stderr
  [(_, missing_err)] = failures  # the other bad inputs raise in-process (test above); main() one-lines them alike
  assert runs[1].returncode != 0 and "Traceback" not in missing_err
  assert missing_err.strip().splitlines()[-1] == f"error: --checkpoint {tmp_path / 'nope'} does not exist"


def test_the_report_averages_over_sets_and_lands_in_metrics(tmp_path):
  results = {"checkpoint": "/ckpt", "orbax_step": 30, "sets": {
    "aime24": {"accuracy": 0.125, "num_problems": 30, "samples_per_problem": 16, "protocol": "mean@16 T=0.6"},
    "math500": {"accuracy": 0.8, "num_problems": 500, "samples_per_problem": 1, "protocol": "greedy"}}}
  table = evaluation.render_table(results)
  assert table.splitlines()[-1] == "| **average** | 530 | mean over sets | **46.25** |"  # (12.5 + 80) / 2, unweighted
  path = evaluation.write_report(results, tmp_path)
  assert table in path.read_text()
  [record] = read_metrics(tmp_path / "metrics.jsonl")
  assert record["step"] == 30 and record["eval/average_accuracy"] == pytest.approx(0.4625)
  assert record["eval/aime24/accuracy"] == 0.125
  assert list((tmp_path / TENSORBOARD_DIRNAME).iterdir())  # the event file


@pytest.mark.slow
def test_prepared_benchmarks_evaluate_into_the_paper_table(files, tmp_path):
  """prepare -> evaluate on two benchmark fixtures with their real columns; the table's average is over sets."""
  fixtures = pathlib.Path(__file__).parent / "fixtures" / "datasets"
  for name, fixture in (("aime24", "aime24_h4"), ("math500", "math500")):
    sources.prepare(name, str(fixtures / fixture), tmp_path / name)
  c = make_config(files, f"aime24={tmp_path / 'aime24' / 'test.jsonl'},math500={tmp_path / 'math500' / 'test.jsonl'}")
  c.rollout.max_prompt_len = 256
  def length_parity(responses, queries):  # a stand-in verifier for LaTeX answers a tiny random policy never writes
    return np.asarray([float(len(r) % 2 == 0) for r in responses], np.float32)

  results = evaluation.run_evaluation(c, files["policy"], score=length_parity, include_builtin=False)
  sets = results["sets"]
  assert {name: r["num_problems"] for name, r in sets.items()} == {"aime24": 3, "math500": 2}
  average = (sets["aime24"]["accuracy"] + sets["math500"]["accuracy"]) / 2
  assert evaluation.render_table(results).splitlines()[-1].endswith(f"**{100 * average:.2f}** |")
