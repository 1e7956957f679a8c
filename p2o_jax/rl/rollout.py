"""Rollouts: queries -> K responses each (one `Policy.generate` call) -> verified rewards.

Every row has two contexts: the user turn it was GENERATED from and the user turn its gradient is TAKEN on. Plain GRPO
uses the query for both. P^2O generates hard queries' rows from templated turns and trains them on the plain one
(context distillation); `RowContexts` is that seam.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from p2o_jax.data.records import Query
from p2o_jax.policy import Policy
from p2o_jax.rewards.functions import RewardScores, ScoreFn, as_scores
from p2o_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RowContexts:
  """Per row (query-major, K rows per query): the user turn to sample from and the one to train on, and whether the
  row was generated from a template (None: exactly the rows whose two turns differ)."""

  generate: list[str]
  train: list[str]
  templated: list[bool] | None = None


@dataclasses.dataclass(frozen=True)
class Rollouts:
  group_size: int
  answers: list[str]  # per row: the query's reference answer
  texts: list[str]  # per row: the decoded response
  generate_prompt_ids: list[list[int]]
  train_prompt_ids: list[list[int]]
  tokens: np.ndarray  # (rows, max_new) int32
  mask: np.ndarray  # (rows, max_new) bool
  sampler_logp: np.ndarray  # (rows, max_new): log-probs under the GENERATION context
  rewards: np.ndarray  # (rows,) float32: the weighted sum of the reward functions
  reward_terms: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # function name -> (rows,), NaN = None
  # (rows,) bool: generated from a template. None: derived from the prompt ids, which fails when a row is also trained
  # on its template (p2o.distillation="templated"), so P^2O's contexts always say it.
  templated: np.ndarray | None = None

  @property
  def num_rows(self) -> int:
    return len(self.texts)

  def correct(self) -> np.ndarray:
    """Per row: whether the correctness reward (the first reward function) is positive."""
    return RewardScores(self.rewards, self.reward_terms).correctness > 0

  def is_templated(self) -> np.ndarray:
    """Per row: whether it was generated from a templated user turn."""
    if self.templated is not None:
      return np.asarray(self.templated, bool)
    return np.asarray([g != t for g, t in zip(self.generate_prompt_ids, self.train_prompt_ids)], bool)


def plain_contexts(user_turns: Sequence[str], group_size: int) -> RowContexts:
  rows = [turn for turn in user_turns for _ in range(group_size)]
  return RowContexts(generate=rows, train=list(rows))


def collect_rollouts(policy: Policy, contexts: RowContexts, queries: Sequence[Query], group_size: int,
                     sampling: SamplingConfig, seed, score: ScoreFn) -> Rollouts:
  """Sample one response per row in a single call and score it against the row's query.

  The rows are this process's share of the step's global batch (one process-local sampler call over all processes).
  """
  out = policy.generate(contexts.generate, sampling, seed=seed, process_local=True)
  train_ids = out.prompt_ids if contexts.train == contexts.generate else policy.prompt_ids(contexts.train)
  row_queries = [q for q in queries for _ in range(group_size)]
  scores = as_scores(score(out.texts, row_queries), len(row_queries))
  return Rollouts(group_size=group_size, answers=[q.answer for q in row_queries], texts=out.texts,
                  generate_prompt_ids=out.prompt_ids, train_prompt_ids=train_ids, tokens=out.tokens, mask=out.mask,
                  sampler_logp=out.logprobs, rewards=scores.total, reward_terms=scores.by_function,
                  templated=None if contexts.templated is None else np.asarray(contexts.templated, bool))
