"""A whole GRPO step of our Trainer against TRL's GRPOTrainer (transformers + PyTorch eager), both on the CPU.

    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.grpo_step_bench [--sizes demo,50m] [--repeats 3]   (the entry point)

Needs TRL (`pip install -e ".[bench]"`; see pyproject.toml). One step = sample K responses for each of the batch's
prompts, score them, take log-probs, one optimizer update over all the rows. Both sides start from the same HF
checkpoint directory, draw the same prompts every step (built-in arithmetic problems, half easy and half hard, in the
checkpoint's chat template) and sample with T=1, top-p 1, no top-k, up to `new_tokens` new tokens. Workloads:
- demo: the built-in policy (p2o_jax/models/builtin_base), 8 prompts x K=6 = 48 rows, up to 96 new tokens (the demo
  config's K and response length). Asked plainly it answers directly (~18 tokens) and stops at EOS, so lengths
  differ a little between steps and sides: the target is checked on response tokens per second, not step time.
- 50m: a random Qwen2 (benchmarks.common.MODEL_SIZES["50m"]) with a 32,000-token byte-level BPE trained here on the
  Python standard library's sources, 4 prompts x K=4 = 16 rows, 128 new tokens. A random model (almost) never draws
  EOS, so every response runs to 128 tokens on both sides.
The same GRPO on both sides: group-normalized advantages, PPO clip 0.2, no KL term and no reference model (TRL
beta=0, ours grpo.kl_coef=0), one policy epoch (TRL num_iterations=1, ours ppo_epochs=1), the loss's token mean over
the whole batch (TRL loss_type="dapo", ours grpo.aggregation="token-mean"), one AdamW update (lr 1e-6 so the timed
steps leave the policy as it was, weight decay 0.01, gradient clip 1.0, float32, no gradient checkpointing) over all
rows in one micro-batch (TRL per_device_train_batch_size = rows, steps_per_generation = gradient_accumulation = 1).
Ours keeps its dual clip (3.0; TRL has none), which costs nothing measurable.

Ours is the real public path: configs/demo_cpu.py with the overrides in `ours_config` (P^2O off, one mini-batch; the
CPU split into the config's 2 JAX devices, both sizes on the first alone: `Workload.devices`), our Policy, verifier
pool and Trainer built as p2o_jax/experiment.py builds them, timing `Trainer.step`, which samples, scores in the
sandboxed worker pool and updates; with one update per step neither side runs a separate old-log-prob pass (ours:
grpo.old_logprobs "auto"; TRL's old log-probs are the detached current ones), and scores in-process with a plain
Python reward function of the same logic (`exact_match_reward`, our builtin_exact grader). Both use the tokenizer
our `load_tokenizer` reads (transformers' own class): AutoTokenizer would give the built-in checkpoint a
Qwen2Tokenizer, whose pre-tokenizer drops the spaces of its character vocabulary.

Timing: the two sides alternate, step for step (benchmarks.common.interleaved_timings): TRL's `train()` runs in a
thread that pauses at every optimizer-step boundary (`SteppedTrainer`), so a timed TRL step is one whole iteration
of its training loop. Untimed steps first: ours until OURS_QUIET_STEPS in a row compile nothing (at most
OURS_WARMUP_STEPS: each new length bucket compiles once per run), then one per side (TRL's first step also builds its dataloader).
Reported: median step time, response tokens per second (tokens sampled and trained on / step time, median over
steps), their ratio ours/TRL next to the targets, and each side's split of the step. XLA compile seconds that fall in
ours' timed steps (a new response-length bucket) are printed; they are part of the step as a run would see it.
Both sizes with --repeats 3 take 6-8 minutes on 2 busy cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence

import jax

from benchmarks.common import (interleaved_timings, machine_note, markdown_table, ModelSize, parse_cli,
                               save_random_qwen2, use_all_torch_threads)
from p2o_jax import builders, sharding
from p2o_jax.config import load_config_file, validate
from p2o_jax.data.records import Query, problem_queries
from p2o_jax.distributed import use_cpu_devices
from p2o_jax.experiment import builtin_train_problems
from p2o_jax.rewards.graders import builtin_exact

DEMO_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.py"
LEARNING_RATE = 1e-6
OURS_WARMUP_STEPS = 16  # at most: untimed steps of ours before the timed ones
OURS_QUIET_STEPS = 3  # warm-up ends after this many steps in a row that compiled nothing
REWARD_FALLBACK = "last_number"  # the demo config's reward.fallback; set on our side, used by exact_match_reward
CHATML_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclasses.dataclass(frozen=True)
class Workload:
  prompts: int
  num_samples: int  # K
  new_tokens: int  # rollout.max_new_tokens = TRL max_completion_length
  target_ratio: float  # ours / TRL response tokens per second; printed, not asserted
  devices: int  # the CPU devices ours runs on (of the demo config's distributed.cpu_devices = 2)

  @property
  def rows(self) -> int:
    return self.prompts * self.num_samples


WORKLOADS = {
    # One device each. 50M: each of two would read all the weights every decode step. Demo: with the rollout engine,
    # the step's generation took 0.05 s on one device against 0.08 on the config's two, the update the same (this
    # bench, --sizes demo --repeats 9, one run each way).
    "demo": Workload(prompts=8, num_samples=6, new_tokens=96, target_ratio=2.5, devices=1),
    "50m": Workload(prompts=4, num_samples=4, new_tokens=128, target_ratio=2.0, devices=1),
}


# ---- the workload: checkpoint, prompts, reward -------------------------------------------------------------------

def bench_queries(c, n: int) -> list[Query]:
  """n built-in training problems: the first n // 2 easy ones and the last n - n // 2 hard ones."""
  queries = problem_queries(builtin_train_problems(c))
  return queries[:n // 2] + queries[len(queries) - (n - n // 2):]


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
  """TRL's reward-function convention around our builtin_exact grader: 1.0 iff the answer is the reference's text.
  A conversational completion is a list of messages; its text is the last one's content."""
  del kwargs
  texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
  return [builtin_exact(text, reference, REWARD_FALLBACK) for text, reference in zip(texts, answer)]


def save_bpe_tokenizer(out_dir: str | pathlib.Path, vocab_size: int):
  """A byte-level BPE of `vocab_size` tokens (every id of the model decodes), trained on the standard library's
  top-level modules (~5 MB, ~2 s), with a ChatML template; saved into `out_dir` in HF format."""
  import transformers  # pylint: disable=import-outside-toplevel  (kept out of worker re-imports: see main)
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
  core = Tokenizer(models.BPE())
  core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  core.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  sources = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
  core.train([str(p) for p in sources], trainer)
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                                   chat_template=CHATML_TEMPLATE)
  tokenizer.save_pretrained(out_dir)
  return tokenizer


def save_random_checkpoint(size: ModelSize, out_dir: str) -> None:
  """A random Qwen2 of `size` with a trained BPE tokenizer, its config naming the tokenizer's EOS and padding ids
  (which both trainers read)."""
  save_random_qwen2(size, out_dir)
  tokenizer = save_bpe_tokenizer(out_dir, size.vocab_size)
  config_path = pathlib.Path(out_dir) / "config.json"
  config = json.loads(config_path.read_text())
  config.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  config_path.write_text(json.dumps(config, indent=2))
  (pathlib.Path(out_dir) / "generation_config.json").unlink(missing_ok=True)


# ---- ours -------------------------------------------------------------------------------------------------------

def ours_config(checkpoint: str, work: Workload, workdir: str):
  """configs/demo_cpu.py as plain GRPO on this workload (see the module docstring)."""
  c = load_config_file(DEMO_CONFIG)
  c.workdir = workdir
  c.model.checkpoint = checkpoint
  c.p2o.enabled = False
  c.reward.fallback = REWARD_FALLBACK
  c.rollout.update(num_samples=work.num_samples, max_new_tokens=work.new_tokens, temperature=1.0, top_p=1.0, top_k=0)
  c.grpo.update(ppo_epochs=1, num_minibatches=1, micro_batch_size=work.rows, kl_coef=0.0, aggregation="token-mean",
                clip_low=0.2, clip_high=0.2, dynamic_sampling=False)
  c.optim.update(lr=LEARNING_RATE, warmup_ratio=0.0, schedule="constant", weight_decay=0.01, grad_clip=1.0)
  c.train.update(batch_size=work.prompts, max_steps=1000)
  c.eval.update(builtin_easy=0, builtin_hard=0, every_steps=0, base_with_template=False)
  validate(c, work.devices)
  return c


class CompileClock:
  """Seconds XLA spent compiling since the last `take()` (JAX's own monitoring events)."""

  def __init__(self):
    self._seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, seconds: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
      self._seconds += seconds

  def take(self) -> float:
    seconds, self._seconds = self._seconds, 0.0
    return seconds


@dataclasses.dataclass
class StepLog:
  """Per step of one side: response tokens, time split (seconds) and compile seconds."""

  tokens: list[float] = dataclasses.field(default_factory=list)
  splits: list[dict[str, float]] = dataclasses.field(default_factory=list)
  compile_s: list[float] = dataclasses.field(default_factory=list)


def ours_stepper(c, queries: Sequence[Query], stack: contextlib.ExitStack, clock: CompileClock, devices: int
                 ) -> tuple[Callable[[], None], StepLog]:
  """run() = one Trainer.step on `queries` (step numbers count up, so each draws fresh samples) on the first
  `devices` CPU devices; and its log."""
  from p2o_jax.rl.trainer import Trainer

  mesh = sharding.make_mesh({"data": c.mesh.data, "fsdp": c.mesh.fsdp, "tensor": c.mesh.tensor},
                            jax.devices()[:devices])
  pool = stack.enter_context(builders.build_reward_pool(c))
  policy = builders.build_policy(c, builders.existing_policy_checkpoint(c), mesh)
  score = pool.scorer(c.data.prompt_format)
  trainer = Trainer(c, policy=policy, train_queries=list(queries), eval_sets={}, score=score)
  log, step = StepLog(), [0]

  def run() -> None:
    clock.take()
    metrics = trainer.step(step[0], queries)
    jax.block_until_ready(trainer.policy.params)
    step[0] += 1
    log.tokens.append(metrics["train/tokens"])
    log.splits.append({k[len("time/"):-len("_s")]: v for k, v in metrics.items()
                       if k.startswith("time/") and k != "time/step_s"})
    log.compile_s.append(clock.take())

  return run, log


# ---- the run ----------------------------------------------------------------------------------------------------

def _median_split(log: StepLog, timed: int) -> str:
  splits = log.splits[-timed:]
  if not splits:
    return "total only"
  return ", ".join(f"{k} {statistics.median(s[k] for s in splits):.2f}" for k in splits[0])


def bench_size(size: ModelSize, work: Workload, repeats: int, clock: CompileClock) -> tuple[list[object], str]:
  """Measure one size; print each side's per-step times; return its table row and TRL's version."""
  with contextlib.ExitStack() as stack:
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"grpo_step_bench_{size.name}_"))
    if size.name == "demo":
      checkpoint = "builtin"
    else:
      checkpoint = str(pathlib.Path(tmp, "checkpoint"))
      save_random_checkpoint(size, checkpoint)
    c = ours_config(checkpoint, work, str(pathlib.Path(tmp, "ours")))
    checkpoint_dir = str(builders.existing_policy_checkpoint(c))
    queries = bench_queries(c, work.prompts)
    ours, ours_log = ours_stepper(c, queries, stack, clock, work.devices)
    for _ in range(OURS_WARMUP_STEPS):  # until steps compile nothing: the length buckets this workload meets
      ours()
      if all(s < 0.05 for s in ours_log.compile_s[-OURS_QUIET_STEPS:]) and len(ours_log.compile_s) >= OURS_QUIET_STEPS:
        break
    from benchmarks.trl_grpo_side import trl_stepper  # pylint: disable=import-outside-toplevel  (see that module)
    theirs, theirs_log, trl_version = trl_stepper(checkpoint_dir, c, queries, work, 1 + repeats,
                                                  str(pathlib.Path(tmp, "trl")), stack)
    use_all_torch_threads()  # after the trainers are built: nothing they set up may lower it
    timings = interleaved_timings({"ours": ours, "TRL": theirs}, repeats=repeats, warmup=1)
  logs = {"ours": ours_log, "TRL": theirs_log}
  rates = {}
  for side, timing in timings.items():
    tokens = logs[side].tokens[-repeats:]
    rates[side] = statistics.median(n / t for n, t in zip(tokens, timing.seconds))
    compiled = sum(logs[side].compile_s[-repeats:])
    print(f"  {size.name} {side}: {', '.join(f'{t:.2f}' for t in timing.seconds)} s per step; response tokens "
          f"{', '.join(f'{n:.0f}' for n in tokens)}; median split (s): {_median_split(logs[side], repeats)}"
          + (f"; XLA compiles in timed steps: {compiled:.1f} s" if compiled > 0.05 else ""), file=sys.stderr)
  ratio = rates["ours"] / rates["TRL"]
  row = [size.name, f"{work.prompts} x {work.num_samples}", work.new_tokens,
         f"{timings['ours'].median:.2f}", f"{timings['TRL'].median:.2f}",
         f"{rates['ours']:,.0f}", f"{rates['TRL']:,.0f}", f"{ratio:.2f}x",
         f">= {work.target_ratio:g}x {'PASS' if ratio >= work.target_ratio else 'FAIL'}",
         _median_split(ours_log, repeats), _median_split(theirs_log, repeats)]
  return row, trl_version


def main(argv: Sequence[str] | None = None) -> None:
  sizes, repeats = parse_cli(argv, __doc__.splitlines()[0], WORKLOADS, "timed steps per side (median reported)")
  use_cpu_devices(load_config_file(DEMO_CONFIG).distributed.cpu_devices)  # before JAX starts, as the demo does
  threads = use_all_torch_threads()
  # transformers (and TRL) are imported here, not at the top: the verifier pool's workers re-import this module.
  import transformers  # pylint: disable=import-outside-toplevel
  transformers.logging.set_verbosity_error()
  transformers.logging.disable_progress_bar()
  warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations TRL triggers
  clock = CompileClock()
  rows, trl_version = [], "?"
  start = time.perf_counter()
  for size in sizes:
    print(f"measuring {size.name} ...", file=sys.stderr, flush=True)
    row, trl_version = bench_size(size, WORKLOADS[size.name], repeats, clock)
    rows.append(row)
  headers = ["size", "prompts x K", "max new tokens", "ours s/step", "TRL s/step", "ours tok/s", "TRL tok/s",
             "ratio ours/TRL", "target", "ours split (s)", "TRL split (s)"]
  print(f"\nGRPO step (sample, reward, log-probs, one update), ours (JAX; CPU devices: "
        f"{', '.join(f'{s.name} {WORKLOADS[s.name].devices}' for s in sizes)}) vs TRL "
        f"{trl_version} GRPOTrainer (torch threads: {threads}); median of {repeats}; tok/s = response tokens per s")
  print(f"{machine_note()}; wall time {time.perf_counter() - start:.0f} s\n")
  print(markdown_table(headers, rows))
  print("\nratio = ours tok/s / TRL tok/s, checked against the target. Split (median s): ours from the step's"
        " time/* metrics (generate, rewards, logprobs = packing and any log-prob pass, update = the jitted updates);"
        " TRL: sample = its _prepare_inputs without the rewards, verify = rewards, train = the rest (forward, backward,"
        " AdamW and its loop's bookkeeping)")


