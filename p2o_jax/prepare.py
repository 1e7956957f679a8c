"""`python -m p2o_jax.prepare --source NAME --input PATH --output DIR [--seed 42] [--split S]`: the paper's training
sets and benchmarks as {"id", "problem", "answer", ...} JSONL files, from a local copy (library: data/sources.py).

Sources: deepscaler, deepmath (training: DIR/train_5k.jsonl, train_10k.jsonl, dev_500.jsonl), aime24, aime25, amc,
math500, minerva, olympiadbench (benchmarks: DIR/test.jsonl). --input is a .parquet/.arrow/.jsonl/.json file, a hub
snapshot directory, a `datasets` save_to_disk directory, or a hub name when the `datasets` package is installed. The
training splits are the authors' (github zlkqz/P2O, scripts/data_process/) at the default --seed 42. Prints, per
output file, the rows written and the rows skipped by reason (each skipped row is also logged with its row number and
id), and writes DIR/prepare_info.json. Bad input is a one-line `error: ...` and exit status 1.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags

from p2o_jax.cli import one_line, parse_flags


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags, registered when the command runs, never on import."""
  from p2o_jax.data.sources import AUTHORS_SEED, SOURCES  # pylint: disable=import-outside-toplevel
  return {
      "source": flags.DEFINE_enum("source", None, list(SOURCES), "The dataset to prepare."),
      "input": flags.DEFINE_string("input", None, "A local copy: a file, a hub snapshot or save_to_disk directory; "
                                   "or a hub name (needs the `datasets` package)."),
      "output": flags.DEFINE_string("output", None, "The directory the JSONL files are written into."),
      "seed": flags.DEFINE_integer("seed", AUTHORS_SEED, "Seed of the dev split and the training subsets (42: the "
                                   "authors' selection)."),
      "split": flags.DEFINE_string("split", None, "The input's split, when it holds several (default: train for "
                                   "training sets, test for benchmarks, or the only one)."),
      "hf_config": flags.DEFINE_string("hf_config", None, "Hub config name(s), comma-separated, for a hub-name "
                                       "--input (e.g. AIME2025-I,AIME2025-II)."),
      "dev_size": flags.DEFINE_integer("dev_size", 500, "Held-out dev problems (training sets)."),
      "train_sizes": flags.DEFINE_list("train_sizes", ["5000", "10000"], "Training subset sizes."),
      "min_difficulty": flags.DEFINE_float("min_difficulty", 7.0, "deepmath: keep rows with difficulty >= this."),
      "amc_year": flags.DEFINE_integer("amc_year", 2023, "amc: keep this year's problems (by the url; 0: all years)."),
  }


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  from p2o_jax.data import sources  # pylint: disable=import-outside-toplevel
  values = {name: holder.value for name, holder in flag_values.items()}
  for required in ("source", "input", "output"):
    if not values[required]:
      sys.exit(f"error: --{required} is required")
  try:
    options = sources.Options(seed=values["seed"], dev_size=values["dev_size"],
                              train_sizes=tuple(int(size) for size in values["train_sizes"]),
                              min_difficulty=values["min_difficulty"], amc_year=values["amc_year"],
                              split=values["split"], hf_config=values["hf_config"])
  except ValueError:
    sys.exit(f"error: --train_sizes must be integers, got {','.join(values['train_sizes'])}")
  try:
    result = sources.prepare(values["source"], values["input"], values["output"], options)
  except (ValueError, OSError) as e:  # sources.PrepareError is a ValueError
    sys.exit(f"error: {one_line(e)}")
  print("\n".join(result.lines()), flush=True)


def run() -> None:
  flag_values = define_flags()
  app.run(lambda argv: main(argv, flag_values), flags_parser=parse_flags)


if __name__ == "__main__":
  run()
