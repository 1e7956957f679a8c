"""Self-Ref: the frozen reference policy writes GEPA's new templates, through our own sampler (no extra server)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax

from p2o_jax.p2o.records import ReflectionRequest
from p2o_jax.p2o.reflection import ReflectionStats, build_reflection_prompt, templates_from_replies
from p2o_jax.policy import Policy
from p2o_jax.sampling import SamplingConfig

log = logging.getLogger(__name__)


class SelfReflector:
  """One batched `Policy.generate(reference=True)` call per `propose`.

  Sampling seeds come from (seed, number of calls so far), and that count is saved with GEPA's state, so a resumed
  search draws the same replies.
  """

  def __init__(self, policy: Policy, *, seed: int, temperature: float = 0.6, max_new_tokens: int = 2048,
               max_template_chars: int = 2000):
    self.policy, self.seed = policy, seed
    self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    self.max_template_chars = max_template_chars
    self.stats = ReflectionStats()
    self.calls = 0

  def state(self) -> int:
    return self.calls

  def restore(self, calls: int) -> None:
    self.calls = int(calls)

  def propose(self, requests: Sequence[ReflectionRequest]) -> list[str | None]:
    self.stats.requests += len(requests)
    turns = [build_reflection_prompt(r) for r in requests]
    limit = self.policy.reference_max_prompt_len
    fits = [i for i, ids in enumerate(self.policy.prompt_ids(turns)) if len(ids) <= limit]
    if len(fits) < len(turns):
      log.warning("%d reflection prompts exceed max_prompt_len=%d and are rejected", len(turns) - len(fits), limit)
    replies = [""] * len(turns)  # an empty reply is rejected and counted like any reply without a fence
    if fits:
      seed = jax.random.fold_in(jax.random.key(self.seed), self.calls)
      out = self.policy.generate([turns[i] for i in fits], self.sampling, seed=seed, reference=True)
      for i, text in zip(fits, out.texts):
        replies[i] = text
    self.calls += 1
    return templates_from_replies(replies, self.stats, max_chars=self.max_template_chars)
