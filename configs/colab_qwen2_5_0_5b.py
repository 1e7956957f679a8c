"""A small real model on a Colab TPU: Qwen2.5-0.5B-Instruct with GRPO (P^2O off) on GSM8K-style JSONL data.

Put the checkpoint directory and data files in place first (nothing is downloaded at run time), then:
python -m p2o_jax.main --config configs/colab_qwen2_5_0_5b.py --config.model.checkpoint=/content/Qwen2.5-0.5B-Instruct
"""

import ml_collections

from p2o_jax.config import base_config


def get_config() -> ml_collections.ConfigDict:
  c = base_config()
  c.workdir = "runs/colab_qwen2_5_0_5b"
  c.model.checkpoint = "/content/Qwen2.5-0.5B-Instruct"
  c.model.param_dtype = "float32"
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"  # 16 rows of 768 tokens: without remat the saved activations alone overflow a 16 GB v5e chip
  c.data.train_path = "/content/data/gsm8k_train.jsonl"
  c.data.question_field, c.data.answer_field = "question", "answer"
  c.eval.sets = "gsm8k_test=/content/data/gsm8k_test.jsonl"
  c.eval.every_steps = 50
  c.reward.fallback = "last_number"  # GSM8K answers end in "#### 42"; the extractor reads that first
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples = 256, 512, 8
  # 9 MiB of KV cache per row: sampler calls of up to 142 rows, so a 99-problem set's 1,584 evaluation samples do not
  # prefill at once (one call of 2,048 rows needs 39 GB). `python -m p2o_jax.dry_run ... --topology v5e-1` checks it.
  c.rollout.kv_cache_gib = 1.25
  c.train.batch_size, c.train.epochs, c.train.checkpoint_every = 32, 1, 25
  c.grpo.num_minibatches, c.grpo.micro_batch_size = 2, 8  # 16 rows per micro-batch left 2% of a v5e chip free
  c.optim.lr = 1e-6
  return c
