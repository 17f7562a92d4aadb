"""Policy, value, entropy and KL losses. Pure functions of tensors.

Every ``(B, T)`` loss matrix is reduced with :func:`agg_loss` over a mask; entries outside the mask
may hold anything (NaN included): they are selected away, never multiplied by zero, so they reach
neither the loss nor the gradient. Metrics come back as ``dict[str, float]`` with verl's names
(``actor/pg_loss``, ``actor/pg_clipfrac``, ...), brought to the host with one ``tolist()``.
"""

from __future__ import annotations

import torch

LOSS_AGG_MODES = (
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum-norm",
)
KL_PENALTIES = ("kl", "abs", "mse", "low_var_kl")
LOSS_TYPES = ("ppo_clip", "reinforce", "cispo", "gspo")
#: |log-ratio| bound before ``exp``, so that no ratio overflows (the correction's bound too).
LOG_RATIO_BOUND = 20.0


def agg_loss(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    denominator_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a ``(B, T)`` loss matrix to a scalar: sum over the tokens where ``mask`` is nonzero,
    divided by counts taken from ``denominator_mask`` (default: ``mask`` itself).

    With ``n_i`` the number of tokens of sequence i in the denominator mask, ``V`` the sequences
    with ``n_i > 0`` and ``T = mask.shape[-1]``:

    - ``token-mean``: ``sum_{i,t} L / sum_i n_i``
    - ``seq-mean-token-sum``: ``sum_{i in V} sum_t L / |V|``
    - ``seq-mean-token-mean``: ``sum_{i in V} (sum_t L / n_i) / |V|``
    - ``seq-mean-token-sum-norm``: ``sum_{i in V} (sum_t L / T) / |V|`` (Dr. GRPO: a constant
      divisor)

    ``denominator_mask`` is how the choice "tokens kept vs tokens generated" is made: the mask
    after rejection (the default) divides by what was kept; the response mask before rejection
    divides by what was generated, so rejected tokens and sequences count as zeros.

    An empty mask gives 0 (still attached to the graph, so ``backward`` gives zero gradients).
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {', '.join(LOSS_AGG_MODES)}; got {mode!r}")
    if loss_mat.shape != mask.shape:
        raise ValueError(
            f"loss matrix {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} differ in shape"
        )
    keep = mask.bool()
    count = keep if denominator_mask is None else denominator_mask.bool()  # (B, T)
    masked = torch.where(keep, loss_mat, torch.zeros((), dtype=loss_mat.dtype))  # (B, T)
    if mode == "token-mean":
        return masked.sum() / count.sum().clamp_min(1)
    seq_sums = masked.sum(-1)  # (B,)
    counts = count.sum(-1)  # (B,)
    num_seqs = (counts > 0).sum().clamp_min(1)
    if mode == "seq-mean-token-sum":
        return seq_sums.sum() / num_seqs
    if mode == "seq-mean-token-mean":
        return (seq_sums / counts.clamp_min(1)).sum() / num_seqs
    return seq_sums.sum() / (num_seqs * mask.shape[-1])


def _token_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``clamp(log_probs - old_log_probs, -20, 20)`` on kept tokens, 0 elsewhere, ``(B, T)``:
    the per-token log-ratio every ratio loss starts from."""
    return _masked(log_probs - old_log_probs, keep).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def _masked(x: torch.Tensor, keep: torch.Tensor, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
    return torch.where(keep, x, fill)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the masked-in entries; 0 for an empty mask."""
    return _masked(x, keep).sum() / keep.sum().clamp_min(1)


def _masked_max(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Max over the masked-in entries; 0 for an empty mask."""
    return torch.where(keep.any(), _masked(x, keep, -torch.inf).amax(), 0.0)


def ppo_clip_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    denominator_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Dual-clip PPO policy loss.

    ``rho = exp(clamp(log_probs - old_log_probs, -20, 20))``, ``eps_lo/eps_hi`` default to
    ``clip_ratio``. Per token::

        L1 = max(-A * rho, -A * clamp(rho, 1 - eps_lo, 1 + eps_hi))
        L  = min(L1, -A * clip_ratio_c)  if A < 0  else  L1       (dual clip)
        L  = w * L                                                 (if is_weights is given)

    and the loss is ``agg_loss(L, mask, loss_agg_mode, denominator_mask)``. ``is_weights`` carry
    no gradient. Metrics (over the mask): ``actor/pg_loss``, ``actor/pg_clipfrac`` (share where the
    clipped term is the larger), ``actor/pg_clipfrac_lower`` (share with A < 0 where the dual clip
    bound is active), ``actor/ppo_kl`` (mean of ``old - new`` log-prob), and with weights
    ``actor/is_weight_mean`` / ``actor/is_weight_max`` (the weights actually applied).
    """
    if clip_ratio_c <= 1.0:
        raise ValueError(
            f"clip_ratio_c must be > 1 (dual-clip bound on -A * ratio), got {clip_ratio_c}"
        )
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high)
    keep = mask.bool()
    # Entries outside the mask may be NaN/inf (a rollout engine's padding): neutralise them first
    # so that no NaN enters the graph, whose backward would multiply it by a zero gradient.
    neg_kl = _token_log_ratio(log_probs, old_log_probs, keep)  # (B, T)
    adv = _masked(advantages, keep)  # (B, T)
    ratio = torch.exp(neg_kl)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, low, high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = -adv * clip_ratio_c
    negative = adv < 0
    loss_mat = torch.where(negative, torch.minimum(loss_ppo, loss_dual), loss_ppo)
    weights = None if is_weights is None else _masked(is_weights.detach(), keep)  # (B, T)
    if weights is not None:
        loss_mat = loss_mat * weights
    loss = agg_loss(loss_mat, mask, loss_agg_mode, denominator_mask)

    with torch.no_grad():
        stats = [
            loss.detach(),
            _masked_mean((loss_clipped > loss_unclipped).to(ratio.dtype), keep),
            _masked_mean(((loss_ppo > loss_dual) & negative).to(ratio.dtype), keep),
            _masked_mean(-neg_kl, keep),
        ]
        names = ["actor/pg_loss", "actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"]
        metrics = _loss_metrics(names, stats, weights, keep)
    return loss, metrics


def reinforce_loss(
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    is_weights: torch.Tensor | None = None,
    loss_agg_mode: str = "token-mean",
    denominator_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE with optional IS weights: ``L = agg(-w * A * log_probs)`` over the mask.

    No clipping; ``w`` (default 1) carries no gradient, so ``dL/dlog_probs = -w * A`` (times the
    aggregation's normaliser). Metrics: ``actor/pg_loss`` and, with weights,
    ``actor/is_weight_mean`` / ``actor/is_weight_max``.
    """
    keep = mask.bool()
    coeff = _masked(advantages, keep)  # (B, T)
    weights = None if is_weights is None else _masked(is_weights.detach(), keep)  # (B, T)
    if weights is not None:
        coeff = coeff * weights
    loss_mat = -coeff.detach() * _masked(log_probs, keep)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, denominator_mask)
    with torch.no_grad():
        metrics = _loss_metrics(["actor/pg_loss"], [loss.detach()], weights, keep)
    return loss, metrics


def _clip_range(
    clip_ratio: float, clip_ratio_low: float | None, clip_ratio_high: float | None
) -> tuple[float, float]:
    """``(1 - eps_lo, 1 + eps_hi)``, each epsilon defaulting to ``clip_ratio`` (verl's rule)."""
    eps_lo = clip_ratio if clip_ratio_low is None else clip_ratio_low
    eps_hi = clip_ratio if clip_ratio_high is None else clip_ratio_high
    return 1.0 - eps_lo, 1.0 + eps_hi


def cispo_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    denominator_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (MiniMax-M1): the clipped ratio weighs the log-prob, under a stop-gradient.

    ``rho = exp(clamp(log_probs - old_log_probs, -20, 20))``; per token::

        L = -sg(clamp(rho, 1 - eps_lo, 1 + eps_hi)) * A * log_probs      (times w, if given)

    so ``dL/dlog_probs = -clamp(rho) * A``: unlike PPO-clip, a token whose ratio is clipped keeps
    its gradient (the clip bounds its weight, it does not zero it). ``eps_lo/eps_hi`` default to
    ``clip_ratio`` (verl's ``clip_ratio_low/high``; MiniMax-M1 sets no lower bound:
    ``clip_ratio_low = 1``). Metrics: ``actor/pg_loss``, ``actor/pg_clipfrac`` (share of tokens
    whose ratio was clipped), ``actor/ppo_kl``, and with weights ``actor/is_weight_mean|max``.
    """
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high)
    keep = mask.bool()
    neg_kl = _token_log_ratio(log_probs, old_log_probs, keep)  # (B, T)
    ratio = torch.exp(neg_kl.detach())  # (B, T)
    clipped = torch.clamp(ratio, low, high)  # (B, T), no gradient
    coeff = clipped * _masked(advantages, keep)  # (B, T)
    weights = None if is_weights is None else _masked(is_weights.detach(), keep)  # (B, T)
    if weights is not None:
        coeff = coeff * weights
    loss_mat = -coeff.detach() * _masked(log_probs, keep)
    loss = agg_loss(loss_mat, mask, loss_agg_mode, denominator_mask)
    with torch.no_grad():
        stats = [
            loss.detach(),
            _masked_mean((clipped != ratio).to(ratio.dtype), keep),
            _masked_mean(-neg_kl, keep),
        ]
        names = ["actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl"]
        metrics = _loss_metrics(names, stats, weights, keep)
    return loss, metrics


def sequence_log_ratio(log_ratio: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``clamp(mean_t log_ratio, -20, 20)`` over each sequence's kept tokens, ``(B, T), (B, T) ->
    (B,)``; 0 for a sequence with none. ``exp`` of it is GSPO's sequence ratio, the geometric
    mean of the token ratios."""
    counts = keep.sum(-1).clamp_min(1)  # (B,)
    mean = _masked(log_ratio, keep).sum(-1) / counts
    return mean.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def gspo_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    loss_agg_mode: str = "token-mean",
    is_weights: torch.Tensor | None = None,
    denominator_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Qwen): PPO's clip on the sequence ratio, applied to every token of the sequence.

    With ``log_r = clamp(log_probs - old_log_probs, -20, 20)`` and the sequence ratio
    ``s_i = exp(clamp(mean_t log_r[i,t], -20, 20))`` over the sequence's masked-in tokens::

        L[i,t] = max(-A[i,t] * s_i, -A[i,t] * clamp(s_i, 1 - eps_lo, 1 + eps_hi))   (times w)

    aggregated by ``loss_agg_mode`` (the paper's objective is ``seq-mean-token-mean``). The
    gradient flows through ``s_i``: ``d s_i = s_i * mean_t d log_probs``. No dual clip (as in
    verl). ``eps_lo/eps_hi`` default to ``clip_ratio`` (the paper uses 3e-4 / 4e-4). Metrics:
    ``actor/pg_loss``, ``actor/pg_clipfrac`` (share of tokens where the clipped term is the
    larger), ``actor/ppo_kl``, and with weights ``actor/is_weight_mean|max``.
    """
    low, high = _clip_range(clip_ratio, clip_ratio_low, clip_ratio_high)
    keep = mask.bool()
    neg_kl = _token_log_ratio(log_probs, old_log_probs, keep)  # (B, T)
    seq_ratio = torch.exp(sequence_log_ratio(neg_kl, keep))[:, None]  # (B, 1)
    adv = _masked(advantages, keep)  # (B, T)
    loss_unclipped = -adv * seq_ratio  # (B, T)
    loss_clipped = -adv * torch.clamp(seq_ratio, low, high)  # (B, T)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    weights = None if is_weights is None else _masked(is_weights.detach(), keep)  # (B, T)
    if weights is not None:
        loss_mat = loss_mat * weights
    loss = agg_loss(loss_mat, mask, loss_agg_mode, denominator_mask)
    with torch.no_grad():
        stats = [
            loss.detach(),
            _masked_mean((loss_clipped > loss_unclipped).to(neg_kl.dtype), keep),
            _masked_mean(-neg_kl, keep),
        ]
        names = ["actor/pg_loss", "actor/pg_clipfrac", "actor/ppo_kl"]
        metrics = _loss_metrics(names, stats, weights, keep)
    return loss, metrics


def _loss_metrics(
    names: list[str], stats: list[torch.Tensor], weights: torch.Tensor | None, keep: torch.Tensor
) -> dict[str, float]:
    """Scalar stats -> metrics in one host sync, plus ``actor/is_weight_mean|max`` when weighted."""
    if weights is not None:
        names = [*names, "actor/is_weight_mean", "actor/is_weight_max"]
        stats = [*stats, _masked_mean(weights, keep), _masked_max(weights, keep)]
    values = torch.stack([s.to(torch.float64) for s in stats]).tolist()
    return dict(zip(names, values, strict=True))


def value_loss(
    values: torch.Tensor,
    returns: torch.Tensor,
    old_values: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
    loss_agg_mode: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: ``0.5 * agg(max((V - R)^2, (clamp(V, V_old - c, V_old + c) - R)^2))``.

    Metrics: ``critic/vf_loss`` and ``critic/vf_clipfrac`` (share where the clipped term is the
    larger).
    """
    keep = mask.bool()
    v = _masked(values, keep)
    v_old = _masked(old_values, keep)
    target = _masked(returns, keep)
    v_clipped = torch.maximum(torch.minimum(v, v_old + cliprange_value), v_old - cliprange_value)
    loss_unclipped = (v - target).square()
    loss_clipped = (v_clipped - target).square()
    loss = 0.5 * agg_loss(torch.maximum(loss_unclipped, loss_clipped), mask, loss_agg_mode)
    with torch.no_grad():
        clipfrac = _masked_mean((loss_clipped > loss_unclipped).to(v.dtype), keep)
        values_out = torch.stack([loss.detach().double(), clipfrac.double()]).tolist()
    return loss, {"critic/vf_loss": values_out[0], "critic/vf_clipfrac": values_out[1]}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logsumexp(z) - sum softmax(z) * z``.

    ``(B, T, V) -> (B, T)``.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL penalty to a frozen reference policy, ``(B, T)``; ``d = log_probs - ref``.

    - ``kl``: ``d`` (k1)
    - ``abs``: ``|d|``
    - ``mse``: ``0.5 d^2`` (k2)
    - ``low_var_kl``: ``exp(-d) + d - 1`` (k3, non-negative), with d clamped to +-20 and the
      result to [-10, 10] as verl does.
    """
    d = log_probs - ref_log_probs
    if kind == "kl":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    if kind == "low_var_kl":
        neg = (-d).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        return (torch.exp(neg) - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"kl_loss_type must be one of {', '.join(KL_PENALTIES)}; got {kind!r}")
