"""Tests for the paper's data prepared from local copies (p2o_jax/data/sources.py, command p2o_jax/prepare.py) and for
the real dataset formats records.read_queries accepts (conversational rows, row columns, whole-file missing columns).

The fixtures (tests/fixtures/datasets/, written by make_fixtures.py there) carry each source's published column names
with fabricated problems. Answers are chosen to parse, or not, under any grader ("\\frac{" and "" never do)."""

import collections
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2o_jax.data import arithmetic, sources
from p2o_jax.data.records import Query, problem_queries, read_queries

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "datasets"
SMALL = sources.Options(dev_size=5, train_sizes=(4, 8))


def _rows(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def _ids_answers(path: pathlib.Path) -> list[tuple[str, str]]:
  return [(row["id"], row["answer"]) for row in _rows(path)]


# ----- benchmarks -----

@pytest.mark.parametrize("source,fixture,expected,skipped", [
    ("aime24", "aime24_h4", [("60", "100"), ("61", "101"), ("62", "102")], {}),
    ("aime24", "aime24_maxwell/aime_2024_problems.jsonl",  # ID/Problem/Answer (an int)
     [("2024-I-1", "100"), ("2024-I-2", "101"), ("2024-I-3", "102")], {}),
    ("aime25", "aime25_opencompass",  # both files of the directory, I before II; no ids: the row index
     [("aime25-0", "10"), ("aime25-1", "11"), ("aime25-2", "20"), ("aime25-3", "21")], {}),
    ("amc", "amc", [("0", "27"), ("1", "0.5"), ("2", "29")], {}),  # floats as text; only 2023 (see the next test)
    ("math500", "math500/test.jsonl",
     [("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)"), ("test/algebra/1.json", "2")],
     {"no answer": 1}),
    ("minerva", "minerva",  # the answer is the last non-empty \boxed{} of the solution
     [("0", "1.6"), ("1", "4.5 \\times 10^{33}")], {"no \\boxed answer in the solution": 2}),
    ("olympiadbench", "olympiadbench",  # final_answer[0] without its $ delimiters; multi-answer rows kept
     [("1606", "2"), ("1610", "\\frac{1}{2 n+2}"), ("1611", "69,84")], {"no answer": 1}),
])
def test_each_benchmark_from_its_published_layout(tmp_path, source, fixture, expected, skipped):
  result = sources.prepare(source, str(FIXTURES / fixture), tmp_path)
  assert _ids_answers(tmp_path / "test.jsonl") == expected
  (output,) = result.outputs
  assert (output.path, output.written, dict(output.skipped)) == (tmp_path / "test.jsonl", len(expected), skipped)
  row = _rows(tmp_path / "test.jsonl")[0]
  assert row["source"] == source and not {"solution", "Solution", "r1_solution_1"} & set(row)
  assert json.loads((tmp_path / "prepare_info.json").read_text())["outputs"]["test.jsonl"]["rows"] == len(expected)


def test_benchmark_columns_and_problem_text(tmp_path):
  sources.prepare("math500", str(FIXTURES / "math500" / "test.jsonl"), tmp_path)
  assert _rows(tmp_path / "test.jsonl")[1] == {"id": "test/algebra/1.json", "problem": "What is $1+1$?", "answer": "2",
                                               "source": "math500", "subject": "Algebra", "level": 1}
  sources.prepare("olympiadbench", str(FIXTURES / "olympiadbench"), tmp_path / "ob")
  assert _rows(tmp_path / "ob" / "test.jsonl")[0]["subject"] == "Combinatorics"


def test_amc_keeps_the_years_asked_for(tmp_path):
  result = sources.prepare("amc", str(FIXTURES / "amc"), tmp_path)
  assert dict(result.filtered) == {"filtered: not AMC 2023": 2}
  every_year = sources.prepare("amc", str(FIXTURES / "amc"), tmp_path / "all", sources.Options(amc_year=0))
  assert every_year.outputs[0].written == 5 and not every_year.filtered


# ----- training sets: the authors' splits -----

def _datasets_style_selection(n: int, seed: int, dev_size: int, sizes, shuffle_first: bool):
  """The authors' scripts step by step, with `datasets`' semantics on lists of row indices: shuffle(seed) is
  rows[default_rng(seed).permutation(n)]; train_test_split(test_size=k, seed) is (rows[p[k:]], rows[p[:k]]) for
  p = default_rng(seed).permutation(len(rows))."""
  rows = list(range(n))
  if shuffle_first:
    rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
  p = np.random.default_rng(seed).permutation(len(rows))
  train, dev = [rows[i] for i in p[dev_size:]], [rows[i] for i in p[:dev_size]]
  subsets = {}
  for size in sizes:
    q = np.random.default_rng(seed).permutation(len(train))
    subsets[size] = [train[i] for i in q[:size]]
  return dev, subsets


@pytest.mark.parametrize("shuffle_first", [True, False])
@pytest.mark.parametrize("seed", [42, 0])
def test_train_splits_are_the_authors_selection(seed, shuffle_first):
  options = sources.Options(seed=seed, dev_size=7, train_sizes=(10, 20))
  assert sources.train_splits(50, options, shuffle_first) == _datasets_style_selection(50, seed, 7, (10, 20),
                                                                                        shuffle_first)


def test_deepscaler_subsets_are_deterministic_nested_and_disjoint_from_dev(tmp_path):
  first = sources.prepare("deepscaler", str(FIXTURES / "deepscaler"), tmp_path / "a", SMALL)
  sources.prepare("deepscaler", str(FIXTURES / "deepscaler" / "deepscaler.json"), tmp_path / "b", SMALL)
  names = ["train_4.jsonl", "train_8.jsonl", "dev_5.jsonl"]
  assert [output.path.name for output in first.outputs] == names
  for name in names:
    assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
  small, large, dev = ({row["id"] for row in _rows(tmp_path / "a" / name)} for name in names)
  assert len(small) == 4 and len(large) == 8 and len(dev) == 5
  assert small <= large and not large & dev
  other = sources.prepare("deepscaler", str(FIXTURES / "deepscaler"), tmp_path / "c",
                          sources.Options(seed=1, dev_size=5, train_sizes=(4, 8)))
  assert {row["id"] for row in _rows(other.outputs[1].path)} != large
  # ids are the 0-based source row, so every output row is the source row it names
  source_rows = json.loads((FIXTURES / "deepscaler" / "deepscaler.json").read_text())
  for row in _rows(tmp_path / "a" / "train_8.jsonl"):
    index = int(row["id"].removeprefix("deepscaler-"))
    assert (row["problem"], row["answer"]) == (source_rows[index]["problem"], source_rows[index]["answer"])


def test_bad_training_rows_are_counted_skips_with_their_row_ids(tmp_path, caplog):
  # 40 rows, 5 dev, one subset of all 35 others: rows 4 (empty answer) and 8 ("\frac{") land somewhere.
  with caplog.at_level(logging.WARNING, logger="p2o_jax.data.sources"):
    result = sources.prepare("deepscaler", str(FIXTURES / "deepscaler"), tmp_path,
                             sources.Options(dev_size=5, train_sizes=(35,)))
  skipped = sum((output.skipped for output in result.outputs), start=collections.Counter())
  assert dict(skipped) == {"empty answer": 1, "answer does not parse": 1}
  assert sum(output.written for output in result.outputs) == 38
  logged = " ".join(record.getMessage() for record in caplog.records)
  assert "row 4: empty answer" in logged and "row 8: answer does not parse ('\\\\frac{')" in logged
  summary = "\n".join(result.lines())
  assert "skipped 1: empty answer [row 4]" in summary and "skipped 1: answer does not parse [row 8]" in summary
  assert "rows written (of 35 selected)" in summary or "dev_5.jsonl: 3 rows written" in summary


def test_deepmath_keeps_difficulty_at_least_seven(tmp_path):
  result = sources.prepare("deepmath", str(FIXTURES / "deepmath"), tmp_path, SMALL)
  assert dict(result.filtered) == {"filtered: difficulty < 7": 24}  # 5.0 and 6.5: 2 of every 5 of 60 rows
  rows = [row for output in result.outputs for row in _rows(output.path)]
  assert rows and all(row["difficulty"] >= 7 for row in rows)
  assert set(rows[0]) == {"id", "problem", "answer", "source", "difficulty", "topic"}  # never the r1 solutions
  looser = sources.prepare("deepmath", str(FIXTURES / "deepmath"), tmp_path / "l",
                           sources.Options(dev_size=5, train_sizes=(4, 8), min_difficulty=6.5))
  assert dict(looser.filtered) == {"filtered: difficulty < 6.5": 12}
  # the split is over the 36 kept rows in source order (no shuffle first), as the authors' script does
  dev, subsets = _datasets_style_selection(36, 42, 5, (4, 8), shuffle_first=False)
  kept = [i for i in range(60) if i % 5 >= 2]
  expected_dev = [f"deepmath-{kept[i]}" for i in dev if kept[i] != 2]  # source row 2 does not parse
  assert [row["id"] for row in _rows(tmp_path / "dev_5.jsonl")] == expected_dev


# ----- inputs -----

def _save_to_disk(directory: pathlib.Path, table: pa.Table, shards: int = 2) -> None:
  """What `datasets`' Dataset.save_to_disk writes: Arrow IPC *stream* files listed in state.json."""
  directory.mkdir(parents=True)
  size = -(-table.num_rows // shards)
  names = []
  for shard in range(shards):
    name = f"data-{shard:05d}-of-{shards:05d}.arrow"
    with pa.ipc.new_stream(directory / name, table.schema) as writer:
      writer.write_table(table.slice(shard * size, size))
    names.append({"filename": name})
  (directory / "state.json").write_text(json.dumps({"_data_files": names, "_fingerprint": "x", "_split": "test"}))
  (directory / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_save_to_disk_directories_are_read_with_pyarrow(tmp_path):
  table = pa.table({"problem": [f"p{i}" for i in range(5)], "answer": [str(i) for i in range(5)],
                    "subject": ["Algebra"] * 5, "level": [1, 2, 3, 4, 5], "unique_id": [f"u{i}" for i in range(5)],
                    "solution": ["long"] * 5})
  _save_to_disk(tmp_path / "math500", table)
  sources.prepare("math500", str(tmp_path / "math500"), tmp_path / "out")
  assert _ids_answers(tmp_path / "out" / "test.jsonl") == [(f"u{i}", str(i)) for i in range(5)]
  # a DatasetDict: dataset_dict.json and one directory per split; a benchmark reads "test" by default
  _save_to_disk(tmp_path / "dict" / "test", table.slice(0, 2), shards=1)
  _save_to_disk(tmp_path / "dict" / "train", table.slice(2, 3), shards=1)
  (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
  sources.prepare("math500", str(tmp_path / "dict"), tmp_path / "out2")
  assert _ids_answers(tmp_path / "out2" / "test.jsonl") == [("u0", "0"), ("u1", "1")]
  sources.prepare("math500", str(tmp_path / "dict"), tmp_path / "out3", sources.Options(split="train"))
  assert [i for i, _ in _ids_answers(tmp_path / "out3" / "test.jsonl")] == ["u2", "u3", "u4"]


def test_snapshot_directories_choose_a_split_and_one_format(tmp_path):
  rows = {"train": [{"problem": "t", "answer": "1"}], "test": [{"problem": "s", "answer": "2"}]}
  for split, split_rows in rows.items():
    pq.write_table(pa.Table.from_pylist(split_rows), tmp_path / f"{split}-00000-of-00001.parquet")
  (tmp_path / "test.jsonl").write_text(json.dumps({"problem": "dup", "answer": "3"}) + "\n")  # same data, jsonl
  sources.prepare("aime25", str(tmp_path), tmp_path / "out")
  assert [row["problem"] for row in _rows(tmp_path / "out" / "test.jsonl")] == ["s"]  # test split, parquet only
  with pytest.raises(sources.PrepareError, match="has no split 'dev'"):
    sources.prepare("aime25", str(tmp_path), tmp_path / "out", sources.Options(split="dev"))


def test_a_missing_column_names_the_column_and_the_file(tmp_path):
  pq.write_table(pa.table({"problem": ["p"], "solution": ["s"]}), tmp_path / "train.parquet")
  with pytest.raises(sources.PrepareError) as error:
    sources.prepare("deepscaler", str(tmp_path / "train.parquet"), tmp_path / "out")
  assert str(error.value) == (f"{tmp_path / 'train.parquet'} has no column 'answer' (the answer of deepscaler; "
                              "columns: problem, solution)")
  (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "final_answer": "1"}) + "\n")
  with pytest.raises(sources.PrepareError, match=r"q\.jsonl has no column 'difficulty'"):
    sources.prepare("deepmath", str(tmp_path / "q.jsonl"), tmp_path / "out")


def test_unknown_inputs_are_one_line_errors(tmp_path):
  with pytest.raises(sources.PrepareError, match="no such file or directory"):
    sources.prepare("aime24", str(tmp_path / "nope.jsonl"), tmp_path / "out")
  with pytest.raises(sources.PrepareError, match="unknown source 'gsm8k'"):
    sources.prepare("gsm8k", str(FIXTURES / "math500"), tmp_path / "out")
  try:
    import datasets  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    with pytest.raises(sources.PrepareError, match="pass a local copy .* or install `datasets`"):
      sources.prepare("aime24", "HuggingFaceH4/aime_2024", tmp_path / "out")


def test_command_line_prepares_and_reports_bad_input(tmp_path):
  command = [sys.executable, "-m", "p2o_jax.prepare", "--source", "amc", "--output", str(tmp_path / "amc")]
  done = subprocess.run(command + ["--input", str(FIXTURES / "amc")], capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr
  assert "amc: 5 rows read" in done.stdout and "test.jsonl: 3 rows written" in done.stdout
  bad = subprocess.run(command + ["--input", str(tmp_path / "missing")], capture_output=True, text=True, check=False)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1] == f"error: --input {tmp_path / 'missing'}: no such file or directory"


# ----- records.read_queries on real formats -----

def test_conversational_rows_take_the_last_user_turn(tmp_path, caplog):
  with caplog.at_level(logging.WARNING, logger="p2o_jax.data.records"):
    result = read_queries(FIXTURES / "conversational.jsonl", messages_field="messages", id_field="id")
  assert [(q.id, q.question, q.answer) for q in result.queries] == [("c1", "What is 2+2?", "4"),
                                                                   ("c2", "What is 3+3?", "6")]
  assert result.skipped == 1 and result.skipped_examples == [(3, "no user turn in 'messages' (id 'c3')")]
  # verl-style Parquet: the chat turns in a struct list column named "prompt"
  table = pa.table({"prompt": [[{"role": "system", "content": "sys"}, {"role": "user", "content": "Q?"}]],
                    "reward_model": [{"ground_truth": "7"}]})
  pq.write_table(table, tmp_path / "verl.parquet")
  (query,) = read_queries(tmp_path / "verl.parquet", messages_field="prompt",
                          answer_field="reward_model.ground_truth").queries
  assert (query.question, query.answer) == ("Q?", "7")


def test_query_columns_carry_the_row(tmp_path):
  result = read_queries(FIXTURES / "conversational.jsonl", messages_field="messages", id_field="id")
  columns = result.queries[0].columns
  assert set(columns) == {"id", "messages", "answer", "level"} and columns["level"] == 1
  # answer is always the reference string, whatever the source column holds
  pq.write_table(pa.table({"problem": ["p"], "final_answer": [3.5], "blob": [b"\x00x"], "meta": [{"k": 1}]}),
                 tmp_path / "t.parquet")
  (query,) = read_queries(tmp_path / "t.parquet", answer_field="final_answer").queries
  assert query.columns == {"problem": "p", "final_answer": 3.5, "blob": "\x00x", "meta": {"k": 1}, "answer": "3.5"}
  json.dumps(query.columns)
  assert query == Query(query.id, "p", "3.5")  # columns do not take part in ==
  assert read_queries(tmp_path / "t.parquet", answer_field="final_answer", keep_columns=False).queries[0].columns == {}
  sources.prepare("math500", str(FIXTURES / "math500" / "test.jsonl"), tmp_path / "m")
  (first, _) = read_queries(tmp_path / "m" / "test.jsonl", id_field="id").queries
  assert first.columns["subject"] == "Precalculus" and first.columns["answer"] == first.answer


def test_builtin_queries_have_id_question_answer_difficulty_columns():
  (query,) = problem_queries(arithmetic.sample_problems(arithmetic.WorldConfig(), "hard", 1, seed=0))
  assert query.columns == {"id": query.id, "question": query.question, "answer": query.answer, "difficulty": "hard"}


def test_a_column_no_row_has_is_one_error_naming_it(tmp_path):
  pq.write_table(pa.table({"problem": ["p"], "solution": ["s"]}), tmp_path / "train.parquet")
  with pytest.raises(ValueError) as error:
    read_queries(tmp_path / "train.parquet")
  assert str(error.value) == f"{tmp_path / 'train.parquet'} has no column 'answer' (columns: problem, solution)"
  pq.write_table(pa.table({"problem": ["p"], "reward_model": [{"style": "rule"}]}), tmp_path / "verl.parquet")
  with pytest.raises(ValueError, match="has no column 'reward_model.ground_truth'"):
    read_queries(tmp_path / "verl.parquet", answer_field="reward_model.ground_truth")
  lines = [json.dumps({"id": i, "problem": "p", "solution": "s"}) for i in range(3)]
  (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"a\.jsonl has no column 'answer' \(columns: id, problem, solution\)"):
    read_queries(tmp_path / "a.jsonl", id_field="id")


def test_a_row_missing_the_answer_is_a_skip_naming_row_and_id(tmp_path):
  lines = [json.dumps({"id": "a", "problem": "p", "answer": "1"}), json.dumps({"id": "b", "problem": "q"}),
           json.dumps({"id": "c", "problem": "r", "answer": " "})]
  (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
  result = read_queries(tmp_path / "a.jsonl", id_field="id")
  assert [q.id for q in result.queries] == ["a"]
  assert result.skipped_examples == [(2, "missing field 'answer' (id 'b')"), (3, "empty answer in 'answer' (id 'c')")]
