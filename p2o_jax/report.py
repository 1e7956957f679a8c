"""The end-of-run report: what a run achieved, in `<workdir>/report.md` and on the terminal.

Everything is read back from what the run wrote (its history, metrics.jsonl, GEPA's saved state), so the report is a
view of the run, not a second source of truth: plain-prompt accuracy of the starting and the trained policy on every
evaluation set, the starting policy WITH GEPA's best template (what context distillation can at best move into the
weights), the templates GEPA found, where GEPA's time went, and where the checkpoints are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from p2o_jax.metrics import read_metrics
from p2o_jax.run_dir import RunDir


def set_accuracies(eval_metrics: Mapping[str, float]) -> dict[str, float]:
  """{set name: accuracy} from "eval/<name>/accuracy" metrics."""
  return {key.split("/")[1]: value for key, value in eval_metrics.items()
          if key.startswith("eval/") and key.endswith("/accuracy")}


def ranked_templates(run_dir: RunDir) -> list[tuple[str, float]]:
  """(template, mean dev score) of the last GEPA search, best first; [] when GEPA never ran."""
  path = run_dir.gepa_progress
  if not path.is_file():
    return []
  state = json.loads(path.read_text())["state"]
  means = np.asarray(state["scores_cd"], dtype=float).mean(axis=1)
  order = np.argsort(-means, kind="stable")
  return [(state["candidates"][i], float(means[i])) for i in order]


def search_bests(run_dir: RunDir) -> list[dict[str, Any]]:
  """Each GEPA search's best template, [{"epoch", "template", "dev"}] in epoch order; [] when GEPA never ran."""
  path = run_dir.search_bests
  if not path.is_file():
    return []
  return [{"epoch": int(epoch), **best} for epoch, best in sorted(json.loads(path.read_text()).items(),
                                                                  key=lambda item: int(item[0]))]


def best_with_template(results: list[dict[str, Any]]) -> dict[str, float]:
  """Per eval set, the starting policy's best accuracy over the templates tried ({"accuracy": {set: value}} each)."""
  best: dict[str, float] = {}
  for result in results:
    for name, value in result["accuracy"].items():
      best[name] = max(best.get(name, value), value)
  return best


def gepa_seconds(run_dir: RunDir) -> float:
  path = run_dir.metrics
  if not path.is_file():
    return 0.0
  return float(sum(record.get("p2o/gepa_seconds", 0.0) for record in read_metrics(path)))


def _percent(value: float | None) -> str:
  return "-" if value is None else f"{100 * value:.1f}%"


def _accuracy_table(start: Mapping[str, float], end: Mapping[str, float],
                    with_template: Mapping[str, float]) -> list[str]:
  lines = ["| eval set | starting policy | trained policy | starting policy + best template |", "|---|---|---|---|"]
  for name in sorted(set(start) | set(end)):
    lines.append(f"| {name} | {_percent(start.get(name))} | {_percent(end.get(name))} | "
                 f"{_percent(with_template.get(name))} |")
  return lines


def distillation_efficiency(trained: Mapping[str, float], with_template: Mapping[str, float]) -> dict[str, float]:
  """Per set: trained plain-prompt accuracy / the starting policy's accuracy with the best template."""
  return {name: trained[name] / with_template[name] for name in with_template
          if name in trained and with_template[name] > 0}


def _templates_section(run_dir: RunDir, search_results: list[dict[str, Any]]) -> list[str]:
  templates = ranked_templates(run_dir)
  if not templates:
    return []
  lines = ["", "## Templates GEPA found", ""]
  if search_results:
    lines += ["Best of each search (mean dev score; the starting policy's accuracy with it):", ""]
    lines += [f"- after epoch {r['epoch']} ({r['dev']:.2f}): {r['template'] or '(empty template)'} — "
              + ", ".join(f"{name} {_percent(value)}" for name, value in sorted(r["accuracy"].items()))
              for r in search_results]
    lines += ["", "Last search, best mean dev score first:", ""]
  lines += [f"{i + 1}. ({score:.2f}) {text or '(empty template)'}" for i, (text, score) in enumerate(templates[:5])]
  return lines + ["", f"All candidates, per epoch: {run_dir.templates_dir}"]


def render_report(run_dir: RunDir, history: Mapping[str, Any], wall_seconds: float,
                  with_template: Mapping[str, float] | None = None) -> str:
  start = set_accuracies(history.get("eval_at_start", {}))
  end = set_accuracies(history.get("eval_at_end", {}))
  with_template = dict(with_template or {})
  lines = [f"# Run report: {run_dir.root}", "",
           "Accuracy with the plain prompt (no template), on the evaluation sets:", ""]
  lines += _accuracy_table(start, end, with_template)
  efficiency = distillation_efficiency(end, with_template)
  if efficiency:
    lines += ["", "Distillation efficiency (trained plain / starting + best template): "
              + ", ".join(f"{name} {value:.2f}" for name, value in sorted(efficiency.items()))]
  lines += _templates_section(run_dir, history.get("base_with_search_bests", []))
  gepa = gepa_seconds(run_dir)
  lines += ["", "## Time", "", f"Wall time {wall_seconds:.0f} s"
            + (f"; GEPA {gepa:.0f} s ({100 * gepa / max(wall_seconds, 1e-9):.1f}%)" if gepa else "")]
  lines += ["", "## Outputs", "", f"- checkpoints (resume with the same command): {run_dir.checkpoints}",
            f"- trained policy, Hugging Face format: {history.get('final_export', run_dir.export('final'))}",
            f"- best-by-dev policy: {run_dir.export('best')}",
            f"- metrics: {run_dir.metrics} (and TensorBoard files in {run_dir.tensorboard})"]
  return "\n".join(lines) + "\n"


def closing_lines(run_dir: RunDir, history: Mapping[str, Any]) -> list[str]:
  """The last lines a run prints: where the report is, and the plain-prompt accuracy it starts with."""
  start = set_accuracies(history.get("eval_at_start", {}))
  end = set_accuracies(history.get("eval_at_end", {}))
  lines = [f"Report: {run_dir.report}"]
  names = sorted(set(start) & set(end), key=lambda name: ("hard" not in name, name))
  if names:
    lines.append("Plain-prompt accuracy, starting -> trained policy: " + "; ".join(
        f"{name} {_percent(start[name])} -> {_percent(end[name])}" for name in names))
  return lines

