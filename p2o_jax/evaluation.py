"""Plain-prompt evaluation on held-out sets, with the paper's protocol: sets with fewer than `small_set_size` problems
are scored as the mean over `small_set_samples` samples at the rollout temperature; larger sets greedily."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from p2o_jax.data.records import Query
from p2o_jax.models.tokenizer import chat_prompt_ids, decode_completions
from p2o_jax.sampling import Sampler, SamplingConfig


@dataclasses.dataclass(frozen=True)
class EvalProtocol:
  max_new_tokens: int
  temperature: float = 0.6
  small_set_size: int = 100
  small_set_samples: int = 16

  @classmethod
  def from_config(cls, c) -> EvalProtocol:
    """The run config's `eval` section (max_new_tokens 0: the rollout's)."""
    return cls(c.eval.max_new_tokens or c.rollout.max_new_tokens, c.eval.temperature, c.eval.small_set_size,
               c.eval.small_set_samples)

  def sampling_for(self, num_problems: int) -> tuple[SamplingConfig, int]:
    """(sampling config, samples per problem) for a set of `num_problems`."""
    if num_problems < self.small_set_size:
      return SamplingConfig(self.max_new_tokens, temperature=self.temperature), self.small_set_samples
    return SamplingConfig(self.max_new_tokens, temperature=0.0), 1


def evaluate_set(sampler: Sampler, tokenizer, queries: Sequence[Query], prompt_format: str, protocol: EvalProtocol,
                 score: Callable[[Sequence[str], Sequence[str]], np.ndarray], seed: int = 0) -> dict[str, float]:
  """{"accuracy", "samples"}: mean verified reward over problems x samples, prompts without any template."""
  sampling, n = protocol.sampling_for(len(queries))
  prompts = chat_prompt_ids(tokenizer, [prompt_format.format(question=q.question) for q in queries])
  out = sampler.generate(prompts, sampling, n=n, seed=seed)
  texts = decode_completions(tokenizer, out.tokens, out.lengths)
  rewards = score(texts, [q.answer for q in queries for _ in range(n)])
  return {"accuracy": float(np.mean(rewards)), "samples": float(n)}
