"""Decode throughput of our jitted Sampler against transformers' `generate` (PyTorch eager, CPU) on the same model.

    python -m benchmarks.sampler_bench [--sizes demo,50m] [--repeats 3]

For every size, transformers writes one random Qwen2 checkpoint; both sides load it, sample the same prompts with
T=1, no top-k / top-p, and exactly `new_tokens` new tokens per row (the EOS id is one past the vocabulary, so it is
never drawn and no row stops early). Throughput is rows * new_tokens / wall time of one whole generate call (prefill
included), median over interleaved repeats. Ours is warmed up by one identical call (it compiles); transformers
(eager: nothing to compile) by a call with the same prompts and 2 new tokens, which keeps the run under 5 minutes.
Ours runs twice, interleaved with transformers: on one JAX device, and with the CPU split into the devices that
configs/demo_cpu.py asks for (`distributed.cpu_devices`) and the batch data-parallel over them, as the demo samples.
Prints a markdown table. On a busy machine, run with OMP_WAIT_POLICY=PASSIVE: PyTorch's default spinning OpenMP
threads otherwise make the transformers figure (and so the ratio) swing by up to 10x; the header says which was used.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sys
import tempfile
from collections.abc import Callable, Sequence

import numpy as np
import transformers

from benchmarks.common import (interleaved_timings, machine_note, markdown_table,
                               ModelSize, parse_cli, save_random_qwen2, use_all_torch_threads)
from p2o_jax.config import load_config_file
from p2o_jax.distributed import use_cpu_devices

DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.py"


@dataclasses.dataclass(frozen=True)
class Workload:
  batch: int
  prompt_len: int
  new_tokens: int
  target_ratio: float  # printed next to the measured ratio, not asserted


WORKLOADS = {
    "demo": Workload(batch=64, prompt_len=24, new_tokens=64, target_ratio=5.0),
    # Batch 32, not 64: at 64, transformers alone needs ~90 s per call on this 2-core machine.
    "50m": Workload(batch=32, prompt_len=32, new_tokens=64, target_ratio=2.0),
}


def random_prompts(vocab_size: int, work: Workload, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, vocab_size, (work.batch, work.prompt_len), dtype=np.int64)


def ours_generate(checkpoint_dir: str, prompts: np.ndarray, eos_id: int, data_parallel: bool) -> Callable[[int], None]:
  """f(new_tokens) = one Sampler.generate of all prompts (its outputs are host NumPy arrays, so it has finished);
  on one device, or with `data_parallel` the batch split over every device (the demo's mesh, data = -1)."""
  from p2o_jax import sharding
  from p2o_jax.models.hf_checkpoint import load_hf_model
  from p2o_jax.sampling import Sampler, SamplingConfig

  prompt_len = prompts.shape[1]
  mesh = sharding.make_mesh({"data": -1}) if data_parallel else None
  sampler = Sampler(load_hf_model(checkpoint_dir, mesh=mesh), eos_ids=[eos_id], pad_id=0, max_prompt_len=prompt_len,
                    prompt_buckets=[prompt_len], mesh=mesh)
  rows = prompts.tolist()

  def run(new_tokens: int) -> None:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    out = sampler.generate(rows, cfg, seed=0)
    _check_generated(int(out.lengths.min()), new_tokens, "ours")

  return run


def transformers_generate(checkpoint_dir: str, prompts: np.ndarray, eos_id: int) -> Callable[[int], None]:
  """f(new_tokens) = one `model.generate` of all prompts, sampling with the same settings as ours."""
  import torch

  model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()
  input_ids = torch.from_numpy(prompts)
  attention_mask = torch.ones_like(input_ids)

  def run(new_tokens: int) -> None:
    with torch.inference_mode():
      out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                           top_k=0, top_p=1.0, max_new_tokens=new_tokens, eos_token_id=eos_id, pad_token_id=0)
    _check_generated(out.shape[1] - input_ids.shape[1], new_tokens, "transformers")

  return run


def _check_generated(generated: int, expected: int, side: str) -> None:
  if generated != expected:
    raise RuntimeError(f"{side} generated {generated} tokens per row; the benchmark needs exactly {expected}")


def bench_size(size: ModelSize, work: Workload, repeats: int) -> list[list[object]]:
  """Measure one size; return its table rows, one per setup of ours."""
  import jax

  setups = {"1 device": False}
  if jax.device_count() > 1:
    setups[f"{jax.device_count()} CPU devices, data-parallel"] = True
  with tempfile.TemporaryDirectory(prefix=f"sampler_bench_{size.name}_") as checkpoint_dir:
    num_params = save_random_qwen2(size, checkpoint_dir)
    prompts = random_prompts(size.vocab_size, work)
    eos_id = size.vocab_size  # outside the vocabulary: never sampled
    ours = {setup: ours_generate(checkpoint_dir, prompts, eos_id, split) for setup, split in setups.items()}
    theirs = transformers_generate(checkpoint_dir, prompts, eos_id)
    for run in ours.values():
      run(work.new_tokens)
    theirs(2)
    runs = {setup: functools.partial(run, work.new_tokens) for setup, run in ours.items()}
    runs["transformers"] = functools.partial(theirs, work.new_tokens)
    timings = interleaved_timings(runs, repeats=repeats, warmup=0)
  for side, timing in timings.items():  # the spread shows how much other load on the machine moved the medians
    print(f"  {size.name} {side}: {', '.join(f'{t:.2f}' for t in timing.seconds)} s per call", file=sys.stderr)
  tokens = work.batch * work.new_tokens
  theirs_rate = tokens / timings.pop("transformers").median
  rows = []
  for setup, timing in timings.items():
    ours_rate = tokens / timing.median
    rows.append([size.name, f"{num_params:,}", work.batch, work.new_tokens, setup, f"{ours_rate:,.0f}",
                 f"{theirs_rate:,.0f}", f"{ours_rate / theirs_rate:.2f}x", f">= {work.target_ratio:g}x"])
  return rows


def main(argv: Sequence[str] | None = None) -> None:
  sizes, repeats = parse_cli(argv, __doc__.splitlines()[0], WORKLOADS,
                             "timed generate calls per side (median reported)")
  use_cpu_devices(load_config_file(DEMO_CONFIG).distributed.cpu_devices)  # before JAX starts
  threads = use_all_torch_threads()
  transformers.logging.disable_progress_bar()
  rows = []
  for size in sizes:
    print(f"measuring {size.name} ...", file=sys.stderr, flush=True)
    rows.extend(bench_size(size, WORKLOADS[size.name], repeats))
  headers = ["size", "params", "batch", "new tokens", "ours on", "ours tok/s", "transformers tok/s", "ratio", "target"]
  print(f"decode throughput, generated tokens/s (torch threads: {threads}; median of {repeats})")
  print(f"{machine_note()}\n")
  print(markdown_table(headers, rows))


if __name__ == "__main__":
  main()
