"""The pure parts of benchmarks/grpo_step.py (the GRPO step bench), without TRL (CI does not install it): the TRL-side reward agrees
with our grader, our side's config is the workload, and the step gate runs a trainer loop exactly one step at a time."""

import pathlib
import sys
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `benchmarks` is not installed, only p2o_jax
from benchmarks.grpo_step import WORKLOADS, bench_queries, exact_match_reward, ours_config  # noqa: E402
from benchmarks.trl_grpo_side import SteppedTrainer  # noqa: E402
from p2o_jax.rewards.graders import builtin_exact  # noqa: E402


def test_trl_reward_is_our_grader_on_conversational_and_plain_completions():
  texts = ["The answer is 27.", "\\boxed{72}", "no number", "1+2=3"]
  answers = ["27", "27", "27", "3"]
  conversational = [[{"role": "assistant", "content": t}] for t in texts]
  expected = [builtin_exact(t, a, "last_number") for t, a in zip(texts, answers)]
  assert expected == [1.0, 0.0, 0.0, 1.0]
  assert exact_match_reward(conversational, answer=answers, prompts=["p"] * 4) == expected
  assert exact_match_reward(texts, answer=answers) == expected


def test_our_side_is_the_workload_as_plain_grpo_with_one_update(tmp_path):
  work = WORKLOADS["demo"]
  c = ours_config("builtin", work, str(tmp_path))
  assert (c.rollout.num_samples, c.rollout.max_new_tokens, c.rollout.temperature) == (6, 96, 1.0)
  assert (c.rollout.top_p, c.rollout.top_k) == (1.0, 0)
  assert not c.p2o.enabled and c.grpo.kl_coef == 0.0
  assert c.grpo.ppo_epochs * c.grpo.num_minibatches == 1
  assert c.grpo.micro_batch_size == work.rows == 48
  assert c.train.batch_size == work.prompts
  queries = bench_queries(c, work.prompts)
  assert [q.columns["difficulty"] for q in queries] == ["easy"] * 4 + ["hard"] * 4
  assert len({q.id for q in queries}) == work.prompts


class _FakeLoop:
  """A training loop that calls the callbacks as transformers.Trainer does and records each step it takes."""

  def __init__(self, max_steps: int):
    self.max_steps, self.steps, self.callbacks = max_steps, [], []

  def add_callback(self, callback):
    self.callbacks.append(callback)

  def train(self):
    control = types.SimpleNamespace(should_training_stop=False)
    for cb in self.callbacks:
      cb.on_train_begin(None, None, control)
    for step in range(self.max_steps):
      self.steps.append(step)
      for cb in self.callbacks:
        cb.on_step_end(None, None, control)
      if control.should_training_stop:
        return


def test_stepped_trainer_runs_one_step_per_call_and_stops_early_on_close():
  loop = _FakeLoop(max_steps=10)
  stepper = SteppedTrainer(loop)
  assert loop.steps == []  # waits for the first step() before its first step
  stepper.step()
  assert loop.steps == [0]
  stepper.step()
  assert loop.steps == [0, 1]
  stepper.close()
  assert loop.steps == [0, 1]  # stopped at the boundary, not run to max_steps
