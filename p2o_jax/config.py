"""The run config: every key with its default (`base_config`), and up-front validation (`validate`) so a wrong value or
an impossible combination is a one-line error naming the key, before anything heavy starts."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib

import ml_collections

from p2o_jax.data import arithmetic
from p2o_jax.distributed import CPU_COLLECTIVES, INITIALIZE_MODES
from p2o_jax.models.attention import ATTENTION_CHOICES
from p2o_jax.models.config import REMAT_POLICIES
from p2o_jax.p2o.distillation import DISTILLATIONS, RATIO_MASKS
from p2o_jax.p2o.reflectors import REFLECTORS
from p2o_jax.rewards.extract import FALLBACKS
from p2o_jax.rl.advantages import ADVANTAGE_ESTIMATORS
from p2o_jax.rewards.functions import RewardFunctionError, resolve
from p2o_jax.rl.losses import AGGREGATIONS, KL_ESTIMATORS
from p2o_jax.rl.optimizer import SCHEDULES
from p2o_jax.rl.sequence_packing import PACKING_CHOICES

_DTYPES = ("float32", "bfloat16")

# Every string option: its key and the registry that implements each allowed value. `validate` checks them all here,
# so code that looks a value up never meets an unknown one.
CHOICES = {
    "model.param_dtype": _DTYPES,
    "model.compute_dtype": _DTYPES,
    "model.remat": REMAT_POLICIES,
    "model.attention": ATTENTION_CHOICES,
    "data.source": ("file", "builtin"),
    "data.too_long": ("error", "skip"),
    "reward.fallback": FALLBACKS,
    "grpo.advantage": ADVANTAGE_ESTIMATORS,
    "grpo.aggregation": AGGREGATIONS,
    "grpo.old_logprobs": ("auto", "recompute", "sampler"),
    "grpo.packing": PACKING_CHOICES,
    "grpo.kl_estimator": KL_ESTIMATORS,
    "optim.schedule": SCHEDULES,
    "p2o.distillation": DISTILLATIONS,
    "p2o.ratio_mask": RATIO_MASKS,
    "p2o.reflector": REFLECTORS,
    "p2o.search": ("gepa", "self_reflection"),
    "distributed.initialize": INITIALIZE_MODES,
    "distributed.cpu_collectives": CPU_COLLECTIVES,
}


class ConfigError(ValueError):
  """The run's config is malformed; the message names the key."""


def base_config() -> ml_collections.ConfigDict:
  """Defaults follow the P^2O authors' code where the paper fixes a value (see ../shared/P2O_SPEC.md)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.workdir = "runs/default"

  # remat: what each layer recomputes in the backward pass ("none", "full": only layer inputs kept, "save_dots": the
  # projections' outputs kept). attention: "auto" (splash on TPU, cuDNN on GPU, chunked on CPU) or an implementation
  # of p2o_jax/models/attention.py.
  c.model = dict(checkpoint="builtin", builtin_cache_dir=".cache/p2o_jax/builtin_policy", param_dtype="float32",
                 compute_dtype="float32", remat="none", attention="auto",
                 enable_thinking=False)  # passed to chat templates with Qwen3's switch (the paper: thinking off)
  # The built-in task (data.source="builtin") and its base policy (model.checkpoint="builtin"): the arithmetic world
  # (p2o_jax/data/arithmetic.py) and the tiny Qwen2 model SFT-trained on its corpus, cached per distinct setting.
  c.builtin = dict(easy_operands=(2, 2), easy_digits=(2, 3), hard_operands=(4, 6), hard_digits=(2, 2),
                   held_out_fraction=0.1, lsb_first=True, easy_as_step=False, scratchpad_format="running_totals",
                   num_layers=4, hidden_size=128, sft_steps=1000, sft_lr=2e-3, sft_rows=16,
                   sft_row_len=256, sft_examples=50_000, sft_seed=0)  # one base for every run seed
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: all remaining devices
  # Multi-process runs (p2o_jax/distributed.py): "auto" starts jax.distributed on a TPU VM or when a coordinator is
  # given here or in JAX_COORDINATOR_ADDRESS; "always" also relies on JAX's SLURM / Open MPI / Kubernetes detection.
  # Unset values ("", 0, -1) are left to JAX's auto-detection. cpu_collectives: "gloo", "mpi" or "none" (CPU only).
  # cpu_devices: split this process's CPU into that many JAX devices (0: JAX's default, one); see
  # distributed.use_cpu_devices for when that pays.
  c.distributed = dict(initialize="auto", coordinator_address="", num_processes=0, process_id=-1,
                       cpu_collectives="gloo", cpu_devices=0)
  c.data = dict(
      source="file",  # "file" (train_path) or "builtin" (the arithmetic world)
      train_path="", question_field="problem", answer_field="answer", id_field="",
      # messages_field: a chat-format training file's list of turns (e.g. "messages", verl's "prompt"); the question
      # is then the last user turn (p2o_jax/data/records.py).
      messages_field="",
      # The user turn; "{question}" is replaced by the problem. The paper's format:
      prompt_format="Let's think step by step and output the final answer within \\boxed{{}}.\nQuestion: {question}",
      builtin_train_size=4096, builtin_hard_fraction=0.5,
      # A query whose plain prompt is over rollout.max_prompt_len tokens: "error" at load (the authors' code) or
      # "skip" it (counted, logged). Templated prompts over the limit are left-truncated instead (Policy.generate).
      too_long="error")
  # The sampler is a continuous-batching engine: a call's rows run in a fixed number of slots, a finished row's slot
  # taking the next waiting row. kv_cache_gib: the KV cache its slots may take per device (0: no budget); slots: at
  # most this many slots (0: as many as the budget holds, or every row of the call). The dry run checks it fits.
  c.rollout = dict(max_prompt_len=512, max_new_tokens=1024, temperature=0.6, top_p=1.0, top_k=0, num_samples=6,
                   kv_cache_gib=0.0, slots=0)
  # functions: "name[=weight], ..." — built-in graders (math: math-verify; equivalence: our sympy grader;
  # builtin_exact; boxed_format) or "package.module:function" in TRL's reward-function convention. The first one is
  # the correctness reward that accuracy, the hard set and GEPA read (p2o_jax/rewards/functions.py). Empty: by
  # data.source, "math" for files and "builtin_exact" for the built-in task (its answers are canonical integers).
  c.reward = dict(functions="", fallback="none", num_workers=2, timeout_s=5.0)
  c.grpo = dict(
      advantage="grpo",  # "grpo" (std-normalized) or "dr_grpo"
      clip_low=0.2, clip_high=0.2, dual_clip=3.0,  # dual_clip 0: off
      # aggregation "token-mean": over the whole mini-batch; "microbatch-token-mean": the authors' verl, each
      # micro-batch's token-mean weighted by its rows (p2o_jax/rl/losses.py says why ours is the default)
      kl_coef=0.0, kl_estimator="k3", aggregation="token-mean",
      ppo_epochs=1, num_minibatches=2, micro_batch_size=8,
      # old_logprobs, the PPO ratio's denominator: "recompute" in a log-prob pass over the batch before the updates
      # (the authors' verl); "auto": that pass only when a step makes more than one update (ppo_epochs x
      # num_minibatches) or P^2O needs templated rows' plain-context log-probs, else the update's own log-probs (ratio
      # exactly 1: the same gradient, one forward pass less); "sampler": the sampler's own log-probs (the trainer's up
      # to float rounding when top_p = 1 and top_k = 0, which it requires), recomputed only where P^2O needs them.
      old_logprobs="auto",
      # packing, the train rows' layout (p2o_jax/rl/sequence_packing.py; the same log-probs and gradients in every
      # one): "rows" one sequence per row, padded; "sequences" packed side by side without padding; "shared_prompts"
      # also a query's K rows behind one copy of its prompt; "auto": shared_prompts with the XLA attentions (CPU),
      # sequences with splash (TPU), rows with cuDNN (GPU, whose kernel takes only a row's validity).
      packing="auto",
      dynamic_sampling=False, dynamic_sampling_max_batches=3)
  c.optim = dict(lr=1e-6, warmup_ratio=0.05, schedule="constant", weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.999)
  c.train = dict(batch_size=128, epochs=10, max_steps=0,  # 0: epochs x steps per epoch
                 checkpoint_every=10, keep_checkpoints=3, export_dtype="",
                 checkpoint_dir="")  # "": <workdir>/checkpoints; may be gs://bucket/path (orbax writes there)
  # The teacher-distilled SFT baseline (p2o_jax/teacher_sft.py, compare method "teacher_sft"): trace_field names the
  # training file's column of teacher solutions (the built-in task uses its oracle scratchpads); steps 0: as many
  # updates as the RL run; row_len 0: max_prompt_len + max_new_tokens; lr 0: optim.lr.
  c.teacher_sft = dict(trace_field="", steps=0, rows=8, row_len=0, lr=0.0)
  c.eval = dict(every_steps=0, sets="",  # "name=path.jsonl,name2=path2.jsonl"
                builtin_easy=0, builtin_hard=0, small_set_size=100, small_set_samples=16, temperature=0.6,
                max_new_tokens=0,  # 0: rollout.max_new_tokens
                base_with_template=False)  # after P^2O, also score the starting policy with GEPA's best template
  c.p2o = dict(
      enabled=False,
      hard_max_correct=1,  # a query is hard with at most this many correct of K rollouts (0: the strict variant)
      hard_min_count=100,  # fewer hard queries: no GEPA, no templates next epoch
      distillation="plain",  # "plain": gradient on the plain prompt (P^2O); "templated": the paper's ablation;
      # "importance": plain prompt, old log-probs from the templated context (ratio pi(y|x) / pi_old(y|x~))
      ratio_mask="hard", ratio_low=0.01, ratio_high=10.0,  # the context ratio mask: "hard", "soft" or "off"
      # The authors' switches (their trainer.gepa keys, same defaults): one template for all K rollouts of a query;
      # the last of a templated query's K rollouts stays plain; templated rollouts that fail leave the loss.
      same_template_in_sample=False, left_1_no_template_rollout=False, drop_failed_template_rollout=False,
      # max_metric_calls 0: the authors' budget, 23 x |D_dev| + 4140 (11,040 at |D_dev|=300); max_iters 0: no cap;
      # remove_dominated: the gepa package's parent pool instead of the authors' (every candidate on some front).
      gepa=dict(dev_size=300, beam_width=16, minibatch_size=3, max_metric_calls=0, max_iters=0,
                remove_dominated=False),
      # search: "gepa" (P^2O), or "self_reflection" (the paper's baseline: the policy rewrites its own failed answer
      # once; p2o_jax/p2o/self_reflection.py).
      search="gepa",
      reflector="self",  # "self" (frozen reference policy), "teacher" (OpenAI-compatible endpoint), "offline"
      reflection_temperature=0.6, reflection_max_new_tokens=2048, reflection_max_prompt_len=4096,
      max_template_chars=0,  # a longer reflected template is rejected; 0: no cap (the authors' code)
      offline_fragments="",  # "|"-separated fragment pool of the offline proposer ("" = its default pool)
      thinking_in_reflection=False,  # Self-Ref reflection prompts: enable_thinking for Qwen3-style templates
      # extra_body: a JSON object merged into each request, e.g. '{"chat_template_kwargs": {"enable_thinking": false}}'.
      # Retries: max_retries more attempts after the first, waiting backoff_s doubling up to max_backoff_s; then that
      # parent's reflection is empty (the authors retry forever, 1 s apart).
      teacher=dict(base_url="", model="", api_key_env="OPENAI_API_KEY", timeout_s=120.0, max_retries=5,
                   backoff_s=1.0, max_backoff_s=30.0, max_concurrency=8, extra_body=""))
  return ml_collections.ConfigDict(c)


def _require(ok: bool, key: str, message: str) -> None:
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def _get(c: ml_collections.ConfigDict, key: str):
  node = c
  for part in key.split("."):
    node = node[part]
  return node


def _one_of(c: ml_collections.ConfigDict, key: str) -> None:
  node = _get(c, key)
  _require(node in CHOICES[key], key, f"{node!r} is not one of {tuple(CHOICES[key])}")


def _positive(c: ml_collections.ConfigDict, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    node = _get(c, key)
    _require(node >= 0 if allow_zero else node > 0, key, f"{node} must be {'>= 0' if allow_zero else '> 0'}")


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """get_config() of an ml_collections config file such as configs/demo_cpu.py (what --config loads), without flags."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raise ConfigError for the first impossible value or combination."""
  _one_of(c, "model.param_dtype")
  _one_of(c, "model.compute_dtype")
  _one_of(c, "model.remat")
  _one_of(c, "model.attention")
  for axis in ("data", "fsdp", "tensor"):
    size = c.mesh[axis]
    _require(size == -1 or size >= 1, f"mesh.{axis}", f"{size} must be >= 1 or -1 (all remaining devices)")
  _require("://" not in c.workdir, "workdir", f"{c.workdir!r} must be a local directory (metrics, reports and exports "
           "are plain files); put checkpoints on GCS with train.checkpoint_dir=gs://...")
  _one_of(c, "data.source")
  _positive(c, "builtin.num_layers", "builtin.hidden_size", "builtin.sft_lr", "builtin.sft_rows", "builtin.sft_row_len",
            "builtin.sft_examples")
  _positive(c, "builtin.sft_steps", allow_zero=True)
  if "builtin" in (c.data.source, c.model.checkpoint):
    builtin_world(c)
  _require(c.data.source != "file" or bool(c.data.train_path), "data.train_path", "is empty but data.source='file'")
  _require("{question}" in c.data.prompt_format, "data.prompt_format", "must contain '{question}'")
  _one_of(c, "data.too_long")
  _positive(c, "rollout.max_prompt_len", "rollout.max_new_tokens", "rollout.num_samples", "reward.num_workers",
            "reward.timeout_s", "grpo.ppo_epochs", "grpo.num_minibatches", "grpo.micro_batch_size", "train.batch_size",
            "train.epochs", "optim.lr", "teacher_sft.rows")
  _positive(c, "teacher_sft.steps", "teacher_sft.row_len", "teacher_sft.lr", allow_zero=True)
  _positive(c, "rollout.temperature", "rollout.top_k", "rollout.kv_cache_gib", "rollout.slots", "train.max_steps",
            "grpo.kl_coef", "eval.every_steps", allow_zero=True)
  _require(0 < c.rollout.top_p <= 1, "rollout.top_p", f"{c.rollout.top_p} must be in (0, 1]")
  _one_of(c, "reward.fallback")
  try:
    resolve(reward_functions(c))
  except RewardFunctionError as e:
    raise ConfigError(f"config.reward.functions: {e}") from None
  _one_of(c, "grpo.advantage")
  _one_of(c, "grpo.aggregation")
  _one_of(c, "grpo.old_logprobs")
  _one_of(c, "grpo.packing")
  _require(c.grpo.old_logprobs != "sampler" or (c.rollout.top_p == 1 and c.rollout.top_k == 0), "grpo.old_logprobs",
           "'sampler' needs rollout.top_p=1 and rollout.top_k=0: the sampler's log-probs are then the policy's")
  _one_of(c, "grpo.kl_estimator")
  _require(c.grpo.dual_clip == 0 or c.grpo.dual_clip > 1, "grpo.dual_clip", f"{c.grpo.dual_clip} must be > 1 (0: off)")
  _one_of(c, "optim.schedule")
  _require(0 <= c.optim.warmup_ratio < 1, "optim.warmup_ratio", f"{c.optim.warmup_ratio} must be in [0, 1)")
  rows = c.train.batch_size * c.rollout.num_samples
  _require(rows % c.grpo.num_minibatches == 0, "grpo.num_minibatches",
           f"{c.grpo.num_minibatches} does not divide the {rows} rollout rows per step (batch_size x num_samples)")
  minibatch = rows // c.grpo.num_minibatches
  _require(minibatch % c.grpo.micro_batch_size == 0, "grpo.micro_batch_size",
           f"{c.grpo.micro_batch_size} does not divide the mini-batch of {minibatch} rows")
  if c.p2o.enabled:
    _validate_p2o(c)
  validate_distributed(c)
  if num_devices is not None:
    batch_devices = _batch_devices(c, num_devices)
    _require(c.grpo.micro_batch_size % batch_devices == 0, "grpo.micro_batch_size",
             f"{c.grpo.micro_batch_size} is not divisible by the {batch_devices} devices of the data x fsdp axes")


def reward_functions(c: ml_collections.ConfigDict) -> str:
  """config.reward.functions, or when empty the data source's natural grader."""
  return c.reward.functions or ("builtin_exact" if c.data.source == "builtin" else "math")


def builtin_world(c: ml_collections.ConfigDict) -> arithmetic.WorldConfig:
  """The arithmetic world the `builtin` config section describes."""
  b = c.builtin
  try:
    return arithmetic.WorldConfig(easy_operands=b.easy_operands, easy_digits=b.easy_digits,
                                  hard_operands=b.hard_operands, hard_digits=b.hard_digits,
                                  held_out_fraction=b.held_out_fraction, lsb_first=b.lsb_first,
                                  easy_as_step=b.easy_as_step, scratchpad_format=b.scratchpad_format)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.builtin: {e}") from None


def _batch_devices(c: ml_collections.ConfigDict, num_devices: int) -> int:
  sizes = {axis: c.mesh[axis] for axis in ("data", "fsdp", "tensor")}
  known = 1
  for size in sizes.values():
    known *= size if size != -1 else 1
  rest = num_devices // known
  return (rest if sizes["data"] == -1 else sizes["data"]) * (rest if sizes["fsdp"] == -1 else sizes["fsdp"])


def validate_distributed(c: ml_collections.ConfigDict, process_count: int = 0) -> None:
  """The `distributed` section alone: checkable before JAX starts (the CLI runs it before jax.distributed).

  `process_count`: the number of processes once JAX runs (0: not known yet), for a run whose config leaves it to JAX
  (a TPU VM slice, SLURM); the run checks again with it at its start.
  """
  d = c.distributed
  _one_of(c, "distributed.initialize")
  _one_of(c, "distributed.cpu_collectives")
  _positive(c, "distributed.num_processes", "distributed.cpu_devices", allow_zero=True)
  if d.num_processes:
    _require(d.initialize != "never", "distributed.initialize", f"is 'never' but num_processes={d.num_processes}")
    _require(bool(d.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")),
             "distributed.coordinator_address", f"is empty (and JAX_COORDINATOR_ADDRESS unset) but num_processes="
             f"{d.num_processes}; give the host:port of process 0")
    _require(c.train.batch_size % d.num_processes == 0, "train.batch_size",
             f"{c.train.batch_size} is not divisible by distributed.num_processes={d.num_processes}")
  _require(d.process_id == -1 or 0 <= d.process_id < d.num_processes, "distributed.process_id",
           f"{d.process_id} must be -1 (auto) or in [0, num_processes={d.num_processes})")
  processes = process_count or d.num_processes
  # Orbax writes one checkpoint from all hosts together, and a resume reads it on all: a host-local directory holds
  # only each host's part.
  _require(processes <= 1 or bool(c.train.checkpoint_dir), "train.checkpoint_dir",
           f"a multi-host run ({processes} processes) needs a directory every host shares (gs://bucket/path or a "
           "shared mount); it is empty, so each host would write its own <workdir>/checkpoints")


def _validate_p2o(c: ml_collections.ConfigDict) -> None:
  p = c.p2o
  _require(0 <= p.hard_max_correct < c.rollout.num_samples, "p2o.hard_max_correct",
           f"{p.hard_max_correct} must be in [0, rollout.num_samples)")
  _positive(c, "p2o.gepa.dev_size", "p2o.gepa.beam_width", "p2o.gepa.minibatch_size",
            "p2o.reflection_max_new_tokens", "p2o.reflection_max_prompt_len")
  _positive(c, "p2o.hard_min_count", "p2o.gepa.max_iters", "p2o.gepa.max_metric_calls", "p2o.max_template_chars",
            allow_zero=True)
  _require(isinstance(p.gepa.remove_dominated, bool), "p2o.gepa.remove_dominated",
           f"{p.gepa.remove_dominated!r} must be True or False")
  _one_of(c, "p2o.distillation")
  _one_of(c, "p2o.ratio_mask")
  for switch in ("same_template_in_sample", "left_1_no_template_rollout", "drop_failed_template_rollout"):
    _require(isinstance(p[switch], bool), f"p2o.{switch}", f"{p[switch]!r} must be True or False")
  _require(0 < p.ratio_low < 1 < p.ratio_high, "p2o.ratio_low", f"need 0 < ratio_low < 1 < ratio_high, got "
           f"{p.ratio_low}, {p.ratio_high}")
  _one_of(c, "p2o.reflector")
  _one_of(c, "p2o.search")
  if p.reflector == "teacher":
    _require(bool(p.teacher.base_url) and bool(p.teacher.model), "p2o.teacher.base_url",
             "the teacher reflector needs p2o.teacher.base_url and p2o.teacher.model")
  _positive(c, "p2o.teacher.max_retries", "p2o.teacher.backoff_s", "p2o.teacher.max_backoff_s", allow_zero=True)
  _positive(c, "p2o.teacher.timeout_s", "p2o.teacher.max_concurrency")
  _validate_extra_body(p.teacher.extra_body)


def _validate_extra_body(text: str) -> None:
  """p2o.teacher.extra_body: "" or a JSON object that does not replace the request's model or messages."""
  if not text.strip():
    return
  try:
    extra = json.loads(text)
  except ValueError as e:
    raise ConfigError(f"config.p2o.teacher.extra_body: not valid JSON ({e}): {text!r}") from None
  _require(isinstance(extra, dict), "p2o.teacher.extra_body", f"must be a JSON object, got {type(extra).__name__}: "
           f"{text!r}")
  clash = sorted({"model", "messages"} & set(extra))
  _require(not clash, "p2o.teacher.extra_body", f"must not set {clash} (p2o.teacher.model and the reflection prompt "
           "are the request's own)")
