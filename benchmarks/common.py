"""Shared pieces of the benchmarks against transformers: random HF Qwen2 checkpoints, interleaved timing, tables.

Both sides of a benchmark load the same HF directory written here by transformers itself, so a comparison also
exercises our checkpoint loader. Timings interleave the contenders (a, b, a, b, ...) so that load from other processes
on the machine falls on both alike.
"""

from __future__ import annotations

import argparse

import dataclasses
import os
import pathlib
import statistics
import time
from collections.abc import Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """The architecture of one benchmarked Qwen2 model."""

  name: str
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  vocab_size: int
  tie_word_embeddings: bool

  def hf_config_kwargs(self) -> dict:
    return dict(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                intermediate_size=self.intermediate_size, vocab_size=self.vocab_size,
                tie_word_embeddings=self.tie_word_embeddings)


# "demo" is the built-in policy's shape (p2o_jax.models.builtin); "50m" is a small real-vocabulary model.
MODEL_SIZES: dict[str, ModelSize] = {
    "demo": ModelSize("demo", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                      vocab_size=100, tie_word_embeddings=True),
    "50m": ModelSize("50m", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                     vocab_size=32000, tie_word_embeddings=False),
}


def parse_sizes(names: str) -> list[ModelSize]:
  """'demo,50m' -> the named sizes, in that order."""
  chosen = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in chosen if n not in MODEL_SIZES]
  if unknown or not chosen:
    raise ValueError(f"unknown or no model sizes {unknown or names!r}; known: {sorted(MODEL_SIZES)}")
  return [MODEL_SIZES[n] for n in chosen]


def save_random_qwen2(size: ModelSize, out_dir: str | os.PathLike, *, seed: int = 0) -> int:
  """Write a randomly initialized transformers Qwen2ForCausalLM (float32) to `out_dir`; return its parameter count."""
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.Qwen2Config(**size.hf_config_kwargs(), max_position_embeddings=4096,
                                    use_sliding_window=False, torch_dtype="float32")
  model = transformers.Qwen2ForCausalLM(config).eval()
  model.save_pretrained(pathlib.Path(out_dir))
  return sum(p.numel() for p in model.parameters())


def use_all_torch_threads() -> int:
  """Let PyTorch use every core, as XLA on CPU does by default; return the thread count."""
  import torch

  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  return threads


def machine_note() -> str:
  """One line on what skews CPU timings: other load, and PyTorch's OpenMP wait policy.

  With the default (active, spinning) policy, torch's threads lose their time slices to any other busy process and
  transformers can run 10x slower than with OMP_WAIT_POLICY=PASSIVE (which must be set before torch starts).
  """
  load = os.getloadavg()[0]
  policy = os.environ.get("OMP_WAIT_POLICY", "unset (active spinning)")
  return f"cores: {os.cpu_count()}, load average (1 min): {load:.1f}, OMP_WAIT_POLICY: {policy}"


@dataclasses.dataclass(frozen=True)
class Timing:
  seconds: tuple[float, ...]

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)


def interleaved_timings(runs: Mapping[str, Callable[[], object]], *, repeats: int,
                        warmup: int = 1) -> dict[str, Timing]:
  """Wall time of every run, `warmup` untimed rounds then `repeats` timed ones, alternating runs within each round.

  Each callable must block until its work is done (e.g. end in np.asarray / jax.block_until_ready).
  """
  if repeats < 1:
    raise ValueError(f"repeats={repeats} must be >= 1")
  for _ in range(warmup):
    for run in runs.values():
      run()
  seconds: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      seconds[name].append(time.perf_counter() - start)
  return {name: Timing(tuple(s)) for name, s in seconds.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """A GitHub-markdown table; cells are str()-ed."""
  cells = [[str(c) for c in row] for row in rows]
  for i, row in enumerate(cells):
    if len(row) != len(headers):
      raise ValueError(f"row {i} has {len(row)} cells; the table has {len(headers)} columns")
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def parse_cli(argv, description: str, workloads, repeats_help: str) -> tuple[list, int]:
  """(sizes, repeats) from `--sizes a,b --repeats N`, with one-line argparse errors for bad values."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--sizes", default="demo,50m", help="comma-separated, from: " + ", ".join(workloads))
  parser.add_argument("--repeats", type=int, default=3, help=repeats_help)
  args = parser.parse_args(argv)
  try:
    sizes = parse_sizes(args.sizes)
  except ValueError as e:
    parser.error(str(e))
  if args.repeats < 1:
    parser.error(f"--repeats={args.repeats} must be >= 1")
  return sizes, args.repeats
