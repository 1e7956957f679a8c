"""Supervised fine-tuning on (prompt, completion) text pairs: how the built-in policy gets its "pre-trained" abilities.

Examples are packed several to a row; per-example segments (attention stays within one) and positions keep them independent,
exactly as if each had its own row. The loss is the mean cross-entropy over completion tokens (and the EOS after them).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from p2o_jax.metrics import Progress
from p2o_jax.models.decoder import Decoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  steps: int = 1000
  max_seconds: float = 0.0  # > 0: stop early once this much wall time has passed
  rows: int = 16
  row_len: int = 256
  lr: float = 2e-3
  warmup_steps: int = 50
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  seed: int = 0


def tokenize_examples(tokenizer, examples: Sequence[tuple[str, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
  """(token ids, loss mask) per example: prompt tokens are context only; completion tokens and the EOS are targets."""
  out = []
  for prompt, completion in examples:
    p = tokenizer.encode(prompt, add_special_tokens=False)
    t = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    out.append((np.asarray(p + t, np.int32), np.asarray([0] * len(p) + [1] * len(t), bool)))
  return out


def pack_examples(examples: Sequence[tuple[np.ndarray, np.ndarray]], rows: int, row_len: int,
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Fill `rows` rows of `row_len` tokens with randomly drawn whole examples (segment ids 1.., 0 = padding)."""
  tokens = np.zeros((rows, row_len), np.int32)
  loss_mask = np.zeros((rows, row_len), bool)
  segments = np.zeros((rows, row_len), np.int32)
  for r in range(rows):
    pos, seg = 0, 1
    while True:
      ids, mask = examples[rng.integers(len(examples))]
      if len(ids) > row_len:
        raise ValueError(f"an SFT example has {len(ids)} tokens; rows hold {row_len}")
      if pos + len(ids) > row_len:
        break
      tokens[r, pos:pos + len(ids)], loss_mask[r, pos:pos + len(ids)] = ids, mask
      segments[r, pos:pos + len(ids)] = seg
      pos, seg = pos + len(ids), seg + 1
  return {"tokens": tokens, "loss_mask": loss_mask, "segments": segments}


def packed_positions(segments_bt: jax.Array) -> jax.Array:
  """Positions that restart at 0 for every segment (the decoder keeps attention within each segment)."""
  t = segments_bt.shape[1]
  starts = jnp.concatenate([jnp.ones_like(segments_bt[:, :1], bool), segments_bt[:, 1:] != segments_bt[:, :-1]], 1)
  index = jnp.arange(t)[None, :]
  last_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
  return index - last_start


def sft_loss(model: Decoder, batch: dict[str, jax.Array]) -> jax.Array:
  positions = packed_positions(batch["segments"])
  logits, _ = model(batch["tokens"][:, :-1], positions[:, :-1], batch["segments"][:, :-1])
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
  # Target t+1 counts only when it is a completion token of the same example as position t.
  weight = batch["loss_mask"][:, 1:] & (batch["segments"][:, 1:] == batch["segments"][:, :-1])
  return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1)


def make_sft_optimizer(cfg: SFTConfig) -> optax.GradientTransformation:
  schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
                                                end_value=cfg.lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip),
                     optax.adamw(schedule, weight_decay=cfg.weight_decay))


def train_sft(model: Decoder, tokenizer, examples: Sequence[tuple[str, str]], cfg: SFTConfig, *,
              show_progress: bool = False) -> dict[str, float]:
  """Train `model` in place on (prompt, completion) texts; returns {"steps", "seconds", "final_loss"}."""
  return train_sft_ids(model, tokenize_examples(tokenizer, examples), cfg, show_progress=show_progress)


def train_sft_ids(model: Decoder, data: Sequence[tuple[np.ndarray, np.ndarray]], cfg: SFTConfig, *,
                  show_progress: bool = False) -> dict[str, float]:
  """Train `model` in place on tokenized (ids, loss mask) examples; returns {"steps", "seconds", "final_loss"}."""
  optimizer = make_sft_optimizer(cfg)
  graphdef, params = nnx.split(model)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda p: sft_loss(nnx.merge(graphdef, p), batch))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(cfg.seed)
  progress = Progress(cfg.steps, desc="sft", enabled=show_progress)
  start, done = time.perf_counter(), 0
  for done in range(1, cfg.steps + 1):
    params, opt_state, loss = step(params, opt_state, pack_examples(data, cfg.rows, cfg.row_len, rng))
    if done % 50 == 0 or done == cfg.steps:
      progress.update(done, loss=f"{float(loss):.4f}")
    if cfg.max_seconds and time.perf_counter() - start > cfg.max_seconds:
      log.info("sft stopped at step %d: max_seconds %.0f reached", done, cfg.max_seconds)
      break
  progress.close()
  nnx.update(model, params)
  return {"steps": done, "seconds": time.perf_counter() - start, "final_loss": float(loss)}
