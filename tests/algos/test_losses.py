"""rcx.algos.losses: aggregation modes, dual-clip PPO, REINFORCE, value, entropy and KL."""

from __future__ import annotations

import math

import pytest
import torch

from rcx.algos.losses import (
    agg_loss,
    cispo_loss,
    entropy_from_logits,
    gspo_loss,
    kl_penalty,
    ppo_clip_loss,
    reinforce_loss,
    sequence_log_ratio,
    value_loss,
)

LN = math.log

# Ragged mask: row 0 has 2 tokens, row 1 one, row 2 none (its 100s must not count).
LOSS_MAT = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [100.0, 100.0, 100.0]])
RAGGED = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", (1 + 2 + 4) / 3),
        ("seq-mean-token-sum", ((1 + 2) + 4) / 2),  # mean over the 2 non-empty rows
        ("seq-mean-token-mean", ((1 + 2) / 2 + 4 / 1) / 2),
        ("seq-mean-token-sum-norm", ((1 + 2) + 4) / (2 * 3)),  # token sums / T=3, mean over rows
    ],
)
def test_agg_loss_modes_on_a_ragged_mask(mode, expected):
    assert agg_loss(LOSS_MAT, RAGGED, mode).item() == pytest.approx(expected)


def test_agg_loss_ignores_nan_outside_the_mask_and_gives_zero_for_an_empty_mask():
    mat = LOSS_MAT.clone().requires_grad_(True)
    with torch.no_grad():
        poisoned = mat.clone()
        poisoned[2] = float("nan")
    x = mat + (poisoned - mat).detach()  # NaN in row 2, gradient still to mat
    loss = agg_loss(x, RAGGED, "token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(7 / 3)
    assert torch.isfinite(mat.grad).all()
    empty = agg_loss(
        LOSS_MAT.clone().requires_grad_(True), torch.zeros(3, 3), "seq-mean-token-mean"
    )
    assert empty.item() == 0.0 and empty.requires_grad


def test_agg_loss_rejects_unknown_mode():
    with pytest.raises(ValueError, match="loss_agg_mode must be one of"):
        agg_loss(LOSS_MAT, RAGGED, "sum")


# ------------------------------------------------------------------------------------ PPO-clip

# Four tokens, eps = 0.2, clip_ratio_c = 3:
#  A=+1, rho=1.5: max(-1.5, -1.2) = -1.2   (clipped)
#  A=+1, rho=0.5: max(-0.5, -0.8) = -0.5   (not clipped: the ratio fell, the loss is the larger)
#  A=-1, rho=0.5: max(0.5, 0.8)   =  0.8   (clipped)
#  A=-1, rho=4:   max(4, 1.2) = 4 -> min(4, 3) = 3   (dual clip)
ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
LOG_RATIO = torch.tensor([[LN(1.5), LN(0.5), LN(0.5), LN(4.0)]])
OLD = torch.full((1, 4), -1.0)
MASK4 = torch.ones(1, 4)


def ppo(**kwargs):
    new = (OLD + LOG_RATIO).requires_grad_(True)
    loss, metrics = ppo_clip_loss(OLD, new, ADV, MASK4, **kwargs)
    loss.backward()
    return loss, metrics, new.grad


def test_ppo_clip_loss_clipfracs_and_gradient():
    loss, metrics, grad = ppo()
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 + 3.0) / 4)
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item())
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 4)  # tokens 1 and 3
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(1 / 4)  # token 4
    # ppo_kl = mean(old - new) = -(ln1.5 + ln.5 + ln.5 + ln4)/4 = -ln(1.5)/4
    assert metrics["actor/ppo_kl"] == pytest.approx(-LN(1.5) / 4)
    # only the unclipped token has a gradient: d(-A rho)/d log pi = -A rho = -0.5, / 4 tokens
    torch.testing.assert_close(grad, torch.tensor([[0.0, -0.5 / 4, 0.0, 0.0]]))


def test_ppo_clip_asymmetric_bounds_and_dual_clip_constant():
    # clip_ratio_high = 0.6: rho = 1.5 < 1.6 is no longer clipped -> -1.5
    # clip_ratio_c = 5: 4 < 5, the dual clip no longer binds -> 4
    loss, metrics, _ = ppo(clip_ratio_high=0.6, clip_ratio_c=5.0)
    assert loss.item() == pytest.approx((-1.5 - 0.5 + 0.8 + 4.0) / 4)
    assert metrics["actor/pg_clipfrac_lower"] == 0.0


def test_ppo_clip_multiplies_is_weights_without_gradient_through_them():
    weights = torch.tensor([[2.0, 1.0, 0.5, 1.0]], requires_grad=True)
    new = (OLD + LOG_RATIO).requires_grad_(True)
    loss, metrics = ppo_clip_loss(OLD, new, ADV, MASK4, is_weights=weights)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 * 2 - 0.5 + 0.8 * 0.5 + 3.0) / 4)
    assert weights.grad is None
    assert metrics["actor/is_weight_mean"] == pytest.approx(4.5 / 4)
    assert metrics["actor/is_weight_max"] == pytest.approx(2.0)


def test_ppo_clip_rejects_dual_clip_bound_at_or_below_one():
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        ppo_clip_loss(OLD, OLD, ADV, MASK4, clip_ratio_c=1.0)


def test_ppo_clip_padding_with_nonfinite_log_probs_stays_out_of_loss_and_gradient():
    old = OLD.clone()
    old[0, 3] = float("-inf")
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    new = (OLD + LOG_RATIO).requires_grad_(True)
    loss, _ = ppo_clip_loss(old, new, ADV, mask)
    loss.backward()
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8) / 3)
    assert torch.isfinite(new.grad).all()


# ----------------------------------------------------------------------------------- REINFORCE


def test_reinforce_gradient_is_minus_w_a_grad_log_pi():
    log_probs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])
    weights = torch.tensor([[1.5, 0.5, 1.0], [2.0, 1.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, metrics = reinforce_loss(log_probs, adv, mask, is_weights=weights)
    loss.backward()
    # L = -sum(w A log pi)/5 over the 5 valid tokens
    expected = -(1.5 * -1 + 0.5 * -2 + 1 * -0.5 + 2 * -2 * -0.3 + 1 * -2 * -0.7) / 5
    assert loss.item() == pytest.approx(expected)
    torch.testing.assert_close(log_probs.grad, -(weights * adv * mask).detach() / 5)
    assert weights.grad is None  # the weights are detached
    assert metrics["actor/pg_loss"] == pytest.approx(expected)


# ------------------------------------------------------------------------- value, entropy, KL


def test_value_loss_clipped():
    values = torch.tensor([[1.0, 2.0]])
    old = torch.tensor([[0.5, 2.0]])
    returns = torch.tensor([[2.0, 0.0]])
    loss, metrics = value_loss(values, returns, old, torch.ones(1, 2), cliprange_value=0.2)
    # token 1: V clipped to 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69; token 2: max(4, 4) = 4
    assert loss.item() == pytest.approx(0.5 * (1.69 + 4) / 2)
    assert metrics["critic/vf_clipfrac"] == pytest.approx(0.5)
    assert metrics["critic/vf_loss"] == pytest.approx(loss.item())


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.5]]])
    entropy = entropy_from_logits(logits)
    assert entropy.shape == (1, 3)
    assert entropy[0, 0].item() == pytest.approx(math.log(4))  # uniform
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)  # one-hot
    expected = torch.distributions.Categorical(logits=logits[0, 2]).entropy()
    assert entropy[0, 2].item() == pytest.approx(expected.item())


def test_kl_penalty_kinds():
    lp, ref = torch.tensor([[LN(0.5)]]), torch.tensor([[LN(0.25)]])  # d = ln 2
    d = math.log(2)
    assert kl_penalty(lp, ref, "kl").item() == pytest.approx(d)
    assert kl_penalty(ref, lp, "abs").item() == pytest.approx(d)
    assert kl_penalty(lp, ref, "mse").item() == pytest.approx(0.5 * d * d)
    # k3 = exp(-d) + d - 1 = 0.5 + ln2 - 1
    assert kl_penalty(lp, ref, "low_var_kl").item() == pytest.approx(0.5 + d - 1)
    with pytest.raises(ValueError, match="kl_loss_type must be one of"):
        kl_penalty(lp, ref, "k4")


# ---------------------------------------------------------------------------- CISPO and GSPO


def test_cispo_clips_the_weight_but_keeps_every_tokens_gradient():
    # ratios 1.5, 0.5, 1.1 (old = 0), A = [1, -1, 2], eps = 0.2: sg(clip) = [1.2, 0.8, 1.1].
    # L = -(1/3) sum clip * A * log pi, so dL/dlog pi = -clip * A / 3 = [-0.4, +0.2667, -0.7333]:
    # the two clipped tokens still get a gradient (PPO-clip would give them 0).
    log_probs = torch.tensor([[LN(1.5), LN(0.5), LN(1.1)]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 2.0]]), torch.ones(1, 3)
    loss, metrics = cispo_loss(old, log_probs, adv, mask, clip_ratio=0.2)
    loss.backward()
    expected = -(1.2 * 1 * LN(1.5) + 0.8 * -1 * LN(0.5) + 1.1 * 2 * LN(1.1)) / 3
    assert loss.item() == pytest.approx(expected)
    assert log_probs.grad.tolist()[0] == pytest.approx([-0.4, 0.8 / 3, -2.2 / 3])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(2 / 3)


def test_cispo_with_no_lower_bound_and_is_weights():
    # clip_ratio_low = 1: the ratio 0.5 is not raised to 0.8; w = 2 doubles the coefficient.
    # dL/dlog pi = -0.5 * (-1) * 2 / 1 = +1.
    log_probs = torch.tensor([[LN(0.5)]], requires_grad=True)
    loss, metrics = cispo_loss(
        torch.zeros(1, 1),
        log_probs,
        torch.tensor([[-1.0]]),
        torch.ones(1, 1),
        clip_ratio_low=1.0,
        clip_ratio_high=0.28,
        is_weights=torch.tensor([[2.0]]),
    )
    loss.backward()
    assert log_probs.grad.item() == pytest.approx(1.0)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/is_weight_mean"] == 2.0


def test_gspo_clips_the_geometric_mean_ratio_of_each_sequence():
    # Both rows: log r = [ln 2, 0] -> s = exp(ln 2 / 2) = sqrt 2 = 1.414, above 1 + 0.2.
    #   row 0, A = +1: max(-s, -1.2) = -1.2, clipped: no gradient.
    #   row 1, A = -1: max(s, 1.2) = s: gradient ds/dlog pi_t = s / 2 per token.
    # token-mean over 4 tokens: L = (2 * -1.2 + 2 * s) / 4; row 1's grads = s / 2 * 2 / 4 = s / 4.
    s = math.sqrt(2.0)
    log_probs = torch.tensor([[LN(2.0), 0.0], [LN(2.0), 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    loss, metrics = gspo_loss(torch.zeros(2, 2), log_probs, adv, torch.ones(2, 2))
    loss.backward()
    assert loss.item() == pytest.approx((2 * -1.2 + 2 * s) / 4)
    assert log_probs.grad[0].tolist() == [0.0, 0.0]
    assert log_probs.grad[1].tolist() == pytest.approx([s / 4, s / 4])
    assert metrics["actor/pg_clipfrac"] == pytest.approx(0.5)


def test_gspo_sequence_ratio_uses_masked_in_tokens_only():
    # Row 0 has one token in the mask (log r = ln 1.1); the padded token's log r = 5 must not
    # count: s = 1.1 (within [0.8, 1.2]), L = -A * s = -1.1 for A = 1.
    log_probs = torch.tensor([[LN(1.1), 5.0]])
    loss, _ = gspo_loss(torch.zeros(1, 2), log_probs, torch.ones(1, 2), torch.tensor([[1, 0]]))
    assert loss.item() == pytest.approx(-1.1)
    assert sequence_log_ratio(log_probs, torch.tensor([[True, False]])).item() == pytest.approx(
        LN(1.1)
    )


# ------------------------------------------------------------------ denominators after rejection

# Row 0 generated 4 tokens, RS kept 2; row 1 generated 2 tokens, RS rejected both.
GENERATED = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
KEPT = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
ONES = torch.ones(2, 4)


@pytest.mark.parametrize(
    ("mode", "kept", "generated"),
    [
        ("token-mean", 2 / 2, 2 / 6),  # kept tokens: 2; generated tokens: 6
        ("seq-mean-token-sum", 2 / 1, 2 / 2),  # 1 sequence with kept tokens; 2 generated
        ("seq-mean-token-mean", (2 / 2) / 1, (2 / 4 + 0 / 2) / 2),
        ("seq-mean-token-sum-norm", 2 / (1 * 4), 2 / (2 * 4)),
    ],
)
def test_denominator_tokens_kept_versus_tokens_generated(mode, kept, generated):
    assert agg_loss(ONES, KEPT, mode).item() == pytest.approx(kept)
    assert agg_loss(ONES, KEPT, mode, denominator_mask=GENERATED).item() == pytest.approx(generated)


def test_generated_denominator_shrinks_the_gradient_by_the_rejected_share():
    # REINFORCE, A = 1: kept gives each kept token -1/2; generated gives -1/6 (verl #4852's
    # "the loss shrinks", here a choice rather than an accident).
    for denominator, grad in ((None, -1 / 2), (GENERATED, -1 / 6)):
        log_probs = torch.zeros(2, 4, requires_grad=True)
        loss, _ = reinforce_loss(log_probs, ONES, KEPT, denominator_mask=denominator)
        loss.backward()
        assert log_probs.grad[0, :2].tolist() == pytest.approx([grad, grad])
        assert log_probs.grad[1].tolist() == [0.0] * 4
