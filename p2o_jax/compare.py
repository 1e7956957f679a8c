"""`python -m p2o_jax.compare --config configs/demo_cpu.py --seeds 3`: GRPO (K), GRPO (2K) and P^2O from one base.

Every method trains from the same starting policy for the same number of steps, once per seed, each in its own run
directory `<workdir>/<method>/seed_<s>` (so an interrupted comparison resumes where it stopped: finished runs are
skipped, a half-done run resumes from its checkpoint). Afterwards `comparison.md` (a table) and `comparison.png`
(plain-prompt accuracy on the held-out hard split vs step, mean and spread over seeds) are written into `<workdir>`.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

from absl import app, flags

from p2o_jax.cli import WORKDIR, load_config, parse_flags, setup_logging, start_jax

# method -> config overrides; "k2" doubles rollout.num_samples (GRPO with 2K rollouts per query).
METHODS = {
    "grpo": {"p2o.enabled": False},
    "grpo_2k": {"p2o.enabled": False, "rollout.num_samples": "k2"},
    "p2o": {"p2o.enabled": True},
    "p2o_templated": {"p2o.enabled": True, "p2o.distillation": "templated"},  # ablation: w/o context distillation
    "p2o_same_template": {"p2o.enabled": True, "p2o.same_template_in_group": True},  # ablation
}
LABELS = {"grpo": "GRPO (K)", "grpo_2k": "GRPO (2K)", "p2o": "P^2O", "p2o_templated": "P^2O w/o distillation",
          "p2o_same_template": "P^2O same template in group"}

# --config and --workdir (here: the comparison directory, default <config.workdir>_compare) come from p2o_jax.cli.
_SEEDS = flags.DEFINE_integer("seeds", 3, "Seeds per method.")
_METHODS = flags.DEFINE_list("methods", "grpo,grpo_2k,p2o", f"Methods to run, from {sorted(METHODS)}.")
_SET = flags.DEFINE_string("set", "builtin_hard", "The eval set the plot and the headline column follow.")


def method_config(base, method: str, seed: int, workdir: pathlib.Path):
  c = base.copy_and_resolve_references()
  with c.unlocked():
    for key, value in METHODS[method].items():
      section, name = key.split(".")
      c[section][name] = 2 * base.rollout.num_samples if value == "k2" else value
    c.seed = seed
    c.workdir = str(workdir / method / f"seed_{seed}")
  return c


def run_one(c) -> dict:
  """Train (or resume, or skip when finished) one run; its history."""
  from p2o_jax.experiment import run_training  # pylint: disable=import-outside-toplevel
  done = pathlib.Path(c.workdir) / "history.json"
  if done.is_file():
    logging.info("%s: finished earlier, reusing its results", c.workdir)
    return json.loads(done.read_text())
  return run_training(c)


def main(argv) -> None:
  del argv
  setup_logging()
  from p2o_jax.comparison import summarize  # pylint: disable=import-outside-toplevel
  from p2o_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
  from p2o_jax.preflight import PreflightError  # pylint: disable=import-outside-toplevel
  base = load_config()
  unknown = [m for m in _METHODS.value if m not in METHODS]
  if unknown or _SEEDS.value < 1:
    sys.exit(f"error: --methods must be from {sorted(METHODS)} and --seeds >= 1 (got {_METHODS.value}, "
             f"{_SEEDS.value})")
  workdir = pathlib.Path(base.workdir if WORKDIR.value else f"{base.workdir}_compare")
  runs: dict[str, list[pathlib.Path]] = {}
  histories: dict[str, list[dict]] = {}
  try:
    start_jax(base)
    for seed in range(_SEEDS.value):
      for method in _METHODS.value:
        c = method_config(base, method, seed, workdir)
        logging.info("=== %s, seed %d -> %s", LABELS[method], seed, c.workdir)
        histories.setdefault(method, []).append(run_one(c))
        runs.setdefault(method, []).append(pathlib.Path(c.workdir))
  except (ConfigError, FileNotFoundError, PreflightError) as e:
    sys.exit(f"error: {e}")
  table, plot = summarize(runs, workdir, eval_set=_SET.value, labels=LABELS, histories=histories)
  print(table.read_text())
  print(f"table: {table}\nplot: {plot}")


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
