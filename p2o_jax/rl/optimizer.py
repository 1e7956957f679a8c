"""The policy optimizer: AdamW with linear warmup and cosine or constant decay, global-norm clipping, and a guard that
skips any update whose gradients are not finite (the step is counted, the run continues)."""

from __future__ import annotations

import optax

SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_ratio: float, schedule: str) -> optax.Schedule:
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: {SCHEDULES}")
  warmup = int(round(warmup_ratio * total_steps))
  ramp = optax.linear_schedule(0.0, peak_lr, max(warmup, 1))
  rest = (optax.cosine_decay_schedule(peak_lr, max(total_steps - warmup, 1)) if schedule == "cosine"
          else optax.constant_schedule(peak_lr))
  return optax.join_schedules([ramp, rest], [warmup]) if warmup else rest


def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float = 0.0, schedule: str = "constant",
                   weight_decay: float = 0.0, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   grad_clip: float | None = 1.0) -> optax.GradientTransformation:
  """AdamW (+ clipping) wrapped in `optax.apply_if_finite`, which leaves params untouched on a NaN/inf gradient."""
  lr_schedule = learning_rate_schedule(lr, total_steps, warmup_ratio, schedule)
  chain = [optax.clip_by_global_norm(grad_clip)] if grad_clip else []
  chain.append(optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.apply_if_finite(optax.chain(*chain), max_consecutive_errors=1_000_000)
