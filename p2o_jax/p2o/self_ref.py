"""Self-Ref: the frozen reference policy writes GEPA's new templates, through our own sampler (no extra server)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax

from p2o_jax.p2o.records import ReflectionRequest
from p2o_jax.p2o.reflection import ReflectionStats, TokenizerCounter, build_reflection_prompt, templates_from_replies
from p2o_jax.policy import Policy
from p2o_jax.sampling import SamplingConfig

log = logging.getLogger(__name__)


class SelfReflector:
  """One batched `Policy.generate(reference=True)` call per `propose`.

  Sampling seeds come from (seed, number of calls so far), and that count is saved with GEPA's state, so a resumed
  search draws the same replies. enable_thinking: what the reflection prompt passes to a chat template with Qwen3's
  thinking switch (None: the policy's `reflection_enable_thinking`, i.e. p2o.thinking_in_reflection, default off).
  """

  def __init__(self, policy: Policy, *, seed: int, temperature: float = 0.6, max_new_tokens: int = 2048,
               max_template_chars: int = 0, enable_thinking: bool | None = None):
    self.policy, self.seed = policy, seed
    self.enable_thinking = policy.reflection_enable_thinking if enable_thinking is None else enable_thinking
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
    counter = TokenizerCounter(self.policy.tokenizer)  # the reflector's own tokens decide what is cut
    turns = [build_reflection_prompt(r, tokens=counter) for r in requests]
    limit = self.policy.reference_max_prompt_len
    prompt_ids = self.policy.prompt_ids(turns, enable_thinking=self.enable_thinking)
    fits = [i for i, ids in enumerate(prompt_ids) if len(ids) <= limit]
    if len(fits) < len(turns):
      log.warning("%d reflection prompts exceed max_prompt_len=%d and are rejected", len(turns) - len(fits), limit)
    replies = [""] * len(turns)  # an empty reply is rejected and counted like any reply without a fence
    if fits:
      seed = jax.random.fold_in(jax.random.key(self.seed), self.calls)
      out = self.policy.generate([turns[i] for i in fits], self.sampling, seed=seed, reference=True,
                                 enable_thinking=self.enable_thinking)
      for i, text in zip(fits, out.texts):
        replies[i] = text
    self.calls += 1
    return templates_from_replies(replies, self.stats, max_chars=self.max_template_chars)
