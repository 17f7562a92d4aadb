"""rcx.train.actor.policy_loss: the update step chooses the anchor and where the correction goes."""

from __future__ import annotations

import math

import pytest
import torch

from rcx.algos.correction import compute_rollout_correction
from rcx.algos.criteria import correction_spec
from rcx.algos.losses import cispo_loss, gspo_loss, ppo_clip_loss, reinforce_loss
from rcx.algos.modes import update_plan
from rcx.config.models import ActorConfig
from rcx.train.actor import policy_loss
from rcx.train.batch import StepBatch

ACTOR = ActorConfig()


def micro_batch(seed=0, is_weights=None, bypass=True):
    """(log_probs with gradient, a StepBatch of 3 responses x 6 tokens, row 1 two tokens short)."""
    g = torch.Generator().manual_seed(seed)
    rollout = -torch.rand(3, 6, generator=g) * 2
    log_probs = (rollout + 0.3 * torch.randn(3, 6, generator=g)).requires_grad_(True)
    adv = torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    mask[1, 4:] = 0
    ids = torch.zeros(3, 8, dtype=torch.long)
    batch = StepBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=mask,
        rollout_log_probs=rollout,
        prompt_index=torch.zeros(3, dtype=torch.long),
        weight_version=torch.zeros(3, dtype=torch.long),
        # decoupled tests treat the rollout log-probs as pi_old: only the anchor matters here
        old_log_probs=rollout,
        advantages=adv,
        train_mask=mask,
        is_weights=is_weights,
    )
    return log_probs, batch


def test_decoupled_is_ppo_clip_with_the_batch_weights_even_for_reinforce():
    weights = torch.rand(3, 6) + 0.5
    log_probs, mb = micro_batch(is_weights=weights)
    spec = correction_spec(rollout_is="token")
    ref, ref_metrics = ppo_clip_loss(
        mb.old_log_probs, log_probs, mb.advantages, mb.train_mask, is_weights=weights
    )
    for loss_type in ("ppo_clip", "reinforce"):
        plan = update_plan("token", False, loss_type)
        loss, metrics, kept = policy_loss(plan, spec, ACTOR, log_probs, mb)
        assert loss.item() == pytest.approx(ref.item())
        assert metrics == ref_metrics
        assert kept == float(mb.train_mask.sum())
        assert not any(k.startswith("rollout_corr/") for k in metrics)


def test_bypass_ppo_clip_uses_rs_mask_and_never_multiplies_weights():
    log_probs, mb = micro_batch()
    settings = dict(rollout_is="token", rollout_rs="token_k1", rollout_rs_threshold="0.7_1.4")
    plan = update_plan("token", True, "ppo_clip")
    loss, metrics, kept = policy_loss(plan, correction_spec(**settings), ACTOR, log_probs, mb)
    corr = compute_rollout_correction(
        log_probs.detach(), mb.rollout_log_probs, mb.response_mask, **settings
    )
    assert 0 < corr.mask.sum() < mb.response_mask.sum()  # the case rejects some tokens, not all
    ref, _ = ppo_clip_loss(mb.rollout_log_probs, log_probs, mb.advantages, corr.mask)
    assert loss.item() == pytest.approx(ref.item())
    assert "actor/is_weight_mean" not in metrics  # weights are metrics only here
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(
        corr.metrics["rollout_corr/rollout_is_mean"]
    )
    share = float(corr.mask.sum() / mb.response_mask.sum())
    assert metrics["actor/kept_token_fraction"] == pytest.approx(share)
    assert kept == pytest.approx(share * float(mb.response_mask.sum()))


def test_bypass_reinforce_recomputes_weights_from_current_log_probs():
    log_probs, mb = micro_batch(1)
    settings = dict(rollout_is="sequence", rollout_is_threshold=3.0)
    plan = update_plan("sequence", True, "reinforce")
    loss, metrics, _ = policy_loss(plan, correction_spec(**settings), ACTOR, log_probs, mb)
    loss.backward()
    mask = mb.response_mask
    w = compute_rollout_correction(
        log_probs.detach(), mb.rollout_log_probs, mask, **settings
    ).weights
    # grad of -agg(w A log pi) = -w A / n_tokens (weights detached)
    torch.testing.assert_close(log_probs.grad, -(w * mb.advantages * mask) / mask.sum())
    assert metrics["actor/is_weight_mean"] == pytest.approx(float(w[mask.bool()].mean()))


def test_bypass_without_correction_still_logs_diagnostics():
    log_probs, mb = micro_batch(2)
    plan = update_plan(None, True, "ppo_clip")
    loss, metrics, _ = policy_loss(plan, correction_spec(), ACTOR, log_probs, mb)
    ref, _ = ppo_clip_loss(mb.rollout_log_probs, log_probs, mb.advantages, mb.response_mask)
    assert loss.item() == pytest.approx(ref.item())
    assert "rollout_corr/kl" in metrics and "rollout_corr/chi2_token" in metrics


def test_bypass_rejecting_everything_gives_zero_loss_gradient_and_kept_tokens():
    log_probs, mb = micro_batch(3)
    spec = correction_spec(rollout_is="token", rollout_rs="seq_max_k2", rollout_rs_threshold="1e-9")
    plan = update_plan("token", True, "reinforce")
    loss, metrics, kept = policy_loss(plan, spec, ACTOR, log_probs, mb)
    loss.backward()
    assert loss.item() == 0.0 and kept == 0.0
    assert torch.all(log_probs.grad == 0)
    assert metrics["actor/kept_token_fraction"] == 0.0
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == 1.0
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize(
    ("rollout_is", "bypass", "loss_type", "loss", "weights"),
    [
        (None, False, "ppo_clip", "ppo_clip", "off"),
        ("token", False, "ppo_clip", "ppo_clip", "loss"),
        ("token", False, "reinforce", "ppo_clip", "loss"),
        ("token", True, "ppo_clip", "ppo_clip", "metrics_only"),
        ("sequence", True, "reinforce", "reinforce", "loss"),
        (None, True, "reinforce", "reinforce", "off"),
    ],
)
def test_update_plan_says_where_the_is_weights_go(rollout_is, bypass, loss_type, loss, weights):
    plan = update_plan(rollout_is, bypass, loss_type)
    assert (plan.loss, plan.is_weights) == (loss, weights)
    assert plan.anchor == ("pi_rollout" if bypass else "pi_old")


@pytest.mark.parametrize("loss_type", ["cispo", "gspo"])
def test_cispo_and_gspo_follow_the_mode_table(loss_type):
    # decoupled: the batch weights multiply the loss; bypass: weights are metrics only.
    weights = torch.rand(3, 6) + 0.5
    log_probs, mb = micro_batch(is_weights=weights)
    spec = correction_spec(rollout_is="token")
    fn = cispo_loss if loss_type == "cispo" else gspo_loss
    ref, _ = fn(mb.old_log_probs, log_probs, mb.advantages, mb.train_mask, is_weights=weights)
    loss, metrics, _ = policy_loss(
        update_plan("token", False, loss_type), spec, ACTOR, log_probs, mb
    )
    assert loss.item() == pytest.approx(ref.item()) and "actor/is_weight_mean" in metrics
    plan = update_plan("token", True, loss_type)
    assert plan.is_weights == "metrics_only"
    loss, metrics, _ = policy_loss(plan, spec, ACTOR, log_probs, mb)
    ref, _ = fn(mb.rollout_log_probs, log_probs, mb.advantages, mb.response_mask)
    assert loss.item() == pytest.approx(ref.item()) and "actor/is_weight_mean" not in metrics


def test_bypass_opsm_masks_sequences_from_the_current_policy():
    # Row 0 drifts (mean lp_rollout - lp_theta = 1 > delta 0.5) with A < 0: masked whole.
    log_probs, mb = micro_batch()
    with torch.no_grad():
        log_probs[0] = mb.rollout_log_probs[0] - 1.0
    mb.advantages[0] = -1.0
    plan = update_plan(None, True, "ppo_clip")
    spec = correction_spec(off_policy_mask_threshold=0.5)
    loss, metrics, kept = policy_loss(plan, spec, ACTOR, log_probs, mb)
    keep = mb.response_mask.clone()
    keep[0] = 0
    ref, _ = ppo_clip_loss(mb.rollout_log_probs, log_probs, mb.advantages, keep)
    assert loss.item() == pytest.approx(ref.item())
    assert kept == float(keep.sum())
    assert metrics["rollout_corr/opsm_seq_masked_fraction"] >= 1 / 3


def test_generated_denominator_divides_by_the_response_mask():
    log_probs, mb = micro_batch()
    settings = dict(rollout_rs="token_k1", rollout_rs_threshold="0.7_1.4")
    spec = correction_spec(**settings)
    plan = update_plan(None, True, "reinforce", "generated")
    loss, _, _ = policy_loss(plan, spec, ACTOR, log_probs, mb)
    corr = compute_rollout_correction(
        log_probs.detach(), mb.rollout_log_probs, mb.response_mask, **settings
    )
    ref, _ = reinforce_loss(log_probs, mb.advantages, corr.mask, denominator_mask=mb.response_mask)
    assert loss.item() == pytest.approx(ref.item())
