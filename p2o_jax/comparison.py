"""Method comparisons (the library of `python -m p2o_jax.compare`): every method trains from the same starting
policy for the same number of steps, once per seed, each in its own run directory `<workdir>/<method>/seed_<s>` (so an
interrupted comparison resumes: finished runs are reused, a half-done run resumes from its checkpoint).

The summaries are pure readers of the runs' metrics.jsonl files: curves are the "eval/<set>/accuracy" records, aligned
on the steps every run of a method evaluated at, averaged over seeds with the min-max spread shown; `comparison.md`
holds the table and `comparison.png` the curves.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping, Sequence

import ml_collections
import numpy as np

from p2o_jax.metrics import read_metrics
from p2o_jax.report import distillation_efficiency
from p2o_jax.run_dir import RunDir

TABLE_FILENAME, PLOT_FILENAME = "comparison.md", "comparison.png"

# method -> config overrides; "k2" doubles rollout.num_samples (GRPO with 2K rollouts per query). The paper's
# baselines: GRPO (K and 2K), DAPO's dynamic sampling alone, and teacher-distilled SFT (p2o_jax/teacher_sft.py).
METHODS = {
    "grpo": {"p2o.enabled": False},
    "grpo_2k": {"p2o.enabled": False, "rollout.num_samples": "k2"},
    "dapo": {"p2o.enabled": False, "grpo.dynamic_sampling": True},
    "teacher_sft": {"p2o.enabled": False},
    "self_reflection": {"p2o.enabled": True, "p2o.search": "self_reflection"},
    "p2o": {"p2o.enabled": True},
    "p2o_templated": {"p2o.enabled": True, "p2o.distillation": "templated"},  # ablation: w/o context distillation
    "p2o_same_template": {"p2o.enabled": True, "p2o.same_template_in_sample": True},  # ablation
}
LABELS = {"grpo": "GRPO (K)", "grpo_2k": "GRPO (2K)", "dapo": "DAPO dynamic sampling", "teacher_sft": "teacher SFT",
          "self_reflection": "self-reflection (no GEPA)",
          "p2o": "P^2O", "p2o_templated": "P^2O w/o distillation", "p2o_same_template": "P^2O same template in group"}


def method_config(base: ml_collections.ConfigDict, method: str, seed: int,
                  workdir: pathlib.Path) -> ml_collections.ConfigDict:
  c = base.copy_and_resolve_references()
  with c.unlocked():
    for key, value in METHODS[method].items():
      section, name = key.split(".")
      c[section][name] = 2 * base.rollout.num_samples if value == "k2" else value
    c.seed = seed
    c.workdir = str(workdir / method / f"seed_{seed}")
  return c


def run_one(c: ml_collections.ConfigDict, method: str) -> dict:
  """Train (or resume, or reuse when finished) one run; its history."""
  # pylint: disable=import-outside-toplevel  (JAX: only when training)
  from p2o_jax.experiment import run_training
  from p2o_jax.teacher_sft import run_teacher_sft
  done = RunDir.from_config(c).history
  if done.is_file():
    logging.info("%s: finished earlier, reusing its results", c.workdir)
    return json.loads(done.read_text())
  return run_teacher_sft(c) if method == "teacher_sft" else run_training(c)


def run_comparison(base: ml_collections.ConfigDict, methods: Sequence[str], seeds: int, workdir: pathlib.Path,
                   eval_set: str) -> tuple[pathlib.Path, pathlib.Path]:
  """Every method x seed (seed-major, so an early stop leaves every method with as many seeds), then the table and the
  plot; their paths."""
  runs: dict[str, list[pathlib.Path]] = {}
  histories: dict[str, list[dict]] = {}
  for seed in range(seeds):
    for method in methods:
      c = method_config(base, method, seed, workdir)
      logging.info("=== %s, seed %d -> %s", LABELS[method], seed, c.workdir)
      histories.setdefault(method, []).append(run_one(c, method))
      runs.setdefault(method, []).append(pathlib.Path(c.workdir))
  return summarize(runs, workdir, eval_set=eval_set, labels=LABELS, histories=histories)


def accuracy_curve(run_dir: pathlib.Path, eval_set: str) -> dict[int, float]:
  """{step: accuracy} of one run on one eval set (the last record wins when a resumed run repeated a step)."""
  key = f"eval/{eval_set}/accuracy"
  return {int(r["step"]): float(r[key]) for r in read_metrics(RunDir(run_dir).metrics) if key in r}


def seed_curves(run_dirs: Sequence[pathlib.Path], eval_set: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, accuracies (seeds, steps)) on the steps common to every seed's run."""
  curves = [accuracy_curve(d, eval_set) for d in run_dirs]
  steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
  return np.asarray(steps, int), np.asarray([[c[s] for s in steps] for c in curves], float).reshape(len(curves), -1)


def _final(run_dirs: Sequence[pathlib.Path], eval_set: str) -> np.ndarray:
  _, acc = seed_curves(run_dirs, eval_set)
  return acc[:, -1] if acc.size else np.full(len(run_dirs), np.nan)


def _cell(values: np.ndarray) -> str:
  if np.isnan(values).any():
    return "-"
  return f"{100 * values.mean():.1f} ± {100 * values.std():.1f}"


def eval_sets_of(run_dirs: Sequence[pathlib.Path]) -> list[str]:
  names = set()
  for d in run_dirs:
    for record in read_metrics(RunDir(d).metrics):
      names.update(k.split("/")[1] for k in record if k.startswith("eval/") and k.endswith("/accuracy"))
  return sorted(names)


def render_table(runs: Mapping[str, Sequence[pathlib.Path]], labels: Mapping[str, str],
                 histories: Mapping[str, Sequence[Mapping]] | None = None) -> str:
  """Final plain-prompt accuracy per method and eval set (mean ± std over seeds, in %)."""
  sets = eval_sets_of([d for dirs in runs.values() for d in dirs])
  seeds = {len(dirs) for dirs in runs.values()}
  lines = [f"Final plain-prompt accuracy, % (mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds)", "",
           "| method | " + " | ".join(sets) + " | distillation efficiency |",
           "|---" * (len(sets) + 2) + "|"]
  for method, dirs in runs.items():
    cells = [_cell(_final(dirs, name)) for name in sets]
    efficiency = "-"
    if histories and histories.get(method):
      values = [distillation_efficiency(_finals(h), h.get("base_with_best_template", {})) for h in histories[method]]
      per_set = {name: [v[name] for v in values if name in v] for name in sets}
      efficiency = ", ".join(f"{name} {np.mean(v):.2f}" for name, v in per_set.items() if v) or "-"
    lines.append(f"| {labels.get(method, method)} | " + " | ".join(cells) + f" | {efficiency} |")
  return "\n".join(lines) + "\n"


def _finals(history: Mapping) -> dict[str, float]:
  return {k.split("/")[1]: v for k, v in history.get("eval_at_end", {}).items()
          if k.startswith("eval/") and k.endswith("/accuracy")}


def plot_curves(runs: Mapping[str, Sequence[pathlib.Path]], labels: Mapping[str, str], eval_set: str,
                out: pathlib.Path) -> pathlib.Path:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")  # files only: no display on servers and in CI
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for method, dirs in runs.items():
    steps, acc = seed_curves(dirs, eval_set)
    if not steps.size:
      continue
    mean = 100 * acc.mean(axis=0)
    (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{labels.get(method, method)} (n={len(dirs)})")
    ax.fill_between(steps, 100 * acc.min(axis=0), 100 * acc.max(axis=0), color=line.get_color(), alpha=0.2)
  ax.set_xlabel("training step")
  ax.set_ylabel(f"{eval_set} accuracy, plain prompt (%)")
  ax.set_ylim(-2, 102)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def summarize(runs: Mapping[str, Sequence[pathlib.Path]], out_dir: pathlib.Path, *, eval_set: str,
              labels: Mapping[str, str], histories: Mapping[str, Sequence[Mapping]] | None = None
              ) -> tuple[pathlib.Path, pathlib.Path]:
  """Write the table and the plot into `out_dir`; their paths."""
  out_dir.mkdir(parents=True, exist_ok=True)
  table = out_dir / TABLE_FILENAME
  table.write_text(render_table(runs, labels, histories))
  return table, plot_curves(runs, labels, eval_set, out_dir / PLOT_FILENAME)
