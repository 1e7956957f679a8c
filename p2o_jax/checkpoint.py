"""Orbax checkpoints of a run: params, optimizer state, step, and JSON metadata (data-iterator state, RNG seed,
GEPA / hard-set state, best-dev bookkeeping).

Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-save leaves
the previous checkpoint as the latest usable one. Restoring places every array straight into the sharding of the
live train state (the abstract target carries the shardings).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Save/restore {"params", "opt_state"} plus a JSON `meta` dict under `<directory>/<step>` (local or gs://)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    directory = os.fspath(directory)
    if "://" not in directory:  # orbax wants absolute local paths; gs:// and other URLs pass through
      directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of `step`, with arrays placed like the arrays of `like` (same tree, shapes, shardings)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    log.info("restored checkpoint at step %d", step)
    return restored.state, restored.meta

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


@dataclasses.dataclass(frozen=True)
class OrbaxStep:
  """Step `step` of the orbax checkpoints directory `checkpoints_dir` (`<workdir>/checkpoints`)."""

  checkpoints_dir: pathlib.Path
  step: int


def orbax_steps(directory: pathlib.Path) -> list[int]:
  # A finished step is a numeric directory holding the "state" item; orbax's in-progress saves carry a suffix.
  if not directory.is_dir():
    return []
  return [int(d.name) for d in directory.iterdir() if d.name.isdigit() and (d / "state").is_dir()]


def _shapes_by_path(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
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
