"""Evaluation: plain-prompt accuracy of a policy on held-out sets with the paper's protocol. Sets with fewer than
`small_set_size` problems are scored as the mean over `small_set_samples` samples at the rollout temperature; larger
sets greedily. The trainer evaluates through `evaluate_set`; `run_evaluation` is the whole of the evaluation command
(p2o_jax/evaluate.py): it locates the checkpoint (an HF directory, or an orbax run / checkpoints / step directory whose
params are read alone), reads the sets (through the seqio registry when seqio imports), scores, and returns the
results document.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from p2o_jax import builders, sharding
from p2o_jax.checkpoint import OrbaxStep, orbax_steps, restore_params
from p2o_jax.cli import one_line
from p2o_jax.config import ConfigError, builtin_world, reward_functions, validate
from p2o_jax.data import arithmetic, seqio_tasks
from p2o_jax.data.records import Query, problem_queries, read_queries
from p2o_jax.metrics import MetricsWriter
from p2o_jax.models.config import load_hf_config
from p2o_jax.policy import Policy
from p2o_jax.preflight import PreflightError, check_prompt_lengths
from p2o_jax.rewards.functions import ScoreFn, as_scores
from p2o_jax.sampling import SamplingConfig

RESULTS_FILENAME = "eval_results.json"
REPORT_FILENAME = "eval_report.md"
QUESTION_FIELDS = ("problem", "question")  # interchangeable when the configured one is absent from a file
log = logging.getLogger(__name__)


class EvalInputError(ValueError):
  """A checkpoint or evaluation set cannot be used; the message names it and says what was expected."""


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
  max_new_tokens: int
  temperature: float = 0.6
  small_set_size: int = 100
  small_set_samples: int = 16

  @classmethod
  def from_config(cls, c) -> EvalProtocol:
    """The run config's `eval` section (max_new_tokens 0: the rollout's)."""
    return cls(c.eval.max_new_tokens or c.rollout.max_new_tokens, c.eval.temperature, c.eval.small_set_size,
               c.eval.small_set_samples)

  def sampling_for(self, num_problems: int) -> tuple[SamplingConfig, int]:
    """(sampling config, samples per problem) for a set of `num_problems`."""
    if num_problems < self.small_set_size:
      return SamplingConfig(self.max_new_tokens, temperature=self.temperature), self.small_set_samples
    return SamplingConfig(self.max_new_tokens, temperature=0.0), 1


def evaluate_set(policy: Policy, queries: Sequence[Query], prompt_format: str, protocol: EvalProtocol,
                 score: ScoreFn, *, template: str = "", seed: int = 0) -> dict[str, float]:
  """{"accuracy", "samples"}: the mean correctness reward (the first reward function) over problems x samples, with
  `template` (default: none) in front of every user turn."""
  sampling, n = protocol.sampling_for(len(queries))
  out = policy.generate([prompt_format.format(question=q.question) for q in queries], sampling,
                        templates=[template] * len(queries), n=n, seed=seed)
  rows = [q for q in queries for _ in range(n)]
  rewards = as_scores(score(out.texts, rows), len(rows)).correctness
  return {"accuracy": float(np.mean(rewards)), "samples": float(n)}


# ---- the checkpoint ----------------------------------------------------------------------------------------------

def locate_checkpoint(path: str | pathlib.Path) -> pathlib.Path | OrbaxStep:
  """The HF directory at `path`, or the orbax step it names (a run dir or checkpoints dir means its newest step)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise EvalInputError(f"--checkpoint {path} does not exist")
  if (path / "config.json").is_file():
    return path
  if path.name.isdigit() and (path / "state").is_dir():
    return OrbaxStep(path.parent, int(path.name))
  for directory in (path / "checkpoints", path):
    steps = orbax_steps(directory)
    if steps:
      return OrbaxStep(directory, max(steps))
  raise EvalInputError(f"--checkpoint {path}: expected a Hugging Face directory (with config.json), or an orbax run "
                       "directory, its checkpoints/ directory or one of its step directories (with a finished save)")


def load_policy(location: pathlib.Path | OrbaxStep, c, mesh) -> tuple[Policy, pathlib.Path]:
  """(the policy with the weights to evaluate, the HF directory whose tokenizer goes with them)."""
  if isinstance(location, pathlib.Path):
    return builders.build_policy(c, location, mesh), location
  architecture = builders.existing_policy_checkpoint(c)
  model_cfg = load_hf_config(architecture, **builders.model_overrides(c, mesh))
  graphdef, abstract = builders.abstract_params(model_cfg, mesh)
  try:
    params = restore_params(location, abstract)
  except (ValueError, KeyError, FileNotFoundError) as e:  # orbax: missing item, shape or tree mismatch
    raise EvalInputError(f"--checkpoint {location.checkpoints_dir / str(location.step)}: its params do not fit the "
                         f"architecture of config.model.checkpoint ({architecture}): {one_line(e)}") from None
  log.info("restored the params of orbax step %d from %s", location.step, location.checkpoints_dir)
  return builders.build_policy(c, architecture, mesh, model=nnx.merge(graphdef, params)), architecture


# ---- the evaluation sets -----------------------------------------------------------------------------------------

def _first_row_fields(path: pathlib.Path) -> set[str]:
  """Top-level field names of a file's first row; empty when it cannot tell (read_queries then reports the file)."""
  if not path.is_file():
    return set()
  if path.suffix == ".parquet":
    import pyarrow.parquet as pq
    return set(pq.read_schema(path).names)
  if path.suffix != ".jsonl":
    return set()
  with path.open("rb") as file:
    line = next((line for line in file if line.strip()), b"")
  try:
    row = json.loads(line)
  except ValueError:
    return set()
  return set(row) if isinstance(row, dict) else set()


def question_field_for(path: str | pathlib.Path, configured: str) -> str:
  """`configured`, unless it is "problem" or "question" and the file's first row has only the other of the two."""
  if configured not in QUESTION_FIELDS:
    return configured
  fields = _first_row_fields(pathlib.Path(path))
  other = next(f for f in QUESTION_FIELDS if f != configured)
  if configured not in fields and other in fields:
    log.info("%s has no %r field; reading questions from %r", path, configured, other)
    return other
  return configured


def _seqio_task_name(set_name: str) -> str:
  return "p2o_jax_eval." + re.sub(r"[^\w.:#]", "_", set_name)  # seqio's allowed task-name characters


def _read_set(name: str, path: str, c, score: ScoreFn | None, use_seqio: bool):
  fields = dict(question_field=question_field_for(path, c.data.question_field), answer_field=c.data.answer_field,
                id_field=c.data.id_field or None)
  queries = read_queries(path, **fields).queries
  if not use_seqio:
    return queries
  task = seqio_tasks.register_eval_task(_seqio_task_name(name), path, **fields, replace=True,
                                        score_fn=_reference_scorer(score) if score else seqio_tasks.exact_match_scores)
  # seqio carries (id, inputs, targets) only; reward functions also get the row's other columns.
  columns = {q.id: q.columns for q in queries}
  return [dataclasses.replace(q, columns=columns.get(q.id, {"answer": q.answer}))
          for q in seqio_tasks.eval_queries(task)]


def _reference_scorer(score: ScoreFn) -> Callable[[Sequence[str], Sequence[str]], np.ndarray]:
  """seqio's metric sees only (predictions, targets): score them as queries whose only column is the answer."""
  return lambda predictions, targets: as_scores(score(predictions, [Query("", "", t) for t in targets]),
                                                len(targets)).correctness


def _seqio_available() -> bool:
  try:
    import seqio  # pylint: disable=unused-import
  except ImportError as e:
    log.info("seqio is not available (%s); reading the evaluation sets with records.read_queries", e)
    return False
  return True


def read_file_sets(paths: dict[str, str], c, score: ScoreFn | None = None) -> dict[str, list]:
  """{set name: Queries} of the files, through the seqio registry (tasks scored by `score`) when seqio imports."""
  use_seqio = bool(paths) and _seqio_available()
  sets = {}
  for name, path in paths.items():
    try:
      sets[name] = _read_set(name, path, c, score, use_seqio)
    except (OSError, ValueError) as e:  # missing/unreadable file, bad extension, no usable row, corrupt parquet
      reason = e.strerror if isinstance(e, OSError) and e.strerror else one_line(e)  # the path is named already
      raise EvalInputError(f"eval set {name!r} ({path}): {reason}") from None
  return sets


def parse_eval_sets(spec: str) -> dict[str, str]:
  """"name=path,name2=path2" -> {name: path}."""
  sets = {}
  for item in filter(None, (s.strip() for s in spec.split(","))):
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ConfigError(f"config.eval.sets: {item!r} is not name=path")
    sets[name] = path
  return sets


def builtin_sets(c) -> dict[str, list[Query]]:
  """The run's held-out built-in splits, as training evaluates them (none unless config.data.source is "builtin")."""
  if c.data.source != "builtin":
    return {}
  easy, hard = arithmetic.held_out_splits(builtin_world(c), c.eval.builtin_easy, c.eval.builtin_hard, seed=c.seed)
  return {name: problem_queries(problems) for name, problems in (("builtin_easy", easy), ("builtin_hard", hard))
          if problems}


# ---- protocol, scoring, results ----------------------------------------------------------------------------------

def check_eval_config(c) -> None:
  """The config as a whole (config.validate) and the eval keys it leaves to the evaluation."""
  validate(c)
  e = c.eval
  for key, ok in (("small_set_size", e.small_set_size >= 0), ("small_set_samples", e.small_set_samples >= 1),
                  ("temperature", e.temperature >= 0), ("max_new_tokens", e.max_new_tokens >= 0)):
    if not ok:
      raise ConfigError(f"config.eval.{key}: {e[key]} is out of range")


def protocol_label(protocol, num_problems: int) -> str:
  """"greedy" or "mean@<n> T=<temperature>": how a set of `num_problems` is scored."""
  sampling, n = protocol.sampling_for(num_problems)
  return "greedy" if sampling.greedy and n == 1 else f"mean@{n} T={sampling.temperature:g}"


def evaluate_sets(policy: Policy, sets: dict[str, list], c, score: ScoreFn) -> dict[str, dict[str, Any]]:
  """Per set: accuracy (a fraction), num_problems, samples_per_problem, protocol."""
  protocol = EvalProtocol.from_config(c)
  results = {}
  for name, queries in sets.items():
    result = evaluate_set(policy, queries, c.data.prompt_format, protocol, score, seed=c.seed)
    results[name] = {"accuracy": result["accuracy"], "num_problems": len(queries),
                     "samples_per_problem": int(result["samples"]), "protocol": protocol_label(protocol, len(queries))}
    log.info("%s: %.2f%% (%s, %d problems)", name, 100 * result["accuracy"], results[name]["protocol"], len(queries))
  return results


def config_summary(c) -> dict[str, Any]:
  """The settings an accuracy depends on, for the results file."""
  return {"model.checkpoint": c.model.checkpoint, "model.param_dtype": c.model.param_dtype,
          "model.compute_dtype": c.model.compute_dtype, "data.prompt_format": c.data.prompt_format,
          "data.question_field": c.data.question_field, "data.answer_field": c.data.answer_field,
          "eval.sets": c.eval.sets, "eval.temperature": c.eval.temperature,
          "eval.small_set_size": c.eval.small_set_size, "eval.small_set_samples": c.eval.small_set_samples,
          "eval.max_new_tokens": c.eval.max_new_tokens or c.rollout.max_new_tokens,
          "rollout.max_prompt_len": c.rollout.max_prompt_len, "reward.fallback": c.reward.fallback,
          "reward.functions": reward_functions(c), "seed": c.seed}


def run_evaluation(c, checkpoint: str | pathlib.Path, *, score: ScoreFn | None = None,
                   include_builtin: bool = True, functions=None) -> dict[str, Any]:
  """The results document of evaluating `checkpoint` on the configured sets; `score` (responses, queries) -> rewards
  replaces the sandboxed verifier pool when given; `functions` (rewards.functions.resolve) replaces
  config.reward.functions."""
  check_eval_config(c)
  location = locate_checkpoint(checkpoint)
  paths = parse_eval_sets(c.eval.sets)
  builtin = builtin_sets(c) if include_builtin else {}
  if not paths and not builtin:
    raise EvalInputError("nothing to evaluate: give --sets name=path.jsonl,... (or config.eval.sets)")
  with contextlib.ExitStack() as stack:
    if score is None:
      score = stack.enter_context(builders.build_reward_pool(c, functions)).scorer(c.data.prompt_format)
    sets = {**read_file_sets(paths, c, score), **builtin}  # before the model: a bad file fails fast
    mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
    policy, tokenizer_dir = load_policy(location, c, mesh)
    sets = _fitting_prompts(sets, policy.tokenizer, c)
    results = evaluate_sets(policy, sets, c, score)
  for name, result in results.items():
    result["source"] = paths.get(name, "builtin")
  is_orbax = isinstance(location, OrbaxStep)
  return {"checkpoint": str(pathlib.Path(checkpoint).resolve()), "checkpoint_kind": "orbax" if is_orbax else "hf",
          "orbax_step": location.step if is_orbax else None, "tokenizer_dir": str(tokenizer_dir),
          "config": config_summary(c), "sets": results}


def average_accuracy(results: dict[str, Any]) -> float:
  """The unweighted mean over sets, as the paper averages its benchmarks (AIME's 30 problems count as much as
  MATH500's 500)."""
  return float(np.mean([r["accuracy"] for r in results["sets"].values()]))


def _fitting_prompts(sets: dict[str, list[Query]], tokenizer, c) -> dict[str, list[Query]]:
  """Each set without the queries whose plain prompt is over rollout.max_prompt_len (data.too_long="skip"), or an
  EvalInputError naming the first one ("error"), as training treats its data."""
  try:
    return {name: check_prompt_lengths(tokenizer, queries, c.data.prompt_format, c.rollout.max_prompt_len,
                                       too_long=c.data.too_long, enable_thinking=c.model.enable_thinking,
                                       what=f"eval set {name!r} query") for name, queries in sets.items()}
  except PreflightError as e:
    raise EvalInputError(str(e)) from None


def render_table(results: dict[str, Any]) -> str:
  """Markdown table: set, problems, protocol, accuracy in %, and the average over sets."""
  lines = ["| set | problems | protocol | accuracy (%) |", "|---|---:|---|---:|"]
  for name, r in results["sets"].items():
    lines.append(f"| {name} | {r['num_problems']} | {r['protocol']} | {100 * r['accuracy']:.2f} |")
  if len(results["sets"]) > 1:
    total = sum(r["num_problems"] for r in results["sets"].values())
    lines.append(f"| **average** | {total} | mean over sets | **{100 * average_accuracy(results):.2f}** |")
  return "\n".join(lines)


def write_report(results: dict[str, Any], workdir: str | pathlib.Path) -> pathlib.Path:
  """The table as `<workdir>/eval_report.md`, and each set's accuracy and the average to the workdir's metrics.jsonl
  and TensorBoard (`eval/<set>/accuracy`, `eval/average_accuracy`) at the evaluated orbax step (0 for an HF
  directory): with the run directory as workdir, they land beside the run's own curves."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / REPORT_FILENAME
  path.write_text(f"# Evaluation of {results['checkpoint']}\n\n{render_table(results)}\n")
  metrics = {f"eval/{name}/accuracy": r["accuracy"] for name, r in results["sets"].items()}
  metrics["eval/average_accuracy"] = average_accuracy(results)
  writer = MetricsWriter(workdir)
  try:
    writer.write(results["orbax_step"] or 0, metrics)
  finally:
    writer.close()
  return path


def write_results(results: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2))
  return path
