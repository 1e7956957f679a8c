"""P^2O end to end on a tiny policy: two epochs produce a hard set, run GEPA, assign templates, and the second epoch
rolls out templated groups that are trained on the plain prompt; a run killed during GEPA resumes at the search."""

import hashlib
import json
import re

import jax
import numpy as np
import pytest
from flax import nnx

from p2o_jax import sharding
from p2o_jax.config import base_config, validate
from p2o_jax.data.records import Query
from p2o_jax.metrics import read_metrics
from p2o_jax.models.builtin import build_builtin_checkpoint
from p2o_jax.builders import build_policy
from p2o_jax.models.hf_checkpoint import load_hf_model, save_hf_model
from p2o_jax.models.tokenizer import load_tokenizer
from p2o_jax.p2o import phase
from p2o_jax.p2o.hooks import P2OHooks
from p2o_jax.p2o.self_ref import SelfReflector
from p2o_jax.rl.trainer import Trainer
from p2o_jax.sampling import SamplingConfig

K = 4


def synthetic_score(texts, queries):
  """A deterministic stand-in verifier: about a third of all responses 'solve' their query. It lets a random tiny
  policy have hard and non-hard queries, and templates that change which ones are solved, so every P^2O path runs."""
  return np.asarray([hashlib.sha256(f"{t}|{a}".encode()).digest()[0] % 3 == 0 for t, a in zip(texts, (q.answer for q in queries))],
                    np.float32)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
  """A tiny random policy with weights scaled up, so its greedy output depends on the whole prompt (at the default
  init scale, a template in front of the question would hardly change what it writes)."""
  base = build_builtin_checkpoint(tmp_path_factory.mktemp("policy") / "tiny", hidden_size=32, num_layers=1,
                                  num_heads=2, num_kv_heads=1, intermediate_size=64)
  model = load_hf_model(base)
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda x: x * 25.0, params))
  return save_hf_model(model, base.parent / "scaled", tokenizer=load_tokenizer(base))


def p2o_config(workdir, policy_dir):
  c = base_config()
  c.workdir = str(workdir)
  c.model.checkpoint = str(policy_dir)
  c.data.source, c.data.prompt_format = "builtin", "{question}"
  c.rollout.max_prompt_len, c.rollout.max_new_tokens, c.rollout.num_samples, c.rollout.temperature = 128, 6, K, 1.0
  c.train.batch_size, c.train.epochs, c.train.checkpoint_every = 4, 2, 100
  c.grpo.micro_batch_size, c.optim.lr = 8, 1e-3
  c.p2o.enabled, c.p2o.reflector, c.p2o.hard_max_correct, c.p2o.hard_min_count = True, "offline", K - 1, 2
  c.p2o.gepa.dev_size, c.p2o.gepa.beam_width, c.p2o.gepa.minibatch_size = 4, 4, 1
  c.p2o.gepa.max_iters, c.p2o.gepa.max_metric_calls = 20, 400
  c.p2o.reflection_max_prompt_len = 128
  validate(c, 1)
  return c


def make_trainer(c, policy_dir, queries):
  policy = build_policy(c, policy_dir, sharding.make_mesh({}))
  return Trainer(c, policy=policy, train_queries=queries, eval_sets={}, score=synthetic_score, hooks=P2OHooks(c))


QUERIES = [Query(f"q{i}", f"Q: {10 + i}+{20 + 3 * i}=", str(30 + 4 * i)) for i in range(8)]


@pytest.mark.slow
def test_two_epochs_collect_hard_set_run_gepa_and_roll_out_templated_groups(policy_dir, tmp_path, capsys):
  c = p2o_config(tmp_path, policy_dir)
  trainer = make_trainer(c, policy_dir, QUERIES)
  seen = []
  original = trainer.hooks.contexts

  def spy(queries, turns, group_size):
    contexts = original(queries, turns, group_size)
    seen.append((list(turns), contexts))
    return contexts

  trainer.hooks.contexts = spy
  trainer.run()
  records = read_metrics(tmp_path / "metrics.jsonl")
  epoch_ends = [r for r in records if "p2o/epoch_hard_set_size" in r]
  gepa_records = [r for r in records if "p2o/gepa_iterations" in r]
  # A search after epoch 0; none after the last epoch, whose templates no epoch would use.
  assert len(epoch_ends) == 2 and gepa_records == epoch_ends[:1]
  assert all(r["p2o/epoch_hard_set_size"] >= 2 and r["p2o/gepa_iterations"] >= 1 for r in gepa_records)
  assert not (tmp_path / "templates" / "epoch_001.md").exists()
  first = gepa_records[0]
  assert first["p2o/gepa_metric_calls"] <= 400 + 4 * (2 * 1 + 4)  # budget + at most one iteration's worst case
  # The reflector's own counters are logged per search: every request was accepted or rejected for a reason.
  reflector = {k.split("/")[-1]: v for k, v in first.items() if k.startswith("p2o/reflector/")}
  assert reflector["requests"] >= first["p2o/gepa_iterations"] > 0
  assert reflector["requests"] == reflector["accepted"] + sum(v for k, v in reflector.items() if k.startswith("rejected"))
  assert (tmp_path / "templates" / "epoch_000.md").read_text().startswith("# GEPA after epoch 0")
  # Epoch 1 (steps 3-4) rolls out with the templates GEPA assigned after epoch 0.
  templated = [(turns, ctx) for turns, ctx in seen[2:] if ctx.generate != ctx.train]
  assert templated, "no templated rows in the second epoch"
  for turns, ctx in templated:
    plain_rows = [t for t in turns for _ in range(K)]
    assert ctx.train == plain_rows  # context distillation: gradients are taken on the plain prompt
    assert any(g.endswith("\n\n" + t) and g != t for g, t in zip(ctx.generate, ctx.train))
  epoch1 = [r for r in records if r.get("epoch") == 1.0 and "p2o/ratio_masked_token_fraction" in r]
  assert epoch1 and all(0.0 <= r["p2o/ratio_masked_token_fraction"] <= 1.0 for r in epoch1)
  assert "p2o/templated_success" in epoch_ends[1]
  # The search shows one progress line (metric calls of the budget, best dev score), not a log line per iteration.
  shown = re.findall(r"gepa after epoch 0 +(\d+)/400 .*best_dev=([\d.]+)", capsys.readouterr().err)
  assert shown and int(shown[-1][0]) == min(first["p2o/gepa_metric_calls"], 400)
  assert float(shown[-1][1]) == pytest.approx(first["p2o/gepa_best_dev"], abs=0.005)


@pytest.mark.slow
def test_kill_during_gepa_resumes_at_the_search(policy_dir, tmp_path, monkeypatch):
  """Stop the run inside GEPA after its first iteration; a new trainer continues that search, not the epoch."""
  c = p2o_config(tmp_path, policy_dir)
  trainer = make_trainer(c, policy_dir, QUERIES)

  class Stop(Exception):
    pass

  save_progress = phase._save_progress  # pylint: disable=protected-access

  def stop_after_first_iteration(ctx, hard_ids, state):
    save_progress(ctx, hard_ids, state)
    if state.iteration == 1:
      raise Stop

  monkeypatch.setattr(phase, "_save_progress", stop_after_first_iteration)
  with pytest.raises(Stop):
    trainer.run()
  trainer.checkpointer.close()
  monkeypatch.setattr(phase, "_save_progress", save_progress)
  progress = json.loads((tmp_path / "p2o" / "gepa_progress.json").read_text())
  assert progress["state"]["iteration"] == 1

  resumed = make_trainer(c, policy_dir, QUERIES)
  resumed.run()
  final = json.loads((tmp_path / "p2o" / "gepa_progress.json").read_text())
  assert final["epoch"] == 0 and final["state"]["iteration"] > 1
  # The resumed search continued the saved one: its first iteration's record is the interrupted run's.
  assert final["state"]["history"][0] == progress["state"]["history"][0]
  steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "rollout/reward_mean" in r]
  assert steps == [1, 2, 3, 4]  # epoch 0's steps ran once; the resumed run did not repeat them


def test_self_ref_reflects_with_the_initial_policy_not_the_trained_one(policy_dir, tmp_path):
  from p2o_jax.p2o.reflectors import make_reflector  # pylint: disable=import-outside-toplevel
  c = p2o_config(tmp_path, policy_dir)
  c.p2o.reflector = "self"
  trainer = make_trainer(c, policy_dir, QUERIES)
  policy = trainer.policy
  assert policy.ref_params is not None and c.grpo.kl_coef == 0  # kept for Self-Ref although beta = 0
  greedy, turns = SamplingConfig(max_new_tokens=6, temperature=0.0), [q.question for q in QUERIES]
  before = policy.generate(turns, greedy).tokens
  moved = jax.tree.map(lambda x: x + np.sin(np.arange(x.size)).reshape(x.shape).astype(x.dtype), policy.params)
  policy.set_params(moved)  # as if training had moved the policy
  assert not np.array_equal(policy.generate(turns, greedy).tokens, before)
  np.testing.assert_array_equal(policy.generate(turns, greedy, reference=True).tokens, before)
  reflector = make_reflector(c, policy)
  assert isinstance(reflector, SelfReflector) and reflector.policy is policy  # it samples with reference=True


def test_run_keeps_the_setup_heap_out_of_garbage_collection_and_releases_it_on_exit(policy_dir, tmp_path, monkeypatch):
  import gc  # pylint: disable=import-outside-toplevel
  trainer = make_trainer(p2o_config(tmp_path, policy_dir), policy_dir, QUERIES)
  frozen_during_step = []

  def failing_step(step, queries):
    frozen_during_step.append(gc.get_freeze_count())
    raise RuntimeError("stop here")

  monkeypatch.setattr(trainer, "step", failing_step)
  with pytest.raises(RuntimeError, match="stop here"):
    trainer.run()
  assert frozen_during_step and frozen_during_step[0] > 1000  # the policy, tokenizer and modules were frozen
  assert gc.get_freeze_count() == 0  # released although the run failed
