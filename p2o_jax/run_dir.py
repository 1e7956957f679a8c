"""Every path a run writes, in one place: `RunDir(workdir, checkpoint_dir)` names them, nothing else spells them.

    <workdir>/metrics.jsonl, tensorboard/     metrics (p2o_jax/metrics.py)
    <workdir>/checkpoints/<step>              orbax checkpoints (or train.checkpoint_dir, which may be gs://)
    <workdir>/export/{best,final}             Hugging Face exports of the policy
    <workdir>/templates/epoch_NNN.md          every candidate template of each GEPA search
    <workdir>/p2o/gepa_progress.json          the latest search's state (a killed run resumes inside it)
    <workdir>/p2o/search_bests.json           each search's best template
    <workdir>/history.json, report.md         the run's summary and its report
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
REPORT_FILENAME = "report.md"
HISTORY_FILENAME = "history.json"


@dataclasses.dataclass(frozen=True)
class RunDir:
  root: pathlib.Path
  checkpoint_dir: str = ""  # "" : <root>/checkpoints; may be a gs:// URL

  def __post_init__(self):
    object.__setattr__(self, "root", pathlib.Path(self.root))

  @classmethod
  def from_config(cls, c) -> RunDir:
    return cls(pathlib.Path(c.workdir), c.train.checkpoint_dir)

  @property
  def checkpoints(self) -> str | pathlib.Path:
    return self.checkpoint_dir or self.root / "checkpoints"

  @property
  def metrics(self) -> pathlib.Path:
    return self.root / METRICS_FILENAME

  @property
  def tensorboard(self) -> pathlib.Path:
    return self.root / TENSORBOARD_DIRNAME

  def export(self, name: str) -> pathlib.Path:
    return self.root / "export" / name

  def templates(self, epoch: int) -> pathlib.Path:
    return self.root / "templates" / f"epoch_{epoch:03d}.md"

  @property
  def templates_dir(self) -> pathlib.Path:
    return self.root / "templates"

  @property
  def gepa_progress(self) -> pathlib.Path:
    return self.root / "p2o" / "gepa_progress.json"

  @property
  def search_bests(self) -> pathlib.Path:
    return self.root / "p2o" / "search_bests.json"

  @property
  def history(self) -> pathlib.Path:
    return self.root / HISTORY_FILENAME

  @property
  def report(self) -> pathlib.Path:
    return self.root / REPORT_FILENAME


def write_atomically(path: pathlib.Path, text: str) -> None:
  """Replace `path` with `text` so a kill leaves either the old or the new content, never half of one."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
