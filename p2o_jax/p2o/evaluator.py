"""GEPA's evaluator on the device: every request list is one batched greedy sampler call, scored by the verifier.

Multi-process: GEPA runs in lockstep, so every process evaluates the same requests in one sampler call over all
devices and gets every row back (the sampler's default, lockstep mode); their scores, and so the search, are identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from p2o_jax.data.records import Query
from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions
from p2o_jax.p2o.records import Rollout
from p2o_jax.p2o.templates import apply_template, feedback_text
from p2o_jax.sampling import Sampler, SamplingConfig


class SamplerEvaluator:
  """Greedy rollouts of (template, hard-set index) pairs with the current (frozen) policy."""

  def __init__(self, sampler: Sampler, tokenizer, hard_set: Sequence[Query], prompt_format: str, max_new_tokens: int,
               score: Callable[[Sequence[str], Sequence[str]], np.ndarray]):
    self.sampler, self.tokenizer, self.hard_set = sampler, tokenizer, hard_set
    self.prompt_format, self.score = prompt_format, score
    self.sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    self.calls, self.seconds = 0, 0.0

  def user_turn(self, template: str, index: int) -> str:
    return apply_template(template, self.prompt_format.format(question=self.hard_set[index].question))

  def evaluate(self, requests: Sequence[tuple[str, int]]) -> list[Rollout]:
    if not requests:
      return []
    start = time.perf_counter()
    prompts = chat_prompt_ids(self.tokenizer, [self.user_turn(t, i) for t, i in requests])
    out = self.sampler.generate(prompts, self.sampling)
    texts = decode_completions(self.tokenizer, out.tokens, out.lengths)
    answers = [self.hard_set[i].answer for _, i in requests]
    rewards = self.score(texts, answers)
    self.calls += 1
    self.seconds += time.perf_counter() - start
    return [Rollout(score=float(r), output=t, feedback=feedback_text(r > 0, a))
            for r, t, a in zip(rewards, texts, answers)]
