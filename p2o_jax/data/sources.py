"""The paper's datasets, prepared from local copies into the {"id", "problem", "answer"} JSONL files training and
evaluation read (the command is p2o_jax/prepare.py).

Inputs: a local copy, never a download (`local_copies.read_input`).

Sources (`SOURCES`): each names the columns it accepts, in the published layouts, matched exactly or else ignoring
case (Qwen2.5-Math's evaluation files lower-case every key). Training sets follow the authors' preprocessing
(github zlkqz/P2O, scripts/data_process/): DeepScaleR is shuffled with the seed, then split into 500 dev problems and
the rest; DeepMath-103K keeps difficulty >= 7 and is split the same way without the shuffle; the 5K and 10K subsets
are the first 5,000 / 10,000 of one seeded permutation of the rest (so the 5K lies inside the 10K, both disjoint from
dev). The permutations are numpy's default_rng(seed).permutation, which is what `datasets`' shuffle and
train_test_split(test_size=N, seed=seed) use, so seed 42 (the default, the authors' seed) selects the authors'
exact problems from the same source rows. Rows are validated after the split, so a subset loses its unusable rows
rather than drawing others: the selection stays the authors'.

Benchmarks follow Qwen2.5-Math's evaluation suite (QwenLM/Qwen2.5-Math, evaluation/), which the paper evaluated with.

Output rows: {"id", "problem", "answer", "source"} plus small columns (difficulty, topic, level, subject, ...), never
the long solutions. Answers are strings (integral floats such as AMC's 27.0 become "27"). A row without a problem or
answer, or whose answer does not parse (`p2o_jax.rewards.math_verify_grader.reference_parses`), is a counted skip
logged with its row number and id; rows a source filters out (DeepMath below the difficulty) are only counted.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from p2o_jax.data.local_copies import PrepareError, RawRows, read_input
from p2o_jax.metrics import Progress
from p2o_jax.rewards.extract import last_boxed
from p2o_jax.rewards.math_verify_grader import reference_parses

logger = logging.getLogger(__name__)

AUTHORS_SEED = 42  # scripts/data_process/{deepscaler,DeepMath-103K}.py: shuffle(seed=42), train_test_split(seed=42)
_SHOWN_PER_REASON = 5


@dataclasses.dataclass(frozen=True)
class Source:
  """One dataset: where it is published and which of its columns become the output's problem, answer and id."""

  name: str
  kind: Literal["train", "benchmark"]
  hub: str  # the published copy the default layout comes from (for messages and docs)
  problem: tuple[str, ...]  # candidate column names, first present wins
  answer: tuple[str, ...]
  ids: tuple[str, ...] = ()  # the row's own id; without one the id is "<source>-<0-based row index>"
  extras: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (output column, candidate source columns)
  boxed_from: tuple[str, ...] = ()  # solution columns whose last \boxed{} is the answer when no answer column exists
  subset: str = ""  # the config to read when a snapshot directory holds several (OlympiadBench's)
  shuffle_first: bool = False  # training sets: shuffle with the seed before the dev split (DeepScaleR)
  filter_columns: tuple[str, ...] = ()  # what the source's filter reads (_filtered)
  layouts: str = ""  # the accepted layouts, for --help and the README

  @property
  def default_split(self) -> str:
    return "train" if self.kind == "train" else "test"


SOURCES: dict[str, Source] = {s.name: s for s in [
    Source("deepscaler", "train", "agentica-org/DeepScaleR-Preview-Dataset", problem=("problem",),
           answer=("answer",), shuffle_first=True,
           layouts="problem/answer/solution (deepscaler.json, a JSON array, or its parquet conversion)"),
    Source("deepmath", "train", "zwhe99/DeepMath-103K", problem=("question", "problem"),
           answer=("final_answer", "answer"), extras=(("difficulty", ("difficulty",)), ("topic", ("topic",))),
           filter_columns=("difficulty",),
           layouts="question/final_answer/difficulty/topic/r1_solution_1..3; kept: difficulty >= --min_difficulty"),
    Source("aime24", "benchmark", "HuggingFaceH4/aime_2024", problem=("problem", "question"), answer=("answer",),
           ids=("id",), boxed_from=("solution",),
           layouts="id/problem/answer/solution/url/year (HuggingFaceH4/aime_2024, Qwen2.5-Math aime24), "
                   "ID/Problem/Answer/Solution (Maxwell-Jia/AIME_2024), id/problem/solution with a \\boxed answer"),
    Source("aime25", "benchmark", "opencompass/AIME2025", problem=("question", "problem"), answer=("answer",),
           ids=("id",),
           layouts="question/answer (opencompass/AIME2025: both AIME2025-I and -II files), problem/answer/id "
                   "(math-ai/aime25), id/problem/answer/solution/url/year (yentinglin/aime_2025)"),
    Source("amc", "benchmark", "AI-MO/aimo-validation-amc", problem=("problem", "question"), answer=("answer",),
           ids=("id",), extras=(("url", ("url",)),), filter_columns=("url",),
           layouts="id/problem/answer (a float)/url (AI-MO/aimo-validation-amc, Qwen2.5-Math amc23); kept: the "
                   "--amc_year problems, by the year in the url, as Qwen2.5-Math's amc23 (AMC 2023, 40 problems)"),
    Source("math500", "benchmark", "HuggingFaceH4/MATH-500", problem=("problem", "question"), answer=("answer",),
           ids=("unique_id", "id", "idx"), extras=(("subject", ("subject", "type")), ("level", ("level",))),
           boxed_from=("solution",),
           layouts="problem/solution/answer/subject/level/unique_id (HuggingFaceH4/MATH-500); problem/solution "
                   "without an answer column: the last \\boxed{} of the solution"),
    Source("minerva", "benchmark", "math-ai/minervamath", problem=("problem", "question"), answer=("answer",),
           ids=("idx", "id"), extras=(("subject", ("type", "subject")),), boxed_from=("solution",),
           layouts="problem/solution/type/idx (Qwen2.5-Math minerva_math: the answer is the last \\boxed{} of the "
                   "solution), question/answer (math-ai/minervamath), problem/answer"),
    Source("olympiadbench", "benchmark", "Hothan/OlympiadBench", problem=("question", "problem"),
           answer=("final_answer", "answer"), ids=("id",), subset="OE_TO_maths_en_COMP",
           extras=(("subject", ("subfield", "subject")), ("answer_type", ("answer_type",))),
           layouts="id/question/final_answer (a list of strings)/subfield/answer_type/is_multiple_answer/... "
                   "(Hothan/OlympiadBench config OE_TO_maths_en_COMP, Qwen2.5-Math olympiadbench), question/answer"),
]}


# ---- rows -> output records --------------------------------------------------------------------------------------

class _Skip(Exception):
  """Why a row is left out: `reason` is the summary's category, `detail` what the log adds."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason)
    self.reason = reason
    self.detail = detail


def _resolve(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
  """The first candidate present in `columns`, matched exactly, else ignoring case."""
  for candidate in candidates:
    if candidate in columns:
      return candidate
  lower = {}
  for column in columns:
    lower.setdefault(column.lower(), column)
  for candidate in candidates:
    if candidate.lower() in lower:
      return lower[candidate.lower()]
  return None


@dataclasses.dataclass(frozen=True)
class Options:
  """What a run may change: the split seed and sizes, the filters, which split/config of the input to read."""

  seed: int = AUTHORS_SEED
  dev_size: int = 500
  train_sizes: tuple[int, ...] = (5000, 10000)
  min_difficulty: float = 7.0  # deepmath
  amc_year: int = 2023  # amc; 0 keeps every year
  split: str | None = None
  hf_config: str | None = None


@dataclasses.dataclass(frozen=True)
class _Layout:
  """The input's columns each output column comes from."""

  problem: str
  answer: str | None  # None: the answer is the last \boxed{} of `boxed`
  boxed: str | None
  id: str | None
  extras: tuple[tuple[str, str], ...]
  filter_columns: tuple[str, ...]

  def wanted(self) -> list[str]:
    names = [self.problem, self.answer, self.boxed, self.id, *(c for _, c in self.extras), *self.filter_columns]
    return list(dict.fromkeys(name for name in names if name))


def _layout(source: Source, raw: RawRows) -> _Layout:
  def missing(role: str, candidates: Sequence[str]) -> PrepareError:
    names = " or ".join(repr(c) for c in candidates)
    return PrepareError(f"{raw.label} has no column {names} (the {role} of {source.name}; columns: "
                        f"{', '.join(raw.columns) or 'none'})")

  problem = _resolve(raw.columns, source.problem)
  if problem is None:
    raise missing("problem", source.problem)
  answer = _resolve(raw.columns, source.answer)
  boxed = None if answer else _resolve(raw.columns, source.boxed_from)
  if answer is None and boxed is None:
    raise missing("answer", source.answer + source.boxed_from)
  filter_columns = tuple(c for c in (_resolve(raw.columns, (name,)) for name in source.filter_columns) if c)
  if source.name == "deepmath" and not filter_columns:
    raise missing("difficulty", ("difficulty",))
  extras = tuple((out, column) for out, candidates in source.extras
                 if (column := _resolve(raw.columns, candidates)) is not None)
  return _Layout(problem, answer, boxed, _resolve(raw.columns, source.ids), extras, filter_columns)




def _answer_text(value: Any, source: Source) -> str:
  if value is None:
    raise _Skip("no answer")
  if isinstance(value, list) and source.name == "olympiadbench":
    # Qwen2.5-Math's parse_ground_truth takes final_answer[0] and strips its "$"s; every row of its 675-problem set
    # has exactly one string there, multi-part answers inside it ("$69$,$84$"), so multi-answer rows are kept too.
    if not value:
      raise _Skip("no answer", "final_answer is an empty list")
    value = value[0]
  if isinstance(value, str):
    text = value.strip()
    if source.name == "olympiadbench":
      text = re.sub(r"(?<!\\)\$", "", text).strip()
    if not text:
      raise _Skip("empty answer")
    return text
  if isinstance(value, int) and not isinstance(value, bool):
    return str(value)
  if isinstance(value, float) and math.isfinite(value):
    return str(int(value)) if value.is_integer() else repr(value)
  raise _Skip("answer is not a string", f"answer is {type(value).__name__}")


def _filtered(row: dict[str, Any], source: Source, layout: _Layout, options: Options) -> str | None:
  """The filter reason when `source` leaves this row out (counted, not logged), else None."""
  if source.name == "deepmath":
    difficulty = row.get(layout.filter_columns[0])
    if not isinstance(difficulty, (int, float)) or isinstance(difficulty, bool) or difficulty < options.min_difficulty:
      return f"filtered: difficulty < {options.min_difficulty:g}"
  if source.name == "amc" and options.amc_year and layout.filter_columns:
    match = re.search(r"(\d{4})_AMC", str(row.get(layout.filter_columns[0]) or ""))
    if match and int(match.group(1)) != options.amc_year:
      return f"filtered: not AMC {options.amc_year}"
  return None


def _record(row: dict[str, Any] | str, index: int, source: Source, layout: _Layout,
            parses: Callable[[str], bool]) -> dict[str, Any]:
  """The output row of input row `index` (0-based), or _Skip."""
  if isinstance(row, str):
    raise _Skip("unreadable row", row)
  problem = row.get(layout.problem)
  if not isinstance(problem, str) or not problem.strip():
    raise _Skip("no problem" if problem is None else "empty problem" if isinstance(problem, str)
                else "problem is not a string")
  if layout.answer is not None:
    answer = _answer_text(row.get(layout.answer), source)
  else:
    solution = row.get(layout.boxed)
    boxed = last_boxed(solution) if isinstance(solution, str) else None
    if boxed is None:
      raise _Skip("no \\boxed answer in the solution")
    answer = _answer_text(boxed, source)
  if not parses(answer):
    raise _Skip("answer does not parse", repr(answer))
  own_id = row.get(layout.id) if layout.id else None
  record = {"id": str(own_id) if own_id is not None and own_id != "" else f"{source.name}-{index}",
            "problem": problem.strip(), "answer": answer, "source": source.name}
  for out, column in layout.extras:
    if row.get(column) is not None:
      record[out] = row[column]
  return record


# ---- splits and outputs ------------------------------------------------------------------------------------------

def permutation(n: int, seed: int) -> np.ndarray:
  """`datasets`' shuffle / train_test_split permutation of n rows."""
  return np.random.default_rng(seed).permutation(n)


def train_splits(n: int, options: Options, shuffle_first: bool) -> tuple[list[int], dict[int, list[int]]]:
  """(dev indices, {size: train subset indices}) into a list of n rows, as the authors' scripts select them:
  [shuffle,] train_test_split(test_size=dev_size) -> (rest, dev); each subset train_test_split(test_size=size) of
  the rest, i.e. the first `size` of one permutation of it."""
  if n <= options.dev_size:
    raise PrepareError(f"only {n} rows to split, not more than the {options.dev_size} dev problems")
  order = permutation(n, options.seed) if shuffle_first else np.arange(n)
  split = permutation(n, options.seed)
  dev, rest = order[split[:options.dev_size]], order[split[options.dev_size:]]
  subset_order = rest[permutation(len(rest), options.seed)]
  return dev.tolist(), {size: subset_order[:min(size, len(rest))].tolist() for size in options.train_sizes}


def train_file_name(size: int) -> str:
  return f"train_{size // 1000}k.jsonl" if size % 1000 == 0 else f"train_{size}.jsonl"


@dataclasses.dataclass
class OutputSummary:
  path: pathlib.Path
  written: int
  skipped: collections.Counter  # reason -> count
  examples: dict[str, list[str]]  # reason -> the first few "row N (id X)"
  requested: int | None = None  # the subset size asked for (training outputs)

  def lines(self) -> list[str]:
    short = f" (of {self.requested} selected)" if self.requested and self.written < self.requested else ""
    lines = [f"  {self.path.name}: {self.written} rows written{short}"]
    for reason, count in self.skipped.most_common():
      shown = ", ".join(self.examples.get(reason, []))
      more = ", ..." if count > len(self.examples.get(reason, [])) and shown else ""
      lines.append(f"    skipped {count}: {reason}" + (f" [{shown}{more}]" if shown else ""))
    return lines


def _write_jsonl(path: pathlib.Path, records: Iterable[dict[str, Any]]) -> None:
  temporary = path.with_name(path.name + ".tmp")
  with temporary.open("w", encoding="utf-8") as file:
    for record in records:
      file.write(json.dumps(record, ensure_ascii=False) + "\n")
  os.replace(temporary, path)


def _build(path: pathlib.Path, indices: Sequence[int], rows: list[dict[str, Any] | str], row_numbers: list[int],
           source: Source, layout: _Layout, parses: Callable[[str], bool], requested: int | None = None
           ) -> OutputSummary:
  """Validates rows[indices] (in that order) and writes the usable ones to `path`."""
  records, seen_ids = [], set()
  skipped: collections.Counter = collections.Counter()
  examples: dict[str, list[str]] = collections.defaultdict(list)
  progress = Progress(max(len(indices), 1), desc=f"checking {path.name}", enabled=len(indices) >= 2000)
  for done, index in enumerate(indices, start=1):
    progress.update(done)
    row = rows[index]
    try:
      record = _record(row, row_numbers[index] - 1, source, layout, parses)
      if record["id"] in seen_ids:
        raise _Skip("duplicate id")
    except _Skip as skip:
      own_id = row.get(layout.id) if isinstance(row, dict) and layout.id else None
      where = f"row {row_numbers[index]}" + (f" (id {own_id!r})" if own_id is not None else "")
      skipped[skip.reason] += 1
      if len(examples[skip.reason]) < _SHOWN_PER_REASON:
        examples[skip.reason].append(where)
      logger.warning("%s: skipped %s: %s%s", path.name, where, skip.reason, f" ({skip.detail})" if skip.detail else "")
      continue
    seen_ids.add(record["id"])
    records.append(record)
  progress.close()
  _write_jsonl(path, records)
  return OutputSummary(path, len(records), skipped, dict(examples), requested)


@dataclasses.dataclass
class PrepareResult:
  source: str
  input: str
  rows_read: int
  filtered: collections.Counter
  outputs: list[OutputSummary]
  checker: str
  seed: int

  def lines(self) -> list[str]:
    filtered = "".join(f"; {count} {reason}" for reason, count in self.filtered.items())
    lines = [f"{self.source}: {self.rows_read} rows read from {self.input}{filtered}"]
    for output in self.outputs:
      lines.extend(output.lines())
    lines.append(f"  answers checked with {self.checker}")
    return lines


def prepare(source_name: str, location: str, output_dir: str | pathlib.Path, options: Options = Options()
            ) -> PrepareResult:
  """Reads `location`, writes the source's output files into `output_dir` and returns what it wrote and skipped."""
  if source_name not in SOURCES:
    raise PrepareError(f"unknown source {source_name!r}; expected one of {', '.join(SOURCES)}")
  source = SOURCES[source_name]
  if source.kind == "train" and (options.dev_size < 1 or not options.train_sizes
                                 or min(options.train_sizes) < 1):
    raise PrepareError("--dev_size and every --train_sizes entry must be positive")
  raw = read_input(location, source.default_split, subset=source.subset, split=options.split,
                   hf_config=options.hf_config)
  layout = _layout(source, raw)
  try:
    all_rows = raw.read(layout.wanted())
  except (pa.ArrowException, OSError) as error:
    raise PrepareError(f"{raw.label}: cannot read it ({' '.join(str(error).split())})") from None
  if not all_rows:
    raise PrepareError(f"{raw.label} contains no rows")
  filtered: collections.Counter = collections.Counter()
  rows, row_numbers = [], []
  for number, row in enumerate(all_rows, start=1):
    reason = _filtered(row, source, layout, options) if isinstance(row, dict) else None
    if reason:
      filtered[reason] += 1
      continue
    rows.append(row)
    row_numbers.append(number)
  checks, checker = reference_parses, "p2o_jax.rewards.math_verify_grader.reference_parses"
  verdicts: dict[str, bool] = {}  # the 5K subset lies inside the 10K: each answer is parsed once

  def parses(answer: str) -> bool:
    if answer not in verdicts:
      verdicts[answer] = checks(answer)
    return verdicts[answer]

  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  if source.kind == "train":
    dev, subsets = train_splits(len(rows), options, source.shuffle_first)
    outputs = [_build(output_dir / train_file_name(size), subsets[size], rows, row_numbers, source, layout, parses,
                      requested=size) for size in options.train_sizes]
    outputs.append(_build(output_dir / f"dev_{options.dev_size}.jsonl", dev, rows, row_numbers, source, layout,
                          parses))
  else:
    outputs = [_build(output_dir / "test.jsonl", range(len(rows)), rows, row_numbers, source, layout, parses)]
  result = PrepareResult(source.name, raw.label, len(all_rows), filtered, outputs, checker, options.seed)
  info = {"source": source.name, "hub": source.hub, "input": raw.label, "rows_read": len(all_rows),
          "filtered": dict(filtered), "seed": options.seed, "answer_checker": checker,
          "options": {k: v for k, v in dataclasses.asdict(options).items() if v is not None},
          "outputs": {o.path.name: {"rows": o.written, "skipped": dict(o.skipped)} for o in outputs}}
  (output_dir / "prepare_info.json").write_text(json.dumps(info, indent=2) + "\n")
  return result
