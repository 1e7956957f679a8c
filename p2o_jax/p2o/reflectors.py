"""The reflectors GEPA can ask for new templates, by the name config.p2o.reflector gives (`REFLECTORS`).

Multi-host: an off-device reflector (an HTTP teacher, the offline proposer) runs on process 0 only and its replies are
broadcast; Self-Ref samples on the mesh in lockstep on every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from p2o_jax import distributed

if TYPE_CHECKING:
  from p2o_jax.policy import Policy

# The implementations are imported by their factories: config.py validates p2o.reflector against REFLECTORS, and the
# config must stay importable without transformers (the Colab notebook imports it before its model is fetched).
# pylint: disable=import-outside-toplevel


class _OnProcessZero:
  """Run an off-device reflector on process 0 only and broadcast its replies (and RNG state, if it has one) to all."""

  def __init__(self, inner):
    self.inner, self.stats = inner, inner.stats

  def state(self):
    return self.inner.state() if hasattr(self.inner, "state") else None

  def restore(self, state) -> None:
    if hasattr(self.inner, "restore"):
      self.inner.restore(state)

  def propose(self, requests):
    replies = self.inner.propose(requests) if jax.process_index() == 0 else None
    replies, state = distributed.broadcast_json([replies, self.state()])
    self.restore(state)
    return replies


def _offline(c, policy: Policy):
  from p2o_jax.p2o.offline_proposer import DEFAULT_FRAGMENTS, FragmentProposer
  del policy
  p = c.p2o
  fragments = tuple(f.strip() for f in p.offline_fragments.split("|") if f.strip()) or DEFAULT_FRAGMENTS
  return _OnProcessZero(FragmentProposer(fragments, seed=c.seed, max_template_chars=p.max_template_chars))


def _teacher(c, policy: Policy):
  from p2o_jax.p2o.teacher_ref import TeacherReflector, teacher_config
  del policy
  return _OnProcessZero(TeacherReflector(teacher_config(c)))


def _self(c, policy: Policy):
  from p2o_jax.p2o.self_ref import SelfReflector
  p = c.p2o
  return SelfReflector(policy, seed=c.seed, temperature=p.reflection_temperature,
                       max_new_tokens=p.reflection_max_new_tokens, max_template_chars=p.max_template_chars)


# name -> (config, policy) -> reflector. Self-Ref needs the policy's frozen reference params (REFERENCE_REFLECTORS).
REFLECTORS: dict[str, Callable] = {"self": _self, "teacher": _teacher, "offline": _offline}
REFERENCE_REFLECTORS = ("self",)


def make_reflector(c, policy: Policy):
  return REFLECTORS[c.p2o.reflector](c, policy)
