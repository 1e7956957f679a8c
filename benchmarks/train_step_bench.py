"""Throughput of one GRPO optimizer step: our jitted train step against the same step in PyTorch eager (transformers).

    python -m benchmarks.train_step_bench [--sizes demo,50m] [--repeats 3]

For every size, transformers writes one random Qwen2 checkpoint and both sides load it. Both take the same random
mini-batch (left-padded prompts, right-padded responses, GRPO advantages, noisy old log-probs, a 0/1 context ratio
mask), split into the same micro-batches (torch pads them, as transformers and TRL do; ours packs each micro-batch
without padding, as our trainer does: rl/sequence_packing.py), and do the same step: response-token log-probs under logits / T, PPO-clip
with dual clip, token-mean over the whole mini-batch, gradients accumulated over micro-batches, global-norm clipping
at 1.0, one AdamW update; the (gradient-free) token entropy metric is computed on both sides too. Before timing, the
first step of each side runs on the same initial params and the two losses and gradient norms are printed side by side.

Throughput is padded (prompt + response) token positions per second, the same count for both: rows * (P + R) / step
time, so ours is credited with the padding it no longer computes; median over interleaved
repeats (ours compiled beforehand; torch warmed up by that first step). MFU divides model FLOPs per step by the step
time and by this CPU's float32 matmul peak, measured in the same run. On a busy machine, run with OMP_WAIT_POLICY=PASSIVE
(see benchmarks.common.machine_note).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from benchmarks.common import (interleaved_timings, machine_note, markdown_table,
                               ModelSize, parse_cli, save_random_qwen2, use_all_torch_threads)
from p2o_jax.rl.losses import LOG_RATIO_LIMIT, PolicyLossConfig

LEARNING_RATE = 1e-6  # small: the timed steps barely move the policy, so the clip pattern stays like a real step's
GRAD_CLIP = 1.0  # make_optimizer's default
TEMPERATURE = 1.0
TARGET_RATIO = 1.5
TARGET_MFU = 0.35  # at 50m

Batch = dict[str, np.ndarray]  # rows first: tokens, valid, response_mask, advantages, old_logp, token_weights


@dataclasses.dataclass(frozen=True)
class Workload:
  """One mini-batch: micro_batches x micro_batch_size rows of prompt_len + response_len tokens."""

  micro_batches: int
  micro_batch_size: int
  prompt_len: int
  response_len: int

  @property
  def rows(self) -> int:
    return self.micro_batches * self.micro_batch_size

  @property
  def tokens(self) -> int:
    return self.rows * (self.prompt_len + self.response_len)


WORKLOADS = {
    "demo": Workload(micro_batches=2, micro_batch_size=16, prompt_len=64, response_len=192),
    "50m": Workload(micro_batches=2, micro_batch_size=4, prompt_len=64, response_len=192),
}


# ---- the batch ------------------------------------------------------------------------------------------------------

def random_rows(vocab_size: int, work: Workload, seed: int = 0) -> Batch:
  """Packed rows as `pack_rows` builds them, with random lengths (one row at full length), advantages and weights."""
  rng = np.random.default_rng(seed)
  p, r, rows = work.prompt_len, work.response_len, work.rows
  prompt_lens = rng.integers(p // 2, p + 1, rows)
  response_lens = rng.integers(r // 4, r + 1, rows)
  prompt_lens[0], response_lens[0] = p, r
  positions = np.arange(p + r)[None]
  valid = (positions >= p - prompt_lens[:, None]) & (positions < p + response_lens[:, None])
  tokens = np.where(valid, rng.integers(0, vocab_size, valid.shape), 0).astype(np.int32)
  return {
      "tokens": tokens,
      "valid": valid,
      "response_mask": valid[:, p:].copy(),
      "advantages": rng.standard_normal(rows).astype(np.float32),
      "token_weights": (rng.random((rows, r)) < 0.9).astype(np.float32),  # P^2O's hard context ratio mask
  }


def with_old_logprobs(rows: Batch, current_logp: np.ndarray, seed: int = 1) -> Batch:
  """Old log-probs = the current ones plus noise, so ratios spread around 1 and both clips (and dual clip) engage."""
  noise = 0.3 * np.random.default_rng(seed).standard_normal(current_logp.shape)
  return {**rows, "old_logp": (current_logp + noise).astype(np.float32)}


def as_micro_batches(rows: Batch, work: Workload) -> Batch:
  """(rows, ...) -> (micro_batches, micro_batch_size, ...), the layout the trainer hands the train step: the padded
  rows packed without their padding (p2o_jax/rl/sequence_packing.py, "sequences": the prompts here are not shared)."""
  from p2o_jax.rl.sequence_packing import pack_sequences, packed_shape

  p = work.prompt_len
  prompts = [t[:p][v[:p]].tolist() for t, v in zip(rows["tokens"], rows["valid"])]
  responses, mask = rows["tokens"][:, p:], rows["response_mask"]
  shape = packed_shape(prompts, mask, work.micro_batch_size, p + work.response_len, "sequences", attention_span=1e9)
  batch = {**pack_sequences(prompts, responses, mask, 0, work.micro_batch_size, shape, "sequences"),
           **{k: v for k, v in rows.items() if k not in ("tokens", "valid", "response_mask")}}
  return {k: v.reshape(work.micro_batches, -1, *v.shape[1:]) for k, v in batch.items()}


# ---- ours -------------------------------------------------------------------------------------------------------------

def load_ours(checkpoint_dir: str):
  """(graphdef, params) of our decoder loaded from the HF directory."""
  from flax import nnx

  from p2o_jax.models.hf_checkpoint import load_hf_model

  return nnx.split(load_hf_model(checkpoint_dir))


def current_logprobs(graphdef, params, rows: Batch, work: Workload) -> np.ndarray:
  """(rows, R) log-probs of the response tokens under `params`, from our old-policy log-prob program."""
  from p2o_jax.rl.train_step import make_logprob_fn

  micro = jax.device_put(as_micro_batches(rows, work))
  return np.asarray(make_logprob_fn(graphdef, TEMPERATURE)(params, micro)).reshape(work.rows, -1)


def ours_train_step(graphdef, params, rows: Batch, work: Workload) -> Callable[[], dict]:
  """run() = one train step on the mini-batch, params/opt_state donated and fed back; returns host metrics."""
  from p2o_jax.rl.optimizer import make_optimizer
  from p2o_jax.rl.train_step import StepConfig, make_train_step

  optimizer = make_optimizer(lr=LEARNING_RATE, total_steps=1000, grad_clip=GRAD_CLIP)
  step = make_train_step(graphdef, optimizer, StepConfig(PolicyLossConfig(), temperature=TEMPERATURE))
  minibatch = jax.device_put(as_micro_batches(rows, work))
  # Under the params' mesh, the optimizer's scalar counters come out on that mesh, as the step returns them; made
  # without it they carry a mesh-less sharding and the second step would compile the whole program again.
  with jax.set_mesh(jax.tree.leaves(params)[0].sharding.mesh):
    state = [params, jax.jit(optimizer.init)(params)]

  def run() -> dict:
    state[0], state[1], metrics = step(state[0], state[1], minibatch)
    jax.block_until_ready(state)
    return jax.device_get(metrics)

  return run


# ---- the peer: transformers + torch.optim.AdamW -------------------------------------------------------------------

def torch_ppo_clip_sum(logp, old_logp, advantages, mask, weights, cfg: PolicyLossConfig):
  """Sum over valid response tokens of the weighted PPO-clip (dual-clip) loss, written independently in torch."""
  import torch

  ratio = torch.exp(torch.clamp(logp - old_logp, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
  adv = advantages[:, None]
  loss = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high))
  if cfg.dual_clip is not None:
    loss = torch.where((adv < 0) & (loss > -adv * cfg.dual_clip), -adv * cfg.dual_clip, loss)
  return torch.where(mask, loss * weights, torch.zeros_like(loss)).sum()


def torch_train_step(checkpoint_dir: str, rows: Batch, work: Workload) -> Callable[[], dict]:
  """run() = one eager step on the same micro-batches: backward per micro-batch, clip, AdamW; returns metrics."""
  import torch

  model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
  cfg = PolicyLossConfig()
  tensors = {k: torch.from_numpy(v) for k, v in rows.items()}
  tensors["tokens"] = tensors["tokens"].long()
  denominator = max(float(rows["response_mask"].sum()), 1.0)
  p = work.prompt_len

  def micro_loss(sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
    m = {k: v[sl] for k, v in tensors.items()}
    positions = torch.clamp(torch.cumsum(m["valid"].long(), dim=1) - 1, min=0)
    hidden = model.model(input_ids=m["tokens"], attention_mask=m["valid"].long(), position_ids=positions,
                         use_cache=False).last_hidden_state
    logp_full = torch.log_softmax(model.lm_head(hidden[:, p - 1:-1]) / TEMPERATURE, dim=-1)
    logp = torch.gather(logp_full, -1, m["tokens"][:, p:, None])[..., 0]
    loss_sum = torch_ppo_clip_sum(logp, m["old_logp"], m["advantages"], m["response_mask"], m["token_weights"], cfg)
    with torch.no_grad():  # the entropy metric our step also reports
      entropy = -(logp_full.exp() * logp_full).sum(-1)
      entropy_sum = torch.where(m["response_mask"], entropy, torch.zeros_like(entropy)).sum()
    return loss_sum / denominator, entropy_sum

  def run() -> dict:
    optimizer.zero_grad(set_to_none=True)
    loss = 0.0
    for i in range(work.micro_batches):
      part, _ = micro_loss(slice(i * work.micro_batch_size, (i + 1) * work.micro_batch_size))
      part.backward()
      loss += float(part.detach())
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP))
    optimizer.step()
    return {"loss": loss, "grad_norm": grad_norm}

  return run


# ---- FLOPs and the machine's peak -----------------------------------------------------------------------------------

def step_flops(size: ModelSize, num_params: int, work: Workload) -> float:
  """Model FLOPs of one step (forward + backward = 3x forward), counting matmuls only.

  6 * (params - embedding - untied head) * rows * (P + R)   every layer weight, at every position
  + 6 * hidden * vocab * rows * R                              the LM head, at the R response positions only
  + 12 * layers * hidden * rows * (P + R)^2                   QK^T and PV (2 * 2 * T^2 * hidden forward), unmasked:
                                                                neither side skips the causal half
  The embedding lookup is a gather, not a matmul, so its parameters do not count.
  """
  head = size.hidden_size * size.vocab_size
  body = num_params - head * (1 if size.tie_word_embeddings else 2)
  seq = work.prompt_len + work.response_len
  return (6.0 * body * work.rows * seq + 6.0 * head * work.rows * work.response_len
          + 12.0 * size.num_layers * size.hidden_size * work.rows * seq ** 2)


def matmul_peak_flops(n: int = 2048, tries: int = 7) -> float:
  """Best-of-`tries` float32 FLOP/s of one jitted n x n matmul on this CPU."""
  a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = math.inf
  for _ in range(tries):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


# ---- the run --------------------------------------------------------------------------------------------------------

def bench_size(size: ModelSize, work: Workload, repeats: int) -> list[object]:
  """Measure one size; print the loss check; return its table row."""
  with tempfile.TemporaryDirectory(prefix=f"train_step_bench_{size.name}_") as checkpoint_dir:
    save_random_qwen2(size, checkpoint_dir)
    graphdef, params = load_ours(checkpoint_dir)
    num_params = sum(x.size for x in jax.tree.leaves(params))
    rows = random_rows(size.vocab_size, work)
    rows = with_old_logprobs(rows, current_logprobs(graphdef, params, rows, work))
    ours = ours_train_step(graphdef, params, rows, work)
    theirs = torch_train_step(checkpoint_dir, rows, work)
    first_ours, first_theirs = ours(), theirs()  # same initial params: ours compiles, torch warms up
    print(f"{size.name} first step on equal params: loss ours {first_ours['loss']:.6f} torch {first_theirs['loss']:.6f}"
          f" (|diff| {abs(first_ours['loss'] - first_theirs['loss']):.1e}); grad norm ours"
          f" {first_ours['grad_norm']:.6f} torch {first_theirs['grad_norm']:.6f}")
    # The peak brackets the timed steps rather than being taken once per run: other load on the machine can halve
    # it within a minute, and the better of the two is closer to what the CPU can do.
    peak = matmul_peak_flops()
    timings = interleaved_timings({"ours": ours, "torch": theirs}, repeats=repeats, warmup=0)
    peak = max(peak, matmul_peak_flops())
  for side, timing in timings.items():  # the spread shows how much other load on the machine moved the medians
    print(f"  {size.name} {side}: {', '.join(f'{t:.2f}' for t in timing.seconds)} s per step", file=sys.stderr)
  ours_rate, theirs_rate = work.tokens / timings["ours"].median, work.tokens / timings["torch"].median
  mfu = step_flops(size, num_params, work) / timings["ours"].median / peak
  return [size.name, f"{num_params:,}", work.tokens, f"{ours_rate:,.0f}", f"{theirs_rate:,.0f}",
          f"{ours_rate / theirs_rate:.2f}x", f"{100 * mfu:.1f}%", f"{peak / 1e9:.1f}"]


def main(argv: Sequence[str] | None = None) -> None:
  sizes, repeats = parse_cli(argv, __doc__.splitlines()[0], WORKLOADS, "timed steps per side (median reported)")
  threads = use_all_torch_threads()
  transformers.logging.disable_progress_bar()
  table = []
  for size in sizes:
    print(f"measuring {size.name} ...", file=sys.stderr, flush=True)
    table.append(bench_size(size, WORKLOADS[size.name], repeats))
  headers = ["size", "params", "tokens/step", "ours tok/s", "torch tok/s", "ratio", "ours MFU", "peak GFLOP/s"]
  print(f"\nGRPO train step (fwd + bwd + AdamW) throughput, (prompt + response) token positions per second"
        f" (torch threads: {threads}; median of {repeats})")
  print(f"{machine_note()}\n")
  print(markdown_table(headers, table))
  print("\nMFU = model FLOPs per step (see step_flops) / median step time / peak; peak = float32 FLOP/s of a jitted"
        " 2048x2048 matmul, best of 7 just before and 7 just after each size's timed steps")
  print(f"\ntargets (not asserted): ratio >= {TARGET_RATIO}x, ours MFU >= {100 * TARGET_MFU:.0f}% at 50m")


if __name__ == "__main__":
  main()
