"""Device mesh from config, the one table of logical-axis rules, and helpers to shard parameters and activations.

Parameters and activations name their dimensions logically ("embed", "heads", "batch", ...); LOGICAL_RULES maps each
name to mesh axes. A mesh axis that does not divide a dimension (e.g. 1 kv-head over tensor=2) is dropped for that
dimension, so every model runs on every mesh, replicated where it cannot split. On one device nothing changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "length": (),
    "cache_length": (),
    "act_embed": (),
}
# The sampler's copy of the weights: split over "tensor" only, whole on every data/fsdp device, so a decode step
# never all-gathers them (p2o_jax/sampling.py: sampling_params).
SAMPLING_RULES = {**LOGICAL_RULES, "embed": ()}


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over `devices` (default: all) with axes MESH_AXES; one size may be -1 (= the rest of the devices)."""
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(axis_sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected a subset of {MESH_AXES}")
  sizes = {name: int(axis_sizes.get(name, 1)) for name in MESH_AXES}
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh {sizes}: at most one axis may be -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if known <= 0 or len(devices) % known:
    raise ValueError(f"mesh {sizes} does not fit {len(devices)} devices")
  sizes = {name: (len(devices) // known if s == -1 else s) for name, s in sizes.items()}
  if math.prod(sizes.values()) != len(devices):
    raise ValueError(f"mesh {sizes} uses {math.prod(sizes.values())} devices but {len(devices)} are available")
  grid = np.asarray(devices).reshape([sizes[name] for name in MESH_AXES])
  return Mesh(grid, MESH_AXES)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh,
                    rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dims are named `logical_axes`, valid on `mesh`."""
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape, strict=True):
    if name is not None and name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    chosen = []
    for axis in rules.get(name, ()) if name else ():
      size = mesh.shape.get(axis, 1)
      if axis in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in chosen)):
        continue
      chosen.append(axis)
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, tuple[str, ...]] = LOGICAL_RULES) -> nnx.State:
  """NamedSharding for every Variable in `state` (abstract or concrete), from its `logical_axes` metadata."""

  def one(variable):
    axes = getattr(variable, "logical_axes", None) or (None,) * len(variable.shape)
    return NamedSharding(mesh, logical_to_spec(axes, variable.shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_state_shardings(optimizer: optax.GradientTransformation, params: nnx.State, mesh: Mesh):
  """Shardings for optimizer.init(params): every per-parameter buffer (Adam's moments) like its parameter, the scalars
  (step counts) replicated. `params` may be abstract (ShapeDtypeStructs carrying shardings)."""
  shapes = jax.eval_shape(optimizer.init, params)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  return optax.tree_map_params(optimizer, lambda _, sharding: sharding, shapes, param_shardings,
                               transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()))


def init_optimizer_state(optimizer: optax.GradientTransformation, params: nnx.State, mesh: Mesh):
  """optimizer.init(params), sharded by `optimizer_state_shardings`. Without explicit output shardings XLA replicates
  the zeros it creates: for Qwen3-4B on fsdp=8, 30 GiB of Adam moments per device instead of 3.7 GiB."""
  return jax.jit(optimizer.init, out_shardings=optimizer_state_shardings(optimizer, params, mesh))(params)


def batch_sharding(mesh: Mesh, ndim: int, batch_size: int) -> NamedSharding:
  """Sharding for an array whose leading axis is the batch and the other axes are replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), (batch_size,) + (1,) * (ndim - 1),
                                             mesh))


def batch_divisor(mesh: Mesh | None) -> int:
  """Batch sizes must be multiples of this to split evenly over the batch axes."""
  if mesh is None:
    return 1
  return math.prod(mesh.shape[a] for a in LOGICAL_RULES["batch"])


class UnderMesh:
  """A jitted function that is called and lowered under `mesh` (`jax.set_mesh`), so the `constrain` calls inside it
  are real. Without an ambient mesh XLA chooses the activations' layout from the arguments alone: for Qwen3-4B's
  log-prob pass on fsdp=4 that was an all-reduce of f32 [98304, 151936] logits (55.6 GiB)."""

  def __init__(self, jitted, mesh: Mesh | None):
    self.jitted, self.mesh = jitted, mesh

  def _mesh_context(self):
    return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

  def __call__(self, *args, **kwargs):
    with self._mesh_context():
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with self._mesh_context():
      return self.jitted.lower(*args, **kwargs)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint under the ambient mesh (`jax.set_mesh`); a no-op when there is none."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes, x.shape, mesh))
