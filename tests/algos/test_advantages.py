"""rcx.algos.advantages against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rcx.algos.advantages import (
    gae,
    grpo,
    masked_whiten,
    reinforce_plus_plus,
    rloo,
    token_rewards_from_scores,
)

MASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])


def per_row(adv: torch.Tensor) -> list[float]:
    """The constant advantage of each row (checked constant over its valid tokens)."""
    out = []
    for row, m in zip(adv, MASK.bool(), strict=True):
        assert torch.all(row[~m] == 0)
        assert torch.allclose(row[m], row[m][0])
        out.append(row[m][0].item())
    return out


def test_grpo_normalises_by_group_std_and_zero_std_group_gets_zero():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0])
    adv = grpo(scores, MASK, ["a", "a", "b", "b"])
    # group a: mean 0.5, unbiased std sqrt(0.5) -> +-0.5/sqrt(0.5) = +-0.7071 (eps 1e-6)
    s = math.sqrt(0.5)
    assert per_row(adv) == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6), 0.0, 0.0])
    assert per_row(grpo(scores, MASK, ["a", "a", "b", "b"], norm_by_std=False)) == pytest.approx(
        [0.5, -0.5, 0.0, 0.0]
    )


def test_grpo_groups_by_tensor_ids_in_any_order():
    scores = torch.tensor([3.0, 1.0, 0.0, 2.0])
    adv = grpo(scores, MASK, torch.tensor([7, 9, 7, 9]), norm_by_std=False)
    # group 7: scores 3, 0 (mean 1.5); group 9: 1, 2 (mean 1.5)
    assert per_row(adv) == pytest.approx([1.5, -0.5, -1.5, 0.5])


def test_rloo_with_two_and_three_samples():
    # n = 2: the baseline is the other sample
    assert per_row(rloo(torch.tensor([1.0, 0.0, 5.0, 2.0]), MASK, [0, 0, 1, 1])) == pytest.approx(
        [1.0, -1.0, 3.0, -3.0]
    )
    mask3 = torch.ones(3, 2)
    adv = rloo(torch.tensor([3.0, 0.0, 0.0]), mask3, [0, 0, 0])
    # A_0 = 3 - (0+0)/2 = 3, A_1 = 0 - (3+0)/2 = -1.5
    torch.testing.assert_close(adv[:, 0], torch.tensor([3.0, -1.5, -1.5]))


@pytest.mark.parametrize("estimator", [grpo, rloo])
def test_group_estimators_need_two_samples_per_group(estimator):
    with pytest.raises(ValueError, match="at least 2 responses per group"):
        estimator(torch.tensor([1.0, 0.0, 1.0, 1.0]), MASK, [0, 0, 1, 2])


def test_token_rewards_land_on_the_last_valid_token():
    rewards = token_rewards_from_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), MASK)
    expected = torch.tensor([[0, 1.0, 0], [0, 0, 2.0], [3.0, 0, 0], [0, 0, 4.0]])
    torch.testing.assert_close(rewards, expected)


def test_gae_hand_case():
    # gamma = lam = 0.5, rewards [0, 1], values [0.5, 0.25]
    # delta_1 = 1 + 0.5*0 - 0.25 = 0.75            A_1 = 0.75
    # delta_0 = 0 + 0.5*0.25 - 0.5 = -0.375        A_0 = -0.375 + 0.25*0.75 = -0.1875
    rewards = torch.tensor([[0.0, 1.0, 9.0]])
    values = torch.tensor([[0.5, 0.25, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    adv, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[-0.1875, 0.75, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.3125, 1.0, 0.0]]))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), cols=st.integers(1, 9))
def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value(seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    values = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mask = torch.rand(rows, cols, generator=g) < 0.7  # holes anywhere
    adv, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
    masked_rewards = torch.where(mask, rewards, 0.0)
    to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1)  # sum of r over t' >= t
    expected = torch.where(mask, to_go - values, 0.0)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(returns, torch.where(mask, to_go, 0.0))


def test_gae_whitening_gives_zero_mean_unit_variance():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    mask = torch.ones(4, 5)
    mask[0, 3:] = 0
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    valid = adv[mask.bool()]
    assert valid.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert valid.std().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(adv[~mask.bool()] == 0)


def test_reinforce_plus_plus_discounts_then_whitens():
    rewards = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # gamma = 0.5: returns [0.5, 1, -] and [0.5, 1, 2]
    returns = torch.tensor([[0.5, 1.0, 0.0], [0.5, 1.0, 2.0]])
    expected = masked_whiten(returns, mask)
    torch.testing.assert_close(reinforce_plus_plus(rewards, mask, gamma=0.5), expected)
    # whitening by hand: mean 5/5 = 1, unbiased var (.25+0+.25+0+1)/4 = 0.375
    assert expected[1, 2].item() == pytest.approx(1.0 / math.sqrt(0.375 + 1e-8))


# ------------------------------------------- fully rejected sequences and the group baselines

# One group of 4; the 4th response (score 1) was rejected whole.
SCORES4 = torch.tensor([1.0, 0.0, 0.0, 1.0])
ONE_GROUP = [0, 0, 0, 0]
IN_BASELINE = torch.tensor([True, True, True, False])


def test_grpo_baseline_with_and_without_the_rejected_sequence():
    # Included: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5774 -> A_0 = 0.5 / 0.5774 = 0.866.
    # Left out: mean over [1, 0, 0] = 1/3, std sqrt((4/9 + 1/9 + 1/9) / 2) = 0.5774
    #   -> A_0 = (2/3) / 0.5774 = 1.1547, A_1 = (-1/3) / 0.5774 = -0.5774.
    ones = torch.ones(4, 1)
    std = math.sqrt(1 / 3)
    with_rejected = grpo(SCORES4, ones, ONE_GROUP, eps=0.0)[:, 0]
    without = grpo(SCORES4, ones, ONE_GROUP, eps=0.0, in_baseline=IN_BASELINE)[:, 0]
    assert with_rejected.tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert without[:3].tolist() == pytest.approx([(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std])


def test_rloo_baseline_with_and_without_the_rejected_sequence():
    # Included: A_0 = 1 - (0 + 0 + 1) / 3 = 2/3. Left out: A_0 = 1 - (0 + 0) / 2 = 1,
    # A_1 = 0 - (1 + 0) / 2 = -0.5.
    ones = torch.ones(4, 1)
    assert rloo(SCORES4, ones, ONE_GROUP)[0, 0].item() == pytest.approx(2 / 3)
    without = rloo(SCORES4, ones, ONE_GROUP, in_baseline=IN_BASELINE)[:, 0]
    assert without[:3].tolist() == pytest.approx([1.0, -0.5, -0.5])


def test_a_group_left_with_one_baseline_member_gets_zero_advantage():
    # Only response 0 is in the baseline: nothing to compare it with.
    only_first = torch.tensor([True, False, False, False])
    ones = torch.ones(4, 1)
    assert grpo(SCORES4, ones, ONE_GROUP, in_baseline=only_first).abs().sum() == 0
    assert rloo(SCORES4, ones, ONE_GROUP, in_baseline=only_first)[0, 0].item() == 0.0
