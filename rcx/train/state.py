"""What a checkpoint holds of the trainer's parts, and how it is put back.

One process: everything in ``state.pt`` (:mod:`rcx.store.checkpoint`). Several processes: the
weights and optimiser states of the actor and critic are saved sharded with
``torch.distributed.checkpoint`` (DCP) into the checkpoint's ``sharded/`` folder, each rank
writing its own shards, and ``state.pt`` (written by rank 0) keeps the rest (schedulers, rollout
copy, RNG, history). DCP reshards on load, so a sharded checkpoint resumes under any number of
processes, one included. A one-process checkpoint resumes only in one process.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from rcx.config.models import RcxConfig
from rcx.config.yamlio import dump_yaml
from rcx.store.checkpoint import (
    STEP_DIR_PREFIX,
    CheckpointError,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from rcx.store.tracking import Tracker
from rcx.train.actor import Actor
from rcx.train.critic import Critic
from rcx.train.distributed import World, barrier

#: The checkpoint sub-folder of the DCP shards.
SHARDED_DIR = "sharded"


class StateHost(Protocol):
    """What saving and restoring read from (and write to) the trainer."""

    cfg: RcxConfig
    world: World
    actor: Actor
    critic: Critic | None
    engine: Any
    ckpt_dir: Path
    step: int
    history: dict[str, list[tuple[int, float]]]
    val_start: dict[str, float]
    tracker: Tracker
    device: torch.device


def save_run_state(host: StateHost) -> Path | None:
    """Checkpoint the completed step ``host.step``; every rank calls it, rank 0 returns the
    path (the others None)."""
    world = host.world
    # With k = 1 every step refreshes the rollout copy first: its weights need no saving. In
    # one_step_off the copy holds the weights of the batch in flight (one update old): kept.
    # (fully_async publishes the trainer's weights first on resume: the copy is not needed.)
    keep_rollout = (
        host.cfg.actor_rollout_ref.rollout.weight_sync_interval > 1
        or host.cfg.trainer.async_mode == "one_step_off"
    )
    state = parts_state(host.actor, host.critic, host.engine, keep_rollout, world.distributed)
    state["rng"] = capture_rng_state()
    state["extra"] = {
        "history": {k: list(v) for k, v in host.history.items()},
        "val_start": dict(host.val_start),
    }
    driver = getattr(host, "async_rollout", None)
    if driver is not None and (async_state := driver.state_dict()) is not None:
        state["extra"]["async_rollout"] = async_state  # fully_async: the stream position
    shards = None
    if world.distributed:
        shards = host.ckpt_dir / f".shards-{STEP_DIR_PREFIX}{host.step}"
        if world.is_main:
            shutil.rmtree(shards, ignore_errors=True)
        barrier(world)
        save_sharded(shards, host.actor, host.critic)
        barrier(world)
    path = None
    if world.is_main:
        path = save_checkpoint(
            host.ckpt_dir,
            host.step,
            state,
            config_yaml=dump_yaml(host.cfg.model_dump(mode="json")),
            mlflow_run_id=host.tracker.run_id,
            keep_last=host.cfg.trainer.max_actor_ckpt_to_keep,
            shards=shards,
        )
    barrier(world)
    return path


def restore_run_state(host: StateHost, path: Path, warn: Callable[[str], None]) -> tuple[int, Path]:
    """Put back the checkpoint at ``path``, or the newest intact one before it when it is
    unreadable (``warn`` says so); every rank reads it. Returns (its step, its path)."""
    from rcx.train.resume import load_with_fallback

    ckpt = load_with_fallback(path, host.device, warn=warn)
    state, path = ckpt.state, ckpt.path
    if state.get("sharded") is None and host.world.distributed:
        raise CheckpointError(
            f"{path} was written by one process; resume it with trainer.n_gpus_per_node=1 "
            "(checkpoints written by several processes resume under any number)"
        )
    load_parts_state(state, path, host.actor, host.critic, host.engine)
    restore_rng_state(state["rng"])
    extra = state.get("extra", {})
    for key, points in extra.get("history", {}).items():
        host.history[key] = [(int(s), float(v)) for s, v in points]
    host.val_start.update(extra.get("val_start", {}))
    # fully_async: where the prompt stream stood (read by rcx.train.fully_async).
    host.async_state = extra.get("async_rollout")  # type: ignore[attr-defined]
    return ckpt.step, path


def _sharded_state(actor: Actor, critic: Critic | None) -> dict[str, Any]:
    """The DCP view of the actor's (and critic's) weights and optimiser state: FQN-keyed
    state dicts of sharded tensors (plain tensors with one process)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    parts = {"actor": actor}
    if critic is not None:
        parts["critic"] = critic  # type: ignore[assignment]
    out: dict[str, Any] = {}
    for name, part in parts.items():
        model_state, optim_state = get_state_dict(part.model, part.optimizer)
        out[name] = {"model": model_state, "optimizer": optim_state}
    return out


def save_sharded(folder: Path, actor: Actor, critic: Critic | None) -> None:
    """Every rank writes its shards of the actor's (and critic's) state into ``folder``."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(actor, critic), checkpoint_id=str(folder))


def load_sharded(folder: Path, actor: Actor, critic: Critic | None) -> None:
    """Read ``folder``'s shards into the actor (and critic), resharded to this world."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _sharded_state(actor, critic)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as err:  # DCP reports a missing key or shard in many ways
        raise CheckpointError(f"cannot read the sharded state in {folder}: {err}") from err
    parts = {"actor": actor, "critic": critic}
    for name, loaded in state.items():
        part = parts[name]
        assert part is not None
        set_state_dict(
            part.model,
            part.optimizer,
            model_state_dict=loaded["model"],
            optim_state_dict=loaded["optimizer"],
        )


def parts_state(
    actor: Actor, critic: Critic | None, engine: Any, rollout_weights: bool, sharded: bool = False
) -> dict[str, Any]:
    """The weights and optimiser states of the actor and critic, and the rollout copy's version
    (and its weights, with ``rollout_weights``). With ``sharded`` the weights and optimiser
    states are left to :func:`save_sharded` and only the rest is returned."""
    if sharded:
        return {
            "sharded": SHARDED_DIR,
            "scheduler": actor.scheduler.state_dict(),
            "critic_scheduler": None if critic is None else critic.scheduler.state_dict(),
            "rollout": engine.state_dict(with_weights=rollout_weights),
        }
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
    if critic is not None and state.get("critic_scheduler") is None:
        raise CheckpointError(f"{path} has no critic, but this config trains one")
    if state.get("sharded") is not None:
        load_sharded(path / state["sharded"], actor, critic)
    else:
        actor.model.load_state_dict(state["model"])
        actor.optimizer.load_state_dict(state["optimizer"])
        if critic is not None:
            critic.model.load_state_dict(state["critic"])
            critic.optimizer.load_state_dict(state["critic_optimizer"])
    actor.scheduler.load_state_dict(state["scheduler"])
    if critic is not None:
        critic.scheduler.load_state_dict(state["critic_scheduler"])
    engine.load_state_dict(state["rollout"])
