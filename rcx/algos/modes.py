"""The two operating modes: which policy anchors the loss, which loss, where the IS weights go.

Torch-free: the trainer's update step and ``rcx validate --explain`` read the same
:class:`UpdatePlan`, so what the explanation says is what the update does.

- decoupled (three policies): the anchor is pi_old, recomputed by one extra forward; the loss is
  always PPO-clip; IS weights (from pi_old / pi_rollout) multiply the per-token loss.
- bypass (two policies): the anchor is pi_rollout; the correction is recomputed per micro-batch
  from pi_theta / pi_rollout. PPO-clip: its ratio pi_theta / pi_rollout already is the
  correction, so IS weights feed metrics only; REINFORCE: the weights multiply the loss.

The mode table (``loss_type`` down, mode across; w = the IS weights of ``rollout_is``):

============  ==========================================  ===========================================
loss_type     decoupled (anchor pi_old)                   bypass (anchor pi_rollout)
============  ==========================================  ===========================================
ppo_clip      PPO-clip on pi_theta/pi_old, times w        PPO-clip on pi_theta/pi_rollout; w metrics
reinforce     ignored: PPO-clip, times w                  -w * A * log pi_theta, no clip
cispo         CISPO on pi_theta/pi_old, times w           CISPO on pi_theta/pi_rollout; w metrics
gspo          GSPO on pi_theta/pi_old, times w            GSPO on pi_theta/pi_rollout; w metrics
============  ==========================================  ===========================================

CISPO and GSPO carry their ratio against the anchor, as PPO-clip does: in bypass that ratio
already is the correction, so multiplying the IS weights in would correct twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

LossType = Literal["ppo_clip", "reinforce", "cispo", "gspo"]
#: Losses whose own ratio pi_theta / anchor corrects for the anchor (IS weights are redundant
#: in bypass mode, where the anchor is pi_rollout).
RATIO_LOSSES: frozenset[str] = frozenset({"ppo_clip", "cispo", "gspo"})
#: Where the IS weights go: multiplied into the loss, computed for metrics only, or off.
WeightUse = Literal["loss", "metrics_only", "off"]
#: What the loss divides by after rejection: the tokens kept, or every token generated.
Denominator = Literal["kept", "generated"]


@dataclass(frozen=True)
class UpdatePlan:
    """How the actor update uses the rollout correction."""

    mode: Literal["decoupled", "bypass"]
    anchor: Literal["pi_old", "pi_rollout"]  # the policy the PPO ratio is taken against
    loss: LossType  # the loss actually used (decoupled mode turns reinforce into ppo_clip)
    is_weights: WeightUse
    denominator: Denominator = "kept"

    @property
    def bypass(self) -> bool:
        return self.mode == "bypass"


def update_plan(
    rollout_is: str | None,
    bypass_mode: bool,
    loss_type: LossType,
    loss_denominator: Denominator = "kept",
) -> UpdatePlan:
    """The plan for ``algorithm.rollout_correction``'s ``rollout_is``, ``bypass_mode``,
    ``loss_type`` and ``loss_denominator``."""
    loss: LossType = "ppo_clip" if loss_type == "reinforce" and not bypass_mode else loss_type
    weights: WeightUse
    if rollout_is is None:
        weights = "off"
    elif bypass_mode and loss in RATIO_LOSSES:
        weights = "metrics_only"
    else:
        weights = "loss"
    if bypass_mode:
        return UpdatePlan("bypass", "pi_rollout", loss, weights, loss_denominator)
    return UpdatePlan("decoupled", "pi_old", loss, weights, loss_denominator)
