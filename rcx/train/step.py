"""One training step, as stages that read top to bottom (listed in :mod:`rcx.train.trainer`)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from rcx.algos.advantages import compute_advantages, token_rewards_from_scores
from rcx.algos.correction import compute_correction, off_policy_sequence_mask
from rcx.algos.criteria import CorrectionSpec
from rcx.config.models import RcxConfig
from rcx.rollout import SamplingParams
from rcx.store.dumps import write_dump
from rcx.store.tracking import Tracker
from rcx.train.actor import Actor
from rcx.train.async_rollout import (
    AsyncRollout,
    check_prompts_match,
    staleness_bound,
    staleness_metrics,
)
from rcx.train.batch import StepBatch
from rcx.train.critic import Critic
from rcx.train.distributed import (
    World,
    all_max,
    all_sum,
    gather_rows,
    global_positions,
    local_rows,
    local_share,
    pad_width,
)
from rcx.train.faults import check_update
from rcx.train.metrics import (
    StageTimer,
    advantage_metrics,
    length_metrics,
    reward_metrics,
    throughput_metrics,
)
from rcx.train.setup import derive_seed, step_scheduler


class StepHost(Protocol):
    """What a step reads from (and ``weights_dirty``, sets on) the trainer that runs it."""

    cfg: RcxConfig
    actor: Actor
    critic: Critic | None
    ref_model: torch.nn.Module | None
    engine: Any  # the rollout engine
    sampling: SamplingParams
    train_data: Any
    device: torch.device
    eos_ids: torch.Tensor  # (E,) every token id that ends a response
    ckpt_dir: Path
    tracker: Tracker
    weights_dirty: bool
    world: World  # several processes: this rank's place (batch quantities are global)
    nonfinite_streak: int  # consecutive steps skipped for non-finite gradients
    async_rollout: AsyncRollout | None  # one_step_off / fully_async rollout workers; None: sync

    def score(
        self, batch: Any, examples: Sequence[Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def train_step(trainer: StepHost, step: int) -> dict[str, float]:
    """Run step ``step`` (1-based) end to end; return its metrics."""
    cfg, plan = trainer.cfg, trainer.actor.plan
    timer, metrics = StageTimer(trainer.device), {}
    step_start = time.perf_counter()
    metrics["actor/lr"] = trainer.actor.optimizer.param_groups[0]["lr"]  # the lr of this step

    # 1. Prompts: a pure function of (seed, step), so a resumed run sees the same batch. With
    #    several processes each rank takes an interleaved share of whole prompts.
    world = trainer.world
    indices = trainer.train_data.batch(step - 1, cfg.data.train_batch_size, cfg.trainer.seed)
    indices = local_share(indices, world)
    examples = [trainer.train_data.examples[i] for i in indices]
    prompts = [trainer.train_data.prompt_ids[i] for i in indices]

    # 2. Generate n responses per prompt from the rollout copy (step - 1 updates so far). One
    #    seed per prompt (from its place in the global batch): its responses do not depend on
    #    the batch or rank that generates them.
    #    One-step-off (trainer.async_mode): the rollout worker generated this batch from the
    #    weights of one update earlier, during the previous step (rcx.train.async_rollout).
    #    Fully-async: the pool's groups, possibly from other steps' batches (rcx.train.fully_async);
    #    the step's prompts are then those of the groups taken.
    with timer("gen"):
        if trainer.async_rollout is not None:
            rollout = trainer.async_rollout.rollout(step)
            indices = trainer.async_rollout.prompt_indices(indices)
            examples = [trainer.train_data.examples[i] for i in indices]
            prompts = [trainer.train_data.prompt_ids[i] for i in indices]
            check_prompts_match(prompts, rollout)
            metrics.update(trainer.async_rollout.step_metrics())
        else:
            sync_rollout_weights(trainer, step - 1)
            seeds = [
                derive_seed(cfg.trainer.seed, f"gen/{i}", step)
                for i in global_positions(len(prompts), world)
            ]
            # Sampling-mask replay: the engine also reports each position's kept token set.
            replay = (
                {"sampling_mask": True} if cfg.actor_rollout_ref.actor.sampling_mask_replay else {}
            )
            rollout = trainer.engine.generate(prompts, trainer.sampling, seed=seeds, **replay)
        rollout = to_global_width(rollout.to(trainer.device), world, trainer.engine.pad_token_id)
    batch = StepBatch.from_rollout(rollout)
    # Prompt ids unique across ranks (rank r's local prompt k is prompt r + W k of the step).
    global_prompt = gather_rows(batch.prompt_index * world.size + world.rank, world)  # (B_all,)
    # Staleness = updates so far - the version that generated each sample (verl's names too).
    metrics.update(staleness_metrics(batch.weight_version, step - 1, staleness_bound(cfg)))

    # 3. Rewards: the outcome score sits on each response's last valid token.
    with timer("reward"):
        per_response = [examples[i] for i in rollout.prompt_index.tolist()]
        scores, extras = trainer.score(rollout, per_response)  # (B,), {name: (B,)}
        token_rewards = token_rewards_from_scores(scores, batch.response_mask)  # (B, T)
    all_scores = gather_rows(scores, world)  # (B_all,)
    metrics.update(reward_metrics(all_scores, "reward"))
    metrics.update(
        {
            f"reward/extra/{k}": float(gather_rows(v.float(), world).mean())
            for k, v in extras.items()
        }
    )
    metrics.update(
        length_metrics(
            gather_rows(rollout.response_ids, world),
            gather_rows(rollout.response_mask, world),
            trainer.eos_ids,
            cfg.data.max_response_length,
        )
    )

    # 4. The anchor pi_old. Decoupled: one extra forward of the training model. Bypass: the
    #    rollout's log-probs.
    if plan.bypass:
        batch.old_log_probs = batch.rollout_log_probs
    else:
        with timer("old_log_prob"):
            batch.old_log_probs = trainer.actor.log_probs(trainer.actor.model, batch)  # (B, T)

    # 5. Reference log-probs, only when a KL loss is on.
    if trainer.ref_model is not None:
        with timer("ref"):
            batch.ref_log_probs = trainer.actor.log_probs(trainer.ref_model, batch)  # (B, T)

    # 6. Values (gae): the critic's estimate before each response token.
    if trainer.critic is not None:
        with timer("values"):
            batch.values = trainer.critic.values(batch)  # (B, T)

    # 7. Rollout correction, decoupled mode: once per batch, w = pi_old / pi_rollout. (Bypass
    #    mode recomputes it per micro-batch in the update.)
    rc = cfg.algorithm.rollout_correction
    batch.train_mask = batch.response_mask
    if not plan.bypass:
        with timer("correction"):
            batch.is_weights, batch.train_mask, correction_metrics = global_correction(
                trainer.actor.spec,
                batch.old_log_probs,
                batch.rollout_log_probs,
                batch.response_mask,
                world,
            )
        metrics.update(correction_metrics)

    # 8. Advantages. Group baselines leave out the sequences rejection emptied when asked to
    #    (decoupled mode: rejection has run).
    #    On the global batch, for estimators with batch statistics (reinforce++ whitening).
    with timer("adv"):
        alg = cfg.algorithm
        members = baseline_members(rc.baseline_includes_rejected, plan.bypass, batch)
        values = None if batch.values is None else gather_rows(batch.values, world)
        all_mask = gather_rows(batch.response_mask, world)  # (B_all, T), gathered once
        advantages, returns = compute_advantages(
            alg.adv_estimator,
            all_scores,
            gather_rows(token_rewards, world),
            all_mask,
            global_prompt,
            values,
            gamma=alg.gamma,
            lam=alg.lam,
            norm_by_std=alg.norm_adv_by_std_in_grpo,
            in_baseline=None if members is None else gather_rows(members, world),
        )  # (B_all, T) each
        batch.advantages, batch.returns = local_rows(advantages, world), local_rows(returns, world)
    metrics.update(advantage_metrics(advantages, returns, values, all_mask))

    # 8b. Off-policy sequence masking, decoupled mode (it needs the advantages): drop whole
    #     sequences with A < 0 whose mean lp_rollout - lp_old exceeds delta.
    delta = trainer.actor.spec.opsm_threshold
    if delta is not None and not plan.bypass:
        keep, opsm_metrics = off_policy_sequence_mask(
            gather_rows(batch.old_log_probs, world),
            gather_rows(batch.rollout_log_probs, world),
            all_mask,
            advantages,
            delta,
        )
        keep = local_rows(keep, world)
        batch.train_mask = batch.train_mask * keep[:, None].to(batch.train_mask.dtype)
        metrics.update(opsm_metrics)

    # 9. Actor update. From here until the step is logged, the weights belong to no
    #    completed step.
    trainer.weights_dirty = True
    with timer("update_actor"):
        actor_metrics, epoch1_log_probs = trainer.actor.update(batch, step)
    metrics.update(actor_metrics)
    trainer.nonfinite_streak = check_update(
        step, metrics, trainer.nonfinite_streak, cfg.trainer.max_nonfinite_steps
    )

    # 10. Critic update (gae).
    if trainer.critic is not None:
        with timer("update_critic"):
            metrics.update(trainer.critic.update(batch))
        step_scheduler(trainer.critic.scheduler)
    step_scheduler(trainer.actor.scheduler)

    # 11. Metrics: timing, throughput; optional log-prob dump.
    if cfg.trainer.dump_log_probs:
        compared = epoch1_log_probs if plan.bypass else batch.old_log_probs
        dump_log_probs(trainer, step, rollout, compared, all_scores, global_prompt)
    metrics.update(timer.metrics())
    local_tokens = rollout.response_mask.sum() + rollout.prompt_mask.sum()
    tokens = float(all_sum(local_tokens.double(), world))
    metrics.update(throughput_metrics(time.perf_counter() - step_start, tokens, trainer.device))
    return metrics


def global_correction(
    spec: CorrectionSpec,
    old_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    world: World,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """The decoupled correction of the *global* batch, this rank's share of it: (IS weights
    (b, T) or None, the mask after RS (b, T), the metrics). Every rank's rows are gathered
    first, so batch normalisation divides by the mean over all ranks' valid tokens (or
    sequences) and every ``rollout_corr/*`` metric is the global value, the same on each rank
    and equal to one process's on the whole batch."""
    correction = compute_correction(
        spec,
        gather_rows(old_log_probs, world),
        gather_rows(rollout_log_probs, world),
        gather_rows(response_mask, world),
    )
    weights = None if correction.weights is None else local_rows(correction.weights, world)
    return weights, local_rows(correction.mask, world), correction.metrics


def baseline_members(
    includes_rejected: bool, bypass: bool, batch: StepBatch
) -> torch.Tensor | None:
    """The sequences that count in group baselines ``(B,)`` bool, or None for all of them.

    With ``baseline_includes_rejected: false`` in decoupled mode, a sequence whose every token
    rejection (or a non-finite log-prob) removed is left out. In bypass mode rejection runs
    per micro-batch during the update, after the advantages: every sequence counts (RCX-W013).
    """
    if includes_rejected or bypass or batch.train_mask is None:
        return None
    return batch.train_mask.sum(-1) > 0


def sync_rollout_weights(trainer: StepHost, updates: int) -> None:
    """Refresh the rollout copy after ``updates`` training steps when it is due: every
    ``weight_sync_interval`` steps (k > 1 leaves the copy up to k - 1 updates stale)."""
    if updates % trainer.cfg.actor_rollout_ref.rollout.weight_sync_interval == 0:
        trainer.engine.sync_weights(trainer.actor.model, updates)


def dump_log_probs(
    trainer: StepHost,
    step: int,
    rollout: Any,
    train_log_probs: torch.Tensor,
    scores: torch.Tensor,
    prompt_index: torch.Tensor,
) -> Path | None:
    """Write this step's log-prob dump of the global batch (:mod:`rcx.store.dumps`) and upload
    it: rank 0 writes (every rank takes part in the gathers); ``scores`` and ``prompt_index``
    are already global."""
    world = trainer.world
    rollout_log_probs = gather_rows(rollout.rollout_log_probs, world)
    train_log_probs = gather_rows(train_log_probs, world)
    response_mask = gather_rows(rollout.response_mask, world)
    if not world.is_main:
        return None
    rc = trainer.cfg.algorithm.rollout_correction
    path = write_dump(
        trainer.ckpt_dir / "log_probs",
        step,
        mode=trainer.actor.plan.mode,
        rollout_log_probs=rollout_log_probs,
        train_log_probs=train_log_probs,
        response_mask=response_mask,
        prompt_index=prompt_index,
        scores=scores,
        rollout_correction=rc.model_dump(mode="json"),
        advantage=advantage_settings(trainer.cfg.algorithm),
        staleness=step - 1 - rollout.sample_versions,
        weight_version=rollout.sample_versions,
    )
    trainer.tracker.log_artifact(path, "log_probs")
    return path


def to_global_width(rollout: Any, world: World, pad_token_id: int) -> Any:
    """``rollout`` with its responses right-padded to the longest response of any rank, so that
    per-token tensors can be gathered row-wise (unchanged with one process)."""
    width = all_max(rollout.response_length, world)
    if width == rollout.response_length:
        return rollout
    return dataclasses.replace(
        rollout,
        response_ids=pad_width(rollout.response_ids, width, pad_token_id),
        response_mask=pad_width(rollout.response_mask, width, 0),
        rollout_log_probs=pad_width(rollout.rollout_log_probs, width, 0.0),
        sampling_mask=None
        if rollout.sampling_mask is None
        else pad_width(rollout.sampling_mask, width, True),
    )


def advantage_settings(alg: Any) -> dict[str, Any]:
    """The advantage settings a dump records (what-if's OPSM replay recomputes with them)."""
    return {
        "adv_estimator": alg.adv_estimator,
        "norm_adv_by_std_in_grpo": alg.norm_adv_by_std_in_grpo,
        "gamma": alg.gamma,
    }
