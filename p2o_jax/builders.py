"""One builder per component, from the run config. The trainer, the evaluation command and the dry run all build
through these, so what the dry run lowers is what the trainer runs."""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections
import optax
from flax import nnx

from p2o_jax import sharding
from p2o_jax.config import ConfigError, builtin_world, reward_functions
from p2o_jax.models.attention import resolve_attention
from p2o_jax.models.builtin import BasePolicySpec, build_cached_base_policy, find_base_policy, shipped_base_matches
from p2o_jax.models.config import ModelConfig
from p2o_jax.models.decoder import Decoder
from p2o_jax.models.hf_checkpoint import load_hf_model
from p2o_jax.models.tokenizer import load_tokenizer
from p2o_jax.policy import Policy
from p2o_jax.rewards.functions import RewardEntry, RewardFunctionError, resolve
from p2o_jax.rewards.pool import VerifierPool
from p2o_jax.rl.batch_layout import BatchLayout
from p2o_jax.rl.losses import PolicyLossConfig
from p2o_jax.rl.optimizer import make_optimizer
from p2o_jax.rl.sequence_packing import Packer, attention_span, resolve_packing
from p2o_jax.rl.train_step import StepConfig, make_logprob_fn, make_train_step
from p2o_jax.sft import SFTConfig


def build_reward_pool(c: ml_collections.ConfigDict, functions: str | list[RewardEntry] | None = None) -> VerifierPool:
  """The verifier pool scoring with `functions` (a Python list or config string), else config.reward.functions."""
  try:
    resolved = resolve(reward_functions(c) if functions is None else functions)
  except RewardFunctionError as e:
    raise ConfigError(f"reward functions: {e}") from None
  return VerifierPool(num_workers=c.reward.num_workers, timeout_s=c.reward.timeout_s, fallback=c.reward.fallback,
                      functions=resolved)


def base_policy_spec(c: ml_collections.ConfigDict) -> BasePolicySpec:
  b = c.builtin
  sft = SFTConfig(steps=b.sft_steps, lr=b.sft_lr, rows=b.sft_rows, row_len=b.sft_row_len, seed=b.sft_seed)
  return BasePolicySpec(world=builtin_world(c), sft=sft, num_examples=b.sft_examples, num_layers=b.num_layers,
                        hidden_size=b.hidden_size)


def user_checkpoint(c: ml_collections.ConfigDict) -> pathlib.Path:
  """config.model.checkpoint as a HF directory (not "builtin"); ConfigError when it is not one."""
  path = pathlib.Path(c.model.checkpoint)
  if not (path / "config.json").is_file():
    raise ConfigError(f"config.model.checkpoint: {path} is not a Hugging Face checkpoint directory")
  return path


def policy_checkpoint(c: ml_collections.ConfigDict) -> pathlib.Path | None:
  """The policy's HF directory. For "builtin": the base shipped with the package when the config's `builtin` section
  is the demo's, else a cached build of it, else None (`build_builtin_base` makes it)."""
  if c.model.checkpoint != "builtin":
    return user_checkpoint(c)
  return find_base_policy(c.model.builtin_cache_dir, base_policy_spec(c))


def existing_policy_checkpoint(c: ml_collections.ConfigDict) -> pathlib.Path:
  """`policy_checkpoint`, or ConfigError when the built-in base it names was never built (commands that only read a
  policy never build one)."""
  path = policy_checkpoint(c)
  if path is None:
    raise ConfigError("config.model.checkpoint: the built-in base policy of this config's `builtin` settings is "
                      "neither shipped nor built yet; a training run builds it (python -m p2o_jax.main --config ...)")
  return path


def build_builtin_base(c: ml_collections.ConfigDict, *, rebuilding: bool) -> pathlib.Path:
  """Build the config's built-in base policy into model.builtin_cache_dir (minutes of SFT, announced)."""
  spec = base_policy_spec(c)
  why = ("--rebuild_base" if rebuilding else
         f"this config's base (fingerprint {spec.fingerprint()}) is not the shipped one and not cached yet")
  if rebuilding and shipped_base_matches(spec):
    why += "; the shipped base is left as it is"
  return build_cached_base_policy(c.model.builtin_cache_dir, spec, why)


def build_policy(c: ml_collections.ConfigDict, checkpoint: str | os.PathLike, mesh, *,
                 model: Decoder | None = None) -> Policy:
  """The policy of HF directory `checkpoint` (its weights, unless `model` brings others, and its tokenizer) on `mesh`,
  sampling prompts of up to rollout.max_prompt_len tokens; its reference (the same weights, frozen) samples Self-Ref
  reflections of up to p2o.reflection_max_prompt_len; every sampler call keeps its KV cache within
  rollout.kv_cache_gib per device and runs in at most rollout.slots slots (0: as many as fit). Chat templates with
  Qwen3's thinking switch get model.enable_thinking (Self-Ref reflection: p2o.thinking_in_reflection)."""
  if model is None:
    model = load_hf_model(checkpoint, mesh=mesh, **model_overrides(c, mesh))
  return Policy(model, load_tokenizer(checkpoint), mesh=mesh, max_prompt_len=c.rollout.max_prompt_len,
                reference_max_prompt_len=c.p2o.reflection_max_prompt_len, cache_budget_bytes=cache_budget_bytes(c),
                slots=c.rollout.slots, enable_thinking=c.model.enable_thinking,
                reflection_enable_thinking=c.p2o.thinking_in_reflection)


def cache_budget_bytes(c: ml_collections.ConfigDict) -> int:
  """rollout.kv_cache_gib in bytes: the KV cache one sampler call may take per device (0: no budget)."""
  return int(c.rollout.kv_cache_gib * 2**30)


def model_overrides(c: ml_collections.ConfigDict, mesh) -> dict[str, str]:
  """The config's numeric choices for the model (ModelConfig fields), "auto" attention and the decode's cache write
  resolved for the mesh's devices: what the dry run compiles for a TPU topology is what a TPU run executes."""
  m = c.model
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  return dict(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=m.remat,
              attention=resolve_attention(m.attention, platform),
              cache_write="blend" if platform == "tpu" else "scatter")


def abstract_params(model_cfg: ModelConfig, mesh) -> tuple[nnx.GraphDef, nnx.State]:
  """The model's graphdef and its params as ShapeDtypeStructs carrying the rules' shardings (nothing allocated)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(model_cfg, nnx.Rngs(0))))
  shardings = sharding.state_shardings(state, mesh)
  return graphdef, jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)),
                                state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_updates(c: ml_collections.ConfigDict, train_steps: int) -> int:
  """Optimizer updates in a run of `train_steps` steps (the schedule's length)."""
  return train_steps * c.grpo.ppo_epochs * c.grpo.num_minibatches


def build_optimizer(c: ml_collections.ConfigDict, train_steps: int) -> optax.GradientTransformation:
  o = c.optim
  return make_optimizer(lr=o.lr, total_steps=optimizer_updates(c, train_steps), warmup_ratio=o.warmup_ratio,
                        schedule=o.schedule, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
                        grad_clip=o.grad_clip or None)


def build_loss_config(c: ml_collections.ConfigDict) -> PolicyLossConfig:
  g = c.grpo
  return PolicyLossConfig(clip_low=g.clip_low, clip_high=g.clip_high, dual_clip=g.dual_clip or None,
                          aggregation=g.aggregation, max_response_len=c.rollout.max_new_tokens, kl_coef=g.kl_coef,
                          kl_estimator=g.kl_estimator)


def logprob_temperature(c: ml_collections.ConfigDict) -> float:
  """Log-probs are taken under logits / T of the rollouts (greedy rollouts: T = 1)."""
  return c.rollout.temperature or 1.0


def build_train_step(c: ml_collections.ConfigDict, graphdef, optimizer: optax.GradientTransformation, mesh):
  """The jitted train step, run under `mesh`."""
  step = make_train_step(graphdef, optimizer, StepConfig(build_loss_config(c), logprob_temperature(c)))
  return sharding.UnderMesh(step, mesh)


def build_logprob_fn(c: ml_collections.ConfigDict, graphdef, mesh):
  """The jitted log-prob pass, run under `mesh`."""
  return sharding.UnderMesh(make_logprob_fn(graphdef, logprob_temperature(c)), mesh)


def build_packer(c: ml_collections.ConfigDict, model_cfg: ModelConfig, mesh, pad_id: int) -> Packer:
  """The train rows' packing (grpo.packing resolved for the model's attention), one cell per micro-batch and batch
  device."""
  r = c.rollout
  return Packer(resolve_packing(c.grpo.packing, model_cfg.attention),
                rows_per_cell=c.grpo.micro_batch_size // sharding.batch_divisor(mesh),
                max_len=r.max_prompt_len + r.max_new_tokens, attention_span=attention_span(model_cfg), pad_id=pad_id)


def build_batch_layout(mesh) -> BatchLayout:
  return BatchLayout.for_mesh(mesh)
