"""`python -m p2o_jax.compare --config configs/demo_cpu.py --seeds 3 [--methods grpo,grpo_2k,p2o]`: GRPO (K), GRPO (2K)
and P^2O (and the ablations) from one base, each seed in its own run directory; writes comparison.md and
comparison.png into the comparison directory (--workdir, default <config.workdir>_compare). See p2o_jax/comparison.py.
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags

from p2o_jax.cli import define_common_flags, flag_value, load_config, run_command, setup_logging, start_jax

# JAX and the trainer are imported inside main(): the verifier's worker processes re-import this module.
# pylint: disable=import-outside-toplevel


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (besides --config / --workdir), registered when the command runs, never on import."""
  define_common_flags()
  return {"seeds": flags.DEFINE_integer("seeds", 3, "Seeds per method."),
          "methods": flags.DEFINE_list("methods", "grpo,grpo_2k,p2o", "Methods to run (p2o_jax/comparison.py "
                                       "METHODS)."),
          "set": flags.DEFINE_string("set", "builtin_hard", "The eval set the plot and the headline column follow.")}


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  del argv
  setup_logging()
  from p2o_jax.comparison import METHODS, run_comparison
  from p2o_jax.config import ConfigError
  from p2o_jax.preflight import PreflightError
  base = load_config()
  methods, seeds = flag_values["methods"].value, flag_values["seeds"].value
  unknown = [m for m in methods if m not in METHODS]
  if unknown or seeds < 1:
    sys.exit(f"error: --methods must be from {sorted(METHODS)} and --seeds >= 1 (got {methods}, {seeds})")
  workdir = pathlib.Path(base.workdir if flag_value("workdir") else f"{base.workdir}_compare")
  try:
    start_jax(base)
    table, plot = run_comparison(base, methods, seeds, workdir, flag_values["set"].value)
  except (ConfigError, FileNotFoundError, PreflightError) as e:
    sys.exit(f"error: {e}")
  print(table.read_text())
  print(f"table: {table}\nplot: {plot}")


def run() -> None:
  run_command(define_flags, main)


if __name__ == "__main__":
  run()
