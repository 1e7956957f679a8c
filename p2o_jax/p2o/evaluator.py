"""GEPA's evaluator on the device: every request list is one batched greedy `Policy.generate` call, scored by the
verifier.

Multi-process: GEPA runs in lockstep, so every process evaluates the same requests in one sampler call over all
devices and gets every row back (the sampler's default, lockstep mode). Process 0 alone scores them and broadcasts the
rewards (`distributed.scored_on_process_zero`): a verifier item that times out on one host but not on another would
otherwise split the search (accepts, dev scores, the best template) and the collectives that follow it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence


from p2o_jax import distributed
from p2o_jax.data.records import Query
from p2o_jax.p2o.records import Rollout
from p2o_jax.p2o.templates import feedback_text
from p2o_jax.policy import Policy
from p2o_jax.rewards.functions import ScoreFn
from p2o_jax.sampling import SamplingConfig


class PolicyEvaluator:
  """Greedy rollouts of (template, hard-set index) pairs with the current (frozen) policy."""

  def __init__(self, policy: Policy, hard_set: Sequence[Query], prompt_format: str, max_new_tokens: int,
               score: ScoreFn):
    self.policy, self.hard_set = policy, hard_set
    self.prompt_format, self.score = prompt_format, distributed.scored_on_process_zero(score)
    self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    self.calls, self.seconds = 0, 0.0

  def evaluate(self, requests: Sequence[tuple[str, int]]) -> list[Rollout]:
    if not requests:
      return []
    start = time.perf_counter()
    turns = [self.prompt_format.format(question=self.hard_set[i].question) for _, i in requests]
    out = self.policy.generate(turns, self.sampling, templates=[t for t, _ in requests])
    queries = [self.hard_set[i] for _, i in requests]
    answers = [q.answer for q in queries]
    rewards = self.score(out.texts, queries)
    self.calls += 1
    self.seconds += time.perf_counter() - start
    return [Rollout(score=float(r), output=t, feedback=feedback_text(r > 0, a))
            for r, t, a in zip(rewards, out.texts, answers)]
