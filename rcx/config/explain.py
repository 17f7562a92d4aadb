"""What a config really does, in words and as data (``rcx validate --explain``)."""

from __future__ import annotations

from typing import Any

from rcx.algos.criteria import RSCriterion, token_ratio_interval
from rcx.algos.modes import update_plan
from rcx.config.models import RcxConfig


def explain(cfg: RcxConfig) -> dict[str, Any]:
    """The mode, the loss, where IS weights go (and the IcePop band), each RS criterion with its
    ratio interval, off-policy sequence masking and the denominators after rejection."""
    rc = cfg.algorithm.rollout_correction
    plan = update_plan(rc.rollout_is, rc.bypass_mode, rc.loss_type)
    applied = plan.is_weights
    spec = rc.spec
    return {
        "mode": plan.mode,
        "policies": 2 if plan.bypass else 3,
        "loss": plan.loss,
        "is": {
            "level": rc.rollout_is,
            "threshold": rc.rollout_is_threshold if rc.rollout_is else None,
            "kind": ("band" if spec.is_band else "truncate") if rc.rollout_is else None,
            "lower": spec.is_lower if rc.rollout_is else None,
            "upper": spec.is_threshold if rc.rollout_is else None,
            "batch_normalize": bool(rc.rollout_is and rc.rollout_is_batch_normalize),
            "applied": applied,
        },
        "rs": [_criterion_dict(c) for c in spec.criteria],
        "opsm": {"threshold": spec.opsm_threshold},
        "loss_denominator": rc.loss_denominator,
        "baseline_includes_rejected": rc.baseline_includes_rejected,
    }


def _criterion_dict(c: RSCriterion) -> dict[str, Any]:
    interval = token_ratio_interval(c)
    return {
        "criterion": c.criterion,
        "level": c.level,
        "statistic": c.statistic,
        "lower": c.lower,
        "upper": c.upper,
        "ratio_lower": interval[0] if interval else None,
        "ratio_upper": interval[1] if interval else None,
    }


def explain_lines(cfg: RcxConfig) -> list[str]:
    """The explanation as sentences, one per line."""
    rc = cfg.algorithm.rollout_correction
    info = explain(cfg)
    lines = [_mode_line(cfg), _loss_line(cfg), _is_line(cfg, info["is"]["applied"])]
    criteria = rc.spec.criteria
    if not criteria:
        lines.append("RS: off (no token or sequence is rejected).")
    else:
        how = "the criterion keeps" if len(criteria) == 1 else "every criterion (AND) keeps"
        lines.append(
            f"RS: a token is trained on only if {how} it; rejection masks, never reweights."
        )
        lines += ["  " + _criterion_line(c) for c in criteria]
    lines.append(_opsm_line(cfg))
    lines.append(_denominator_line(cfg))
    lines.append(f"Advantages: {_adv_line(cfg)}.")
    return lines


def _opsm_line(cfg: RcxConfig) -> str:
    delta = cfg.algorithm.rollout_correction.spec.opsm_threshold
    if delta is None:
        return "OPSM: off (no sequence is masked for its advantage and KL)."
    when = (
        "once per batch from pi_old, after the advantages"
        if not cfg.algorithm.rollout_correction.bypass_mode
        else "per micro-batch from pi_theta"
    )
    return (
        f"OPSM: a sequence with advantage < 0 and mean per-token (lp_rollout - lp_train) > "
        f"{delta:g} is masked whole ({when})."
    )


def _denominator_line(cfg: RcxConfig) -> str:
    rc = cfg.algorithm.rollout_correction
    agg = cfg.actor_rollout_ref.actor.loss_agg_mode
    what = (
        "the tokens and sequences left after rejection (kept)"
        if rc.loss_denominator == "kept"
        else "every generated token and sequence (rejection shrinks the loss)"
    )
    base = (
        "fully rejected sequences still count in their group's baseline"
        if rc.baseline_includes_rejected
        else "fully rejected sequences are left out of their group's baseline"
    )
    return f"Denominators: {agg} divides by {what}; {base}."


def _mode_line(cfg: RcxConfig) -> str:
    if cfg.algorithm.rollout_correction.bypass_mode:
        return (
            "Mode: bypass (two policies). pi_old := pi_rollout, no extra forward pass; IS weights "
            "and the RS mask are recomputed for every micro-batch from pi_theta / pi_rollout."
        )
    return (
        "Mode: decoupled (three policies). pi_old is recomputed by one extra forward pass; IS "
        "weights and the RS mask come from pi_old / pi_rollout, once per batch."
    )


def _loss_line(cfg: RcxConfig) -> str:
    rc = cfg.algorithm.rollout_correction
    a = cfg.actor_rollout_ref.actor
    lo = a.clip_ratio_low if a.clip_ratio_low is not None else a.clip_ratio
    hi = a.clip_ratio_high if a.clip_ratio_high is not None else a.clip_ratio
    clip = f"ratio clipped to [{1 - lo:g}, {1 + hi:g}], dual clip c={a.clip_ratio_c:g}"
    plan = update_plan(rc.rollout_is, rc.bypass_mode, rc.loss_type)
    if plan.loss == "reinforce":
        return f"Loss: REINFORCE, L = -{a.loss_agg_mode}(w * A * log pi_theta), no clipping."
    band = f"[{1 - lo:g}, {1 + hi:g}]"
    if plan.loss == "cispo":
        return (
            f"Loss: CISPO, L = -{a.loss_agg_mode}(sg(clip(pi_theta / {plan.anchor}, {band})) * A * "
            f"log pi_theta): every token keeps its gradient, the clipped ratio only weighs it."
        )
    if plan.loss == "gspo":
        return (
            f"Loss: GSPO, sequence ratio s = exp(mean_t log(pi_theta / {plan.anchor})) clipped to "
            f"{band} as in PPO (no dual clip), applied to every token, aggregated by "
            f"{a.loss_agg_mode}."
        )
    extra = (
        " (loss_type reinforce is ignored in decoupled mode)" if rc.loss_type != plan.loss else ""
    )
    return f"Loss: PPO-clip on pi_theta / {plan.anchor}, {clip}, aggregated by {a.loss_agg_mode}{extra}."


def _is_line(cfg: RcxConfig, applied: str) -> str:
    rc = cfg.algorithm.rollout_correction
    if rc.rollout_is is None:
        return "IS: off (no importance weights)."
    spec = rc.spec
    c = f"{spec.is_threshold:g}"
    if spec.is_band:
        lo = f"{spec.is_lower:g}"
        formula = (
            f"IcePop band: w = r if {lo} <= r <= {c} else 0, per token"
            if rc.rollout_is == "token"
            else f"IcePop band: w = prod_t r_t if {lo} <= prod_t r_t <= {c} else 0, per "
            f"sequence, broadcast to its tokens"
        ) + " (the mask is left alone)"
    else:
        formula = (
            f"w = min(r, {c}) per token"
            if rc.rollout_is == "token"
            else f"w = min(prod_t r_t, {c}) per sequence, broadcast to its tokens"
        )
    norm = ", then divided by its batch mean" if rc.rollout_is_batch_normalize else ""
    where = {
        "loss": "multiplies the per-token loss",
        "metrics_only": "is computed for metrics only: the loss's ratio pi_theta/pi_rollout "
        "already corrects",
    }[applied]
    kind = "IS" if rc.spec.is_band else "truncated IS"
    return f"IS: {rc.rollout_is}-level {kind}, {formula}{norm}; {where}."


def _criterion_line(c: RSCriterion) -> str:
    interval = token_ratio_interval(c)
    bound = f"{c.criterion} keeps {c.keeps()}"
    if interval is None:
        scope = {"sum": "the sequence ratio", "mean": "the geometric-mean ratio"}.get(
            c.aggregation, "an average"
        )
        if c.statistic == "k1":
            return f"{bound} -> bounds {scope} only; single tokens are not bounded"
        return f"{bound} -> bounds the mean over tokens only; single tokens are not bounded"
    lo, hi = interval
    who = "token" if c.level == "token" else "token of a kept sequence"
    return f"{bound} -> every {who} has r in [{lo:.3g}, {hi:.3g}]"


def _adv_line(cfg: RcxConfig) -> str:
    alg = cfg.algorithm
    n = cfg.actor_rollout_ref.rollout.n
    return {
        "grpo": f"GRPO, group of {n}, mean baseline"
        + (", divided by std" if alg.norm_adv_by_std_in_grpo else ""),
        "rloo": f"RLOO, leave-one-out baseline over the other {n - 1} samples",
        "gae": f"GAE with a critic, gamma={alg.gamma:g}, lambda={alg.lam:g}",
        "reinforce_plus_plus": f"REINFORCE++, discounted returns (gamma={alg.gamma:g}), batch-whitened",
    }[alg.adv_estimator]
