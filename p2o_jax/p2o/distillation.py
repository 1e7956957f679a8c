"""Where a templated rollout's gradient is taken and which policy its PPO ratio compares against, by the name
config.p2o.distillation gives (`DISTILLATIONS`); and the context ratio mask's modes (config.p2o.ratio_mask)."""

from __future__ import annotations

import dataclasses

from p2o_jax.rl.losses import CONTEXT_RATIO_MODES


@dataclasses.dataclass(frozen=True)
class Distillation:
  train_on_template: bool  # the gradient is taken on the templated context x~ (the paper's "w/o distillation")
  behaviour_old_logp: bool  # old log-probs from the generating context: the ratio is pi(y|x) / pi_old(y|x~)


DISTILLATIONS = {
    "plain": Distillation(train_on_template=False, behaviour_old_logp=False),  # P^2O: grad log pi(y~ | x)
    "templated": Distillation(train_on_template=True, behaviour_old_logp=False),  # ablation
    "importance": Distillation(train_on_template=False, behaviour_old_logp=True),
}

RATIO_MASK_OFF = "off"
RATIO_MASKS = (*CONTEXT_RATIO_MODES, RATIO_MASK_OFF)
