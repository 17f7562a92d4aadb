"""The two operating modes: which policy anchors the loss, which loss, where the IS weights go.

Torch-free: the trainer's update step and ``rcx validate --explain`` read the same
:class:`UpdatePlan`, so what the explanation says is what the update does.

- decoupled (three policies): the anchor is pi_old, recomputed by one extra forward; the loss is
  always PPO-clip; IS weights (from pi_old / pi_rollout) multiply the per-token loss.
- bypass (two policies): the anchor is pi_rollout; the correction is recomputed per micro-batch
  from pi_theta / pi_rollout. PPO-clip: its ratio pi_theta / pi_rollout already is the
  correction, so IS weights feed metrics only; REINFORCE: the weights multiply the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LossType = Literal["ppo_clip", "reinforce"]
#: Where the IS weights go: multiplied into the loss, computed for metrics only, or off.
WeightUse = Literal["loss", "metrics_only", "off"]


@dataclass(frozen=True)
class UpdatePlan:
    """How the actor update uses the rollout correction."""

    mode: Literal["decoupled", "bypass"]
    anchor: Literal["pi_old", "pi_rollout"]  # the policy the PPO ratio is taken against
    loss: LossType  # the loss actually used (decoupled mode always uses ppo_clip)
    is_weights: WeightUse

    @property
    def bypass(self) -> bool:
        return self.mode == "bypass"


def update_plan(rollout_is: str | None, bypass_mode: bool, loss_type: LossType) -> UpdatePlan:
    """The plan for ``algorithm.rollout_correction``'s ``rollout_is``, ``bypass_mode`` and
    ``loss_type``."""
    loss: LossType = loss_type if bypass_mode else "ppo_clip"
    weights: WeightUse
    if rollout_is is None:
        weights = "off"
    elif bypass_mode and loss == "ppo_clip":
        weights = "metrics_only"
    else:
        weights = "loss"
    if bypass_mode:
        return UpdatePlan("bypass", "pi_rollout", loss, weights)
    return UpdatePlan("decoupled", "pi_old", loss, weights)
