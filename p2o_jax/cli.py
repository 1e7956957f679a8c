"""The command line of `python -m p2o_jax.main --config configs/demo_cpu.py [--config.a.b=value ...] [--workdir DIR]`.

Trains the configured policy (GRPO; P^2O when config.p2o is enabled), resuming from the newest checkpoint in the
workdir, and writes metrics, checkpoints, exported HF policies and a report there.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

# Imports stay light here; JAX, transformers and the trainer are imported inside main() only.

_FLAGS: dict[str, flags.FlagHolder] = {}


def define_common_flags() -> None:
  """--config and --workdir, registered when a command runs (never when a module is imported)."""
  if _FLAGS:
    return
  _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "Path to an ml_collections config file.",
                                                     lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "Run directory (overrides config.workdir).")


def flag_value(name: str):
  return _FLAGS[name].value


def one_line(e: BaseException) -> str:
  text = " ".join(str(e).replace("\\n", " ").split())
  if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # KeyError's str() quotes its whole message
    text = text[1:-1]
  return text


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with config typos (unknown key, wrong type) reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    sys.exit(f"error: bad command-line flag or config override: {one_line(e)}")


def load_config():
  """The --config ConfigDict with overrides resolved and --workdir applied; exits with one line when it is missing."""
  try:
    c = flag_value("config")
    c = None if c is None else c.copy_and_resolve_references()
  except OSError as e:  # ml_collections defers a config file's load error to the first access
    sys.exit(f"error: cannot load --config: {one_line(e)}")
  if c is None:
    sys.exit("error: --config is required, e.g. --config configs/demo_cpu.py")
  if flag_value("workdir"):
    c.workdir = flag_value("workdir")
  return c


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)


def start_jax(c) -> None:
  """Check config.distributed and start JAX as it asks (CPU devices, jax.distributed): before anything touches a JAX
  device. Raises ConfigError for a bad value."""
  from p2o_jax import distributed  # pylint: disable=import-outside-toplevel
  from p2o_jax.config import validate_distributed  # pylint: disable=import-outside-toplevel
  validate_distributed(c)
  distributed.initialize(c.distributed)


def main(argv) -> None:
  del argv
  setup_logging()
  from p2o_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from p2o_jax.experiment import run_training  # pylint: disable=import-outside-toplevel
  from p2o_jax.preflight import PreflightError  # pylint: disable=import-outside-toplevel
  from p2o_jax.report import closing_lines  # pylint: disable=import-outside-toplevel
  from p2o_jax.run_dir import RunDir  # pylint: disable=import-outside-toplevel
  c = load_config()
  try:
    start_jax(c)
    history = run_training(c, rebuild_base=flag_value("rebuild_base"))
  except (ConfigError, FileNotFoundError, PreflightError) as e:
    sys.exit(f"error: {e}")
  print("\n".join(closing_lines(RunDir.from_config(c), history)), flush=True)


def run_command(define_flags, command_main) -> None:
  """Register a command's flags (now, never on import) and run `command_main(argv, flag_values)` under absl."""
  flag_values = define_flags()
  app.run(lambda argv: command_main(argv, flag_values), flags_parser=parse_flags)


def run() -> None:
  define_common_flags()
  _FLAGS["rebuild_base"] = flags.DEFINE_bool("rebuild_base", False, "Build the built-in base policy anew (SFT, "
                                             "minutes) instead of using the shipped or cached one.")
  app.run(main, flags_parser=parse_flags)
