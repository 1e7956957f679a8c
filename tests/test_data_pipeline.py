"""Tests for query reading (p2o_jax/data/records.py) and the epoch batch pipeline (p2o_jax/data/pipeline.py)."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from p2o_jax.data import arithmetic
from p2o_jax.data.pipeline import EpochBatches, epoch_seed
from p2o_jax.data.records import Query, content_id, problem_queries, read_queries


def _write_jsonl(path, lines: list[str]):
  path.write_text("\n".join(lines) + "\n")
  return path


def _queries(n: int) -> list[Query]:
  return [Query(f"q{i}", f"question {i}", str(i)) for i in range(n)]


def _ids(batch: list[Query]) -> list[str]:
  return [query.id for query in batch]


# ----- records: JSONL -----

def test_jsonl_nested_fields_numbers_and_given_ids(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [
      json.dumps({"meta": {"uid": 7}, "data": {"q": "What is 2+2?"}, "reward_model": {"ground_truth": 4}}),
      json.dumps({"meta": {"uid": "x"}, "data": {"q": "Half of 1?"}, "reward_model": {"ground_truth": 0.5}}),
  ])
  result = read_queries(path, question_field="data.q", answer_field="reward_model.ground_truth", id_field="meta.uid")
  assert result.queries == [Query("7", "What is 2+2?", "4"), Query("x", "Half of 1?", "0.5")]
  assert (result.skipped, result.skipped_examples) == (0, [])


def test_list_index_in_a_field_path(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"prompt": [{"content": "Q?"}], "answer": "A"})])
  assert read_queries(path, question_field="prompt.0.content").queries[0].question == "Q?"


def test_hash_ids_depend_on_content_not_position(tmp_path):
  rows = [json.dumps({"problem": f"p{i}", "answer": str(i)}) for i in range(3)]
  forward = read_queries(_write_jsonl(tmp_path / "f.jsonl", rows)).queries
  backward = read_queries(_write_jsonl(tmp_path / "b.jsonl", rows[::-1])).queries
  assert {q.id: q for q in forward} == {q.id: q for q in backward}
  assert forward[1].id == content_id("p1", "1")
  assert content_id("a b", "c") != content_id("a", "b c")
  assert len({q.id for q in forward}) == 3


def test_row_ids_are_line_numbers(tmp_path):
  path = _write_jsonl(tmp_path / "a.jsonl", [json.dumps({"problem": "p", "answer": "1"}), "",
                                             json.dumps({"problem": "r", "answer": "2"})])
  assert _ids(read_queries(path, id_source="row").queries) == ["row1", "row3"]


def test_mixed_file_skips_counts_and_logs_broken_rows(tmp_path, caplog):
  lines = [
      json.dumps({"id": "a", "problem": "good 1", "answer": "1"}),  # 1
      "{not json",  # 2
      json.dumps({"id": "b", "answer": "2"}),  # 3: no problem
      json.dumps({"id": "c", "problem": "   ", "answer": "3"}),  # 4: empty question
      "",  # 5: blank, not a row
      json.dumps({"id": "d", "problem": "p", "answer": {"x": 1}}),  # 6: answer not a string
      json.dumps({"id": "a", "problem": "dup", "answer": "7"}),  # 7: duplicate id
      json.dumps(["a", "list"]),  # 8: not an object
      json.dumps({"id": "e", "problem": "good 2", "answer": True}),  # 9: bool is not an answer
      json.dumps({"id": "f", "problem": "good 3", "answer": 10}),  # 10
  ]
  with caplog.at_level(logging.WARNING, logger="p2o_jax.data.records"):
    result = read_queries(_write_jsonl(tmp_path / "mixed.jsonl", lines), id_field="id")
  assert result.queries == [Query("a", "good 1", "1"), Query("f", "good 3", "10")]
  assert result.skipped == 7
  assert [number for number, _ in result.skipped_examples] == [2, 3, 4, 6, 7]
  reasons = dict(result.skipped_examples)
  assert "invalid JSON" in reasons[2] and "'problem'" in reasons[3] and "empty question" in reasons[4]
  assert "duplicate id 'a' (first at row 1)" in reasons[7]
  warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
  assert len(warnings) == 1 and "skipped 7 of 9 rows" in warnings[0] and "row 2:" in warnings[0]
  assert "\n" not in warnings[0]


def test_all_broken_rows_is_one_line_error_naming_file_and_first_reason(tmp_path):
  path = _write_jsonl(tmp_path / "broken.jsonl", ["{oops", json.dumps({"problem": "p"})])
  with pytest.raises(ValueError, match=r"broken\.jsonl.*none of its 2 rows.*row 1: invalid JSON") as error:
    read_queries(path)
  assert "\n" not in str(error.value)


def test_missing_file_empty_file_and_unknown_extension(tmp_path):
  with pytest.raises(FileNotFoundError, match="query file not found"):
    read_queries(tmp_path / "nope.jsonl")
  with pytest.raises(ValueError, match="contains no rows"):
    read_queries(_write_jsonl(tmp_path / "empty.jsonl", [""]))
  (tmp_path / "data.csv").write_text("problem,answer\n")
  with pytest.raises(ValueError, match=r"extension '\.csv'"):
    read_queries(tmp_path / "data.csv")


# ----- records: Parquet -----

def test_parquet_verl_style_nested_struct(tmp_path):
  table = pa.table({
      "prompt": [[{"role": "user", "content": "long chat prompt 1"}], [{"role": "user", "content": "long 2"}],
                 [{"role": "user", "content": "long 3"}]],
      "problem": ["Solve x+1=3.", None, "Compute 6*7."],
      "reward_model": [{"style": "rule", "ground_truth": "2"}, {"style": "rule", "ground_truth": "5"},
                       {"style": "rule", "ground_truth": "42"}],
      "extra_info": [{"index": 10}, {"index": 11}, {"index": 12}],
  })
  pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)  # two record batches
  result = read_queries(tmp_path / "train.parquet", answer_field="reward_model.ground_truth",
                        id_field="extra_info.index")
  assert result.queries == [Query("10", "Solve x+1=3.", "2"), Query("12", "Compute 6*7.", "42")]
  assert result.skipped == 1 and result.skipped_examples[0][0] == 2
  assert "NoneType" in result.skipped_examples[0][1]


def test_parquet_missing_column_makes_every_row_broken(tmp_path):
  pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "t.parquet")
  with pytest.raises(ValueError, match=r"t\.parquet has no column 'problem' \(columns: question, answer\)"):
    read_queries(tmp_path / "t.parquet")


def test_builtin_queries_match_the_arithmetic_world():
  world = arithmetic.WorldConfig()
  problems = arithmetic.sample_problems(world, "hard", 5, 3, "held_out")
  queries = problem_queries(problems)
  assert [q.id for q in queries] == [p.id for p in problems]
  assert [int(q.answer) for q in queries] == [sum(p.operands) for p in problems]
  assert all(q.question == arithmetic.question_text(p) for q, p in zip(queries, problems))


# ----- pipeline -----

def test_steps_per_epoch_and_local_batch_size():
  assert EpochBatches(_queries(10), global_batch_size=4, seed=0).steps_per_epoch == 2
  assert EpochBatches(_queries(10), global_batch_size=4, seed=0, drop_remainder=False).steps_per_epoch == 3
  assert EpochBatches(_queries(12), global_batch_size=4, seed=0, drop_remainder=False).steps_per_epoch == 3
  assert EpochBatches(_queries(10), global_batch_size=4, seed=0, process_count=2).local_batch_size == 2


def _epoch_ids(pipeline: EpochBatches, epoch: int) -> list[str]:
  return [i for step in range(pipeline.steps_per_epoch) for i in _ids(pipeline.batch(epoch, step))]


def test_each_epoch_is_a_new_permutation_determined_by_the_seed():
  queries = _queries(50)
  pipeline = EpochBatches(queries, global_batch_size=10, seed=5, drop_remainder=False)
  orders = [_epoch_ids(pipeline, epoch) for epoch in range(4)]
  assert all(sorted(order) == sorted(_ids(queries)) for order in orders)  # every query exactly once per epoch
  assert len({tuple(order) for order in orders}) == 4
  assert orders == [_epoch_ids(EpochBatches(queries, global_batch_size=10, seed=5, drop_remainder=False), e)
                    for e in range(4)]
  assert orders[0] != _epoch_ids(EpochBatches(queries, global_batch_size=10, seed=6, drop_remainder=False), 0)
  assert len({epoch_seed(5, epoch) for epoch in range(100)}) == 100


@pytest.mark.parametrize("process_count", [1, 2, 4])
@pytest.mark.parametrize("num_queries,drop_remainder", [(37, True), (37, False), (40, False), (33, False)])
def test_process_local_batches_concatenate_to_the_single_process_global_batch(process_count, num_queries,
                                                                             drop_remainder):
  queries = _queries(num_queries)
  single = EpochBatches(queries, global_batch_size=8, seed=9, drop_remainder=drop_remainder)
  shards = [EpochBatches(queries, global_batch_size=8, seed=9, process_index=p, process_count=process_count,
                         drop_remainder=drop_remainder) for p in range(process_count)]
  for epoch in range(2):
    for step in range(single.steps_per_epoch):
      local = [shard.batch(epoch, step) for shard in shards]
      assert sum(local, []) == single.batch(epoch, step)
      full = step < single.full_batches_per_epoch
      assert not full or all(len(part) == 8 // process_count for part in local)
  assert all(shard.steps_per_epoch == single.steps_per_epoch for shard in shards)


def test_tail_of_an_uneven_epoch_is_cut_contiguously():
  # 9 queries, global batch 4, 2 processes: the tail holds 1 query; process 0 takes it, process 1 an empty step.
  shards = [EpochBatches(_queries(9), global_batch_size=4, seed=0, process_index=p, process_count=2,
                         drop_remainder=False) for p in range(2)]
  assert [len(shard.batch(0, 2)) for shard in shards] == [1, 0]


def _run(iterator, n: int) -> list[tuple[int, int, list[str]]]:
  return [(epoch, step, _ids(batch)) for epoch, step, batch in (iterator.next() for _ in range(n))]


def test_iterator_walks_epochs_and_flags_their_ends():
  pipeline = EpochBatches(_queries(10), global_batch_size=4, seed=2, drop_remainder=False)
  iterator = pipeline.iterator()
  seen, finished = [], []
  for _ in range(7):
    epoch, step, batch = iterator.next()
    seen.append((epoch, step))
    finished.append(iterator.epoch_finished)
    assert batch == pipeline.batch(epoch, step)
  assert seen == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
  assert finished == [False, False, True, False, False, True, False]


@pytest.mark.parametrize("stop_after", [0, 3, 4, 5, 11])
def test_resume_from_saved_state_equals_uninterrupted(stop_after):
  queries = _queries(23)
  uninterrupted = _run(EpochBatches(queries, global_batch_size=6, seed=4).iterator(), 14)
  first = EpochBatches(queries, global_batch_size=6, seed=4).iterator()
  before = _run(first, stop_after)
  state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
  resumed = EpochBatches(queries, global_batch_size=6, seed=4).iterator(state)
  assert resumed.epoch_finished == first.epoch_finished
  assert before + _run(resumed, 14 - stop_after) == uninterrupted


def test_state_is_global_so_a_resume_may_change_process_count():
  queries = _queries(32)
  single = EpochBatches(queries, global_batch_size=8, seed=0).iterator()
  _run(single, 5)
  state = single.state()
  halves = [EpochBatches(queries, global_batch_size=8, seed=0, process_index=p, process_count=2).iterator(state)
            for p in range(2)]
  (epoch, step, batch), = _run(single, 1)
  assert [_run(half, 1)[0][2] for half in halves] == [batch[:4], batch[4:]]


def test_restore_refuses_a_state_from_another_pipeline():
  queries = _queries(20)
  state = EpochBatches(queries, global_batch_size=4, seed=1).iterator().state()
  with pytest.raises(ValueError, match="seed=1 but this pipeline has 2"):
    EpochBatches(queries, global_batch_size=4, seed=2).iterator(state)
  with pytest.raises(ValueError, match="drop_remainder=True but this pipeline has False"):
    EpochBatches(queries, global_batch_size=4, seed=1, drop_remainder=False).iterator(state)
  with pytest.raises(ValueError, match="queries_digest"):
    EpochBatches(queries[::-1], global_batch_size=4, seed=1).iterator(state)
  with pytest.raises(ValueError, match="step 5 is out of range"):
    EpochBatches(queries, global_batch_size=4, seed=1).iterator({**state, "step": 5})
  with pytest.raises(ValueError, match="missing"):
    EpochBatches(queries, global_batch_size=4, seed=1).iterator({"epoch": 0, "step": 0})


def test_bad_configurations_are_one_line_errors():
  with pytest.raises(ValueError, match="global_batch_size 6 is not divisible by process_count 4"):
    EpochBatches(_queries(20), global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="only 5 queries, fewer than one global batch of 8"):
    EpochBatches(_queries(5), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="process_index 2 must be < process_count 2"):
    EpochBatches(_queries(8), global_batch_size=4, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="step 2 is out of range"):
    EpochBatches(_queries(8), global_batch_size=4, seed=0).batch(0, 2)


def test_drop_remainder_drops_a_different_tail_each_epoch():
  # 2 of 10 queries are dropped per epoch; a fixed dropped tail would leave counts of 0 and 40 after 40 epochs.
  pipeline = EpochBatches(_queries(10), global_batch_size=4, seed=3)
  counts = np.zeros(10, int)
  for epoch in range(40):
    order = _epoch_ids(pipeline, epoch)
    assert len(order) == len(set(order)) == 8
    np.add.at(counts, [int(query_id[1:]) for query_id in order], 1)
  assert counts.sum() == 40 * 8
  assert counts.min() >= 20 and counts.max() <= 39  # 32 expected each; binomial sd 2.5
