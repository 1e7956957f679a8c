"""Generation time of the continuous-batching Sampler against the pre-engine sampler and transformers' `generate`.

    python -m benchmarks.generation_bench [--sizes demo,50m] [--repeats 1]

For every size, transformers writes one random Qwen2 checkpoint; our Sampler ("new", p2o_jax.sampling) and the
pre-engine one ("legacy", benchmarks.legacy_sampler) share one load of it, transformers loads it itself. Everything
samples at T=1, no top-k / top-p, on one JAX device (no mesh). Our EOS id is one past the vocabulary, so the random
model never stops a row on its own: every row's length is imposed, the same on every engine, and every engine is
credited with the same useful tokens, sum(row lengths). Figures are medians over interleaved repeats (one by default:
the whole bench took 18 minutes on 2 cores shared with other jobs (load ~3.5), 6 of them warm-ups; each extra repeat
adds ~12); each side is warmed up first, so no compilation is timed: new by an identical call (which programs it
compiles depends on the row lengths), legacy by a call of identical shapes that decodes one step, transformers (eager)
by a 2-token call.

Legacy cannot take per-row limits and decodes until its longest row emits EOS, every step attending over the whole
prompt + max_new_tokens cache. A random model emits no EOS, so a plain legacy call would run all max_new_tokens steps;
instead the bench enters legacy's own decode loop at step max_new_tokens - max(L) + 1 (`legacy_generate`), so it runs
exactly the steps it runs when the longest row stops at max(L) (the prefill's token, then max(L) - 1 decode steps),
each over the whole cache (the skipped slots are masked, as unfilled ones always are): the time of the real call on a
model that emits EOS.

(a) Length scaling: 16 rows, fixed 32-token prompts, per-row lengths L drawn once uniform in [128, 256] (imposed with
    row_max_new_tokens), at max_new_tokens (the allocation) 256, 1024 and 4096. Per generated token = time / sum(L),
    for new and legacy; legacy also per step (time / max(L), one token per row per step). Target: new
    t(4096) / t(256) <= 1.5. Also informational, at demo only (4096 sequential 50m steps, warm-up and timing, would
    take minutes): new with 4 rows run to the allocation (no per-row limits), one timed call each, per generated
    token: what attention over a longer filled cache costs.
(b) Uneven workload: 256 prompts of random ids, lengths uniform in [16, 64]; response lengths lognormal with median
    limit / 16 and sigma 1.5, rounded and clipped to [4, limit]: most rows are short, ~3% hit the limit. Throughput =
    sum(L) / wall time for new (row_max_new_tokens = L; slots = all rows, and 64), legacy (one call, max_new_tokens =
    limit: every row decodes until the longest stops), and transformers `generate` in one batch of 256 with a
    LogitsProcessor that forbids its EOS before a row's length and forces it as the row's L-th token (transformers
    needs an in-vocabulary EOS: the last id; finished rows stay in the batch until all finish). Targets: new >= 3x
    legacy and >= 5x transformers.
    Limits: 512 at demo, 256 at 50m, half of 1024 / 512: there, on 2 cores, legacy's batch of 256 takes ~0.33 s per
    step at demo (a 1088-slot cache) and ~1.6 s at 50m (576 slots): 6 and 13 minutes for one call, against a
    ~15-minute budget for the whole bench. Shorter still (256 / 128), the prefill of the 256 prompts (~10 s at 50m,
    on every engine) was half of the new engine's time.
On a busy machine, run with OMP_WAIT_POLICY=PASSIVE (see benchmarks.common.machine_note).
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from benchmarks import legacy_sampler as legacy
from benchmarks.common import (interleaved_timings, machine_note, markdown_table,
                               ModelSize, parse_cli, save_random_qwen2, use_all_torch_threads)

TEMPERATURE = 1.0
SCALING_TARGET = 1.5  # new engine: t(largest allocation) / t(smallest) per generated token, at most
LEGACY_TARGET = 3.0  # part (b): new throughput / legacy, at least
TRANSFORMERS_TARGET = 5.0  # part (b): new throughput / transformers, at least


@dataclasses.dataclass(frozen=True)
class Scaling:
  """Part (a)."""

  rows: int = 16
  prompt_len: int = 32
  min_len: int = 128
  max_len: int = 256
  allocations: tuple[int, ...] = (256, 1024, 4096)
  full_rows: int = 4  # informational rows run to the allocation
  full_allocations: tuple[int, ...] = (256, 1024, 4096)  # () for none


@dataclasses.dataclass(frozen=True)
class Uneven:
  """Part (b)."""

  prompts: int = 256
  min_prompt: int = 16
  max_prompt: int = 64
  limit: int = 512
  median_fraction: float = 1 / 16
  sigma: float = 1.5
  min_len: int = 4
  slots: tuple[int, ...] = (0, 64)  # 0: all rows


@dataclasses.dataclass(frozen=True)
class Workload:
  scaling: Scaling
  uneven: Uneven


WORKLOADS = {
    "demo": Workload(Scaling(), Uneven(limit=512)),
    # Rows run to the allocation at 50m: ~50 s per 1024 sequential steps, twice (warm-up and timing).
    "50m": Workload(Scaling(full_allocations=()), Uneven(limit=256)),
}


def sampling_config(module, max_new_tokens: int):
  return module.SamplingConfig(max_new_tokens=max_new_tokens, temperature=TEMPERATURE, top_p=1.0, top_k=0)


def random_prompts(vocab_size: int, lengths: Sequence[int], seed: int) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab_size, n).tolist() for n in lengths]


def long_tailed_lengths(work: Uneven, seed: int = 1) -> np.ndarray:
  """Response lengths: lognormal(median limit * median_fraction, sigma), rounded, clipped to [min_len, limit]."""
  draws = np.random.default_rng(seed).lognormal(np.log(work.limit * work.median_fraction), work.sigma, work.prompts)
  return np.clip(np.rint(draws), work.min_len, work.limit).astype(np.int64)


def describe_lengths(lengths: np.ndarray, limit: int) -> str:
  q = np.percentile(lengths, [10, 25, 50, 75, 90, 99]).round().astype(int)
  return (f"p10 {q[0]}, p25 {q[1]}, median {q[2]}, p75 {q[3]}, p90 {q[4]}, p99 {q[5]}, max {lengths.max()}, "
          f"mean {lengths.mean():.1f}; at the limit {limit}: {np.mean(lengths == limit):.1%} "
          f"({int(np.sum(lengths == limit))} rows); sum {int(lengths.sum()):,}")


def new_engine_ready() -> bool:
  """Whether p2o_jax.sampling already has the continuous-batching API (it is being rewritten)."""
  from p2o_jax import sampling

  return ("slots" in inspect.signature(sampling.Sampler).parameters
          and "row_max_new_tokens" in inspect.signature(sampling.Sampler.generate).parameters)


def new_generate(model, eos_id: int, max_prompt_len: int, slots: int) -> Callable[..., None]:
  """f(prompts, allocation, lengths or None, seed) = one new Sampler.generate; checks every row's length."""
  from p2o_jax import sampling

  sampler = sampling.Sampler(model, eos_ids=[eos_id], pad_id=0, max_prompt_len=max_prompt_len, slots=slots)

  def run(prompts, allocation: int, lengths: Sequence[int] | None, seed: int = 0) -> None:
    limits = None if lengths is None else [int(n) for n in lengths]
    out = sampler.generate(prompts, sampling_config(sampling, allocation), seed=seed, row_max_new_tokens=limits)
    expected = np.full(len(prompts), allocation) if lengths is None else np.asarray(lengths)
    _check_lengths(np.asarray(out.lengths), expected, "new")
    if out.tokens.shape != (len(prompts), allocation):
      raise RuntimeError(f"new returned tokens of shape {out.tokens.shape}, not {(len(prompts), allocation)}")

  return run


def legacy_generate(sampler: legacy.Sampler, prompts: Sequence[Sequence[int]], allocation: int, stop_after: int,
                    seed: int = 0) -> None:
  """One legacy call of `allocation` new-token slots that stops after `stop_after` tokens, as it does when its
  longest row emits EOS as token `stop_after` (see the module docstring): its own prefill and decode programs, the
  decode loop entered at step allocation - stop_after + 1."""
  length = legacy.round_up_to_bucket(max(map(len, prompts)), sampler.prompt_buckets)
  batch = sampler._batch_size(len(prompts), sys.maxsize)
  tokens, valid, live = sampler._pad_prompts(prompts, length, batch)
  mode = legacy._Mode(allocation, greedy=False, top_k=0, use_top_p=False, eos_ids=sampler.eos_ids,
                      pad_id=sampler.pad_id)
  temperature, top_p = jnp.float32(TEMPERATURE), jnp.float32(1.0)
  carry = legacy._prefill(sampler.graphdef, sampler.state, jnp.asarray(tokens), jnp.asarray(valid),
                          jnp.asarray(live), jax.random.key(seed), temperature, top_p, mode=mode)
  carry["step"] = jnp.asarray(allocation - stop_after + 1, jnp.int32)
  carry = legacy._decode(sampler.graphdef, sampler.state, carry, temperature, top_p, mode=mode)
  written = np.any(np.asarray(carry["logprobs"])[:len(prompts)] != 0, axis=0)  # a drawn token's log-prob is < 0
  if int(written.sum()) != stop_after:
    raise RuntimeError(f"legacy wrote {int(written.sum())} tokens per row; the benchmark needs {stop_after}")


class ForcedLengths(transformers.LogitsProcessor):
  """Row i draws `eos_id` as its lengths[i]-th new token and never before: transformers stops rows where ours do."""

  def __init__(self, lengths: Sequence[int], prompt_len: int, eos_id: int):
    import torch

    self.lengths = torch.as_tensor(np.asarray(lengths))
    self.prompt_len = prompt_len
    self.eos_id = eos_id

  def __call__(self, input_ids, scores):
    stop = self.lengths == input_ids.shape[1] - self.prompt_len + 1  # rows whose next token is their last
    scores[:, self.eos_id] = -float("inf")
    scores[stop] = -float("inf")
    scores[stop, self.eos_id] = 0.0
    return scores


def transformers_generate(checkpoint_dir: str, eos_id: int) -> Callable[..., None]:
  """f(prompts, lengths, batch) = `model.generate` of the prompts (left-padded) in batches of `batch`, each row
  stopped by ForcedLengths; checks every row's length."""
  import torch

  model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint_dir, dtype=torch.float32).eval()

  def one_batch(prompts, lengths) -> None:
    width = max(map(len, prompts))
    input_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for r, p in enumerate(prompts):
      input_ids[r, width - len(p):] = torch.as_tensor(p)
      attention_mask[r, width - len(p):] = 1
    processors = transformers.LogitsProcessorList([ForcedLengths(lengths, width, eos_id)])
    with torch.inference_mode():
      out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                           temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=int(max(lengths)),
                           eos_token_id=eos_id, pad_token_id=0, logits_processor=processors)
    is_eos = (out[:, width:] == eos_id).numpy()
    generated = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, out.shape[1] - width)
    _check_lengths(generated, np.asarray(lengths), "transformers")

  def run(prompts, lengths, batch: int) -> None:
    for start in range(0, len(prompts), batch):
      one_batch(prompts[start:start + batch], lengths[start:start + batch])

  return run


def _check_lengths(got: np.ndarray, expected: np.ndarray, side: str) -> None:
  if not np.array_equal(got, expected):
    bad = np.flatnonzero(got != expected)
    raise RuntimeError(f"{side}: {len(bad)} rows have the wrong length, e.g. row {bad[0]}: {got[bad[0]]} tokens, "
                       f"not {expected[bad[0]]}")


def _warm(label: str, run: Callable[[], None]) -> None:
  """Run once untimed (ours compiles here); its seconds go to stderr: compilation shows up there, not in the tables."""
  start = time.perf_counter()
  run()
  print(f"  warm-up {label}: {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)


def _timed(runs: dict[str, Callable[[], None]], repeats: int, label: str) -> dict[str, float]:
  """Median seconds per run (interleaved); the spread goes to stderr."""
  timings = interleaved_timings(runs, repeats=repeats, warmup=0)
  for name, timing in timings.items():
    print(f"  {label} {name}: {', '.join(f'{t:.2f}' for t in timing.seconds)} s", file=sys.stderr, flush=True)
  return {name: timing.median for name, timing in timings.items()}


def bench_scaling(size: ModelSize, work: Scaling, legacy_sampler, new_run, repeats: int) -> tuple[list, list, list]:
  """Part (a): (table rows, ratio lines, informational rows)."""
  prompts = random_prompts(size.vocab_size, [work.prompt_len] * work.rows, seed=0)
  lengths = np.random.default_rng(2).integers(work.min_len, work.max_len + 1, work.rows)
  useful, steps = int(lengths.sum()), int(lengths.max())
  runs = {}
  for a in work.allocations:
    _warm(f"{size.name} (a) legacy {a}", lambda a=a: legacy_generate(legacy_sampler, prompts, a, 2))
    runs[f"legacy {a}"] = lambda a=a: legacy_generate(legacy_sampler, prompts, a, steps)
    if new_run:
      _warm(f"{size.name} (a) new {a}", lambda a=a: new_run(prompts, a, lengths, seed=1))
      runs[f"new {a}"] = lambda a=a: new_run(prompts, a, lengths)
  seconds = _timed(runs, repeats, f"{size.name} (a)")
  rows, per_token = [], {"new": {}, "legacy": {}}
  for a in work.allocations:
    legacy_s = seconds[f"legacy {a}"]
    per_token["legacy"][a] = legacy_s / useful
    new_ms = ratio = "-"
    if new_run:
      per_token["new"][a] = seconds[f"new {a}"] / useful
      new_ms, ratio = f"{per_token['new'][a] * 1e3:.3f}", f"{legacy_s / seconds[f'new {a}']:.2f}x"
    rows.append([size.name, a, work.rows, f"{useful:,}", new_ms, f"{per_token['legacy'][a] * 1e3:.3f}",
                 f"{legacy_s / steps * 1e3:.2f}", ratio])
  lo, hi = work.allocations[0], work.allocations[-1]
  legacy_scale = per_token["legacy"][hi] / per_token["legacy"][lo]
  lines = [f"{size.name} legacy t({hi})/t({lo}) per useful token: {legacy_scale:.2f}"]
  if new_run:
    scale = per_token["new"][hi] / per_token["new"][lo]
    verdict = "PASS" if scale <= SCALING_TARGET else "FAIL"
    lines.insert(0, f"{size.name} new t({hi})/t({lo}) per generated token: {scale:.2f} "
                    f"(target <= {SCALING_TARGET:g}: {verdict})")
  full = new_run and work.full_allocations
  return rows, lines, (full_allocation(size, work, prompts[:work.full_rows], new_run) if full else [])


def full_allocation(size: ModelSize, work: Scaling, prompts, new_run) -> list[list]:
  """Informational: new with every row run to the allocation, one timed call each (thousands of sequential steps)."""
  runs = {}
  for a in work.full_allocations:
    _warm(f"{size.name} (a) new to allocation {a}", lambda a=a: new_run(prompts, a, None, seed=1))
    runs[a] = lambda a=a: new_run(prompts, a, None)
  seconds = _timed(runs, 1, f"{size.name} (a) new to allocation")
  return [[size.name, a, len(prompts), f"{len(prompts) * a:,}", f"{seconds[a] / (len(prompts) * a) * 1e3:.3f}"]
          for a in work.full_allocations]


def bench_uneven(size: ModelSize, work: Uneven, legacy_sampler, new_runs: dict[int, Callable], hf_run,
                 repeats: int) -> tuple[list, list, str]:
  """Part (b): (table rows, target lines, the drawn lengths described)."""
  rng = np.random.default_rng(3)
  prompts = random_prompts(size.vocab_size, rng.integers(work.min_prompt, work.max_prompt + 1, work.prompts), seed=4)
  lengths = long_tailed_lengths(work)
  useful, steps = int(lengths.sum()), int(lengths.max())
  hf_batch = work.prompts
  _warm(f"{size.name} (b) legacy", lambda: legacy_generate(legacy_sampler, prompts, work.limit, 2))
  _warm(f"{size.name} (b) transformers", lambda: hf_run(prompts, np.full(work.prompts, 2), hf_batch))
  runs = {"legacy": lambda: legacy_generate(legacy_sampler, prompts, work.limit, steps),
          "transformers": lambda: hf_run(prompts, lengths, hf_batch)}
  for slots, run in new_runs.items():
    name = f"new, slots {slots or work.prompts}"
    _warm(f"{size.name} (b) {name}", lambda run=run: run(prompts, work.limit, lengths, seed=1))
    runs[name] = lambda run=run: run(prompts, work.limit, lengths)
  seconds = _timed(runs, repeats, f"{size.name} (b)")
  rate = {name: useful / s for name, s in seconds.items()}
  batch = legacy.call_batch(work.prompts, sys.maxsize, None)
  notes = {"legacy": f"one call, max_new_tokens {work.limit}: {steps} steps of {batch} rows",
           "transformers": f"batches of {hf_batch}, EOS forced at each row's length"}
  rows, lines = [], []
  for name, s in seconds.items():
    rows.append([size.name, work.prompts, work.limit, f"{useful:,}", name,
                 notes.get(name, f"max_new_tokens {work.limit}, row_max_new_tokens"), f"{s:.2f}", f"{rate[name]:,.0f}"])
  for name in (n for n in rate if n.startswith("new")):
    for peer, target in (("legacy", LEGACY_TARGET), ("transformers", TRANSFORMERS_TARGET)):
      ratio = rate[name] / rate[peer]
      lines.append(f"{size.name} {name} / {peer}: {ratio:.2f}x (target >= {target:g}x: "
                   f"{'PASS' if ratio >= target else 'FAIL'})")
  return rows, lines, describe_lengths(lengths, work.limit)


def bench_size(size: ModelSize, work: Workload, repeats: int, with_new: bool) -> dict[str, list]:
  """Both parts at one size."""
  from p2o_jax.models.hf_checkpoint import load_hf_model

  with tempfile.TemporaryDirectory(prefix=f"generation_bench_{size.name}_") as checkpoint_dir:
    num_params = save_random_qwen2(size, checkpoint_dir)
    eos_id = size.vocab_size  # outside the vocabulary: never sampled
    max_prompt_len = max(work.scaling.prompt_len, work.uneven.max_prompt)
    model = load_hf_model(checkpoint_dir)
    legacy_sampler = legacy.Sampler(model, eos_ids=[eos_id], pad_id=0, max_prompt_len=max_prompt_len)
    new_all = new_generate(model, eos_id, max_prompt_len, slots=0) if with_new else None
    print(f"measuring {size.name} ({num_params:,} params) (a) ...", file=sys.stderr, flush=True)
    scaling, lines, full = bench_scaling(size, work.scaling, legacy_sampler, new_all, repeats)
    print(f"measuring {size.name} (b) ...", file=sys.stderr, flush=True)
    new_runs = {}
    if with_new:
      new_runs = {s: new_all if s == 0 else new_generate(model, eos_id, max_prompt_len, slots=s)
                  for s in work.uneven.slots}
    hf_run = transformers_generate(checkpoint_dir, size.vocab_size - 1)
    uneven, targets, described = bench_uneven(size, work.uneven, legacy_sampler, new_runs, hf_run, repeats)
  return dict(scaling=scaling, scaling_lines=lines, full=full, uneven=uneven, uneven_lines=targets,
              lengths=[f"{size.name}: {described}"])


def main(argv: Sequence[str] | None = None) -> None:
  start = time.perf_counter()
  argv = sys.argv[1:] if argv is None else list(argv)
  sizes, repeats = parse_cli(["--repeats", "1", *argv], __doc__.splitlines()[0], WORKLOADS,  # a later flag wins
                             "timed calls per side (median reported); default 1")
  threads = use_all_torch_threads()
  transformers.logging.disable_progress_bar()
  with_new = new_engine_ready()
  if not with_new:
    print("p2o_jax.sampling has no continuous-batching API yet (slots, row_max_new_tokens): new engine skipped",
          file=sys.stderr)
  results: dict[str, list] = {}
  for size in sizes:
    for key, value in bench_size(size, WORKLOADS[size.name], repeats, with_new).items():
      results.setdefault(key, []).extend(value)
  print(f"generation benchmark (torch threads: {threads}; one JAX device; T={TEMPERATURE:g})")
  print(f"{machine_note()}\n")
  print(f"(a) length scaling: same prompts and row lengths, growing allocation (median of {repeats})\n")
  print(markdown_table(["size", "allocation", "rows", "useful tokens", "new ms/token", "legacy ms/useful token",
                        "legacy ms/step", "legacy/new"], results["scaling"]))
  print("\n" + "\n".join(results["scaling_lines"]))
  if results["full"]:
    print("\ninformational: new engine, rows run to the allocation (no per-row limits; one timed call each)\n")
    print(markdown_table(["size", "allocation", "rows", "generated tokens", "new ms/token"], results["full"]))
  print(f"\n(b) uneven workload: useful tokens / wall time (median of {repeats})")
  print("response lengths drawn: " + "; ".join(results["lengths"]) + "\n")
  print(markdown_table(["size", "prompts", "limit", "useful tokens", "engine", "how", "seconds", "tokens/s"],
                       results["uneven"]))
  print("\n" + "\n".join(results["uneven_lines"]))
  print(f"\nbench wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
