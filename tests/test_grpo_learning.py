"""GRPO learns: on an easy built-in task (16 one-digit sums), a weakly pre-trained tiny policy's accuracy rises within
25 GRPO steps through the real trainer and the sandboxed verifier (seeded, CPU)."""

import jax
import pytest
from flax import nnx

from p2o_jax import sharding
from p2o_jax.config import base_config, validate
from p2o_jax.data.char_tokenizer import build_char_tokenizer, render_user_prompt
from p2o_jax.data.records import Query
from p2o_jax.metrics import read_metrics
from p2o_jax.models.builtin import builtin_model_config
from p2o_jax.models.decoder import Decoder
from p2o_jax.policy import Policy
from p2o_jax.rewards.pool import VerifierPool
from p2o_jax.rl.trainer import Trainer
from p2o_jax.sft import SFTConfig, train_sft

ALL_SUMS = [Query(f"{a}+{b}", f"Q: {a}+{b}=", str(a + b)) for a in range(10) for b in range(10)]
TASK = ALL_SUMS[::6][:16]  # one batch: every step sees every problem, so 25 steps are enough to move them


def weak_policy(tokenizer):
  """Knows the answer format, gets ~10% of the sums right: room to learn, and rewards to learn from."""
  cfg = builtin_model_config(len(tokenizer), num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1,
                             intermediate_size=128)
  model = Decoder(cfg, nnx.Rngs(0))
  examples = [(render_user_prompt(q.question), f" The answer is {q.answer}") for q in ALL_SUMS]
  train_sft(model, tokenizer, examples, SFTConfig(steps=150, rows=8, row_len=128, lr=3e-3, warmup_steps=10))
  return model


@pytest.mark.slow
def test_grpo_raises_accuracy_on_one_digit_sums(tmp_path):
  tokenizer = build_char_tokenizer()
  c = base_config()
  c.workdir = str(tmp_path)
  c.data.source, c.data.prompt_format = "builtin", "{question}"
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples, c.rollout.temperature = 32, 20, 8, 0.6
  c.train.batch_size, c.train.max_steps, c.train.checkpoint_every = 16, 25, 100
  c.grpo.micro_batch_size, c.grpo.num_minibatches = 32, 2
  c.optim.lr, c.optim.warmup_ratio, c.optim.weight_decay = 1e-3, 0.0, 0.0
  c.reward.fallback = "last_number"
  validate(c, jax.device_count())
  with VerifierPool(num_workers=2, timeout_s=5.0, fallback="last_number") as verifier:
    policy = Policy(weak_policy(tokenizer), tokenizer, mesh=sharding.make_mesh({}),
                    max_prompt_len=c.rollout.max_prompt_len)
    trainer = Trainer(c, policy=policy, train_queries=TASK, eval_sets={"sums": TASK}, score=verifier.scorer(c.data.prompt_format))
    history = trainer.run()
  before, after = history["eval_at_start"]["eval/sums/accuracy"], history["eval_at_end"]["eval/sums/accuracy"]
  assert before < 0.3, before  # mean@16 at T=0.6: the set has fewer than 100 problems
  assert after >= before + 0.1, (before, after)
  rewards = [r["rollout/reward_mean"] for r in read_metrics(tmp_path / "metrics.jsonl") if "rollout/reward_mean" in r]
  assert sum(rewards[-5:]) > sum(rewards[:5]) + 0.5, rewards
