"""Losses and advantage estimators: pure functions on tensors (SPEC §4-§5)."""

from rcx.algos.advantages import (
    gae,
    grpo,
    masked_whiten,
    reinforce_plus_plus,
    rloo,
    token_rewards_from_scores,
)
from rcx.algos.losses import (
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
    ppo_clip_loss,
    reinforce_loss,
    value_loss,
)

__all__ = [
    "agg_loss",
    "entropy_from_logits",
    "gae",
    "grpo",
    "kl_penalty",
    "masked_whiten",
    "policy_loss",
    "ppo_clip_loss",
    "reinforce_loss",
    "reinforce_plus_plus",
    "rloo",
    "token_rewards_from_scores",
    "value_loss",
]
