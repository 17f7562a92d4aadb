"""What a checkpoint holds of the trainer's parts, and how it is put back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rcx.store.checkpoint import CheckpointError
from rcx.train.actor import Actor
from rcx.train.critic import Critic


def parts_state(
    actor: Actor, critic: Critic | None, engine: Any, rollout_weights: bool
) -> dict[str, Any]:
    """The weights and optimiser states of the actor and critic, and the rollout copy's version
    (and its weights, with ``rollout_weights``)."""
    return {
        "model": actor.model.state_dict(),
        "optimizer": actor.optimizer.state_dict(),
        "scheduler": actor.scheduler.state_dict(),
        "critic": None if critic is None else critic.model.state_dict(),
        "critic_optimizer": None if critic is None else critic.optimizer.state_dict(),
        "critic_scheduler": None if critic is None else critic.scheduler.state_dict(),
        "rollout": engine.state_dict(with_weights=rollout_weights),
    }


def load_parts_state(
    state: dict[str, Any], path: Path, actor: Actor, critic: Critic | None, engine: Any
) -> None:
    """Put back what :func:`parts_state` saved (``path`` names the checkpoint in errors)."""
    actor.model.load_state_dict(state["model"])
    actor.optimizer.load_state_dict(state["optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
    if critic is not None:
        if state.get("critic") is None:
            raise CheckpointError(f"{path} has no critic, but this config trains one")
        critic.model.load_state_dict(state["critic"])
        critic.optimizer.load_state_dict(state["critic_optimizer"])
        critic.scheduler.load_state_dict(state["critic_scheduler"])
    engine.load_state_dict(state["rollout"])
