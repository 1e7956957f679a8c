"""Query records: the (id, question, answer) triple every pipeline passes around, read from JSONL or Parquet files.

Field names are dotted paths into nested rows ("reward_model.ground_truth" as in verl-style Parquet; a numeric part
indexes a list, e.g. "prompt.0.content"). Rows are numbered from 1: the line number in a JSONL file (blank lines are
not rows but keep their numbers), the row position in a Parquet file. A row that cannot become a Query is skipped and
counted, never guessed at; only a file with no usable row at all is an error.

Ids: with `id_field` the row's own id (numbers converted to str). Without it, `id_source="hash"` (default) gives a
stable content hash of (question, answer), the same in every run, process and file order, so identical problems
collapse into one; `id_source="row"` gives "row<N>" from the row number, stable only while the file is unchanged.
Duplicate ids keep the first row; later ones count as skipped.

Conversational rows: with `messages_field` (a dotted path to a list of chat turns, e.g. "messages" or verl's
"prompt": [{"role": "system", ...}, {"role": "user", "content": ...}, ...]) the question is the content of the LAST
user turn; system and assistant turns are ignored (a system prompt is the run's business, not the dataset's). A
content given as a list of parts ([{"type": "text", "text": ...}]) is the concatenation of its text parts. It replaces
`question_field`. Note that verl-style files often already hold an instruction in the user turn (P^2O's own files:
"Let's think step by step ... Question: " + problem), which config.data.prompt_format would then add a second time;
their `extra_info.original_question` is the plain problem.

Columns: every Query carries the row's top-level fields in `Query.columns` (JSON-able values; `answer` is always the
reference answer string), so a reward function can receive any dataset column by name. `keep_columns=False` leaves it
empty and reads only the needed Parquet columns.

Errors: a field that no row of the file has at all (absent from the Parquet schema, or from every JSONL object) is
one error naming the field and the file; a row missing it, or with an empty answer, is a counted, logged skip.
"""

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
from collections.abc import Iterator
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from p2o_jax.data import arithmetic

logger = logging.getLogger(__name__)

IdSource = Literal["hash", "row"]
_SHOWN_SKIPS = 5  # how many skipped rows a ReadResult and the warning name


@dataclasses.dataclass(frozen=True)
class Query:
  """One training or evaluation problem: a run-independent `id`, the `question` text, the reference `answer`, and
  `columns`: the source row's top-level fields ({} when unknown; `columns["answer"]` is `answer`), ignored by ==."""

  id: str
  question: str
  answer: str
  columns: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)


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


def _has_field(row: Any, path: str) -> bool:
  try:
    _field_value(row, path)
  except _BadRow:
    return False
  return True


def _last_user_content(turns: Any, path: str) -> Any:
  """The content of the last {"role": "user"} turn of a chat-turn list (system and assistant turns are ignored)."""
  if not isinstance(turns, list):
    raise _BadRow(f"field {path!r} is {type(turns).__name__}, not a list of chat turns")
  for turn in reversed(turns):
    if isinstance(turn, dict) and turn.get("role") == "user":
      content = turn.get("content")
      if isinstance(content, list):  # [{"type": "text", "text": ...}, {"type": "image", ...}]
        content = "".join(part.get("text") or "" for part in content
                          if isinstance(part, dict) and part.get("type", "text") == "text")
      return content
  raise _BadRow(f"no user turn in {path!r}")


def _jsonable(value: Any) -> Any:
  """`value` as plain JSON types: Parquet can hold bytes, dates, decimals and maps (lists of key/value pairs)."""
  if value is None or isinstance(value, (str, bool, int, float)):
    return value
  if isinstance(value, dict):
    return {str(key): _jsonable(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(item) for item in value]
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


@dataclasses.dataclass(frozen=True)
class _Fields:
  question: str
  answer: str
  id: str | None
  messages: str | None

  def paths(self) -> list[str]:
    """The dotted paths a row must have, in the order their absence is reported."""
    return [self.messages or self.question, self.answer] + ([self.id] if self.id is not None else [])


def _query_from_row(row: Any | _BadRow, row_number: int, fields: _Fields, id_source: IdSource,
                    keep_columns: bool) -> Query:
  if isinstance(row, _BadRow):
    raise row  # the line did not even parse
  if not isinstance(row, dict):
    raise _BadRow(f"row is a JSON {type(row).__name__}, not an object")
  if fields.messages is not None:
    question_path = f"{fields.messages}[last user turn]"
    question = _last_user_content(_field_value(row, fields.messages), fields.messages)
    question = _as_text(question, question_path) if question is not None else ""
  else:
    question_path = fields.question
    question = _as_text(_field_value(row, fields.question), fields.question)
  answer = _as_text(_field_value(row, fields.answer), fields.answer)
  if not question.strip():
    raise _BadRow(f"empty question in {question_path!r}")
  if not answer.strip():
    raise _BadRow(f"empty answer in {fields.answer!r}")  # nothing to verify against: every reward would be 0
  if fields.id is not None:
    query_id = _as_text(_field_value(row, fields.id), fields.id)
  else:
    query_id = content_id(question, answer) if id_source == "hash" else f"row{row_number}"
  columns = {**{str(key): _jsonable(value) for key, value in row.items()}, "answer": answer} if keep_columns else {}
  return Query(query_id, question, answer, columns)


def _with_row_id(reason: str, row: Any, id_field: str | None) -> str:
  """`reason` naming the row's own id too, when it has one (a duplicate id is named already)."""
  if id_field is None or not isinstance(row, dict) or reason.startswith("duplicate id"):
    return reason
  try:
    return f"{reason} (id {_as_text(_field_value(row, id_field), id_field)!r})"
  except _BadRow:
    return reason


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


def _arrow_type_lacks(schema: pa.Schema, path: str) -> bool:
  """Whether the schema shows that no row can have dotted `path` (a missing column or struct field)."""
  name, *rest = path.split(".")
  if name not in schema.names:
    return True
  arrow_type = schema.field(name).type
  for part in rest:
    if pa.types.is_struct(arrow_type):
      index = arrow_type.get_field_index(part)
      if index < 0:
        return True
      arrow_type = arrow_type.field(index).type
    elif (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and part.isdigit():
      arrow_type = arrow_type.value_type
    else:
      return False  # maps, fixed-size lists, ...: left to the rows
  return False


def _parquet_rows(path: pathlib.Path, fields: _Fields, keep_columns: bool) -> Iterator[tuple[int, Any]]:
  parquet = pq.ParquetFile(path)
  schema = parquet.schema_arrow
  for field in fields.paths():
    if _arrow_type_lacks(schema, field):
      raise ValueError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)})")
  # Without keep_columns, read only the top-level columns the fields live in: verl-style files also carry large
  # prompt/message columns.
  wanted = {field.split(".")[0] for field in fields.paths()}
  columns = None if keep_columns else [name for name in schema.names if name in wanted]
  row_number = 0
  for record_batch in parquet.iter_batches(columns=columns):
    for row in record_batch.to_pylist():
      row_number += 1
      yield row_number, row


def _rows(path: pathlib.Path, fields: _Fields, keep_columns: bool) -> Iterator[tuple[int, Any]]:
  if path.suffix == ".jsonl":
    return _jsonl_rows(path)
  if path.suffix == ".parquet":
    return _parquet_rows(path, fields, keep_columns)
  raise ValueError(f"unsupported query file extension {path.suffix!r} in {path}; expected .jsonl or .parquet")


def read_queries(path: str | pathlib.Path, *, question_field: str = "problem", answer_field: str = "answer",
                 id_field: str | None = None, id_source: IdSource = "hash", messages_field: str | None = None,
                 keep_columns: bool = True) -> ReadResult:
  """Every usable row of a .jsonl or .parquet file as a Query; broken rows and duplicate ids are counted and skipped.

  `messages_field` (a dotted path to a list of chat turns) takes the question from its last user turn instead of
  `question_field`; see the module docstring. A field absent from the whole file is a ValueError naming it."""
  path = pathlib.Path(path)
  if id_source not in ("hash", "row"):
    raise ValueError(f"id_source must be 'hash' or 'row', got {id_source!r}")
  if not path.is_file():
    raise FileNotFoundError(f"query file not found: {path}")
  fields = _Fields(question_field, answer_field, id_field, messages_field or None)
  queries: dict[str, Query] = {}
  first_row_of: dict[str, int] = {}
  skips: list[tuple[int, str]] = []
  seen_columns: dict[str, None] = {}  # top-level names of the object rows, in first-seen order
  unseen_fields = dict.fromkeys(fields.paths())  # fields no object row has had so far
  for row_number, row in _rows(path, fields, keep_columns):
    if isinstance(row, dict) and unseen_fields:
      seen_columns.update(dict.fromkeys(map(str, row)))
      for field in [field for field in unseen_fields if _has_field(row, field)]:
        del unseen_fields[field]
    try:
      query = _query_from_row(row, row_number, fields, id_source, keep_columns)
      if query.id in queries:
        raise _BadRow(f"duplicate id {query.id!r} (first at row {first_row_of[query.id]})")
    except _BadRow as reason:
      skips.append((row_number, _with_row_id(str(reason), row, fields.id)))
      continue
    queries[query.id] = query
    first_row_of[query.id] = row_number
  missing = next(iter(unseen_fields), None) if seen_columns else None
  return _checked_result(path, list(queries.values()), skips, missing, list(seen_columns))


def _checked_result(path: pathlib.Path, queries: list[Query], skips: list[tuple[int, str]], missing: str | None,
                    columns: list[str]) -> ReadResult:
  if not queries and not skips:
    raise ValueError(f"{path} contains no rows")
  if not queries:
    row_number, reason = skips[0]
    usable = f"none of its {len(skips)} rows is usable"
    if missing is not None:  # only JSONL gets here: a Parquet schema without the column fails before any row
      raise ValueError(f"{path} has no column {missing!r} (columns: {', '.join(columns)}); {usable} "
                       f"(first: row {row_number}: {reason})")
    raise ValueError(f"{path}: {usable}; first: row {row_number}: {reason}")
  if skips:
    shown = "; ".join(f"row {number}: {reason}" for number, reason in skips[:_SHOWN_SKIPS])
    logger.warning("skipped %d of %d rows in %s (%s%s)", len(skips), len(skips) + len(queries), path, shown,
                   "; ..." if len(skips) > _SHOWN_SKIPS else "")
  return ReadResult(queries, len(skips), skips[:_SHOWN_SKIPS])


def problem_queries(problems: list[arithmetic.Problem]) -> list[Query]:
  """Built-in arithmetic problems as Queries (ids are the world's own problem ids); their columns are the record's
  id, question and answer plus the problem's difficulty."""
  records = arithmetic.to_records(problems)
  return [Query(record["id"], record["question"], record["answer"], {**record, "difficulty": problem.difficulty})
          for record, problem in zip(records, problems)]
