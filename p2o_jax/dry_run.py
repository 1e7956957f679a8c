"""`python -m p2o_jax.dry_run --config configs/X.py [--model_config config.json] [--config.a.b=v ...]`

Checks that a run's config, its model and its mesh fit together without weights, data or accelerators: validates the
config, builds the mesh, builds the model abstractly (nnx.eval_shape: shapes only, nothing allocated), derives the
param and optimizer-state shardings from the project's logical-axis rules, and lowers the trainer's jitted train step
and log-prob function on ShapeDtypeStructs that carry those shardings, at the config's largest batch shapes. Lowering
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
from absl import app, flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from p2o_jax import sharding
from p2o_jax.cli import load_config, parse_flags
from p2o_jax.config import ConfigError, validate
from p2o_jax.models.config import ModelConfig, ModelConfigError, from_hf_dict
from p2o_jax.models.decoder import Decoder
from p2o_jax.rl.losses import PolicyLossConfig
from p2o_jax.rl.optimizer import make_optimizer
from p2o_jax.rl.train_step import StepConfig, make_logprob_fn, make_train_step

# --config (and the unused --workdir) come from p2o_jax.cli.
_MODEL_CONFIG = flags.DEFINE_string("model_config", None,
                                    "The model's config.json (default: <config.model.checkpoint>/config.json).")
_FAKE_DEVICES = flags.DEFINE_integer("fake_devices", 0, "Run on this many emulated CPU devices (0: the real ones).")
_LOWER = flags.DEFINE_bool("lower", True, "Lower the train step and log-prob fn (--nolower: shapes and layouts only).")

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
    return "\n".join(lines + ["OK" if self.lowered else "OK (layouts only: nothing lowered)"])


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB"


def _shapes_text(shapes: Shapes) -> str:
  return ", ".join(f"{k} {v}" for k, v in shapes.items())


def dry_run(c: ml_collections.ConfigDict, hf_config: dict[str, Any],
            devices: Sequence[jax.Device] | None = None, lower: bool = True) -> DryRunReport:
  """Validate `c` with the architecture `hf_config` on `devices` (default: all) and lower its jitted steps abstractly.

  lower=False stops after the shapes and shardings (seconds saved per model; no sharding check by XLA).
  Raises ConfigError (naming the key) or ModelConfigError for an impossible combination.
  """
  devices = list(devices if devices is not None else jax.devices())
  validate(c, len(devices))
  mesh = _mesh(c, devices)
  model_cfg = from_hf_dict(hf_config, param_dtype=c.model.param_dtype, compute_dtype=c.model.compute_dtype,
                           remat=c.model.remat)
  check_context_fits(c, model_cfg)
  graphdef, params = abstract_params(model_cfg, mesh)
  optimizer = _optimizer(c)
  opt_state = _abstract_opt_state(optimizer, params, mesh)
  minibatch = _on_mesh(batch_shapes(c, train_step=True), mesh)
  whole = _on_mesh(batch_shapes(c, train_step=False), mesh)
  if lower:  # as in the trainer: no ambient mesh, so shardings flow from the arguments alone
    temperature = c.rollout.temperature or 1.0
    make_train_step(graphdef, optimizer, _step_config(c, temperature)).lower(params, opt_state, minibatch)
    make_logprob_fn(graphdef, temperature).lower(params, whole)
  layouts = {_path_name(p): _layout(v) for p, v in _variables(params)}
  return DryRunReport(
      mesh_shape=dict(mesh.shape), model=model_cfg,
      param_count=sum(math.prod(l.shape) for l in layouts.values()),
      param_bytes=_total_bytes(params), param_bytes_per_device=_bytes_per_device(params),
      opt_state_bytes_per_device=_bytes_per_device(opt_state), params=layouts,
      minibatch_shapes={k: v.shape for k, v in minibatch.items()},
      logprob_batch_shapes={k: v.shape for k, v in whole.items()},
      batch_spec=_spec_entries(minibatch["tokens"].sharding.spec, 3),
      replicated=replicated_dimensions(params, mesh), lowered=lower)


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
  if c.p2o.enabled and c.p2o.reflector == "self":  # the policy itself writes the new templates
    spans["p2o.reflection_max_new_tokens"] = c.p2o.reflection_max_prompt_len + c.p2o.reflection_max_new_tokens
  for key, span in spans.items():
    if span > model_cfg.max_position_embeddings:
      raise ConfigError(f"config.{key}: prompt + generation = {span} tokens exceeds the model's "
                        f"max_position_embeddings={model_cfg.max_position_embeddings}")


def abstract_params(model_cfg: ModelConfig, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graphdef and its params as ShapeDtypeStructs carrying the rules' shardings (nothing allocated)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, nnx.Rngs(0))))
  shardings = sharding.state_shardings(state, mesh)
  return graphdef, jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                                state, shardings, is_leaf=_is_variable)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _optimizer(c: ml_collections.ConfigDict):
  # The schedule's length only changes values, never shapes; any positive step count traces the same program.
  o = c.optim
  return make_optimizer(lr=o.lr, total_steps=max(c.train.max_steps, 1), warmup_ratio=o.warmup_ratio,
                        schedule=o.schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                        grad_clip=o.grad_clip or None)


def _step_config(c: ml_collections.ConfigDict, temperature: float) -> StepConfig:
  g = c.grpo
  loss = PolicyLossConfig(clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip or None,
                          aggregation=g.aggregation, max_response_len=c.rollout.max_new_tokens, kl_coef=g.kl_coef,
                          kl_estimator=g.kl_estimator)
  return StepConfig(loss, temperature)


def _abstract_opt_state(optimizer, params: nnx.State, mesh: Mesh):
  """Optimizer-state shapes with the shardings the trainer gives them (sharding.init_optimizer_state)."""
  shapes = jax.eval_shape(optimizer.init, params)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      sharding.optimizer_state_shardings(optimizer, params, mesh))


def batch_shapes(c: ml_collections.ConfigDict, *, train_step: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """The largest packed batch a step can produce (prompt bucket max_prompt_len, response bucket max_new_tokens).

  train_step: one optimizer step's mini-batch, (micro_batches, micro_batch_size, ...); otherwise all rows of a step
  as the log-prob pass sees them, (rows / micro_batch_size, micro_batch_size, ...).
  """
  g, r = c.grpo, c.rollout
  rows = c.train.batch_size * r.num_samples
  micro = g.micro_batch_size
  lead = (rows // g.num_minibatches // micro if train_step else rows // micro, micro)
  seq, resp = r.max_prompt_len + r.max_new_tokens, r.max_new_tokens
  fields = {"tokens": ((seq,), jnp.int32), "valid": ((seq,), jnp.bool_), "response_mask": ((resp,), jnp.bool_)}
  if train_step:
    fields.update(advantages=((), jnp.float32), old_logp=((resp,), jnp.float32),
                  token_weights=((resp,), jnp.float32))
    if g.kl_coef > 0:
      fields["ref_logp"] = ((resp,), jnp.float32)
  return {name: jax.ShapeDtypeStruct(lead + tail, dtype) for name, (tail, dtype) in fields.items()}


def _on_mesh(batch: dict[str, jax.ShapeDtypeStruct], mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """The trainer's batch layout: micro-batch rows (axis 1) split over the batch axes, all else replicated."""

  def place(x):
    axes = (None, "batch") + (None,) * (x.ndim - 2)
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh)))

  return {name: place(x) for name, x in batch.items()}


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


def _bytes_per_device(tree) -> int:
  """Bytes one device holds: each leaf's shard shape times its item size."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in _leaves(tree))


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
    raise ConfigError("config.model.checkpoint: 'builtin' has no config.json before its first build; "
                      "pass --model_config")
  file = pathlib.Path(path) if path else pathlib.Path(c.model.checkpoint) / "config.json"
  if not file.is_file():
    raise ConfigError(f"config.model.checkpoint: {file} not found; pass --model_config path/to/config.json")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ModelConfigError(f"{file} is not valid JSON: {e}") from None


def main(argv) -> None:
  del argv
  if _FAKE_DEVICES.value:  # before anything initializes a backend
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _FAKE_DEVICES.value)
  c = load_config()
  try:
    report = dry_run(c, read_model_config(c, _MODEL_CONFIG.value), lower=_LOWER.value)
  except (ConfigError, ModelConfigError) as e:
    sys.exit(f"error: {e}")
  print(report.summary())


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
