"""`python -m p2o_jax.dry_run --config configs/X.py [--model_config config.json] [--config.a.b=v ...]`

Checks that a run's config, its model and its mesh fit together without weights, data or accelerators: validates the
config, builds the mesh, builds the model abstractly (nnx.eval_shape: shapes only, nothing allocated), derives the
param and optimizer-state shardings from the project's logical-axis rules, and lowers the trainer's jitted train step
and log-prob function (built by the trainer's own builders, p2o_jax/builders.py) on ShapeDtypeStructs that carry the
trainer's shardings (its BatchLayout), at the config's largest batch shapes. Lowering
runs the same sharding checks a real step would, in seconds, so a mesh or batch that cannot work fails here instead of
an hour into a pod reservation. `--fake_devices 16` emulates a 16-chip slice on any machine; `--nolower` stops after
the layouts (seconds, whatever the model's size).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import Mesh

from p2o_jax import builders, sharding
from p2o_jax.cli import define_common_flags, load_config, run_command
from p2o_jax.config import ConfigError, validate
from p2o_jax.models.config import ModelConfig, ModelConfigError, from_hf_dict
from p2o_jax.memory_report import DoesNotFit, MemoryReport, bytes_per_device, measure
from p2o_jax.p2o.reflectors import REFERENCE_REFLECTORS
from p2o_jax.rl.sequence_packing import resolve_packing
from p2o_jax.tpu_topology import Topology, TopologyError, parse_topology

Shapes = dict[str, tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  shape: tuple[int, ...]
  spec: tuple[Any, ...]  # per dimension: None, a mesh axis, or a tuple of mesh axes
  shard_shape: tuple[int, ...]  # what one device holds


@dataclasses.dataclass(frozen=True)
class DryRunReport:
  mesh_shape: dict[str, int]
  model: ModelConfig
  param_count: int
  param_bytes: int
  param_bytes_per_device: int
  opt_state_bytes_per_device: int
  params: dict[str, ParamLayout]  # "layers.0.attn.q_proj" -> layout
  minibatch_shapes: Shapes  # one train-step call: (micro_batches, micro_batch_size, ...)
  logprob_batch_shapes: Shapes  # one log-prob call over all rows of a step
  batch_spec: tuple[Any, ...]  # how the token rows are split over the mesh
  replicated: tuple[str, ...]  # where a rule asked for a mesh axis that does not divide the dimension
  lowered: bool  # the train step and log-prob fn were lowered with these shardings
  memory: MemoryReport | None = None  # every jitted function compiled, with its per-chip memory

  def summary(self) -> str:
    m = self.model
    lines = [
        "mesh: " + " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        + f" ({math.prod(self.mesh_shape.values())} devices)",
        f"model: {m.model_type}, {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads / "
        f"{m.num_kv_heads} kv heads x {m.head_dim}, mlp {m.intermediate_size}, vocab {m.vocab_size}"
        + (" (tied embedding)" if m.tie_word_embeddings else ""),
        f"params: {self.param_count:,} ({m.param_dtype}, {_gib(self.param_bytes)} in all)",
        f"per device: params {_gib(self.param_bytes_per_device)} + optimizer state "
        f"{_gib(self.opt_state_bytes_per_device)}",
        "train-step mini-batch: " + _shapes_text(self.minibatch_shapes),
        "log-prob batch: " + _shapes_text(self.logprob_batch_shapes),
        f"token rows split as {self.batch_spec}",
    ]
    lines += [f"note: {r}" for r in self.replicated]
    if self.memory is not None:
      lines.append(self.memory.table())
    return "\n".join(lines + ["OK" if self.lowered else "OK (layouts only: nothing lowered)"])


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def _shapes_text(shapes: Shapes) -> str:
  return ", ".join(f"{k} {v}" for k, v in shapes.items())


def dry_run(c: ml_collections.ConfigDict, hf_config: dict[str, Any],
            devices: Sequence[jax.Device] | None = None, lower: bool = True, *, memory: bool = False,
            where: str = "", hbm_bytes: int | None = None) -> DryRunReport:
  """Validate `c` with the architecture `hf_config` on `devices` (default: all) and lower its jitted steps abstractly.

  lower=False stops after the shapes and shardings (seconds saved per model; no sharding check by XLA).
  memory=True also compiles every jitted function of the run (`memory_report.measure`) and reports its per-chip
  memory against `hbm_bytes` (None: no limit known) on the devices described by `where`.
  Raises ConfigError (naming the key) or ModelConfigError for an impossible combination.
  """
  devices = list(devices if devices is not None else jax.devices())
  validate(c, len(devices))
  mesh = _mesh(c, devices)
  model_cfg = from_hf_dict(hf_config, **builders.model_overrides(c, mesh))
  check_context_fits(c, model_cfg)
  steps = AbstractSteps.build(c, model_cfg, mesh)
  params, opt_state, minibatch, whole = steps.params, steps.opt_state, steps.minibatch, steps.whole
  if lower and not memory:
    steps.lower()
  report = measure(c, steps, mesh, where or f"{len(devices)} {devices[0].platform.upper()} devices", hbm_bytes) \
      if memory else None
  layouts = {_path_name(p): _layout(v) for p, v in _variables(params)}
  return DryRunReport(
      mesh_shape=dict(mesh.shape), model=model_cfg,
      param_count=sum(math.prod(l.shape) for l in layouts.values()),
      param_bytes=_total_bytes(params), param_bytes_per_device=bytes_per_device(params),
      opt_state_bytes_per_device=bytes_per_device(opt_state), params=layouts,
      minibatch_shapes={k: v.shape for k, v in minibatch.items()},
      logprob_batch_shapes={k: v.shape for k, v in whole.items()},
      batch_spec=_spec_entries(minibatch["tokens"].sharding.spec, 3),
      replicated=replicated_dimensions(params, mesh), lowered=lower or memory, memory=report)


@dataclasses.dataclass(frozen=True)
class AbstractSteps:
  """The trainer's jitted functions, built by its own builders, with abstract arguments carrying its shardings."""

  model_cfg: ModelConfig
  graphdef: nnx.GraphDef
  train_step: Any
  logprobs: Any
  params: nnx.State
  opt_state: Any
  minibatch: dict[str, jax.ShapeDtypeStruct]  # one train-step call
  whole: dict[str, jax.ShapeDtypeStruct]  # one log-prob call over all rows of a step

  @classmethod
  def build(cls, c: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh: Mesh) -> AbstractSteps:
    graphdef, params = builders.abstract_params(model_cfg, mesh)
    optimizer = builders.build_optimizer(c, planned_train_steps(c))
    layout = builders.build_batch_layout(mesh)
    packing = resolve_packing(c.grpo.packing, model_cfg.attention)
    return cls(model_cfg=model_cfg, graphdef=graphdef,
               train_step=builders.build_train_step(c, graphdef, optimizer, mesh),
               logprobs=builders.build_logprob_fn(c, graphdef, mesh), params=params,
               opt_state=_abstract_opt_state(optimizer, params, mesh),
               minibatch=layout.abstract(batch_shapes(c, packing, train_step=True), num_leading=1),
               whole=layout.abstract(batch_shapes(c, packing, train_step=False), num_leading=1))

  def lower(self) -> tuple[Any, Any]:
    """(lowered train step, lowered log-prob fn), under the mesh as in the trainer."""
    return (self.train_step.lower(self.params, self.opt_state, self.minibatch),
            self.logprobs.lower(self.params, self.whole))


def _mesh(c: ml_collections.ConfigDict, devices: list[jax.Device]) -> Mesh:
  try:
    return sharding.make_mesh({axis: c.mesh[axis] for axis in sharding.MESH_AXES}, devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None


def check_context_fits(c: ml_collections.ConfigDict, model_cfg: ModelConfig) -> None:
  """Every prompt + generation the run makes must fit the model's position range."""
  r = c.rollout
  spans = {"rollout.max_new_tokens": r.max_prompt_len + r.max_new_tokens,
           "eval.max_new_tokens": r.max_prompt_len + (c.eval.max_new_tokens or r.max_new_tokens)}
  if c.p2o.enabled and c.p2o.reflector in REFERENCE_REFLECTORS:  # the policy itself writes the new templates
    spans["p2o.reflection_max_new_tokens"] = c.p2o.reflection_max_prompt_len + c.p2o.reflection_max_new_tokens
  for key, span in spans.items():
    if span > model_cfg.max_position_embeddings:
      raise ConfigError(f"config.{key}: prompt + generation = {span} tokens exceeds the model's "
                        f"max_position_embeddings={model_cfg.max_position_embeddings}")


def planned_train_steps(c: ml_collections.ConfigDict) -> int:
  """The run's step count as the trainer computes it, where the config tells (train.max_steps, or epochs of the
  built-in training set); otherwise 1. Only the learning-rate schedule's constants depend on it, never a shape."""
  if c.train.max_steps:
    return c.train.max_steps
  if c.data.source == "builtin":
    return c.train.epochs * max(c.data.builtin_train_size // c.train.batch_size, 1)  # EpochBatches drops the tail
  return 1


def _abstract_opt_state(optimizer, params: nnx.State, mesh: Mesh):
  """Optimizer-state shapes with the shardings the trainer gives them (sharding.init_optimizer_state)."""
  shapes = jax.eval_shape(optimizer.init, params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      sharding.optimizer_state_shardings(optimizer, params, mesh))


def batch_shapes(c: ml_collections.ConfigDict, packing: str, *, train_step: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """The largest packed batch a step can produce (rl/sequence_packing.py): every sequence alone in its packed row
  (max_prompt_len + max_new_tokens tokens), so as many packed rows as response rows; response bucket max_new_tokens.
  `packing` (resolved, one of sequence_packing.PACKINGS) sets the segments' shape and dtype.

  train_step: one optimizer step's mini-batch, (micro_batches, micro_batch_size, ...); otherwise all rows of a step
  as the log-prob pass sees them, (rows / micro_batch_size, micro_batch_size, ...).
  """
  g, r = c.grpo, c.rollout
  rows = c.train.batch_size * r.num_samples
  micro = g.micro_batch_size
  lead = (rows // g.num_minibatches // micro if train_step else rows // micro, micro)
  seq, resp = r.max_prompt_len + r.max_new_tokens, r.max_new_tokens
  segments = {"rows": ((seq,), jnp.bool_), "sequences": ((seq,), jnp.int32), "shared_prompts": ((seq, 2), jnp.int32)}
  fields = {"tokens": ((seq,), jnp.int32), "positions": ((seq,), jnp.int32), "segments": segments[packing],
            "predictor": ((resp,), jnp.int32), "response_tokens": ((resp,), jnp.int32),
            "response_mask": ((resp,), jnp.bool_)}
  if train_step:
    fields.update(advantages=((), jnp.float32), old_logp=((resp,), jnp.float32),
                  token_weights=((resp,), jnp.float32))
    if g.kl_coef > 0:
      fields["ref_logp"] = ((resp,), jnp.float32)
  return {name: jax.ShapeDtypeStruct(lead + tail, dtype) for name, (tail, dtype) in fields.items()}


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _variables(state: nnx.State):
  return jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]


def _path_name(path) -> str:
  return ".".join(str(getattr(k, "key", k)) for k in path)


def _spec_entries(spec, ndim: int) -> tuple[Any, ...]:
  return tuple(spec) + (None,) * (ndim - len(spec))


def _layout(variable: nnx.Variable) -> ParamLayout:
  x = variable.get_value()
  return ParamLayout(shape=tuple(x.shape), spec=_spec_entries(x.sharding.spec, x.ndim),
                     shard_shape=tuple(x.sharding.shard_shape(x.shape)))


def _leaves(tree) -> list[jax.ShapeDtypeStruct]:
  return [x for x in jax.tree.leaves(tree) if hasattr(x, "shape")]


def _total_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in _leaves(tree))


def replicated_dimensions(params: nnx.State, mesh: Mesh) -> tuple[str, ...]:
  """One line per (logical axis, size, mesh axis) the rules wanted to split but could not: the axis does not divide
  the dimension (e.g. 14 heads over tensor=4), so those params are replicated over that mesh axis."""
  found = set()
  for _, variable in _variables(params):
    for name, dim in zip(variable.logical_axes or (), variable.shape):
      for axis in sharding.LOGICAL_RULES.get(name, ()) if name else ():
        size = mesh.shape[axis]
        if size > 1 and dim % size:
          found.add(f"{name} ({dim}) does not split over {axis}={size}: replicated over {axis}")
  return tuple(sorted(found))


def read_model_config(c: ml_collections.ConfigDict, path: str | None) -> dict[str, Any]:
  """The architecture dict from `path`, or from the config's checkpoint directory."""
  if not path and c.model.checkpoint == "builtin":
    base = builders.policy_checkpoint(c)  # the shipped base or a cached build; never builds
    if base is None:
      raise ConfigError("config.model.checkpoint: this 'builtin' base is neither shipped nor built yet and has no "
                        "config.json; pass --model_config")
    path = base / "config.json"
  file = pathlib.Path(path) if path else pathlib.Path(c.model.checkpoint) / "config.json"
  if not file.is_file():
    raise ConfigError(f"config.model.checkpoint: {file} not found; pass --model_config path/to/config.json")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ModelConfigError(f"{file} is not valid JSON: {e}") from None


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command's flags (besides --config), registered when the command runs, never on import."""
  define_common_flags()
  return {"model_config": flags.DEFINE_string("model_config", None, "The model's config.json (default: "
                                              "<config.model.checkpoint>/config.json)."),
          "topology": flags.DEFINE_string("topology", None, "Compile for this TPU slice (v5p-8, v4-32, v5e-1, "
                                          "v6e-8, ...; needs libtpu: pip install -e '.[tpu]') and check every "
                                          "function fits its HBM."),
          "fake_devices": flags.DEFINE_integer("fake_devices", 0, "Run on this many emulated CPU devices (0: the "
                                               "real ones)."),
          "lower": flags.DEFINE_bool("lower", True, "Lower the train step and log-prob fn (--nolower: shapes and "
                                     "layouts only)."),
          "memory": flags.DEFINE_bool("memory", True, "Compile every jitted function of the run and report its "
                                      "per-chip memory (--nomemory: lower the train step and log-prob fn only).")}


def _target(flag_values: dict[str, flags.FlagHolder]) -> tuple[list[jax.Device] | None, str, int | None]:
  """(devices, their description, HBM bytes per chip) of --topology, or the local (or fake) devices."""
  name = flag_values["topology"].value
  if flag_values["fake_devices"].value or name:  # before anything initializes a backend
    jax.config.update("jax_platforms", "cpu")
  if flag_values["fake_devices"].value:
    jax.config.update("jax_num_cpu_devices", flag_values["fake_devices"].value)
  if not name:
    return None, "", None
  topology = parse_topology(name)
  return topology.devices(), f"{topology.name} ({topology.chips} chips)", topology.hbm_bytes


def main(argv, flag_values: dict[str, flags.FlagHolder]) -> None:
  del argv
  try:
    devices, where, hbm_bytes = _target(flag_values)
  except TopologyError as e:
    sys.exit(f"error: {e}")
  c = load_config()
  lower = flag_values["lower"].value
  try:
    report = dry_run(c, read_model_config(c, flag_values["model_config"].value), devices, lower=lower,
                     memory=lower and flag_values["memory"].value, where=where, hbm_bytes=hbm_bytes)
  except (ConfigError, ModelConfigError) as e:
    sys.exit(f"error: {e}")
  except DoesNotFit as e:
    sys.exit(f"error: does not fit: {e}")
  print(report.summary())
  shortfalls = report.memory.shortfalls() if report.memory else []
  if shortfalls:
    sys.exit("error: does not fit: " + "; ".join(shortfalls))


def run() -> None:
  run_command(define_flags, main)


if __name__ == "__main__":
  run()
