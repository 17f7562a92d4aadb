"""Advantage estimators: grpo, rloo, gae, reinforce_plus_plus. Pure tensor code.

``scores`` are per-sequence outcome rewards ``(B,)``; ``token_rewards`` are ``(B, T)`` (an outcome
reward lands on the last valid response token: :func:`token_rewards_from_scores`). Advantages come
back ``(B, T)`` and are zero wherever ``mask`` is zero. Padding may sit anywhere in a row: the
recursions of :func:`gae` and :func:`reinforce_plus_plus` step over masked-out positions.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

GroupIds = torch.Tensor | Sequence[Hashable]


def token_rewards_from_scores(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's outcome reward on its last valid token. ``(B,), (B, T) -> (B, T)``.

    A row without a valid token gets no reward.
    """
    keep = mask.bool()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(keep, positions, -1).amax(-1)  # (B,) -1 for empty rows
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    rows = torch.nonzero(last >= 0).squeeze(-1)
    rewards[rows, last[rows]] = scores[rows]
    return rewards


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked-in entries (unbiased var); 0 elsewhere."""
    keep = mask.bool()
    count = keep.sum()
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, got {int(count)}")
    x = torch.where(keep, values, 0.0)
    mean = x.sum() / count
    var = torch.where(keep, (values - mean).square(), 0.0).sum() / (count - 1)
    return torch.where(keep, (values - mean) * torch.rsqrt(var + eps), 0.0)


def _group_index(group_ids: GroupIds, batch: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Dense group index ``(B,)`` in ``[0, G)`` and G, from ids of any hashable kind."""
    if isinstance(group_ids, torch.Tensor):
        if group_ids.shape != (batch,):
            raise ValueError(f"group_ids must have shape ({batch},), got {tuple(group_ids.shape)}")
        _, index = torch.unique(group_ids, return_inverse=True)
        return index.to(device), int(index.max()) + 1 if batch else 0
    if len(group_ids) != batch:
        raise ValueError(f"group_ids must have {batch} entries, got {len(group_ids)}")
    dense: dict[Hashable, int] = {}
    index = torch.tensor([dense.setdefault(g, len(dense)) for g in group_ids], device=device)
    return index, len(dense)


def _group_stats(
    scores: torch.Tensor,
    group_ids: GroupIds,
    estimator: str,
    in_baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group baseline size and score sum ``(G,)`` and each sequence's group index ``(B,)``,
    checking every group has n >= 2 responses. With ``in_baseline`` ``(B,)`` bool, only those
    sequences count in the sizes and sums (the others are left out of the baseline)."""
    if scores.dim() != 1:
        raise ValueError(
            f"scores must be one outcome reward per sequence (B,), got {tuple(scores.shape)}"
        )
    index, num_groups = _group_index(group_ids, scores.shape[0], scores.device)
    sizes = torch.bincount(index, minlength=num_groups)  # (G,)
    if bool((sizes < 2).any()):
        raise ValueError(
            f"{estimator} needs at least 2 responses per group (rollout.n >= 2); group sizes "
            f"found: {sorted(set(sizes.tolist()))}"
        )
    sums = torch.zeros(num_groups, dtype=scores.dtype, device=scores.device)
    if in_baseline is None:
        sums.index_add_(0, index, scores)
        return sizes.to(scores.dtype), sums, index
    member = in_baseline.to(device=scores.device, dtype=scores.dtype)  # (B,)
    sums.index_add_(0, index, scores * member)
    members = torch.zeros_like(sums).index_add_(0, index, member)  # (G,)
    return members, sums, index


def _broadcast(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), adv[:, None], 0.0)


def grpo(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds,
    *,
    norm_by_std: bool = True,
    eps: float = 1e-6,
    in_baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO: ``A_i = (s_i - mean_g) / (std_g + eps)`` (or ``s_i - mean_g`` without std).

    mean and std (unbiased) over the responses of i's group g; a group whose responses all scored
    the same gets A = 0. With ``in_baseline`` ``(B,)`` bool, mean and std are taken over the
    group's members in the baseline only (e.g. leaving fully rejected sequences out); a group
    with fewer than 2 such members gets A = 0 throughout. Returns ``(B, T)``, constant along
    each response, 0 at padding.
    """
    sizes, sums, index = _group_stats(scores, group_ids, "grpo", in_baseline)
    mean = sums / sizes.clamp_min(1)  # (G,)
    centred = scores - mean[index]  # (B,)
    member = torch.ones_like(scores) if in_baseline is None else in_baseline.to(scores.dtype)
    comparable = (sizes >= 2)[index]  # (B,) a baseline of at least 2 responses
    if not norm_by_std:
        return _broadcast(torch.where(comparable, centred, 0.0), mask)
    sq = torch.zeros_like(sums).index_add_(0, index, centred.square() * member)
    std = torch.sqrt(sq / (sizes - 1).clamp_min(1))  # (G,)
    return _broadcast(torch.where(comparable, centred / (std[index] + eps), 0.0), mask)


def rloo(
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_ids: GroupIds,
    *,
    in_baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """RLOO: ``A_i = s_i - (sum_g - s_i) / (n_g - 1)``, the score minus the others' mean.

    With ``in_baseline`` ``(B,)`` bool, "the others" are the group's other members in the
    baseline; a response with no such other gets A = 0. Returns ``(B, T)``, constant along each
    response, 0 at padding.
    """
    sizes, sums, index = _group_stats(scores, group_ids, "rloo", in_baseline)
    member = torch.ones_like(scores) if in_baseline is None else in_baseline.to(scores.dtype)
    others = sizes[index] - member  # (B,) baseline members other than i
    baseline = (sums[index] - scores * member) / others.clamp_min(1)  # (B,)
    return _broadcast(torch.where(others >= 1, scores - baseline, 0.0), mask)


def gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the valid tokens of each response.

    With t+1 the next valid token (the value after the last one is 0)::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t                                  (the value target)

    Returns ``(advantages, returns)``, both ``(B, T)`` and 0 at padding. ``whiten`` (verl's
    behaviour) whitens the advantages over the batch's valid tokens; the returns are not whitened.
    """
    keep = mask.bool()
    rewards = torch.where(keep, token_rewards, 0.0)
    vals = torch.where(keep, values, 0.0)
    next_value = torch.zeros_like(vals[:, 0])  # (B,)
    next_adv = torch.zeros_like(vals[:, 0])  # (B,)
    advantages = torch.zeros_like(vals)  # (B, T)
    for t in reversed(range(vals.shape[-1])):
        valid_t = keep[:, t]
        delta = rewards[:, t] + gamma * next_value - vals[:, t]
        adv_t = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(valid_t, adv_t, 0.0)
        next_value = torch.where(valid_t, vals[:, t], next_value)
        next_adv = torch.where(valid_t, adv_t, next_adv)
    returns = torch.where(keep, advantages + vals, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


def reinforce_plus_plus(
    token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float
) -> torch.Tensor:
    """REINFORCE++: discounted return-to-go ``G_t = r_t + gamma * G_{t+1}`` (over valid tokens),
    whitened over the batch's valid tokens. ``(B, T)``, 0 at padding."""
    keep = mask.bool()
    rewards = torch.where(keep, token_rewards, 0.0)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    returns = torch.zeros_like(rewards)  # (B, T)
    for t in reversed(range(rewards.shape[-1])):
        valid_t = keep[:, t]
        running = torch.where(valid_t, rewards[:, t] + gamma * running, running)
        returns[:, t] = torch.where(valid_t, running, 0.0)
    return masked_whiten(returns, mask)


ESTIMATORS = ("grpo", "rloo", "gae", "reinforce_plus_plus")


def compute_advantages(
    estimator: str,
    scores: torch.Tensor,
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: GroupIds,
    values: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 1.0,
    norm_by_std: bool = True,
    in_baseline: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), of the named estimator.

    Only gae has value targets (it needs ``values``); for the others ``returns`` are the
    advantages (as in verl). ``in_baseline`` ``(B,)`` bool (grpo and rloo only; ignored by the
    others) names the sequences that count in their group's baseline.
    """
    if estimator == "gae":
        return gae(token_rewards, values, response_mask, gamma=gamma, lam=lam)
    if estimator == "grpo":
        a = grpo(scores, response_mask, group_ids, norm_by_std=norm_by_std, in_baseline=in_baseline)
    elif estimator == "rloo":
        a = rloo(scores, response_mask, group_ids, in_baseline=in_baseline)
    elif estimator == "reinforce_plus_plus":
        a = reinforce_plus_plus(token_rewards, response_mask, gamma=gamma)
    else:
        raise ValueError(f"adv_estimator={estimator!r} is not one of {', '.join(ESTIMATORS)}")
    return a, a
