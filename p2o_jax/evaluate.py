"""`python -m p2o_jax.evaluate --config C --checkpoint PATH [--sets name=path.jsonl,...] [--output results.json]
[--workdir DIR] [--config.a.b=v ...]`: plain-prompt accuracy of a policy on benchmark files, with the paper's protocol.

--checkpoint is one of
  * a Hugging Face directory (config.json beside the weights): loaded as is, tokenizer included;
  * an orbax run directory, its `checkpoints/` directory, or one step directory in it: the architecture and tokenizer
    come from config.model.checkpoint (an HF directory, or "builtin"), the params from the newest step (or the given
    one). Only the params are read (an orbax partial restore); the optimizer state is never touched.

Sets: --sets (shorthand for --config.eval.sets) lists name=path pairs of .jsonl/.parquet files; without it the
config's eval.sets are used plus, when config.data.source is "builtin", the run's held-out easy/hard splits. Rows are
read with config.data.question_field / answer_field (dotted paths); when the question field is "problem" or "question"
and the file's first row has only the other one, that other one is used (logged), so MATH-style and GSM8K-style files
both load without flags. File sets are served through the seqio registry (p2o_jax/data/seqio_tasks.py); without seqio
they are read with records.read_queries directly, which yields the same queries. Broken rows are counted and skipped;
a set without any usable row is an error.

Protocol (evaluation.EvalProtocol, config.eval.*): sets below eval.small_set_size problems score the mean over
eval.small_set_samples samples at eval.temperature ("mean@16 T=0.6"), larger sets one greedy sample ("greedy"). Prompts
are config.data.prompt_format without any template; responses are scored by the sandboxed verifier pool.

Output: a markdown table on stdout and a JSON file (default <workdir>/eval_results.json) with, per set, the accuracy
(a fraction in [0, 1]), number of problems, samples per problem and protocol, plus the checkpoint and a config summary.
Only process 0 prints and writes. Bad input (missing checkpoint, unreadable set, malformed --sets) is a one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from p2o_jax.cli import one_line, load_config, parse_flags, setup_logging, start_jax

# Imports stay light at the top: the verifier's worker processes re-import this module as __mp_main__, so JAX, orbax,
# seqio and the model code are imported inside the functions that use them.
# pylint: disable=import-outside-toplevel
# --config and --workdir come from p2o_jax.cli.
CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF directory, or orbax run / checkpoints / step directory.")
SETS = flags.DEFINE_string("sets", None, "name=path.jsonl,name2=path2.parquet (replaces config.eval.sets).")
OUTPUT = flags.DEFINE_string("output", None, "Results JSON (default <workdir>/eval_results.json).")

RESULTS_FILENAME = "eval_results.json"
QUESTION_FIELDS = ("problem", "question")  # interchangeable when the configured one is absent from a file
ScoreFn = Callable[[Sequence[str], Sequence[str]], Any]
log = logging.getLogger(__name__)


class EvalInputError(ValueError):
  """A checkpoint or evaluation set cannot be used; the message names it and says what was expected."""


@dataclasses.dataclass(frozen=True)
class OrbaxStep:
  """Step `step` of the orbax checkpoints directory `checkpoints_dir` (`<workdir>/checkpoints`)."""

  checkpoints_dir: pathlib.Path
  step: int


# ---- the checkpoint --------------------------------------------------------------------------------------------------

def _orbax_steps(directory: pathlib.Path) -> list[int]:
  # A finished step is a numeric directory holding the "state" item; orbax's in-progress saves carry a suffix.
  if not directory.is_dir():
    return []
  return [int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / "state").is_dir()]


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
    steps = _orbax_steps(directory)
    if steps:
      return OrbaxStep(directory, max(steps))
  raise EvalInputError(f"--checkpoint {path}: expected a Hugging Face directory (with config.json), or an orbax run "
                       "directory, its checkpoints/ directory or one of its step directories (with a finished save)")


def _shapes_by_path(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  import jax

  def name(key) -> str:  # DictKey, SequenceKey or GetAttrKey; the saved tree spells list indices as strings
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))

  return {tuple(map(name, path)): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_params_match(saved: dict[tuple[str, ...], tuple[int, ...]],
                       wanted: dict[tuple[str, ...], tuple[int, ...]]) -> None:
  """ValueError naming the first parameter array that one side lacks or that differs in shape."""
  for path, shape in wanted.items():
    if path not in saved:
      raise ValueError(f"parameter {'.'.join(path)} is not in the checkpoint")
    if saved[path] != shape:
      raise ValueError(f"parameter {'.'.join(path)} has shape {saved[path]} in the checkpoint, {shape} in the model")
  extra = sorted(set(saved) - set(wanted))
  if extra:
    raise ValueError(f"the checkpoint has {len(extra)} parameter arrays the model lacks, e.g. {'.'.join(extra[0])}")


def restore_params(location: OrbaxStep, abstract_params):
  """The params of an orbax step, read alone (partial restore) into the shapes, dtypes and shardings of
  `abstract_params` (an nnx.State of ShapeDtypeStructs carrying shardings); ValueError unless they match one to one."""
  import orbax.checkpoint as ocp

  # A partial restore silently skips saved arrays the target lacks and leaves unfilled the ones it cannot find, so the
  # two trees are compared first, from the checkpoint's metadata (no array is read for that).
  saved = ocp.PyTreeCheckpointHandler().metadata(location.checkpoints_dir / str(location.step) / "state")
  check_params_match(_shapes_by_path(saved.get("params", {})), _shapes_by_path(abstract_params))
  target = {"params": abstract_params}
  restore = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                   partial_restore=True)
  manager = ocp.CheckpointManager(location.checkpoints_dir.absolute(), options=ocp.CheckpointManagerOptions(
      create=False))
  try:
    return manager.restore(location.step, args=ocp.args.Composite(state=restore)).state["params"]
  finally:
    manager.close()


def _abstract_params(architecture: pathlib.Path, c, mesh):
  """(graphdef, params as sharded ShapeDtypeStructs) of the model config.json at `architecture` describes."""
  import jax
  from flax import nnx

  from p2o_jax import sharding
  from p2o_jax.models.config import load_hf_config
  from p2o_jax.models.decoder import Decoder

  cfg = load_hf_config(architecture, param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(state)
  shardings = jax.tree.leaves(sharding.state_shardings(state, mesh))  # same keys, so the same leaf order
  return graphdef, treedef.unflatten([jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                      for x, s in zip(leaves, shardings)])


def load_policy(location: pathlib.Path | OrbaxStep, c, mesh):
  """(Decoder with the weights to evaluate, the HF directory whose tokenizer goes with it)."""
  from flax import nnx

  from p2o_jax.experiment import policy_checkpoint
  from p2o_jax.models.hf_checkpoint import load_hf_model

  if isinstance(location, pathlib.Path):
    return load_hf_model(location, mesh=mesh, param_dtype=c.model.param_dtype,
                         compute_dtype=c.model.compute_dtype), location
  architecture = policy_checkpoint(c)
  graphdef, abstract = _abstract_params(architecture, c, mesh)
  try:
    params = restore_params(location, abstract)
  except (ValueError, KeyError, FileNotFoundError) as e:  # orbax: missing item, shape or tree mismatch
    raise EvalInputError(f"--checkpoint {location.checkpoints_dir / str(location.step)}: its params do not fit the "
                         f"architecture of config.model.checkpoint ({architecture}): {one_line(e)}") from None
  log.info("restored the params of orbax step %d from %s", location.step, location.checkpoints_dir)
  return nnx.merge(graphdef, params), architecture


# ---- the evaluation sets ---------------------------------------------------------------------------------------------

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
  from p2o_jax.data import seqio_tasks
  from p2o_jax.data.records import read_queries

  fields = dict(question_field=question_field_for(path, c.data.question_field), answer_field=c.data.answer_field,
                id_field=c.data.id_field or None)
  if not use_seqio:
    return read_queries(path, **fields).queries
  task = seqio_tasks.register_eval_task(_seqio_task_name(name), path, **fields, replace=True,
                                        score_fn=score or seqio_tasks.exact_match_scores)
  return seqio_tasks.eval_queries(task)


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


def builtin_sets(c) -> dict[str, list]:
  """The run's held-out built-in splits, as training evaluates them (none unless config.data.source is "builtin")."""
  from p2o_jax.config import builtin_world
  from p2o_jax.data import arithmetic
  from p2o_jax.data.records import Query

  if c.data.source != "builtin":
    return {}
  easy, hard = arithmetic.held_out_splits(builtin_world(c), c.eval.builtin_easy, c.eval.builtin_hard, seed=c.seed)
  return {name: [Query(r["id"], r["question"], r["answer"]) for r in arithmetic.to_records(problems)]
          for name, problems in (("builtin_easy", easy), ("builtin_hard", hard)) if problems}


# ---- protocol, scoring, results --------------------------------------------------------------------------------------

def check_eval_config(c) -> None:
  """The config as a whole (config.validate) and the eval keys it leaves to the evaluation."""
  from p2o_jax.config import ConfigError, validate

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


def evaluate_sets(sampler, tokenizer, sets: dict[str, list], c, score: ScoreFn) -> dict[str, dict[str, Any]]:
  """Per set: accuracy (a fraction), num_problems, samples_per_problem, protocol."""
  from p2o_jax.evaluation import EvalProtocol, evaluate_set

  protocol = EvalProtocol.from_config(c)
  results = {}
  for name, queries in sets.items():
    result = evaluate_set(sampler, tokenizer, queries, c.data.prompt_format, protocol, score, seed=c.seed)
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
          "rollout.max_prompt_len": c.rollout.max_prompt_len, "reward.fallback": c.reward.fallback, "seed": c.seed}


def run_evaluation(c, checkpoint: str | pathlib.Path, *, score: ScoreFn | None = None,
                   include_builtin: bool = True) -> dict[str, Any]:
  """The results document of evaluating `checkpoint` on the configured sets; `score` (responses, references) ->
  rewards replaces the sandboxed verifier pool when given."""
  from p2o_jax import sharding
  from p2o_jax.experiment import parse_eval_sets
  from p2o_jax.models.tokenizer import load_tokenizer, stop_token_ids
  from p2o_jax.rewards.pool import VerifierPool
  from p2o_jax.sampling import Sampler

  check_eval_config(c)
  location = locate_checkpoint(checkpoint)
  paths = parse_eval_sets(c.eval.sets)
  builtin = builtin_sets(c) if include_builtin else {}
  if not paths and not builtin:
    raise EvalInputError("nothing to evaluate: give --sets name=path.jsonl,... (or config.eval.sets)")
  with contextlib.ExitStack() as stack:
    if score is None:
      score = stack.enter_context(VerifierPool(num_workers=c.reward.num_workers, timeout_s=c.reward.timeout_s,
                                               fallback=c.reward.fallback)).score
    sets = {**read_file_sets(paths, c, score), **builtin}  # before the model: a bad file fails fast
    mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor})
    model, tokenizer_dir = load_policy(location, c, mesh)
    tokenizer = load_tokenizer(tokenizer_dir)
    sampler = Sampler(model, eos_ids=stop_token_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                      max_prompt_len=c.rollout.max_prompt_len, mesh=mesh)
    results = evaluate_sets(sampler, tokenizer, sets, c, score)
  for name, result in results.items():
    result["source"] = paths.get(name, "builtin")
  is_orbax = isinstance(location, OrbaxStep)
  return {"checkpoint": str(pathlib.Path(checkpoint).resolve()), "checkpoint_kind": "orbax" if is_orbax else "hf",
          "orbax_step": location.step if is_orbax else None, "tokenizer_dir": str(tokenizer_dir),
          "config": config_summary(c), "sets": results}


def render_table(results: dict[str, Any]) -> str:
  """Markdown table: set, problems, protocol, accuracy in %."""
  lines = ["| set | problems | protocol | accuracy (%) |", "|---|---:|---|---:|"]
  for name, r in results["sets"].items():
    lines.append(f"| {name} | {r['num_problems']} | {r['protocol']} | {100 * r['accuracy']:.2f} |")
  return "\n".join(lines)


def write_results(results: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=2))
  return path


# ---- the command -----------------------------------------------------------------------------------------------------

def main(argv) -> None:
  del argv
  setup_logging()
  import jax

  from p2o_jax.config import ConfigError
  from p2o_jax.models.hf_checkpoint import CheckpointError

  c = load_config()
  if not CHECKPOINT.value:
    sys.exit("error: --checkpoint is required (an HF directory or an orbax run directory)")
  if SETS.value is not None:
    c.eval.sets = SETS.value
  try:
    start_jax(c)
    results = run_evaluation(c, CHECKPOINT.value, include_builtin=SETS.value is None)
  except (ConfigError, EvalInputError, CheckpointError) as e:
    sys.exit(f"error: {one_line(e)}")
  if jax.process_index() == 0:
    path = write_results(results, OUTPUT.value or pathlib.Path(c.workdir) / RESULTS_FILENAME)
    print(render_table(results))
    print(f"results: {path}")


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
