"""The teacher-distilled SFT baseline: the examples it trains on, which traces it keeps, and a whole run."""

import json

import numpy as np
import pytest

from conftest import DEMO_CONFIG
from p2o_jax.config import load_config_file
from p2o_jax.data import arithmetic
from p2o_jax.data.char_tokenizer import build_char_tokenizer
from p2o_jax.data.records import Query
from p2o_jax.metrics import read_metrics
from p2o_jax.models.tokenizer import chat_prompt_ids
from p2o_jax.run_dir import RunDir
from p2o_jax.teacher_sft import column_traces, oracle_traces, run_teacher_sft, sft_examples


def test_examples_are_the_plain_prompt_as_rolled_out_then_the_trace_as_the_only_target():
  tokenizer = build_char_tokenizer()
  problem = arithmetic.make_problem((3, 4, 5), "hard")
  traces = oracle_traces([problem], "running_totals")
  assert traces[problem.id] == " 3+4=7, 7+5=12. The answer is 12"
  queries = [Query(problem.id, arithmetic.question_text(problem), "12"), Query("untraced", "Q: 1+1=", "2")]
  [(ids, mask)] = sft_examples(tokenizer, queries, traces, "Solve: {question}")
  prompt = chat_prompt_ids(tokenizer, ["Solve: Q: 3+4+5="])[0]
  target = tokenizer.encode(traces[problem.id], add_special_tokens=False) + [tokenizer.eos_token_id]
  np.testing.assert_array_equal(ids, prompt + target)
  np.testing.assert_array_equal(mask, [False] * len(prompt) + [True] * len(target))


def test_column_traces_keep_only_those_the_correctness_reward_accepts():
  queries = [Query("a", "q", "4", {"sol": "so \\boxed{4}"}), Query("b", "q", "5", {"sol": "so \\boxed{6}"}),
             Query("c", "q", "6", {"sol": ""}), Query("d", "q", "7", {})]
  seen = []

  def score(texts, rows):
    seen.append([q.id for q in rows])
    return np.asarray([float(t.endswith(f"{{{q.answer}}}")) for t, q in zip(texts, rows)], np.float32)

  assert column_traces(queries, "sol", score) == {"a": "so \\boxed{4}"}
  assert seen == [["a", "b"]]  # rows without a trace are not even scored
  with pytest.raises(ValueError, match="no training row has a text in that column"):
    column_traces(queries, "missing", score)


@pytest.mark.slow
def test_a_teacher_sft_run_evaluates_before_and_after_and_learns_the_scratchpad(tmp_path):
  c = load_config_file(DEMO_CONFIG)
  c.workdir = str(tmp_path)
  c.p2o.enabled = False
  c.distributed.cpu_devices = 0
  c.eval.builtin_easy, c.eval.builtin_hard = 0, 64
  c.teacher_sft.steps, c.teacher_sft.lr = 60, 1e-3
  history = run_teacher_sft(c)
  key = "eval/builtin_hard/accuracy"
  before, after = history["eval_at_start"][key], history["eval_at_end"][key]
  assert history["traces"] == c.data.builtin_train_size and history["sft"]["steps"] == 60
  assert after > before + 0.3, (before, after)  # the oracle's scratchpads, under the plain prompt, solve hard sums
  records = read_metrics(RunDir(tmp_path).metrics)
  assert [r["step"] for r in records] == [0, c.train.epochs * (c.data.builtin_train_size // c.train.batch_size)]
  assert json.loads(RunDir(tmp_path).history.read_text())["eval_at_end"] == history["eval_at_end"]
