"""Query records: the (id, question, answer) triple every pipeline passes around, read from JSONL or Parquet files.

Field names are dotted paths into nested rows ("reward_model.ground_truth" as in verl-style Parquet; a numeric part
indexes a list, e.g. "prompt.0.content"). Rows are numbered from 1: the line number in a JSONL file (blank lines are
not rows but keep their numbers), the row position in a Parquet file. A row that cannot become a Query is skipped and
counted, never guessed at; only a file with no usable row at all is an error.

Ids: with `id_field` the row's own id (numbers converted to str). Without it, `id_source="hash"` (default) gives a
stable content hash of (question, answer), the same in every run, process and file order, so identical problems
collapse into one; `id_source="row"` gives "row<N>" from the row number, stable only while the file is unchanged.
Duplicate ids keep the first row; later ones count as skipped.
"""

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow.parquet as pq

from p2o_jax.data import arithmetic

logger = logging.getLogger(__name__)

IdSource = Literal["hash", "row"]
_SHOWN_SKIPS = 5  # how many skipped rows a ReadResult and the warning name


@dataclasses.dataclass(frozen=True)
class Query:
  """One training or evaluation problem: a run-independent `id`, the `question` text, the reference `answer`."""

  id: str
  question: str
  answer: str


@dataclasses.dataclass(frozen=True)
class ReadResult:
  """The usable queries in file order, how many rows were skipped, and (row number, reason) for the first few."""

  queries: list[Query]
  skipped: int
  skipped_examples: list[tuple[int, str]]


class _BadRow(ValueError):
  """Why one row cannot become a Query; caught per row, never escapes read_queries."""


def content_id(question: str, answer: str) -> str:
  """A stable id from the content alone; JSON-encoding the pair keeps ("a b", "c") apart from ("a", "b c")."""
  digest = hashlib.sha256(json.dumps([question, answer]).encode()).hexdigest()
  return "sha256:" + digest[:16]


def _field_value(row: Any, path: str) -> Any:
  """The value at dotted `path` inside nested dicts/lists; raises _BadRow naming the path when it is absent."""
  value = row
  for part in path.split("."):
    if isinstance(value, dict) and part in value:
      value = value[part]
    elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
      value = value[int(part)]
    else:
      raise _BadRow(f"missing field {path!r}")
  return value


def _as_text(value: Any, path: str) -> str:
  # bool is excluded: JSON true would silently become "True"; NaN/inf are never a meaningful reference.
  if isinstance(value, str):
    return value
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if isinstance(value, float) and math.isfinite(value):
    return str(value)
  raise _BadRow(f"field {path!r} is {type(value).__name__}, not a string or number")


def _query_from_row(row: Any | _BadRow, row_number: int, question_field: str, answer_field: str, id_field: str | None,
                    id_source: IdSource) -> Query:
  if isinstance(row, _BadRow):
    raise row  # the line did not even parse
  if not isinstance(row, dict):
    raise _BadRow(f"row is a JSON {type(row).__name__}, not an object")
  question = _as_text(_field_value(row, question_field), question_field)
  answer = _as_text(_field_value(row, answer_field), answer_field)
  if not question.strip():
    raise _BadRow(f"empty question in {question_field!r}")
  if not answer.strip():
    raise _BadRow(f"empty answer in {answer_field!r}")  # nothing to verify against: every reward would be 0
  if id_field is not None:
    query_id = _as_text(_field_value(row, id_field), id_field)
  else:
    query_id = content_id(question, answer) if id_source == "hash" else f"row{row_number}"
  return Query(query_id, question, answer)


def _jsonl_rows(path: pathlib.Path) -> Iterator[tuple[int, Any]]:
  """(line number, parsed object or the _BadRow that explains why not); blank lines are skipped silently."""
  with path.open("rb") as file:
    for line_number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        yield line_number, json.loads(line)
      except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        yield line_number, _BadRow(f"invalid JSON ({error})")


def _parquet_rows(path: pathlib.Path, fields: list[str]) -> Iterator[tuple[int, Any]]:
  parquet = pq.ParquetFile(path)
  # Read only the top-level columns the fields live in: verl-style files also carry large prompt/message columns.
  wanted = {field.split(".")[0] for field in fields}
  columns = [name for name in parquet.schema_arrow.names if name in wanted]
  row_number = 0
  for record_batch in parquet.iter_batches(columns=columns):
    for row in record_batch.to_pylist():
      row_number += 1
      yield row_number, row


def _rows(path: pathlib.Path, fields: list[str]) -> Iterator[tuple[int, Any]]:
  if path.suffix == ".jsonl":
    return _jsonl_rows(path)
  if path.suffix == ".parquet":
    return _parquet_rows(path, fields)
  raise ValueError(f"unsupported query file extension {path.suffix!r} in {path}; expected .jsonl or .parquet")


def read_queries(path: str | pathlib.Path, *, question_field: str = "problem", answer_field: str = "answer",
                 id_field: str | None = None, id_source: IdSource = "hash") -> ReadResult:
  """Every usable row of a .jsonl or .parquet file as a Query; broken rows and duplicate ids are counted and skipped."""
  path = pathlib.Path(path)
  if id_source not in ("hash", "row"):
    raise ValueError(f"id_source must be 'hash' or 'row', got {id_source!r}")
  if not path.is_file():
    raise FileNotFoundError(f"query file not found: {path}")
  fields = [question_field, answer_field] + ([id_field] if id_field is not None else [])
  queries: dict[str, Query] = {}
  first_row_of: dict[str, int] = {}
  skips: list[tuple[int, str]] = []
  for row_number, row in _rows(path, fields):
    try:
      query = _query_from_row(row, row_number, question_field, answer_field, id_field, id_source)
      if query.id in queries:
        raise _BadRow(f"duplicate id {query.id!r} (first at row {first_row_of[query.id]})")
    except _BadRow as reason:
      skips.append((row_number, str(reason)))
      continue
    queries[query.id] = query
    first_row_of[query.id] = row_number
  return _checked_result(path, list(queries.values()), skips)


def _checked_result(path: pathlib.Path, queries: list[Query], skips: list[tuple[int, str]]) -> ReadResult:
  if not queries and not skips:
    raise ValueError(f"{path} contains no rows")
  if not queries:
    row_number, reason = skips[0]
    raise ValueError(f"{path}: none of its {len(skips)} rows is usable; first: row {row_number}: {reason}")
  if skips:
    shown = "; ".join(f"row {number}: {reason}" for number, reason in skips[:_SHOWN_SKIPS])
    logger.warning("skipped %d of %d rows in %s (%s%s)", len(skips), len(skips) + len(queries), path, shown,
                   "; ..." if len(skips) > _SHOWN_SKIPS else "")
  return ReadResult(queries, len(skips), skips[:_SHOWN_SKIPS])


def builtin_queries(world_cfg: arithmetic.WorldConfig, difficulty: arithmetic.Difficulty, n: int, seed: int,
                    split: arithmetic.Split = "train") -> list[Query]:
  """`n` problems of the built-in arithmetic world as Queries (ids are the world's own problem ids)."""
  records = arithmetic.to_records(arithmetic.sample_problems(world_cfg, difficulty, n, seed, split))
  return [Query(record["id"], record["question"], record["answer"]) for record in records]
