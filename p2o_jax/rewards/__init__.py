"""Answer extraction and sandboxed math verification: the reward for every rollout."""

from p2o_jax.rewards.equivalence import answers_match, math_reward, values_match
from p2o_jax.rewards.extract import extract_answer
from p2o_jax.rewards.math_parse import ParseError, ParsedAnswer, parse_answer
from p2o_jax.rewards.pool import PoolStats, VerifierPool

__all__ = [
  "ParseError",
  "ParsedAnswer",
  "PoolStats",
  "VerifierPool",
  "answers_match",
  "extract_answer",
  "math_reward",
  "parse_answer",
  "values_match",
]
