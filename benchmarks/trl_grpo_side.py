"""TRL's side of benchmarks.grpo_step_bench: its GRPOTrainer driven one step at a time.

A module of its own, imported only when the bench runs TRL: the verifier pool's worker processes re-import the bench's
main module, and with TRL (torch) imported there every worker restart would cost seconds inside a timed step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Sequence

import transformers

from benchmarks.grpo_step import LEARNING_RATE, StepLog, Workload, exact_match_reward
from p2o_jax.data.records import Query
from p2o_jax.models.tokenizer import load_tokenizer, stop_token_ids


class SteppedTrainer(transformers.TrainerCallback):
  """Runs `trainer.train()` in a thread that waits at every optimizer-step boundary, so that the caller can run it one
  step at a time (`step()`), interleaved with other work, while the trainer's own loop does everything in between."""

  def __init__(self, trainer):
    self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
    self._error: BaseException | None = None
    self._finished = self._stopping = False
    trainer.add_callback(self)
    self._thread = threading.Thread(target=self._train, args=(trainer,), name="trl-train", daemon=True)
    self._thread.start()

  def _train(self, trainer) -> None:
    try:
      trainer.train()
    except BaseException as e:  # re-raised in the caller's thread by step()
      self._error = e
    finally:
      self._finished = True
      self._done.release()

  def on_train_begin(self, args, state, control, **kwargs):
    self._wait_for_go(control)

  def on_step_end(self, args, state, control, **kwargs):
    self._done.release()
    self._wait_for_go(control)

  def _wait_for_go(self, control) -> None:
    if not self._stopping:  # close() releases once more after setting _stopping: a permit left over is harmless
      self._go.acquire()
    if self._stopping:
      control.should_training_stop = True

  def step(self) -> None:
    if self._finished:
      raise RuntimeError("the TRL trainer has already stopped (train.max_steps too small?)")
    self._go.release()
    self._done.acquire()
    if self._error is not None:
      raise RuntimeError("TRL's GRPOTrainer failed") from self._error
    if self._finished:
      raise RuntimeError("the TRL trainer stopped before the step ended")

  def close(self) -> None:
    """Stop the trainer at its next step boundary (it may still be before its first step) and join the thread."""
    self._stopping = True
    if not self._finished:
      self._go.release()
    self._thread.join()


def _timed(method: Callable, seconds: dict[str, float], name: str) -> Callable:
  def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
      return method(*args, **kwargs)
    finally:
      seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
  return timed


def trl_stepper(checkpoint: str, c, queries: Sequence[Query], work: Workload, max_steps: int, output_dir: str,
                stack: contextlib.ExitStack) -> tuple[Callable[[], None], StepLog, str]:
  """run() = one GRPOTrainer step (one generation round, one optimizer update); its log; TRL's version."""
  import datasets
  import torch
  import trl

  tokenizer = load_tokenizer(checkpoint)  # AutoTokenizer would pick the built-in's Qwen2Tokenizer, which drops spaces
  model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
  rows = [{"prompt": [{"role": "user", "content": c.data.prompt_format.format(question=q.question)}],
           "answer": q.answer} for q in queries]
  args = trl.GRPOConfig(
      output_dir=output_dir, use_cpu=True, bf16=False, activation_checkpointing=False, seed=c.seed, max_steps=max_steps,
      per_device_train_batch_size=work.rows, gradient_accumulation_steps=1, steps_per_generation=1,
      num_generations=work.num_samples, num_iterations=1, max_completion_length=work.new_tokens,
      temperature=1.0, top_p=1.0, top_k=0, beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
      learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01, adam_beta1=0.9,
      adam_beta2=0.999, max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to="none",
      disable_tqdm=True, dataloader_num_workers=0)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=args,
                            train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
  for printer in (transformers.PrinterCallback, transformers.ProgressCallback):  # its logs would end up in the table
    trainer.remove_callback(printer)
  ours_stops, theirs_stops = stop_token_ids(tokenizer), sorted(trainer.eos_token_ids)
  if ours_stops != theirs_stops:
    raise RuntimeError(f"the two sides stop on different tokens: ours {ours_stops}, TRL {theirs_stops}")
  seconds: dict[str, float] = {}
  for name, key in (("_prepare_inputs", "prepare"), ("_calculate_rewards", "verify")):
    if hasattr(trainer, name):  # private methods: the split is informative only, the total is what is compared
      setattr(trainer, name, _timed(getattr(trainer, name), seconds, key))
  stepper = SteppedTrainer(trainer)
  stack.callback(stepper.close)
  log = StepLog()

  def run() -> None:
    seconds.clear()
    start = time.perf_counter()
    stepper.step()
    total = time.perf_counter() - start
    lengths = trainer._metrics["train"].get("completions/mean_length") or [float("nan")]
    log.tokens.append(lengths[-1] * work.rows)
    if "prepare" in seconds:
      verify = seconds.get("verify", 0.0)
      log.splits.append({"sample": seconds["prepare"] - verify, "verify": verify, "train": total - seconds["prepare"]})
    log.compile_s.append(0.0)

  return run, log, trl.__version__
