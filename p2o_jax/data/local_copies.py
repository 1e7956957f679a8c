"""Reading a local copy of a dataset, never a download: a directory written by Hugging Face `datasets`
(`save_to_disk`: *.arrow files in Arrow IPC stream format listed by state.json; a DatasetDict's dataset_dict.json with
one such directory per split), read with pyarrow alone; a directory holding a hub snapshot (parquet / jsonl / json
files, found recursively; files named for a split, "train-00000-of-00001.parquet" or "test.jsonl", are chosen by the
split asked for or the default one; when a directory has the same data in several formats, the first of arrow,
parquet, jsonl, json is read); a single .parquet, .arrow, .jsonl or .json (a JSON array or JSON lines) file; or a hub
name ("owner/name"), loaded with `datasets.load_dataset` only when that package is installed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

DATA_SUFFIXES = (".arrow", ".parquet", ".jsonl", ".json")  # in the order of preference within one directory
_METADATA_FILES = {"dataset_info.json", "state.json", "dataset_dict.json", "dataset_infos.json"}
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev")


class PrepareError(ValueError):
  """Bad input for prepare: a missing path or column, an unknown source; its message is one line."""


@dataclasses.dataclass
class RawRows:
  """The input's rows in source order: a dict per row (only the requested columns) or the reason it is unreadable."""

  label: str  # what the input is, for messages: a path, "<dir> (3 parquet files)", a hub name
  columns: list[str]  # every top-level column of the input
  read: Callable[[Sequence[str]], list[dict[str, Any] | str]]  # rows with those columns (None where absent)


def _arrow_table(path: pathlib.Path) -> pa.Table:
  """An Arrow IPC file: the stream format `datasets` writes, or the random-access file format."""
  source = pa.memory_map(str(path))
  try:
    return pa.ipc.open_stream(source).read_all()
  except pa.ArrowInvalid:
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _table_rows(tables: list[Callable[[Sequence[str] | None], pa.Table]], schemas: list[pa.Schema], label: str
                ) -> RawRows:
  columns = list(dict.fromkeys(name for schema in schemas for name in schema.names))

  def read(wanted: Sequence[str]) -> list[dict[str, Any] | str]:
    rows: list[dict[str, Any] | str] = []
    for load, schema in zip(tables, schemas):
      present = [name for name in wanted if name in schema.names]
      for row in load(present).to_pylist():
        rows.append({name: row.get(name) for name in wanted})
    return rows

  return RawRows(label, columns, read)


def _json_rows(paths: list[pathlib.Path], label: str) -> RawRows:
  """JSON lines, or a JSON array of objects (DeepScaleR's deepscaler.json); an unparseable line is a bad row."""
  parsed: list[dict[str, Any] | str] = []
  for path in paths:
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if path.suffix == ".json" and stripped.startswith("["):
      try:
        items = json.loads(text)
      except ValueError as error:
        raise PrepareError(f"{path} is not valid JSON ({error})") from None
      parsed.extend(item if isinstance(item, dict) else f"row is a JSON {type(item).__name__}, not an object"
                    for item in items)
      continue
    for line in text.splitlines():
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except ValueError as error:
        parsed.append(f"invalid JSON ({error})")
        continue
      parsed.append(item if isinstance(item, dict) else f"row is a JSON {type(item).__name__}, not an object")
  columns = list(dict.fromkeys(str(key) for row in parsed if isinstance(row, dict) for key in row))

  def read(wanted: Sequence[str]) -> list[dict[str, Any] | str]:
    return [{name: row.get(name) for name in wanted} if isinstance(row, dict) else row for row in parsed]

  return RawRows(label, columns, read)


def _file_rows(paths: list[pathlib.Path], label: str) -> RawRows:
  suffix = paths[0].suffix
  if suffix in (".jsonl", ".json"):
    return _json_rows(paths, label)
  try:
    if suffix == ".parquet":
      schemas = [pq.read_schema(path) for path in paths]
      loads = [lambda columns, path=path: pq.read_table(path, columns=list(columns)) for path in paths]
    else:
      tables = [_arrow_table(path) for path in paths]  # memory-mapped: selecting columns copies nothing
      schemas = [table.schema for table in tables]
      loads = [lambda columns, table=table: table.select(list(columns)) for table in tables]
  except (pa.ArrowException, OSError) as error:
    raise PrepareError(f"{label}: cannot read it as {suffix[1:]} ({' '.join(str(error).split())})") from None
  return _table_rows(loads, schemas, label)


def _split_tokens(relative: pathlib.Path) -> set[str]:
  return set(re.split(r"[/\\._\-\s]+", str(relative).lower())) & set(_SPLIT_NAMES)


def choose_split(splits: Sequence[str], requested: str | None, default_split: str, where: str) -> str:
  """The split to read: the requested one, the only one, or `default_split`."""
  if requested:
    if requested not in splits:
      raise PrepareError(f"{where} has no split {requested!r} (splits: {', '.join(splits)})")
    return requested
  if len(splits) == 1:
    return splits[0]
  if default_split in splits:
    return default_split
  raise PrepareError(f"{where} holds several splits ({', '.join(splits)}); choose one with --split")


def _directory_files(root: pathlib.Path, default_split: str, subset: str, split: str | None
                     ) -> tuple[pathlib.Path, list[pathlib.Path]]:
  """(the dataset directory, its data files in order) for a save_to_disk directory or a snapshot."""
  try:
    if (root / "dataset_dict.json").is_file():  # DatasetDict.save_to_disk: one Dataset directory per split
      splits = json.loads((root / "dataset_dict.json").read_text())["splits"]
      root = root / choose_split(splits, split, default_split, str(root))
    if (root / "state.json").is_file():  # Dataset.save_to_disk: the shards, in order
      state = json.loads((root / "state.json").read_text())
      return root, [root / entry["filename"] for entry in state["_data_files"]]
  except (ValueError, KeyError, TypeError) as error:
    if isinstance(error, PrepareError):
      raise
    raise PrepareError(f"{root}: not a readable save_to_disk directory ({type(error).__name__}: {error})") from None
  files = sorted(path for path in root.rglob("*")
                 if path.is_file() and path.suffix in DATA_SUFFIXES and path.name not in _METADATA_FILES
                 and not any(part.startswith(".") for part in path.relative_to(root).parts))
  if subset and any(subset in str(path.relative_to(root)) for path in files):
    files = [path for path in files if subset in str(path.relative_to(root))]
  by_split: dict[str, list[pathlib.Path]] = collections.defaultdict(list)
  for path in files:
    for token in _split_tokens(path.relative_to(root)):
      by_split[token].append(path)
  if split or len(by_split) > 1:
    files = by_split[choose_split(sorted(by_split), split, default_split, str(root))]
  for suffix in DATA_SUFFIXES:
    chosen = [path for path in files if path.suffix == suffix]
    if chosen:
      return root, chosen
  raise PrepareError(f"{root} holds no data files (*{', *'.join(DATA_SUFFIXES)})")


def _hub_rows(name: str, default_split: str, split: str | None, hf_config: str | None) -> RawRows:
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise PrepareError(f"--input {name}: no such file or directory; pass a local copy (a file, a hub snapshot or a "
                       f"save_to_disk directory), or install `datasets` to load it from the hub by name") from None
  tables = []
  for config in (hf_config.split(",") if hf_config else [None]):
    try:
      dataset_dict = datasets.load_dataset(name, config)
    except Exception as error:  # pylint: disable=broad-except  # network, auth, unknown config: all one line
      raise PrepareError(f"cannot load {name}{f' ({config})' if config else ''} from the hub: "
                         f"{' '.join(str(error).split())}") from None
    chosen = choose_split(list(dataset_dict), split, default_split, name)
    tables.append(dataset_dict[chosen].with_format("arrow")[:])
  loads = [lambda columns, table=table: table.select(list(columns)) for table in tables]
  return _table_rows(loads, [table.schema for table in tables], name)


def read_input(location: str, default_split: str, *, subset: str = "", split: str | None = None,
               hf_config: str | None = None) -> RawRows:
  """The rows of a local copy (file or directory), or of a hub dataset when `location` is a name and `datasets` is
  installed. `default_split` is read when there are several and `split` names none; `subset` narrows a snapshot
  holding several configs to the files whose path contains it."""
  path = pathlib.Path(location)
  if path.is_file():
    if path.suffix not in DATA_SUFFIXES:
      raise PrepareError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(DATA_SUFFIXES)}")
    return _file_rows([path], str(path))
  if path.is_dir():
    root, files = _directory_files(path, default_split, subset, split)
    if not files:
      raise PrepareError(f"{root} holds no data files")
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
      raise PrepareError(f"{root}: listed data file {missing[0]} does not exist")
    label = str(files[0]) if len(files) == 1 else f"{root} ({len(files)} {files[0].suffix[1:]} files)"
    return _file_rows(files, label)
  if re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", location) and path.suffix not in DATA_SUFFIXES:
    return _hub_rows(location, default_split, split, hf_config)
  raise PrepareError(f"--input {location}: no such file or directory")
