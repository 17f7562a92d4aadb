"""rcx.algos.correction: hand-computed cases for every weight, criterion and metric; properties.

Hand cases use float64 and ``rollout_log_probs = -ln 4`` (train = log_r - ln 4) so that every
expected value is a short formula in ``math``; the arithmetic is in the comments.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcx.algos.correction import (
    PREFIX,
    CorrectionResult,
    compute_correction,
    compute_rollout_correction,
    off_policy_sequence_mask,
)
from rcx.config import LegacyAliasWarning, RolloutCorrectionConfig

LN2, LN4 = math.log(2.0), math.log(4.0)
NAN = float("nan")


def _load_reference():
    """The straightforward implementation in bench/correction.py, used as an oracle."""
    path = Path(__file__).resolve().parents[2] / "bench" / "correction.py"
    spec = importlib.util.spec_from_file_location("rcx_bench_correction", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_correction


reference_correction = _load_reference()


def batch(log_ratio_rows: list[list[float]], dtype=torch.float64):
    """(train, rollout, mask) for given per-token log-ratios; NaN entries become padding.

    The train log-prob at padding is NaN on purpose: padding must be ignored.
    """
    log_r = torch.tensor(log_ratio_rows, dtype=dtype)
    mask = ~torch.isnan(log_r)
    rollout = torch.full_like(log_r, -LN4)
    train = log_r + rollout  # NaN at padding
    return train, rollout, mask.to(dtype)


def metric(result: CorrectionResult, name: str) -> float:
    return result.metrics[PREFIX + name]


def approx(x: float) -> pytest.approx:
    return pytest.approx(x, rel=1e-9, abs=1e-12)


# r = [[2, 0.5, 1], [4, 1, pad]]: 5 valid tokens, S = [0, ln 4].
TWO_ROWS = [[LN2, -LN2, 0.0], [LN4, 0.0, NAN]]


# ----------------------------------------------------------------------------- IS, token level


def test_token_is_weights_truncated_and_zero_at_padding():
    out = compute_rollout_correction(*batch(TWO_ROWS), rollout_is="token", rollout_is_threshold=3)
    # min(r, 3): 4 -> 3; padding -> 0
    expected = torch.tensor([[2.0, 0.5, 1.0], [3.0, 1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out.weights, expected)
    assert out.weights.dtype == torch.float64
    assert not out.weights.requires_grad


def test_token_is_metrics_describe_raw_ratios_and_ess_the_applied_weights():
    out = compute_rollout_correction(*batch(TWO_ROWS), rollout_is="token", rollout_is_threshold=3)
    # raw r over valid tokens: 2, 0.5, 1, 4, 1 -> mean 8.5/5 = 1.7
    assert metric(out, "rollout_is_mean") == approx(1.7)
    # E[r^2] = (4 + .25 + 1 + 16 + 1)/5 = 4.45; var = 4.45 - 1.7^2 = 1.56
    assert metric(out, "rollout_is_std") == approx(math.sqrt(1.56))
    assert metric(out, "rollout_is_max") == approx(4.0)
    assert metric(out, "rollout_is_min") == approx(0.5)
    assert metric(out, "rollout_is_ratio_fraction_high") == approx(1 / 5)  # r=4 > 3
    assert metric(out, "rollout_is_ratio_fraction_low") == approx(0.0)  # none < 1/3
    # applied w = 2, .5, 1, 3, 1: sum 7.5, sum of squares 15.25 -> ESS = 7.5^2 / (5 * 15.25)
    assert metric(out, "rollout_is_eff_sample_size") == approx(7.5**2 / (5 * 15.25))
    # per-sequence mean ratio: 3.5/3 and 5/2
    seq = [3.5 / 3, 2.5]
    assert metric(out, "rollout_is_seq_mean") == approx(sum(seq) / 2)
    assert metric(out, "rollout_is_seq_std") == approx(abs(seq[1] - seq[0]) / math.sqrt(2))
    assert metric(out, "rollout_is_seq_max") == approx(2.5)
    assert metric(out, "rollout_is_seq_min") == approx(3.5 / 3)
    assert metric(out, "rollout_is_seq_max_deviation") == approx(1.5)
    assert metric(out, "rollout_is_seq_fraction_high") == approx(0.0)
    assert metric(out, "rollout_is_seq_fraction_low") == approx(0.0)
    assert PREFIX + "rollout_is_batch_norm_factor" not in out.metrics


def test_token_is_batch_normalisation_divides_by_mean_weight():
    out = compute_rollout_correction(
        *batch(TWO_ROWS),
        rollout_is="token",
        rollout_is_threshold=3,
        rollout_is_batch_normalize=True,
    )
    # mean applied weight = 7.5 / 5 = 1.5
    assert metric(out, "rollout_is_batch_norm_factor") == approx(1.5)
    expected = torch.tensor([[2.0, 0.5, 1.0], [3.0, 1.0, 0.0]], dtype=torch.float64) / 1.5
    torch.testing.assert_close(out.weights, expected)
    # ESS is of the weights before normalisation (and scale-free anyway)
    assert metric(out, "rollout_is_eff_sample_size") == approx(7.5**2 / (5 * 15.25))


# -------------------------------------------------------------------------- IS, sequence level


def test_sequence_is_weights_metrics_and_batch_normalisation():
    out = compute_rollout_correction(
        *batch(TWO_ROWS),
        rollout_is="sequence",
        rollout_is_threshold=3,
        rollout_is_batch_normalize=True,
    )
    # S = [0, ln 4] -> exp(S) = [1, 4] -> truncated [1, 3]; mean over sequences 2 -> [0.5, 1.5]
    expected = torch.tensor([[0.5, 0.5, 0.5], [1.5, 1.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out.weights, expected)
    assert metric(out, "rollout_is_batch_norm_factor") == approx(2.0)
    # raw weights broadcast to tokens: 1,1,1,4,4 -> mean 11/5, E[x^2] = 35/5 = 7
    assert metric(out, "rollout_is_mean") == approx(2.2)
    assert metric(out, "rollout_is_std") == approx(math.sqrt(7 - 2.2**2))
    assert metric(out, "rollout_is_max") == approx(4.0)
    assert metric(out, "rollout_is_min") == approx(1.0)
    assert metric(out, "rollout_is_ratio_fraction_high") == approx(0.5)  # 1 of 2 sequences
    assert metric(out, "rollout_is_ratio_fraction_low") == approx(0.0)
    # applied per token 1,1,1,3,3: sum 9, squares 21
    assert metric(out, "rollout_is_eff_sample_size") == approx(81 / (5 * 21))
    assert metric(out, "rollout_is_seq_mean") == approx(2.5)
    assert metric(out, "rollout_is_seq_std") == approx(3 / math.sqrt(2))
    assert metric(out, "rollout_is_seq_max_deviation") == approx(3.0)
    assert metric(out, "rollout_is_seq_fraction_high") == approx(0.5)


def test_batch_norm_with_vanishing_mean_leaves_weights_and_reports_one():
    # every ratio exp(-20) after the safety clamp: mean 2e-9 <= 1e-8
    out = compute_rollout_correction(
        *batch([[-30.0, -30.0]]), rollout_is="token", rollout_is_batch_normalize=True
    )
    assert metric(out, "rollout_is_batch_norm_factor") == 1.0
    torch.testing.assert_close(out.weights, torch.full((1, 2), math.exp(-20), dtype=torch.float64))


# ------------------------------------------------------------------------------ off-policy metrics


def test_off_policy_diagnostics():
    out = compute_rollout_correction(*batch(TWO_ROWS))
    assert out.weights is None
    # kl = mean(-log r) = -(ln2 - ln2 + 0 + ln4 + 0)/5
    assert metric(out, "kl") == approx(-LN4 / 5)
    # k3 = r - 1 - log r: (1 - ln2) + (-0.5 + ln2) + 0 + (3 - ln4) + 0 = 3.5 - ln4
    assert metric(out, "k3_kl") == approx((3.5 - LN4) / 5)
    assert metric(out, "chi2_token") == approx(4.45 - 1)  # mean r^2 - 1
    assert metric(out, "chi2_seq") == approx((1 + 16) / 2 - 1)  # mean exp(2 S) - 1
    # rollout lp = -ln4 everywhere: log-ppl ln4, ppl 4 for both sequences
    assert metric(out, "rollout_log_ppl") == approx(LN4)
    assert metric(out, "rollout_ppl") == approx(4.0)
    # train mean lp: row0 -ln4, row1 (0 - ln4)/2 = -ln2 -> log-ppl ln4, ln2; ppl 4, 2
    assert metric(out, "training_log_ppl") == approx(1.5 * LN2)
    assert metric(out, "training_ppl") == approx(3.0)
    # per sequence mean(lp_rollout - lp_train): 0 and -ln2
    assert metric(out, "log_ppl_diff") == approx(-LN2 / 2)
    assert metric(out, "log_ppl_abs_diff") == approx(LN2 / 2)
    assert metric(out, "log_ppl_diff_max") == approx(0.0)
    assert metric(out, "log_ppl_diff_min") == approx(-LN2)
    assert metric(out, "ppl_ratio") == approx((1 + 0.5) / 2)  # training_ppl / rollout_ppl
    assert metric(out, "nonfinite_fraction") == 0.0


def test_metric_keys_without_correction_are_exactly_the_diagnostics():
    out = compute_rollout_correction(*batch(TWO_ROWS))
    names = {k.removeprefix(PREFIX) for k in out.metrics}
    assert names == {
        "kl", "k3_kl", "training_ppl", "rollout_ppl", "training_log_ppl", "rollout_log_ppl",
        "log_ppl_diff", "log_ppl_abs_diff", "log_ppl_diff_max", "log_ppl_diff_min", "ppl_ratio",
        "chi2_token", "chi2_seq", "nonfinite_fraction",
    }  # fmt: skip
    assert all(k.startswith(PREFIX) for k in out.metrics)


def test_exponents_are_clamped_to_twenty():
    out = compute_rollout_correction(*batch([[50.0, -50.0]]), rollout_is="token")
    # log r clamped to +-20: chi2_token = (e^40 + e^-40)/2 - 1; weights min(e^20, 2), e^-20
    assert metric(out, "chi2_token") == pytest.approx((math.exp(40) + math.exp(-40)) / 2 - 1)
    torch.testing.assert_close(
        out.weights, torch.tensor([[2.0, math.exp(-20)]], dtype=torch.float64)
    )
    assert metric(out, "rollout_is_max") == pytest.approx(math.exp(20))
    seq = compute_rollout_correction(*batch([[15.0, 15.0]]), rollout_is="sequence")
    assert metric(seq, "chi2_seq") == pytest.approx(math.exp(40) - 1)  # S = 30 -> 20


# ------------------------------------------------------------------------- rejection, by criterion

# r rows: [2, 0.5, 1], [4, 1, pad], [1, 1, 1]: 8 valid tokens in 3 sequences.
THREE_ROWS = [[LN2, -LN2, 0.0], [LN4, 0.0, NAN], [0.0, 0.0, 0.0]]
K3_2 = 1 - LN2  # k3 at r = 2: 2 - 1 - ln2
K3_HALF = LN2 - 0.5  # k3 at r = 0.5
K3_4 = 3 - LN4


def rs(criterion: str, threshold: str):
    return compute_rollout_correction(
        *batch(THREE_ROWS), rollout_rs=criterion, rollout_rs_threshold=threshold
    )


def kept(result: CorrectionResult) -> list[list[int]]:
    return result.mask.to(torch.int64).tolist()


# (criterion, threshold, expected kept tokens) — the reasons in the comments
RS_CASES = [
    # 0.6 <= r <= 3: drops r=0.5 and r=4
    ("token_k1", "0.6_3", [[1, 0, 1], [0, 1, 0], [1, 1, 1]]),
    # 0.5*ln(r)^2 <= 0.3: ln2^2/2 = 0.24 kept, ln4^2/2 = 0.96 dropped
    ("token_k2", "0.3", [[1, 1, 1], [0, 1, 0], [1, 1, 1]]),
    # k3 <= 0.2: k3(2) = 0.307 dropped, k3(0.5) = 0.193 kept, k3(4) = 1.61 dropped
    ("token_k3", "0.2", [[0, 1, 1], [0, 1, 0], [1, 1, 1]]),
    # 0.5 <= exp(S) <= 2: S = 0, ln4, 0
    ("seq_sum_k1", "0.5_2", [[1, 1, 1], [0, 0, 0], [1, 1, 1]]),
    # 0.5 <= exp(mean log r) <= 1.9: geometric means 1, 2, 1
    ("seq_mean_k1", "0.5_1.9", [[1, 1, 1], [0, 0, 0], [1, 1, 1]]),
    # sum k2 <= 0.5: 0.48, 0.96, 0
    ("seq_sum_k2", "0.5", [[1, 1, 1], [0, 0, 0], [1, 1, 1]]),
    # mean k2 <= 0.2: 0.16, 0.48, 0
    ("seq_mean_k2", "0.2", [[1, 1, 1], [0, 0, 0], [1, 1, 1]]),
    # max k2 <= 0.25: 0.24, 0.96, 0
    ("seq_max_k2", "0.25", [[1, 1, 1], [0, 0, 0], [1, 1, 1]]),
    # sum k3 <= 0.45: (1 - ln2) + (ln2 - 0.5) = 0.5 dropped, 1.61 dropped, 0 kept
    ("seq_sum_k3", "0.45", [[0, 0, 0], [0, 0, 0], [1, 1, 1]]),
    # mean k3 <= 0.2: 0.5/3 kept, 1.61/2 dropped
    ("seq_mean_k3", "0.2", [[1, 1, 1], [0, 0, 0], [1, 1, 1]]),
    # max k3 <= 0.25: 0.307 dropped, 1.61 dropped
    ("seq_max_k3", "0.25", [[0, 0, 0], [0, 0, 0], [1, 1, 1]]),
]


@pytest.mark.parametrize(("criterion", "threshold", "expected"), RS_CASES)
def test_each_criterion_keeps_what_its_rule_says(criterion, threshold, expected):
    out = rs(criterion, threshold)
    assert kept(out) == expected
    dropped_tokens = 8 - sum(map(sum, expected))  # 8 valid tokens
    dropped_seqs = sum(1 for row, n in zip(expected, [3, 2, 3], strict=True) if sum(row) < n)
    assert metric(out, "rollout_rs_masked_fraction") == approx(dropped_tokens / 8)
    assert metric(out, "rollout_rs_seq_masked_fraction") == approx(dropped_seqs / 3)
    # a single criterion: its own fractions equal the overall ones
    p = f"rollout_rs_{criterion}"
    assert metric(out, f"{p}_masked_fraction") == approx(dropped_tokens / 8)
    assert metric(out, f"{p}_seq_masked_fraction") == approx(dropped_seqs / 3)
    assert out.weights is None


def test_token_k1_statistics_with_asymmetric_bounds():
    out = rs("token_k1", "0.6_3")
    p = "rollout_rs_token_k1"
    # statistic -log r over valid tokens: -ln2, ln2, 0, -ln4, 0, 0, 0, 0
    assert metric(out, f"{p}_mean") == approx(-LN4 / 8)
    assert metric(out, f"{p}_max") == approx(LN2)
    assert metric(out, f"{p}_min") == approx(-LN4)
    assert metric(out, f"{p}_fraction_high") == approx(1 / 8)  # r = 4 above U = 3
    assert metric(out, f"{p}_fraction_low") == approx(1 / 8)  # r = 0.5 below L = 0.6
    # std of -log r clamped to the keep interval [-ln 3, -ln 0.6]
    c = [-LN2, -math.log(0.6), 0, -math.log(3), 0, 0, 0, 0]
    mean = sum(c) / 8
    assert metric(out, f"{p}_std") == approx(math.sqrt(sum(x * x for x in c) / 8 - mean**2))
    # per-sequence mean of -log r: 0, -ln2, 0
    assert metric(out, f"{p}_seq_mean") == approx(-LN2 / 3)
    assert metric(out, f"{p}_seq_max") == approx(0.0)
    assert metric(out, f"{p}_seq_min") == approx(-LN2)
    assert metric(out, f"{p}_seq_max_deviation") == approx(LN2)
    assert metric(out, f"{p}_seq_std") == approx(
        math.sqrt(((LN2 / 3) ** 2 * 2 + (2 * LN2 / 3) ** 2) / 2)
    )
    assert metric(out, f"{p}_seq_fraction_high") == approx(0.0)  # no geometric mean above 3
    assert metric(out, f"{p}_seq_fraction_low") == approx(0.0)


def test_sequence_k2_statistics_are_per_sequence_and_token_weighted_mean():
    out = rs("seq_max_k2", "0.25")
    p = "rollout_rs_seq_max_k2"
    v = [LN2**2 / 2, LN4**2 / 2, 0.0]  # max k2 per sequence; token counts 3, 2, 3
    assert metric(out, f"{p}_mean") == approx((3 * v[0] + 2 * v[1]) / 8)
    assert metric(out, f"{p}_max") == approx(v[1])
    assert metric(out, f"{p}_min") == approx(0.0)
    assert metric(out, f"{p}_fraction_high") == approx(1 / 3)
    assert metric(out, f"{p}_fraction_low") == 0.0
    # std of the token-weighted values clamped to [0, 0.25]
    c = [v[0]] * 3 + [0.25] * 2 + [0.0] * 3
    mean = sum(c) / 8
    assert metric(out, f"{p}_std") == approx(math.sqrt(sum(x * x for x in c) / 8 - mean**2))
    assert metric(out, f"{p}_seq_mean") == approx(sum(v) / 3)
    assert metric(out, f"{p}_seq_fraction_high") == approx(1 / 3)
    assert PREFIX + f"{p}_seq_fraction_low" not in out.metrics  # verl reports it for k1 only


def test_token_k3_statistics():
    out = rs("token_k3", "0.2")
    p = "rollout_rs_token_k3"
    assert metric(out, f"{p}_mean") == approx((K3_2 + K3_HALF + K3_4) / 8)
    assert metric(out, f"{p}_max") == approx(K3_4)
    assert metric(out, f"{p}_min") == approx(0.0)
    assert metric(out, f"{p}_fraction_high") == approx(2 / 8)
    seq = [(K3_2 + K3_HALF) / 3, K3_4 / 2, 0.0]
    assert metric(out, f"{p}_seq_mean") == approx(sum(seq) / 3)
    assert metric(out, f"{p}_seq_max") == approx(seq[1])


@pytest.mark.parametrize(
    ("threshold", "expected", "high", "low"),
    [
        # 1.5 <= r <= 5 keeps r = 2 and 4; six valid tokens below 1.5, none above 5
        ("1.5_5", [[1, 0, 0], [1, 0, 0], [0, 0, 0]], 0, 6),
        # 0.1 <= r <= 0.9 keeps r = 0.5; seven valid tokens above 0.9
        ("0.1_0.9", [[0, 1, 0], [0, 0, 0], [0, 0, 0]], 7, 0),
    ],
)
def test_k1_bounds_on_one_side_of_one_count_only_valid_tokens(threshold, expected, high, low):
    out = rs("token_k1", threshold)
    assert kept(out) == expected
    p = "rollout_rs_token_k1"
    assert metric(out, f"{p}_fraction_high") == approx(high / 8)
    assert metric(out, f"{p}_fraction_low") == approx(low / 8)
    ref = reference_correction(
        *batch(THREE_ROWS), rollout_rs="token_k1", rollout_rs_threshold=threshold
    )[2]
    assert metric(out, f"{p}_std") == approx(ref["rollout_corr/" + f"{p}_std"])


def test_k1_bounds_are_inclusive():
    # r exactly 2 and 0.5 (float64 ln2 - ln4 + ln4 == ln2 exactly here) are kept by 0.5_2
    out = rs("token_k1", "0.5_2")
    assert kept(out)[0] == [1, 1, 1]


def test_combined_criteria_keep_the_intersection():
    out = rs("token_k1,seq_max_k2", "0.6_3,0.25")
    # token_k1 drops (0,1) and (1,0); seq_max_k2 drops row 1
    assert kept(out) == [[1, 0, 1], [0, 0, 0], [1, 1, 1]]
    assert metric(out, "rollout_rs_masked_fraction") == approx(3 / 8)
    assert metric(out, "rollout_rs_seq_masked_fraction") == approx(2 / 3)
    assert metric(out, "rollout_rs_token_k1_masked_fraction") == approx(2 / 8)
    assert metric(out, "rollout_rs_seq_max_k2_masked_fraction") == approx(2 / 8)


def test_is_and_rs_together_report_what_each_reports_alone():
    # IS with C = 2 and token_k1 with 0.5_2 share their comparisons internally
    both = compute_rollout_correction(
        *batch(THREE_ROWS), rollout_is="token", rollout_is_threshold=2.0,
        rollout_rs="token_k1,seq_max_k2", rollout_rs_threshold="0.5_2,0.25",
    )  # fmt: skip
    is_only = compute_rollout_correction(*batch(THREE_ROWS), rollout_is="token")
    rs_only = rs("token_k1,seq_max_k2", "0.5_2,0.25")
    assert both.metrics == {**is_only.metrics, **rs_only.metrics}
    assert torch.equal(both.mask, rs_only.mask)
    assert torch.equal(both.weights, is_only.weights)


def test_shared_threshold_entry_and_float_threshold():
    a = rs("seq_sum_k2,seq_mean_k2", "0.5")
    b = rs("seq_sum_k2,seq_mean_k2", "0.5,0.5")
    assert kept(a) == kept(b)
    c = compute_rollout_correction(
        *batch(THREE_ROWS), rollout_rs="token_k1", rollout_rs_threshold=3.0
    )
    assert kept(c) == kept(rs("token_k1", "0.3333333333333333_3"))


def test_legacy_alias_warns_and_equals_the_canonical_criterion():
    with pytest.warns(LegacyAliasWarning, match="token_k1"):
        old = rs("token", "0.6_3")
    assert old.metrics == rs("token_k1", "0.6_3").metrics


def test_symmetric_k1_matches_verls_bound_on_the_inverse_ratio():
    # verl keeps L <= 1/r <= U; for L = 1/U that is the same set as L <= r <= U
    g = torch.Generator().manual_seed(3)
    train = -torch.rand(8, 50, generator=g, dtype=torch.float64)
    rollout = train + torch.randn(8, 50, generator=g, dtype=torch.float64)
    mask = torch.ones(8, 50)
    out = compute_rollout_correction(
        train, rollout, mask, rollout_rs="token_k1", rollout_rs_threshold="0.5_2.0"
    )
    inv = torch.exp(rollout - train)
    verl_keep = (inv >= 0.5) & (inv <= 2.0)
    assert torch.equal(out.mask.bool(), verl_keep)


# --------------------------------------------------------------------------------- bad input


def test_all_zero_mask_is_an_error():
    train, rollout, _ = batch(TWO_ROWS)
    with pytest.raises(ValueError, match="no valid token"):
        compute_rollout_correction(train, rollout, torch.zeros(2, 3))


def test_shape_mismatch_is_an_error():
    train, rollout, mask = batch(TWO_ROWS)
    with pytest.raises(ValueError, match="same shape"):
        compute_rollout_correction(train, rollout[:, :2], mask)
    with pytest.raises(ValueError, match="2-D"):
        compute_rollout_correction(train[0], rollout[0], mask[0])


def test_empty_batch_is_an_error():
    empty = torch.zeros(0, 4)
    with pytest.raises(ValueError, match="no valid token"):
        compute_rollout_correction(empty, empty, empty, rollout_is="token")


def test_nonfinite_log_probs_are_rejected_counted_and_kept_out_of_metrics():
    train, rollout, mask = batch(TWO_ROWS)
    train[0, 1] = NAN
    rollout[1, 1] = -math.inf
    out = compute_rollout_correction(train, rollout, mask, rollout_is="token")
    assert metric(out, "nonfinite_fraction") == approx(2 / 5)
    assert kept(out) == [[1, 0, 1], [1, 0, 0]]
    assert out.weights[0, 1] == 0 and out.weights[1, 1] == 0
    assert all(math.isfinite(v) for v in out.metrics.values())
    # same as if those two tokens had been padding
    clean = compute_rollout_correction(
        *batch([[LN2, NAN, 0.0], [LN4, NAN, NAN]]), rollout_is="token"
    )
    for k, v in clean.metrics.items():
        if k != PREFIX + "nonfinite_fraction":
            assert out.metrics[k] == approx(v), k


def test_nothing_finite_left_is_an_error():
    train, rollout, mask = batch([[0.0, NAN]])
    train[0, 0] = math.inf
    with pytest.raises(ValueError, match="non-finite"):
        compute_rollout_correction(train, rollout, mask)


def test_rows_without_valid_tokens_are_ignored():
    with_empty = compute_rollout_correction(
        *batch([*TWO_ROWS, [NAN, NAN, NAN]]), rollout_is="sequence", rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.5_2",
    )  # fmt: skip
    without = compute_rollout_correction(
        *batch(TWO_ROWS),
        rollout_is="sequence",
        rollout_rs="seq_mean_k1",
        rollout_rs_threshold="0.5_2",
    )
    assert with_empty.metrics.keys() == without.metrics.keys()
    for k, v in without.metrics.items():
        assert with_empty.metrics[k] == approx(v), k


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(rollout_is="tokens"), "rollout_is must be"),
        (dict(rollout_is="token", rollout_is_threshold=1.0), "must be > 1"),
        (dict(rollout_is="token", rollout_is_threshold=0.5), "must be > 1"),
        (dict(rollout_rs="token_k4", rollout_rs_threshold="2"), "unknown rejection criterion"),
        (dict(rollout_rs="seq_max_k2", rollout_rs_threshold="0.5_2"), "one upper bound"),
        (dict(rollout_rs="token_k1,seq_max_k2", rollout_rs_threshold="2,3,4"), "3 entries"),
        (dict(rollout_rs="token_k1"), "rollout_rs_threshold is missing"),
        (dict(rollout_rs="token_k1,token", rollout_rs_threshold="2"), "more than once"),
    ],
)
def test_invalid_settings_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", LegacyAliasWarning)
        compute_rollout_correction(*batch(TWO_ROWS), **kwargs)


# ------------------------------------------------------------------------------ dtypes, config


def test_dtypes_are_kept_and_half_precision_is_computed_in_float32():
    train, rollout, mask = batch(TWO_ROWS, dtype=torch.float32)
    for mask_dtype in (torch.bool, torch.int64, torch.float32):
        out = compute_rollout_correction(train, rollout, mask.to(mask_dtype), rollout_is="token")
        assert out.mask.dtype == mask_dtype
        assert out.weights.dtype == torch.float32
    half = compute_rollout_correction(
        train.nan_to_num().bfloat16(), rollout.bfloat16(), mask, rollout_is="token"
    )
    assert half.weights.dtype == torch.float32


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_outputs_own_their_memory(level):
    # internal buffers are recycled into the outputs: they must not alias each other or inputs
    train, rollout, mask = batch(THREE_ROWS, dtype=torch.float32)
    out = compute_rollout_correction(
        train, rollout, mask, rollout_is=level, rollout_rs="token_k1,token_k2",
        rollout_rs_threshold="0.6_3,0.3",
    )  # fmt: skip
    pointers = {t.data_ptr() for t in (out.weights, out.mask, train, rollout, mask)}
    assert len(pointers) == 5
    weights = out.weights.clone()
    mask[:] = 7.0  # writing to the input must not change the outputs
    assert torch.equal(out.weights, weights)
    assert kept(out) == [[1, 0, 1], [0, 1, 0], [1, 1, 1]]


def test_no_gradient_flows_through_weights_or_mask():
    train, rollout, mask = batch(TWO_ROWS)
    train = train.nan_to_num().requires_grad_(True)
    out = compute_rollout_correction(train, rollout, mask, rollout_is="token")
    assert not out.weights.requires_grad and not out.mask.requires_grad
    assert out.weights.grad_fn is None


def test_float32_agrees_with_float64():
    g = torch.Generator().manual_seed(5)
    train = -torch.rand(16, 64, generator=g, dtype=torch.float64) * 3
    rollout = train + 0.01 * torch.randn(16, 64, generator=g, dtype=torch.float64)
    mask = torch.ones(16, 64)
    kwargs = dict(rollout_is="token", rollout_rs="seq_sum_k3", rollout_rs_threshold="0.5")
    a = compute_rollout_correction(train, rollout, mask, **kwargs)
    b = compute_rollout_correction(train.float(), rollout.float(), mask, **kwargs)
    for k, v in a.metrics.items():  # small deviations keep their precision (no E[r^2]-E[r]^2)
        assert b.metrics[k] == pytest.approx(v, rel=2e-4, abs=1e-6), k


def test_the_config_spec_gives_what_the_string_settings_give():
    cfg = RolloutCorrectionConfig(
        rollout_is="sequence",
        rollout_is_threshold=3.0,
        rollout_rs="token_k1",
        rollout_rs_threshold="0.6_3",
    )
    a = compute_correction(cfg.spec, *batch(THREE_ROWS))
    b = compute_rollout_correction(
        *batch(THREE_ROWS), rollout_is="sequence", rollout_is_threshold=3.0, rollout_rs="token_k1",
        rollout_rs_threshold="0.6_3",
    )  # fmt: skip
    assert a.metrics == b.metrics
    assert torch.equal(a.mask, b.mask) and torch.equal(a.weights, b.weights)


# -------------------------------------------------------------------------------- properties

ALL_CRITERIA = (
    "token_k1,token_k2,token_k3,seq_sum_k1,seq_mean_k1,seq_sum_k2,seq_sum_k3,"
    "seq_mean_k2,seq_mean_k3,seq_max_k2,seq_max_k3"
)
ALL_THRESHOLDS = "0.7_1.5,0.05,0.05,0.2_4,0.8_1.2,1.0,1.0,0.02,0.02,0.1,0.1"


def random_batch(seed: int, scale: float, rows: int, cols: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    train = -torch.rand(rows, cols, generator=g, dtype=dtype) * min(scale, 1e4)
    rollout = (train + torch.randn(rows, cols, generator=g, dtype=dtype) * scale).clamp(-1e4, 1e4)
    lengths = torch.randint(0, cols + 1, (rows,), generator=g)
    lengths[0] = max(int(lengths[0]), 1)  # at least one valid token
    mask = (torch.arange(cols)[None, :] < lengths[:, None]).float()
    return train, rollout, mask


batches = st.builds(
    random_batch,
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1e-4, 0.05, 0.5, 3.0, 30.0, 1e4]),
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
)


@settings(max_examples=60, deadline=None)
@given(inputs=batches, level=st.sampled_from(["token", "sequence"]), cap=st.floats(1.01, 10))
def test_weights_bounded_by_cap_and_zero_at_padding(inputs, level, cap):
    train, rollout, mask = inputs
    out = compute_rollout_correction(
        train, rollout, mask, rollout_is=level, rollout_is_threshold=cap
    )
    assert out.weights.max() <= torch.tensor(cap, dtype=out.weights.dtype)  # C as stored
    assert float(out.weights.min()) >= 0
    assert torch.all(out.weights[mask == 0] == 0)


@settings(max_examples=60, deadline=None)
@given(inputs=batches, level=st.sampled_from(["token", "sequence"]))
def test_batch_normalised_mean_is_one(inputs, level):
    train, rollout, mask = inputs
    train, rollout = train.double(), rollout.double()
    out = compute_rollout_correction(
        train, rollout, mask, rollout_is=level, rollout_is_batch_normalize=True
    )
    if out.metrics[PREFIX + "rollout_is_batch_norm_factor"] == 1.0:
        return  # mean below 1e-8 (or exactly 1): left as it is by definition
    valid = mask.bool()
    if level == "token":
        mean = out.weights[valid].mean()
    else:
        rows = valid.any(-1)
        mean = out.weights[rows, 0].mean()  # one weight per sequence; every row starts valid
    assert float(mean) == pytest.approx(1.0, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(inputs=batches)
def test_mask_is_a_subset_and_criteria_combine_by_and(inputs):
    train, rollout, mask = inputs
    names, thresholds = ALL_CRITERIA.split(","), ALL_THRESHOLDS.split(",")
    combined = compute_rollout_correction(
        train, rollout, mask, rollout_rs=ALL_CRITERIA, rollout_rs_threshold=ALL_THRESHOLDS
    ).mask
    assert torch.all(combined <= mask)
    intersection = mask.bool()
    for name, threshold in zip(names, thresholds, strict=True):
        single = compute_rollout_correction(
            train, rollout, mask, rollout_rs=name, rollout_rs_threshold=threshold
        ).mask
        assert torch.all(single <= mask)
        intersection &= single.bool()
    assert torch.equal(combined.bool(), intersection)


@settings(max_examples=60, deadline=None)
@given(inputs=batches, level=st.sampled_from(["token", "sequence"]), norm=st.booleans())
def test_no_nan_for_finite_inputs(inputs, level, norm):
    train, rollout, mask = inputs
    out = compute_rollout_correction(
        train, rollout, mask, rollout_is=level, rollout_is_batch_normalize=norm,
        rollout_rs=ALL_CRITERIA, rollout_rs_threshold=ALL_THRESHOLDS,
    )  # fmt: skip
    assert not any(math.isnan(v) for v in out.metrics.values())
    assert torch.isfinite(out.weights).all()


# k1 bounds that do not contain 1, where padding (log_r = 0) must not be counted
ONE_SIDED = ("token_k1,seq_sum_k1,seq_mean_k1", "1.05_3,0.1_0.95,1.01_2")


@settings(max_examples=40, deadline=None)
@given(
    inputs=batches,
    level=st.sampled_from([None, "token", "sequence"]),
    norm=st.booleans(),
    nonfinite=st.booleans(),
    rs=st.sampled_from([(ALL_CRITERIA, ALL_THRESHOLDS), ONE_SIDED]),
)
def test_agrees_with_the_straightforward_reference(inputs, level, norm, nonfinite, rs):
    train, rollout, mask = (t.double() for t in inputs)
    if nonfinite:
        train[0, 0] = NAN
        rollout[-1, -1] = math.inf
    kwargs = dict(
        rollout_is=level, rollout_is_batch_normalize=norm, rollout_rs=rs[0],
        rollout_rs_threshold=rs[1],
    )  # fmt: skip
    try:
        ref_weights, ref_mask, ref_metrics = reference_correction(train, rollout, mask, **kwargs)
    except (RuntimeError, IndexError):  # the reference cannot reduce an empty selection
        with pytest.raises(ValueError):
            compute_rollout_correction(train, rollout, mask, **kwargs)
        return
    out = compute_rollout_correction(train, rollout, mask, **kwargs)
    assert torch.equal(out.mask, ref_mask)
    if level is None:
        assert out.weights is None
    else:
        torch.testing.assert_close(out.weights, ref_weights, rtol=1e-9, atol=0)
    assert out.metrics.keys() == ref_metrics.keys()
    for k, v in ref_metrics.items():
        # the _std of a criterion comes from one-pass moments (as verl's): sqrt(eps) * |mean|
        tol = 1e-7 if k.endswith("_std") else 1e-9
        assert out.metrics[k] == pytest.approx(v, rel=1e-6, abs=tol), k


# ------------------------------------------------------------------------------ IcePop bands


def test_token_icepop_band_zeroes_weights_outside_and_leaves_the_mask():
    # r = [0.25, 0.5, 1, 4] with band [0.5, 2]: 0.25 < lo and 4 > hi are zeroed (not truncated);
    # 0.5 sits on the bound and is kept. oob = 2/4; high = 1/4 (r=4), low = 1/4 (r=0.25).
    # ESS of w = [0, 0.5, 1, 0]: (sum w)^2 / (n sum w^2) = 1.5^2 / (4 * 1.25) = 0.45.
    train, rollout, mask = batch([[-LN4, -LN2, 0.0, LN4]])
    res = compute_rollout_correction(
        train, rollout, mask, rollout_is="token", rollout_is_threshold="0.5_2"
    )
    assert res.weights.tolist() == [[0.0, pytest.approx(0.5), 1.0, 0.0]]
    assert res.mask.tolist() == mask.tolist()
    assert metric(res, "rollout_is_oob_ratio") == approx(0.5)
    assert metric(res, "rollout_is_ratio_fraction_high") == approx(0.25)
    assert metric(res, "rollout_is_ratio_fraction_low") == approx(0.25)
    assert metric(res, "rollout_is_eff_sample_size") == approx(0.45)


def test_sequence_icepop_band_zeroes_whole_sequences_and_counts_sequences():
    # Row 0: S = ln 4, exp(S) = 4 > hi = 2 -> weight 0 on both tokens. Row 1: S = ln 0.8 inside
    # [0.5, 2] -> weight 0.8. oob is a share of sequences: 1 of 2 (verl's is token-weighted).
    train, rollout, mask = batch([[LN2, LN2, NAN], [math.log(0.8), 0.0, 0.0]])
    res = compute_rollout_correction(
        train, rollout, mask, rollout_is="sequence", rollout_is_threshold="0.5_2.0"
    )
    assert res.weights[0].tolist() == [0.0, 0.0, 0.0]
    assert res.weights[1].tolist() == [pytest.approx(0.8)] * 3
    assert metric(res, "rollout_is_oob_ratio") == approx(0.5)


def test_icepop_band_that_zeroes_everything_reports_ess_zero_not_nan():
    # Every r = 4 lies above hi = 2: all weights 0, ESS 0 (not 0/0).
    train, rollout, mask = batch([[LN4, LN4]])
    res = compute_rollout_correction(
        train, rollout, mask, rollout_is="token", rollout_is_threshold="0.5_2"
    )
    assert res.weights.tolist() == [[0.0, 0.0]]
    assert metric(res, "rollout_is_eff_sample_size") == 0.0
    assert metric(res, "rollout_is_oob_ratio") == 1.0


def test_a_plain_number_keeps_its_meaning_and_has_no_oob_metric():
    train, rollout, mask = batch([[-LN4, LN4]])
    res = compute_rollout_correction(
        train, rollout, mask, rollout_is="token", rollout_is_threshold=2
    )
    assert res.weights.tolist() == [[0.25, 2.0]]  # min(r, 2): truncated, nothing zeroed
    assert PREFIX + "rollout_is_oob_ratio" not in res.metrics


def test_seq_fraction_high_comes_from_raw_ratios_not_truncated_weights():
    # verl #6806. Token IS, C = 2. Row 0: r = [4, 4] -> truncated weights [2, 2] whose mean (2)
    # is never > C, but the raw mean 4 is. Row 1: r = [1, 1]. So 1 of 2 sequences is "high".
    train, rollout, mask = batch([[LN4, LN4], [0.0, 0.0]])
    res = compute_rollout_correction(
        train, rollout, mask, rollout_is="token", rollout_is_threshold=2
    )
    assert metric(res, "rollout_is_seq_fraction_high") == approx(0.5)
    assert metric(res, "rollout_is_seq_max") == approx(4.0)


# ------------------------------------------------------------------ off-policy sequence masking


def test_opsm_masks_negative_advantage_sequences_that_drifted_beyond_delta():
    # log_r = lp_train - lp_rollout; d = mean(-log_r) per sequence, delta = 0.5.
    #   row 0: d = 1.0, A = -1 -> masked
    #   row 1: d = 1.0, A = +1 -> kept (positive updates are never masked)
    #   row 2: d = 0.2, A = -1 -> kept (close enough)
    # Masked: 1 of 3 sequences, 2 of 6 tokens.
    train, rollout, mask = batch([[-1.0, -1.0], [-1.0, -1.0], [-0.2, -0.2]])
    adv = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    keep, metrics = off_policy_sequence_mask(train, rollout, mask, adv, 0.5)
    assert keep.tolist() == [False, True, True]
    assert metrics[PREFIX + "opsm_seq_masked_fraction"] == approx(1 / 3)
    assert metrics[PREFIX + "opsm_masked_fraction"] == approx(2 / 6)


def test_opsm_ignores_padding_and_keeps_a_sequence_at_exactly_delta():
    # Row 0: one valid token with -log_r = 0.5 = delta: not > delta, kept. Padding is NaN.
    train, rollout, mask = batch([[-0.5, NAN]])
    adv = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)
    keep, metrics = off_policy_sequence_mask(train, rollout, mask, adv, 0.5)
    assert keep.tolist() == [True]
    assert metrics[PREFIX + "opsm_seq_masked_fraction"] == 0.0
