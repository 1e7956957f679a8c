"""The paper's setting (../shared/P2O_SPEC.md section 6): Qwen3-4B, thinking off, P^2O with Self-Ref on a DeepScaleR
5K subset, K=6, T=0.6, batch 128, lr 1e-6 with 5% warmup, 10 epochs, 12288-token responses, best-dev checkpoint.

Data: `python -m p2o_jax.prepare --source deepscaler --input <DeepScaleR copy> --output /mnt/data/deepscaler` (the
authors' 5K subset and 500 dev problems; see the README's "Data"). Needs a TPU slice (the dry run: v5p-8 fits); set
the paths, then run on all workers:
python -m p2o_jax.main --config configs/qwen3_4b_deepscaler.py --workdir gs://BUCKET/runs/p2o_qwen3_4b
Afterwards the paper's benchmarks: prepare each (aime24, aime25, amc, math500, minerva, olympiadbench) and run
python -m p2o_jax.evaluate --config configs/qwen3_4b_deepscaler.py --checkpoint RUN/exports/best \
    --sets aime24=/mnt/data/aime24/test.jsonl,aime25=/mnt/data/aime25/test.jsonl,...
"""

import ml_collections

from p2o_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.workdir = "runs/qwen3_4b_deepscaler"
  c.model.checkpoint = "/mnt/models/Qwen3-4B"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.data.train_path = "/mnt/data/deepscaler/train_5k.jsonl"
  c.data.question_field, c.data.answer_field, c.data.id_field = "problem", "answer", "id"
  c.reward.functions = "math"  # math-verify; the first function is the correctness reward
  c.eval.sets = "dev=/mnt/data/deepscaler/dev_500.jsonl"
  c.eval.every_steps = 30  # the authors' in-training validation interval
  c.rollout.max_prompt_len, c.rollout.max_new_tokens = 4096, 12288  # the authors' prompt limit
  c.rollout.kv_cache_gib = 8.0  # per chip: rollouts decode in as many slots as this holds (the dry run checks it)
  c.rollout.num_samples, c.rollout.temperature = 6, 0.6
  c.train.batch_size, c.train.epochs, c.train.checkpoint_every, c.train.export_dtype = 128, 10, 10, "bfloat16"
  c.grpo.num_minibatches, c.grpo.micro_batch_size = 2, 16
  c.optim.lr, c.optim.warmup_ratio, c.optim.weight_decay = 1e-6, 0.05, 0.01
  c.p2o.enabled = True
  c.p2o.reflector = "self"
  return c
