"""The jitted, sharded policy update: one optimizer step on a mini-batch, accumulated over micro-batches.

A mini-batch arrives as arrays shaped (micro_batches, micro_batch_size, ...). The loss denominator of the whole
mini-batch depends only on the masks, so it is computed first; each micro-batch then contributes
grad(loss_sum_i / denominator), and the accumulated gradient equals the full-batch gradient exactly. (With
aggregation "microbatch-token-mean" the denominator is the mini-batch's rows and loss_sum_i is micro-batch i's
token-mean times its rows: verl's per-micro-batch token-mean, deliberately a function of the micro-batching.) Params and
optimizer state are donated. Rows may carry per-token weights (P^2O's context ratio mask) and reference log-probs (KL).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from p2o_jax.models.decoder import Decoder, cast_floating
from p2o_jax.rl.logprobs import chunked_logprobs, response_hidden
from p2o_jax.rl.sequence_packing import MODEL_INPUTS
from p2o_jax.rl.losses import PolicyLossConfig, aggregate, policy_loss

# sequence_packing.MODEL_INPUTS, advantages, token_weights[, old_logp][, ref_logp]
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  loss: PolicyLossConfig
  temperature: float = 1.0  # the rollout temperature: log-probs are taken under logits / T
  logprob_chunk_size: int | None = None  # response positions per LM-head chunk (None: rl.logprobs' default)


def compute_model(graphdef, params) -> Decoder:
  """The model with its floating params cast to the compute dtype once, up front (f32 master weights, bf16 compute;
  gradients still reach the f32 params). With fsdp each layer's weights are then all-gathered in bf16: XLA keeps the
  gathered weights of every layer from the forward to the backward pass, and in f32 that was 15 GiB per chip for
  Qwen3-4B, more than a v4 chip could spare."""
  return nnx.merge(graphdef, cast_floating(params, nnx.merge(graphdef, params).cfg.dtype))


def _micro_loss(params, graphdef, micro: Batch, denominator, cfg: StepConfig):
  model = compute_model(graphdef, params)
  logp, entropy = chunked_logprobs(response_hidden(model, micro), model.unembedding(), micro["response_tokens"],
                                   cfg.temperature, chunk_size=cfg.logprob_chunk_size)
  # Without old log-probs (one on-policy update: grpo.old_logprobs "auto") the update's own are the old ones.
  old_logp = micro["old_logp"] if "old_logp" in micro else jax.lax.stop_gradient(logp)
  loss_sum, _, metrics = policy_loss(logp, old_logp, micro["advantages"], micro["response_mask"], cfg.loss,
                                     ref_logp_bt=micro.get("ref_logp"), token_weights_bt=micro["token_weights"])
  metrics["entropy_sum"] = jax.lax.stop_gradient(jnp.sum(jnp.where(micro["response_mask"], entropy, 0.0)))
  return loss_sum / denominator, metrics


def make_train_step(graphdef, optimizer: optax.GradientTransformation, cfg: StepConfig) -> Callable:
  """`step(params, opt_state, minibatch) -> (params, opt_state, metrics)`, jitted with params/opt_state donated."""
  grad_fn = jax.value_and_grad(_micro_loss, has_aux=True)

  def step(params, opt_state, minibatch: Batch):
    zeros = jnp.zeros(minibatch["response_mask"].shape, jnp.float32)
    flat_mask = minibatch["response_mask"].reshape(-1, zeros.shape[-1])
    _, denominator = aggregate(zeros.reshape(flat_mask.shape), flat_mask, cfg.loss.aggregation,
                               max_response_len=cfg.loss.max_response_len)
    denominator = jnp.maximum(denominator, 1.0)

    def accumulate(carry, micro):
      grads, sums = carry
      (loss_part, metrics), micro_grads = grad_fn(params, graphdef, micro, denominator, cfg)
      sums = jax.tree.map(jnp.add, sums, {**metrics, "loss": loss_part})
      return (jax.tree.map(jnp.add, grads, micro_grads), sums), None

    first = jax.tree.map(lambda x: x[0], minibatch)
    metric_shapes = jax.eval_shape(lambda: _micro_loss(params, graphdef, first, denominator, cfg)[1])
    zero_sums = {k: jnp.zeros((), jnp.float32) for k in [*metric_shapes, "loss"]}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    (grads, sums), _ = jax.lax.scan(accumulate, (zero_grads, zero_sums), minibatch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, _step_metrics(sums, denominator, grads, opt_state)

  return jax.jit(step, donate_argnums=(0, 1))


def _step_metrics(sums, denominator, grads, opt_state) -> dict[str, jax.Array]:
  tokens = jnp.maximum(sums["token_count"], 1.0)
  metrics = {
      "loss": sums["loss"],
      "grad_norm": optax.global_norm(grads),
      "clip_fraction": sums["clipped_token_count"] / tokens,
      "ratio_mean": sums["ratio_sum"] / tokens,
      "entropy": sums["entropy_sum"] / tokens,
      "update_skipped": 1.0 - opt_state.last_finite.astype(jnp.float32),
      "loss_denominator": denominator,
  }
  if "kl_sum" in sums:
    metrics["kl"] = sums["kl_sum"] / tokens
  return metrics


def make_logprob_fn(graphdef, temperature: float, *, chunk_size: int | None = None) -> Callable:
  """`logprobs(params, batch) -> (micro_batches, micro_batch_size, R)` for old-policy or reference log-probs, the LM
  head applied `chunk_size` response positions at a time (no entropy: nothing here logs it)."""

  def logprobs(params, batch: Batch):
    model = compute_model(graphdef, params)

    def one(micro):
      return chunked_logprobs(response_hidden(model, micro), model.unembedding(), micro["response_tokens"],
                              temperature, chunk_size=chunk_size, entropy=False)[0]

    return jax.lax.map(one, {k: batch[k] for k in MODEL_INPUTS})

  return jax.jit(logprobs)
