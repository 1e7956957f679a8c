"""The single-turn self-reflection baseline: the failed greedy answer becomes the next epoch's rollout context."""

import numpy as np

from p2o_jax.config import base_config
from p2o_jax.data.records import Query
from p2o_jax.p2o.hooks import P2OHooks
from p2o_jax.p2o.phase import PhaseContext
from p2o_jax.p2o.self_reflection import REFLECTION_CONTEXT, reflection_phase
from p2o_jax.policy import Generation

HARD = [Query("a", "2+2=", "4"), Query("b", "3+3=", "6"), Query("c", "5+5=", "10")]


class _AnswersOnce:
  """A policy stand-in that answers each prompt with a fixed text and records how it was asked."""

  def __init__(self, answers):
    self.answers, self.calls = answers, []

  def generate(self, turns, sampling, **kwargs):
    self.calls.append((list(turns), sampling, kwargs))
    texts = [self.answers[t] for t in turns]
    return Generation(prompt_ids=[[1]] * len(texts), tokens=np.zeros((len(texts), 1), np.int32),
                      mask=np.ones((len(texts), 1), bool), logprobs=np.zeros((len(texts), 1), np.float32),
                      texts=texts)


def config():
  c = base_config()
  c.data.prompt_format, c.rollout.num_samples = "Q: {question}", 3
  c.p2o.enabled, c.p2o.search = True, "self_reflection"
  return c


def test_each_failed_query_gets_k_copies_of_its_own_answer_to_rewrite():
  c = config()
  policy = _AnswersOnce({"Q: 2+2=": " 5 ", "Q: 3+3=": "6", "Q: 5+5=": "11"})
  score = lambda texts, queries: np.asarray([t.strip() == q.answer for t, q in zip(texts, queries)], np.float32)
  result = reflection_phase(PhaseContext(config=c, epoch=0, hard_set=HARD, policy=policy, reflector=None,
                                         score=score, run_dir=None))
  [(turns, sampling, _)] = policy.calls
  assert turns == ["Q: 2+2=", "Q: 3+3=", "Q: 5+5="] and sampling.greedy  # one plain greedy answer per query
  assert result.assignment == {"a": [REFLECTION_CONTEXT.format(answer="5")] * 3,
                               "c": [REFLECTION_CONTEXT.format(answer="11")] * 3}  # "b" was solved: plain rollouts
  assert result.metrics == {"p2o/reflection_queries": 2.0, "p2o/reflection_greedy_solved": 1.0}


def test_the_rewrites_are_generated_from_the_reflection_and_trained_on_the_plain_prompt():
  hooks = P2OHooks(config())
  hooks.assignment = {"a": [REFLECTION_CONTEXT.format(answer="5")] * 3}
  contexts = hooks.contexts(HARD[:2], ["Q: 2+2=", "Q: 3+3="], 3)
  assert contexts.generate[:3] == [f"{REFLECTION_CONTEXT.format(answer='5')}\n\nQ: 2+2="] * 3
  assert contexts.train == ["Q: 2+2="] * 3 + ["Q: 3+3="] * 3
  assert contexts.templated == [True] * 3 + [False] * 3
