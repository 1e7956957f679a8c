"""One builder per component: the dry run lowers exactly the functions the trainer runs."""

import jax
import numpy as np

from p2o_jax import builders, dry_run, sharding
from p2o_jax.config import base_config, validate
from p2o_jax.experiment import load_data
from p2o_jax.models.builtin import build_builtin_checkpoint
from p2o_jax.models.config import load_hf_config
from p2o_jax.rl.trainer import Trainer


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_the_dry_run_lowers_the_trainers_own_train_step_and_logprob_fn(tmp_path):
  checkpoint = build_builtin_checkpoint(tmp_path / "policy", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                        intermediate_size=64)
  c = base_config()
  c.workdir, c.model.checkpoint = str(tmp_path / "run"), str(checkpoint)
  c.data.source, c.data.builtin_train_size, c.data.prompt_format = "builtin", 16, "{question}"
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples = 32, 8, 2
  c.train.batch_size, c.train.epochs, c.grpo.micro_batch_size = 4, 3, 2
  c.optim.warmup_ratio = 0.25  # the schedule's constants depend on the step count: they must agree too
  validate(c, jax.device_count())
  mesh = sharding.make_mesh({})
  trainer = Trainer(c, policy=builders.build_policy(c, checkpoint, mesh), train_queries=load_data(c)[0],
                    eval_sets={}, score=lambda texts, answers: np.zeros(len(texts)))
  steps = dry_run.AbstractSteps.build(c, load_hf_config(checkpoint), mesh)
  dry_train, dry_logprobs = steps.lower()
  packing = trainer.packer.packing
  minibatch = trainer.layout.abstract(dry_run.batch_shapes(c, packing, train_step=True), num_leading=1)
  whole = trainer.layout.abstract(dry_run.batch_shapes(c, packing, train_step=False), num_leading=1)
  params, opt_state = _abstract(trainer.policy.params), _abstract(trainer.opt_state)
  assert trainer.train_step.lower(params, opt_state, minibatch).as_text() == dry_train.as_text()
  assert trainer.logprobs.lower(params, whole).as_text() == dry_logprobs.as_text()
  assert dry_run.planned_train_steps(c) == trainer.total_steps == 12
