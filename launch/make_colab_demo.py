"""Writes launch/colab_demo.ipynb, the Colab TPU demo, from the cells below: `python launch/make_colab_demo.py`.

The cells live here as plain text so that a change to the notebook reviews as a normal diff. The notebook is written
without outputs and with fixed cell ids, so the same cells always give the same file; tests/test_colab_notebook.py
checks that the committed notebook is exactly this script's output and executes it headless on a CPU.
"""

from __future__ import annotations

import pathlib
import textwrap

import nbformat

NOTEBOOK_PATH = pathlib.Path(__file__).with_name("colab_demo.ipynb")
PARAMETERS_TAG = "parameters"  # the tag papermill-style tools look for to override the parameters cell

INTRO = r"""
# P^2O on a Colab TPU

Trains a small policy with [P^2O](https://arxiv.org/abs/2603.21877) (GRPO + a GEPA prompt-template search + context
distillation) or plain GRPO, using **p2o_jax**, on a verifiable arithmetic task, then plots reward and held-out
accuracy. Choose *Runtime > Change runtime type > TPU*; it also runs (slowly) on a GPU or CPU runtime.

Without hub access the notebook falls back to p2o_jax's built-in tiny policy, so it always runs to the end.
"""

# (markdown, code) pairs in notebook order; the first code cell is the parameters cell.
CELLS: list[tuple[str, str]] = [
    ("""
**1. Parameters.** Edit these, or override them with a papermill-style tool (the cell is tagged `parameters`).
`REPO_URL` is a placeholder: put the git URL of your copy of p2o_jax there.
""", """
REPO_URL = "https://github.com/YOUR_ACCOUNT/p2o_jax.git"  # placeholder: git URL of p2o_jax (used only to install it)
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"  # a Hugging Face repo id, or "builtin" for the built-in tiny arithmetic policy
STEPS = 64  # training steps
METHOD = "p2o"  # "p2o" (GRPO + GEPA templates + context distillation) or "grpo"
WORKDIR = "runs/colab_demo"  # data, metrics.jsonl, report.md, checkpoints and export/ go here; a rerun resumes
SMOKE_TEST = False  # True: a random 1-layer built-in policy and tiny batches, to check the notebook end to end on CPU
"""),
    ("""
**2. Install.** Clones the project and installs it with the TPU extra (skipped when `p2o_jax` is already
importable). The clone is kept because the config files in `configs/` are not part of the installed package.
""", """
import importlib
import importlib.util
import pathlib
import subprocess
import sys

if importlib.util.find_spec("p2o_jax") is None:
  source_dir = pathlib.Path("p2o_jax_repo").resolve()
  if not source_dir.exists():
    subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(source_dir)], check=True)
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{source_dir}[tpu]"], check=True)
  # An editable install is picked up at interpreter start; this kernel imports from the clone directly.
  sys.path.insert(0, str(source_dir))
  importlib.invalidate_caches()

import jax
import p2o_jax

REPO_DIR = pathlib.Path(p2o_jax.__file__).resolve().parents[1]
if not (REPO_DIR / "configs").is_dir():
  raise FileNotFoundError(f"p2o_jax is imported from {REPO_DIR}, which has no configs/; install it from a checkout")
print("p2o_jax from", REPO_DIR)
print("devices:", jax.devices())
"""),
    ("""
**3. Model.** Fetches `MODEL` from the Hugging Face hub; on any failure it says so in one line and uses the built-in
tiny policy instead. The model picks the starting config: `configs/colab_qwen2_5_0_5b.py` for a real checkpoint,
`configs/demo_cpu.py` for the built-in policy.
""", """
from p2o_jax.config import load_config_file


def fetch_checkpoint(repo_id: str, local_dir: pathlib.Path) -> str:
  \"\"\"The local Hugging Face directory of `repo_id`, or "builtin" when it cannot be fetched.\"\"\"
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=["*.json", "*.safetensors", "*.txt"])
  except Exception as e:  # no hub access, no package, a gated or missing repo: the demo goes on regardless
    reason = (str(e).strip().splitlines() or [""])[0][:160]
    print(f"could not fetch {repo_id} ({type(e).__name__}: {reason}); using the built-in tiny policy instead")
    return "builtin"


CHECKPOINT = "builtin" if SMOKE_TEST or MODEL == "builtin" else fetch_checkpoint(MODEL, pathlib.Path("models") / MODEL)
USE_BUILTIN = CHECKPOINT == "builtin"
CONFIG_FILE = REPO_DIR / "configs" / ("demo_cpu.py" if USE_BUILTIN else "colab_qwen2_5_0_5b.py")
c = load_config_file(CONFIG_FILE)
print("policy:", "the built-in tiny policy" if USE_BUILTIN else CHECKPOINT, "| starting config:", CONFIG_FILE.name)
"""),
    (r"""
**4. Data.** Writes the built-in arithmetic task (sums of several numbers, exact answers) to JSONL files: training
queries and held-out easy and hard evaluation sets, the same files for either model. For a real chat model the
config's prompt asks for the answer in `\boxed{}`; the verifier also accepts the last number in the response.
""", """
import dataclasses
import json

from p2o_jax.config import builtin_world
from p2o_jax.data import arithmetic

TRAIN_SIZE, EVAL_SIZE = (8, 8) if SMOKE_TEST else (256, 128)
DATA_DIR = pathlib.Path(WORKDIR) / "data"

# The built-in policy was trained on numbers written least-significant digit first; a real model reads them normally.
world = builtin_world(c) if USE_BUILTIN else dataclasses.replace(builtin_world(c), lsb_first=False)


def write_jsonl(path: pathlib.Path, problems: list) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(record) + "\\n" for record in arithmetic.to_records(problems)))
  return path


n_hard = TRAIN_SIZE // 2
train_problems = (arithmetic.sample_problems(world, "easy", TRAIN_SIZE - n_hard, seed=c.seed)
                  + arithmetic.sample_problems(world, "hard", n_hard, seed=c.seed + 1))
easy_problems, hard_problems = arithmetic.held_out_splits(world, EVAL_SIZE, EVAL_SIZE, seed=c.seed)
TRAIN_FILE = write_jsonl(DATA_DIR / "train.jsonl", train_problems)
EVAL_FILES = {"easy": write_jsonl(DATA_DIR / "eval_easy.jsonl", easy_problems),
              "hard": write_jsonl(DATA_DIR / "eval_hard.jsonl", hard_problems)}
print(f"{TRAIN_SIZE} training and 2 x {EVAL_SIZE} held-out problems in {DATA_DIR}, e.g.",
      arithmetic.to_records(hard_problems[:1])[0])
"""),
    ("""
**5. Config.** Points the starting config at the model and the data, sets the steps and the method, and for
`SMOKE_TEST` shrinks everything to seconds per step. Every key is documented in `p2o_jax/config.py`; `validate`
names the first wrong value.
""", """
from p2o_jax.config import validate

if METHOD not in ("p2o", "grpo"):
  raise ValueError(f"METHOD must be 'p2o' or 'grpo', got {METHOD!r}")

c.workdir = WORKDIR
c.model.checkpoint = CHECKPOINT
c.data.source, c.data.train_path = "file", str(TRAIN_FILE)
c.data.question_field, c.data.answer_field, c.data.id_field = "question", "answer", "id"
c.eval.sets = ",".join(f"{name}={path}" for name, path in EVAL_FILES.items())
c.eval.builtin_easy = c.eval.builtin_hard = 0
c.eval.every_steps = max(1, STEPS // 8)  # about 8 points on the accuracy plot
c.reward.fallback = "last_number"
c.train.max_steps = STEPS
c.p2o.enabled = METHOD == "p2o"
if not USE_BUILTIN:  # a GEPA budget a notebook session can afford (the paper's is far larger)
  c.p2o.hard_min_count = 16
  c.p2o.gepa.update(dev_size=32, max_metric_calls=400)
if SMOKE_TEST:
  c.builtin.update(sft_steps=0, num_layers=1, hidden_size=32)  # a random policy: seconds to build, not minutes
  c.train.batch_size, c.rollout.num_samples, c.rollout.max_new_tokens = 4, 2, 16
  c.grpo.num_minibatches, c.grpo.micro_batch_size = 2, 4
  c.eval.small_set_samples = 1  # 8 problems x 1 sample: the rollouts' sampler batch, so no extra compile
  c.p2o.hard_min_count = 2
  c.p2o.gepa.update(dev_size=2, minibatch_size=2, max_metric_calls=8)
validate(c, jax.device_count())
print(f"{METHOD} for {STEPS} steps: batch {c.train.batch_size} x {c.rollout.num_samples} samples, "
      f"up to {c.rollout.max_new_tokens} new tokens; prompt format {c.data.prompt_format!r}")
"""),
    ("""
**6. Train.** Runs training in this kernel (the verifier's worker processes come from a fork server, which works
from a notebook). It logs progress and writes `metrics.jsonl`, `report.md`, checkpoints and `export/final` (a Hugging
Face directory) into `WORKDIR`. Running it again resumes from the newest checkpoint.
""", """
import logging

from p2o_jax.experiment import run_training

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
logging.getLogger("absl").setLevel(logging.WARNING)
history = run_training(c)
"""),
    ("""
**7. Reward.** Mean verified reward of the training rollouts at every step (read from `metrics.jsonl`).
""", """
%matplotlib inline
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

from p2o_jax.metrics import read_metrics

records = read_metrics(pathlib.Path(WORKDIR) / "metrics.jsonl")


def series(key: str) -> tuple[list[int], list[float]]:
  \"\"\"(steps, values) of every record that has `key`.\"\"\"
  points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
  return [s for s, _ in points], [v for _, v in points]


fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(*series("rollout/reward_mean"), marker=".")
ax.set(xlabel="step", ylabel="mean reward", ylim=(-0.02, 1.02), title=f"{METHOD}: training reward")
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.grid(alpha=0.3)
plt.show()
"""),
    ("""
**8. Held-out accuracy.** Plain-prompt accuracy (no template) on the held-out easy and hard sets: what the training
moved into the policy itself.
""", """
fig, ax = plt.subplots(figsize=(7, 3.5))
for name in EVAL_FILES:
  ax.plot(*series(f"eval/{name}/accuracy"), marker="o", label=name)
ax.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title=f"{METHOD}: plain-prompt held-out accuracy")
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.legend()
ax.grid(alpha=0.3)
plt.show()
"""),
    ("""
**9. Report.** The run's end-of-run report (`report.md`): accuracy of the starting and the trained policy, the
templates GEPA found (P^2O) and where the checkpoints are.
""", """
from IPython.display import Markdown, display

display(Markdown((pathlib.Path(WORKDIR) / "report.md").read_text()))
"""),
]


def _text(block: str) -> str:
  return textwrap.dedent(block).strip("\n")


def build_notebook() -> nbformat.NotebookNode:
  """The notebook: the intro, then each (markdown, code) pair; no outputs, fixed cell ids."""
  cells = [nbformat.v4.new_markdown_cell(_text(INTRO), id="intro")]
  for number, (markdown, code) in enumerate(CELLS, start=1):
    cells.append(nbformat.v4.new_markdown_cell(_text(markdown), id=f"step-{number}-about"))
    cells.append(nbformat.v4.new_code_cell(_text(code), id=f"step-{number}-code"))
    if number == 1:
      cells[-1].metadata["tags"] = [PARAMETERS_TAG]
  metadata = {"accelerator": "TPU", "colab": {"provenance": []},
              "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
              "language_info": {"name": "python"}}
  notebook = nbformat.v4.new_notebook(cells=cells, metadata=metadata)
  nbformat.validate(notebook)
  return notebook


def notebook_text() -> str:
  return nbformat.writes(build_notebook())


def main() -> None:
  NOTEBOOK_PATH.write_text(notebook_text())
  print(f"wrote {NOTEBOOK_PATH}")


if __name__ == "__main__":
  main()
