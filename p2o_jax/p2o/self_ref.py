"""Self-Ref: the frozen reference policy writes GEPA's new templates, through our own sampler (no extra server)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax

from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions
from p2o_jax.p2o.records import ReflectionRequest
from p2o_jax.p2o.reflection import ReflectionStats, build_reflection_prompt, templates_from_replies
from p2o_jax.sampling import Sampler, SamplingConfig

log = logging.getLogger(__name__)


class SelfReflector:
  """One batched sampler call per `propose`; the sampler holds the reference (initial) params.

  Sampling seeds come from (seed, number of calls so far), and that count is saved with GEPA's state, so a resumed
  search draws the same replies.
  """

  def __init__(self, sampler: Sampler, tokenizer, *, seed: int, temperature: float = 0.6, max_new_tokens: int = 2048,
               max_template_chars: int = 2000):
    self.sampler, self.tokenizer, self.seed = sampler, tokenizer, seed
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
    prompts = chat_prompt_ids(self.tokenizer, [build_reflection_prompt(r) for r in requests])
    fits = [i for i, p in enumerate(prompts) if len(p) <= self.sampler.max_prompt_len]
    if len(fits) < len(prompts):
      log.warning("%d reflection prompts exceed max_prompt_len=%d and are rejected", len(prompts) - len(fits),
                  self.sampler.max_prompt_len)
    replies = [""] * len(prompts)  # an empty reply is rejected and counted like any reply without a fence
    if fits:
      seed = jax.random.fold_in(jax.random.key(self.seed), self.calls)
      out = self.sampler.generate([prompts[i] for i in fits], self.sampling, seed=seed)
      for i, text in zip(fits, decode_completions(self.tokenizer, out.tokens, out.lengths)):
        replies[i] = text
    self.calls += 1
    return templates_from_replies(replies, self.stats, max_chars=self.max_template_chars)
