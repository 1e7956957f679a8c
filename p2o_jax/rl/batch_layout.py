"""How train rows become global device arrays: micro-batches, with their rows split over the mesh's batch axes.

Multi-process: each process holds the rows of its own queries and feeds them into its devices' slots of the global
arrays; `BatchLayout` makes a row's device and micro-batch depend only on the number of batch devices, not on how many
processes share them, so one process with 4 devices and two with 2 each train on the same micro-batches. The dry run
uses the same layout on abstract shapes (`abstract`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from p2o_jax import distributed, sharding


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  mesh: jax.sharding.Mesh
  local_batch_devices: int  # this process's devices on the batch (data x fsdp) axes

  @classmethod
  def for_mesh(cls, mesh: jax.sharding.Mesh) -> BatchLayout:
    return cls(mesh, distributed.check_batch_layout(mesh))

  def sharding(self, shape: tuple[int, ...], num_leading: int) -> jax.sharding.NamedSharding:
    """Leading axes replicated, the micro-batch axis after them over the batch axes, the rest replicated."""
    axes = (None,) * num_leading + ("batch",) + (None,) * (len(shape) - num_leading - 1)
    return jax.sharding.NamedSharding(self.mesh, sharding.logical_to_spec(axes, shape, self.mesh))

  def to_device(self, arrays: dict[str, np.ndarray], leading: tuple[int, ...]) -> dict[str, jax.Array]:
    """This process's rows -> global arrays shaped `leading` + (micro_batch, ...)."""
    out = {}
    for name, x in arrays.items():
      local = to_micro_batches(x, self.local_batch_devices, leading)
      global_shape = (*leading, local.shape[len(leading)] * jax.process_count(), *x.shape[1:])
      out[name] = jax.make_array_from_process_local_data(self.sharding(global_shape, len(leading)), local,
                                                         global_shape)
    return out

  def to_host_rows(self, x: jax.Array, num_leading: int) -> np.ndarray:
    """The inverse of `to_device` for a result shaped like its output: this process's rows in their order."""
    return from_micro_batches(distributed.local_part(x, axis=num_leading), self.local_batch_devices, num_leading)

  def abstract(self, shapes: dict[str, jax.ShapeDtypeStruct], num_leading: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Global-shaped ShapeDtypeStructs with the shardings `to_device` gives the real arrays (for AOT lowering)."""
    return {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding(x.shape, num_leading))
            for name, x in shapes.items()}


def to_micro_batches(rows: np.ndarray, devices: int, leading: tuple[int, ...]) -> np.ndarray:
  """(rows, ...) -> `leading` + (micro_batch, ...): the rows are `devices` contiguous blocks, one per batch device, and
  every micro-batch takes the next chunk of each block."""
  blocks = rows.reshape(devices, *leading, -1, *rows.shape[1:])
  return np.moveaxis(blocks, 0, len(leading)).reshape(*leading, -1, *rows.shape[1:])


def from_micro_batches(x: np.ndarray, devices: int, num_leading: int) -> np.ndarray:
  """The inverse of `to_micro_batches`: (*leading, micro_batch, ...) -> (rows, ...) in the original row order."""
  blocks = x.reshape(*x.shape[:num_leading], devices, -1, *x.shape[num_leading + 1:])
  return np.moveaxis(blocks, num_leading, 0).reshape(-1, *x.shape[num_leading + 1:])
