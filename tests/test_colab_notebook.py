"""launch/colab_demo.ipynb: committed clean and equal to launch/make_colab_demo.py's output, and executed headless on
CPU (nbclient, an ipykernel python3 kernel) with the parameters cell overridden: a smoke run of the built-in policy,
and the model cell's two branches (an unreachable hub; a download that succeeds) up to the validated config."""

import copy
import importlib.util
import json
import os

import nbclient
import nbformat
import pytest

from conftest import REPO

NOTEBOOK = REPO / "launch" / "colab_demo.ipynb"
SMOKE_STEPS = 3
CELL_TIMEOUT_S = 600  # a guard against a hung cell, far above a healthy run's longest cell


def load_generator():
  spec = importlib.util.spec_from_file_location("make_colab_demo", REPO / "launch" / "make_colab_demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def code_cells(notebook) -> list:
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


def with_parameters(notebook, **values):
  """A copy of `notebook` whose parameters cell assigns `values` instead (reprs, as papermill would inject them)."""
  notebook = copy.deepcopy(notebook)
  cell = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
  cell.source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
  return notebook


def execute(notebook, cwd, **env):
  """Runs every cell in a fresh python3 kernel whose working directory is `cwd`; raises on the first failing cell."""
  kernel_env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), **env}
  kernel_env.pop("MPLBACKEND", None)  # an inherited non-inline backend would swallow the plots
  client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute(env=kernel_env)
  return notebook


def cells_through(notebook, marker: str, *extra: str):
  """`notebook` cut after the first cell whose source contains `marker`, then `extra` code cells appended."""
  last = next(i for i, cell in enumerate(notebook.cells) if marker in cell.source)
  notebook.cells = notebook.cells[:last + 1] + [nbformat.v4.new_code_cell(code) for code in extra]
  return notebook, last


def written_sum(question: str, lsb_first: bool) -> str:
  """The answer to "Q: a+b+...=" in the same notebook notation, re-derived from the question text."""
  operands = question.removeprefix("Q: ").removesuffix("=").split("+")
  total = sum(int(x[::-1] if lsb_first else x) for x in operands)
  return str(total)[::-1] if lsb_first else str(total)


def jsonl_rows(path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def stdout_text(cell) -> str:
  return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """(executed notebook, workdir) of the smoke run: random tiny built-in policy, P^2O, SMOKE_STEPS steps."""
  root = tmp_path_factory.mktemp("colab")
  workdir = root / "run"
  notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), REPO_URL="unused: p2o_jax is importable",
                             MODEL="builtin", STEPS=SMOKE_STEPS, METHOD="p2o", WORKDIR=str(workdir),
                             SMOKE_TEST=True)
  return execute(notebook, root), workdir


def test_committed_notebook_is_the_generated_one_and_has_no_outputs():
  text = NOTEBOOK.read_text()
  assert text == load_generator().notebook_text(), "run: python launch/make_colab_demo.py"
  notebook = nbformat.reads(text, as_version=4)
  cells = code_cells(notebook)
  assert all(cell.outputs == [] and cell.execution_count is None for cell in cells)
  assert cells[0].metadata["tags"] == ["parameters"]
  # Every code cell is introduced by a markdown cell saying what it does.
  for i, cell in enumerate(notebook.cells):
    if cell.cell_type == "code":
      assert notebook.cells[i - 1].cell_type == "markdown"


def test_smoke_run_trains_the_configured_steps_and_writes_the_report(smoke_run):
  _, workdir = smoke_run
  records = jsonl_rows(workdir / "metrics.jsonl")
  assert [r["step"] for r in records if "rollout/reward_mean" in r] == list(range(1, SMOKE_STEPS + 1))
  # Both held-out sets from the notebook's JSONL files, before and after training.
  for name in ("easy", "hard"):
    assert {r["step"] for r in records if f"eval/{name}/accuracy" in r} >= {0, SMOKE_STEPS}
  # METHOD="p2o" reached the config: the 8 training queries end an epoch after 2 steps and GEPA searched.
  assert any("p2o/gepa_seconds" in r and r["time/gepa_s"] >= r["p2o/gepa_seconds"] for r in records)
  # Every step's time split: what each phase took, adding up to the step.
  for r in (r for r in records if "rollout/reward_mean" in r):
    parts = [r[f"time/{k}_s"] for k in ("generate", "rewards", "logprobs", "update")]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(r["time/step_s"])
  report = (workdir / "report.md").read_text()
  assert "| easy |" in report and "| hard |" in report
  assert (workdir / "export" / "final" / "config.json").is_file()
  # The built-in policy's notation: every number least-significant digit first (its answers too).
  rows = jsonl_rows(workdir / "data" / "train.jsonl")
  assert len(rows) == 8 and all(r["answer"] == written_sum(r["question"], lsb_first=True) for r in rows)
  assert len(jsonl_rows(workdir / "data" / "eval_hard.jsonl")) == 8


def test_smoke_run_draws_both_plots_and_shows_the_report(smoke_run):
  notebook, workdir = smoke_run
  cells = code_cells(notebook)
  plot_cells = [cell for cell in cells if "plt.show()" in cell.source]
  assert len(plot_cells) == 2
  for cell in plot_cells:
    assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source[:80]
  shown = [out["data"]["text/markdown"] for out in cells[-1].outputs if "text/markdown" in out.get("data", {})]
  assert shown == [(workdir / "report.md").read_text()]


@pytest.mark.slow
def test_unreachable_model_falls_back_to_the_builtin_policy(tmp_path):
  """Cells up to the model cell with a model the (offline) hub cannot have: one line, then the built-in policy."""
  notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), REPO_URL="unused", MODEL="no-such-org/no-model",
                             STEPS=1, METHOD="grpo", WORKDIR=str(tmp_path / "run"), SMOKE_TEST=False)
  notebook, model_cell = cells_through(notebook, "fetch_checkpoint(", "print(repr(CHECKPOINT), CONFIG_FILE.name)")
  execute(notebook, tmp_path, HF_HUB_OFFLINE="1")
  model_output = stdout_text(notebook.cells[model_cell]).splitlines()
  assert len(model_output) == 2
  assert model_output[0].startswith("could not fetch no-such-org/no-model (")
  assert model_output[0].endswith("using the built-in tiny policy instead")
  assert stdout_text(notebook.cells[-1]) == "'builtin' demo_cpu.py\n"


# Stands in for huggingface_hub: a "download" that succeeds without touching the network.
FAKE_HUB = """
import sys, types
hub = types.ModuleType("huggingface_hub")
hub.snapshot_download = lambda repo_id, local_dir, allow_patterns: local_dir
sys.modules["huggingface_hub"] = hub
"""
SHOW_CONFIG = """
print(json.dumps({"checkpoint": c.model.checkpoint, "config_file": CONFIG_FILE.name, "format": c.data.prompt_format,
                  "fallback": c.reward.fallback, "p2o": c.p2o.enabled, "dev_size": c.p2o.gepa.dev_size,
                  "eval_sets": c.eval.sets, "max_steps": c.train.max_steps}))
"""


@pytest.mark.slow
def test_a_fetched_model_gets_the_colab_config_the_boxed_format_and_plain_digit_order(tmp_path):
  """Cells through the config cell, with a hub download that succeeds: the real-model branch, validated."""
  workdir = tmp_path / "run"
  notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), REPO_URL="unused",
                             MODEL="Qwen/Qwen2.5-0.5B-Instruct", STEPS=40, METHOD="p2o", WORKDIR=str(workdir),
                             SMOKE_TEST=False)
  notebook, _ = cells_through(notebook, "validate(c", SHOW_CONFIG)
  notebook.cells.insert(0, nbformat.v4.new_code_cell(FAKE_HUB))
  execute(notebook, tmp_path)
  shown = json.loads(stdout_text(notebook.cells[-1]))
  assert shown["checkpoint"] == "models/Qwen/Qwen2.5-0.5B-Instruct"
  assert shown["config_file"] == "colab_qwen2_5_0_5b.py"
  assert "\\boxed{{}}" in shown["format"] and "{question}" in shown["format"]
  assert (shown["fallback"], shown["p2o"], shown["dev_size"], shown["max_steps"]) == ("last_number", True, 32, 40)
  data = workdir / "data"
  assert shown["eval_sets"] == f"easy={data / 'eval_easy.jsonl'},hard={data / 'eval_hard.jsonl'}"
  rows = jsonl_rows(data / "train.jsonl")
  assert len(rows) == 256 and all(r["answer"] == written_sum(r["question"], lsb_first=False) for r in rows)
  # Half the training problems are hard (4-6 operands), and the eval sets are disjoint from training.
  assert sum(r["question"].count("+") >= 3 for r in rows) == 128
  eval_ids = {r["id"] for name in ("easy", "hard") for r in jsonl_rows(data / f"eval_{name}.jsonl")}
  assert len(eval_ids) == 256 and not eval_ids & {r["id"] for r in rows}
