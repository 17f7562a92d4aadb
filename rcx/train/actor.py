"""The actor: its forwards and its update, where the rollout correction meets the loss.

The update step, not the loss, decides the correction (see :mod:`rcx.algos.modes`):

* decoupled: the IS weights and the RS mask were computed once for the batch from
  (pi_old, pi_rollout); each micro-batch takes its rows of both.
* bypass: the correction is recomputed for every micro-batch from the same forward that carries
  the gradient (pi_theta, detached) against pi_rollout, with no extra forward.

Micro-batches accumulate gradients, each scaled by its share of the mini-batch's responses
(verl's rule). A micro-batch whose tokens RS rejects entirely adds nothing; a mini-batch with no
token left takes no optimiser step (AdamW would still move the weights through momentum and
weight decay). The entropy bonus and the KL loss are aggregated over the plain response mask:
they are regularisers, not part of the off-policy correction, so RS does not switch them off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rcx.algos import losses
from rcx.algos.correction import compute_correction, off_policy_sequence_mask
from rcx.algos.criteria import CorrectionSpec
from rcx.algos.modes import UpdatePlan
from rcx.config.models import ActorConfig
from rcx.rollout import SamplingParams, processed_log_probs, response_logits, token_log_probs
from rcx.train.batch import LOSS_FIELDS, StepBatch
from rcx.train.distributed import SINGLE, World, as_local_scalar, gather_fields, with_local_grad
from rcx.train.metrics import MetricBag, masked_mean
from rcx.train.setup import autocast, batch_split, derive_seed


def policy_loss(
    plan: UpdatePlan,
    spec: CorrectionSpec,
    actor: ActorConfig,
    log_probs: torch.Tensor,
    mb: StepBatch,
) -> tuple[torch.Tensor, dict[str, float], float]:
    """The policy-gradient loss of one micro-batch, its metrics, and the tokens it trains on.

    ``log_probs`` (b, T) are pi_theta's, with gradient; the anchor of the loss's ratio is
    ``mb.old_log_probs`` (pi_old, or pi_rollout in bypass mode). Where the IS weights go follows
    ``plan.is_weights``; the loss divides by the kept tokens, or by every generated one
    (``plan.denominator``). In bypass mode the correction (IS, RS, then OPSM, which needs the
    advantages) is recomputed here from pi_theta, and the metrics add
    ``actor/kept_token_fraction`` (share of the response tokens left in the loss) and this
    micro-batch's ``rollout_corr/*``.
    """
    correction_metrics: dict[str, float] = {}
    if plan.bypass:
        current = log_probs.detach()
        correction = compute_correction(spec, current, mb.rollout_log_probs, mb.response_mask)
        mask, weights, correction_metrics = correction.mask, correction.weights, correction.metrics
        if spec.opsm_threshold is not None:
            keep, opsm_metrics = off_policy_sequence_mask(
                current, mb.rollout_log_probs, mb.response_mask, mb.advantages, spec.opsm_threshold
            )
            mask = mask * keep[:, None].to(mask.dtype)
            correction_metrics.update(opsm_metrics)
    else:
        mask, weights = mb.train_mask, mb.is_weights
    applied = weights if plan.is_weights == "loss" else None
    denominator = mb.response_mask if plan.denominator == "generated" else None
    if plan.loss == "reinforce":
        loss, metrics = losses.reinforce_loss(
            log_probs,
            mb.advantages,
            mask,
            is_weights=applied,
            loss_agg_mode=actor.loss_agg_mode,
            denominator_mask=denominator,
        )
    else:
        loss, metrics = ratio_loss(plan.loss, actor, log_probs, mb, mask, applied, denominator)
    if not plan.bypass:
        return loss, metrics, float(mask.sum())
    kept = float(mask.sum())
    metrics["actor/kept_token_fraction"] = kept / max(float(mb.response_mask.sum()), 1.0)
    metrics.update(correction_metrics)
    return loss, metrics, kept


def ratio_loss(
    loss_type: str,
    actor: ActorConfig,
    log_probs: torch.Tensor,
    mb: StepBatch,
    mask: torch.Tensor,
    is_weights: torch.Tensor | None,
    denominator: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss that carries its ratio pi_theta / anchor: ``ppo_clip`` (dual clip), ``cispo``
    or ``gspo``, with the actor's clip ranges (:mod:`rcx.algos.losses`)."""
    common: dict[str, Any] = dict(
        clip_ratio=actor.clip_ratio,
        clip_ratio_low=actor.clip_ratio_low,
        clip_ratio_high=actor.clip_ratio_high,
        loss_agg_mode=actor.loss_agg_mode,
        is_weights=is_weights,
        denominator_mask=denominator,
    )
    args = (mb.old_log_probs, log_probs, mb.advantages, mask)
    if loss_type == "cispo":
        return losses.cispo_loss(*args, **common)
    if loss_type == "gspo":
        return losses.gspo_loss(*args, **common)
    return losses.ppo_clip_loss(*args, clip_ratio_c=actor.clip_ratio_c, **common)


def actor_loss(
    plan: UpdatePlan,
    spec: CorrectionSpec,
    actor: ActorConfig,
    log_probs: torch.Tensor,
    entropy: torch.Tensor,
    mb: StepBatch,
) -> tuple[torch.Tensor, dict[str, float], float]:
    """:func:`policy_loss` minus the entropy bonus plus the KL loss (when on)."""
    loss, metrics, kept = policy_loss(plan, spec, actor, log_probs, mb)
    if actor.entropy_coeff > 0:
        bonus = losses.agg_loss(entropy, mb.response_mask, actor.loss_agg_mode)
        loss = loss - actor.entropy_coeff * bonus
    if mb.ref_log_probs is not None:
        kl = losses.kl_penalty(log_probs, mb.ref_log_probs, actor.kl_loss_type)  # (b, T)
        kl_loss = losses.agg_loss(kl, mb.response_mask, actor.loss_agg_mode)
        loss = loss + actor.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
    return loss, metrics, kept


@dataclass
class Actor:
    """The policy being trained, its optimiser, and how it scores and updates."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cfg: ActorConfig
    plan: UpdatePlan
    spec: CorrectionSpec
    scoring: SamplingParams  # temperature of the training-side log-probs, no truncation
    n: int  # responses per prompt
    seed: int
    device: torch.device
    world: World = SINGLE  # several processes: losses and metrics over the global micro-batch

    def log_probs(self, model: torch.nn.Module, batch: StepBatch) -> torch.Tensor:
        """Log-probs (B, T) of the sampled tokens under ``model`` (the policy for pi_old, or the
        reference), without gradient, in forwards of ``ppo_micro_batch_size_per_gpu`` rows."""
        chunk = self.cfg.ppo_micro_batch_size_per_gpu or 1 << 30
        length = batch.response_length
        out = []
        with torch.no_grad(), autocast(self.device):
            for s in range(0, batch.size, chunk):
                ids, am = batch.input_ids[s : s + chunk], batch.attention_mask[s : s + chunk]
                kept = None if batch.sampling_mask is None else batch.sampling_mask[s : s + chunk]
                out.append(token_log_probs(model, ids, am, length, self.scoring, kept))
        return torch.cat(out)  # (B, T)

    def scored(self, mb: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropy), each (b, T), of the policy on a micro-batch, with gradient.

        Scored under ``logits / temperature`` with no top-k/top-p truncation (what verl's
        actor does), so a truncated rollout is a real mismatch source; with
        ``sampling_mask_replay`` the log-probs are renormalised over the rollout's kept tokens
        (``mb.sampling_mask``) instead. The entropy is always that of the full distribution.
        """
        length = mb.response_length
        with torch.enable_grad(), autocast(self.device):
            logits = response_logits(self.model, mb.input_ids, mb.attention_mask, length)
            log_probs = processed_log_probs(
                logits, mb.input_ids[:, -length:], self.scoring, mb.sampling_mask
            )
            scaled = logits.float() / self.scoring.temperature
            entropy = losses.entropy_from_logits(scaled)
        return log_probs, entropy

    def update(self, batch: StepBatch, step: int) -> tuple[dict[str, float], torch.Tensor]:
        """``ppo_epochs`` passes of mini-batch updates; returns (metrics, epoch-1 log-probs).

        The epoch-1 log-probs are what the bypass correction compared against (the dumps record
        them). ``rollout_corr/skipped_update`` is 1 when no mini-batch took an optimiser step.
        """
        actor, size = self.cfg, batch.size
        mini, micro = batch_split(
            size,
            actor.ppo_mini_batch_size // self.world.size,  # verl: a global count of prompts
            self.n,
            actor.ppo_micro_batch_size_per_gpu,
        )
        epoch1_log_probs = torch.zeros_like(batch.rollout_log_probs)
        bag, optimizer_steps = MetricBag(), 0
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "shuffle", step))
        for epoch in range(actor.ppo_epochs):
            order = (
                torch.randperm(size, generator=generator) if actor.shuffle else torch.arange(size)
            )
            for start in range(0, size, mini):
                mini_rows = order[start : start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                kept_tokens = 0.0
                for mstart in range(0, len(mini_rows), micro):
                    rows = mini_rows[mstart : mstart + micro].to(self.device)
                    mb = batch.rows(rows)
                    log_probs, entropy = self.scored(mb)  # (b, T) each
                    if epoch == 0:
                        epoch1_log_probs[rows] = log_probs.detach().float()
                    # The global micro-batch (every rank's rows; only ours carry gradient):
                    # the correction, the loss, its denominators and metrics are global.
                    log_probs = with_local_grad(log_probs, self.world)
                    entropy = with_local_grad(entropy, self.world)
                    mb = gather_fields(mb, LOSS_FIELDS, self.world)
                    loss, loss_metrics, kept = actor_loss(
                        self.plan, self.spec, actor, log_probs, entropy, mb
                    )
                    bag.add(loss_metrics)
                    bag.add({"actor/entropy": masked_mean(entropy.detach(), mb.response_mask)})
                    if kept > 0:  # an all-rejected micro-batch contributes no update at all
                        kept_tokens += kept
                        # x W: FSDP averages the ranks' gradients; the global loss sums them.
                        share = self.world.size * len(rows) / len(mini_rows)
                        (loss * share).backward()
                if kept_tokens == 0:
                    bag.add({"actor/skipped_minibatch": 1.0})
                    continue
                bag.add({"actor/skipped_minibatch": 0.0})
                grad_norm = as_local_scalar(
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), actor.grad_clip)
                )
                bag.add({"actor/grad_norm": grad_norm})
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                    optimizer_steps += 1
                else:
                    bag.add({"actor/nonfinite_grad": 1.0})
        self.optimizer.zero_grad(set_to_none=True)
        metrics = bag.means()
        metrics["rollout_corr/skipped_update"] = 1.0 if optimizer_steps == 0 else 0.0
        metrics["actor/optimizer_steps"] = float(optimizer_steps)
        return metrics, epoch1_log_probs
