"""The trained parts of a run: the actor (policy and optimiser), the critic (gae) and the frozen
reference (KL loss), each sharded with FSDP2 when there are several processes."""

from __future__ import annotations

import copy
from typing import Any

import torch

from rcx.algos.modes import update_plan
from rcx.config.models import RcxConfig
from rcx.train.actor import Actor
from rcx.train.critic import Critic, ValueModel
from rcx.train.distributed import World, enable_activation_checkpointing, shard_model
from rcx.train.setup import make_optimizer


def build_parts(
    cfg: RcxConfig, model: torch.nn.Module, scoring: Any, device: torch.device, world: World
) -> tuple[Actor, Critic | None, torch.nn.Module | None]:
    """(actor, critic or None, reference model or None) around ``model``, the loaded policy.

    The reference and the critic's body are copied from the full weights before any sharding;
    optimisers are made after it (FSDP2 replaces the parameters with sharded ones). The rollout
    engines must already hold their own copies.
    """
    arr = cfg.actor_rollout_ref
    rc = cfg.algorithm.rollout_correction
    fsdp = arr.actor.fsdp_config
    offload = fsdp.param_offload or fsdp.optimizer_offload
    ref_model = None
    if arr.actor.use_kl_loss:
        ref_model = shard_model(copy.deepcopy(model).requires_grad_(False), world, offload)
    value_model = ValueModel(model) if cfg.critic.enable else None
    model.requires_grad_(True)
    if arr.model.enable_gradient_checkpointing:
        enable_activation_checkpointing(model)
    model = shard_model(model, world, offload)
    actor = Actor(
        model,
        *make_optimizer(model.parameters(), arr.actor.optim),
        cfg=arr.actor,
        plan=update_plan(rc.rollout_is, rc.bypass_mode, rc.loss_type, rc.loss_denominator),
        spec=rc.spec,
        scoring=scoring,
        n=arr.rollout.n,
        seed=cfg.trainer.seed,
        device=device,
        world=world,
    )
    critic = None
    if value_model is not None:
        value_model = shard_model(value_model, world, offload)
        critic = Critic(
            value_model,
            *make_optimizer(value_model.parameters(), cfg.critic.optim),
            cfg=cfg.critic,
            ppo_epochs=arr.actor.ppo_epochs,
            mini_batch_prompts=arr.actor.ppo_mini_batch_size,
            n=arr.rollout.n,
            loss_agg_mode=arr.actor.loss_agg_mode,
            device=device,
            world=world,
        )
    return actor, critic, ref_model
