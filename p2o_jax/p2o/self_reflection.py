"""The paper's single-turn self-reflection baseline, in place of GEPA: no template search. At an epoch's end the frozen
policy answers each hard query once (greedy, plain prompt); for each query it got wrong, the next epoch's K rollouts are
the policy rewriting that failed answer once, generated from a context that shows it (`REFLECTION_CONTEXT` in front of
the question) and, like P^2O's templated rows, trained on the plain prompt (context distillation, ratio mask and all).

A context longer than rollout.max_prompt_len is left-truncated like any templated prompt: the question and the
instruction's start stay, the oldest part of the failed answer goes.
"""

from __future__ import annotations

import time

from p2o_jax import distributed
from p2o_jax.p2o.phase import PhaseContext, PhaseResult
from p2o_jax.sampling import SamplingConfig

REFLECTION_CONTEXT = ("Your previous answer to the question below was:\n{answer}\n\nThat answer is incorrect. Find the "
                      "mistake and solve the question again.")


def reflection_phase(ctx: PhaseContext) -> PhaseResult:
  """{hard query id: K copies of its reflection context} for the queries whose greedy answer is still wrong."""
  start = time.perf_counter()
  c = ctx.config
  turns = [c.data.prompt_format.format(question=q.question) for q in ctx.hard_set]
  out = ctx.policy.generate(turns, SamplingConfig(c.rollout.max_new_tokens, temperature=0.0))
  solved = distributed.scored_on_process_zero(ctx.score)(out.texts, ctx.hard_set) > 0  # lockstep: one verdict
  assignment = {query.id: [REFLECTION_CONTEXT.format(answer=text.strip())] * c.rollout.num_samples
                for query, text, ok in zip(ctx.hard_set, out.texts, solved) if not ok}
  metrics = {"p2o/reflection_queries": float(len(assignment)), "p2o/reflection_greedy_solved": float(solved.sum())}
  return PhaseResult(assignment=assignment, metrics=metrics, seconds=time.perf_counter() - start)
