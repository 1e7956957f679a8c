"""Orbax checkpoints of a run: params, optimizer state, step, and JSON metadata (data-iterator state, RNG seed,
GEPA / hard-set state, best-dev bookkeeping).

Orbax writes each step into a temporary directory and renames it when complete, so a process killed mid-save leaves
the previous checkpoint as the latest usable one. Restoring places every array straight into the sharding of the
live train state (the abstract target carries the shardings).
"""

from __future__ import annotations

import logging
import os
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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
