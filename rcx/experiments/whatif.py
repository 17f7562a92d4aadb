"""What-if : replay correction configs over log-prob dumps, offline, with no model.

A run with ``trainer.dump_log_probs: true`` writes one file per step (format: the docstring of
:mod:`rcx.store.dumps`; the keys read here are ``step``, ``train_log_probs``, ``rollout_log_probs``,
``response_mask``). :func:`load_dumps` stacks every step's sequences into one ``(N, T)`` batch
with a step index per row; :func:`replay` runs :func:`rcx.algos.correction.compute_rollout_correction`
once per config over the whole stack and splits its weights and mask back into steps.

Statistics per config, per step and overall (every fraction over valid tokens: in the response
mask with a finite log-ratio, exactly as the correction counts them):

==========================  ======================================================================
``masked_fraction``         share of valid tokens that RS rejects (all criteria together)
``seq_masked_fraction``     share of valid sequences with at least one rejected token
``ess``                     effective sample size of the truncated IS weights, ``1 / mean(ŵ²)``
                            with ``ŵ = w / mean w`` over the step's valid tokens
``weight_mean``/``_max``    mean / max IS weight actually applied (after batch normalisation)
``truncated_fraction``      share of raw ratios above the cap C (token IS: tokens; sequence IS:
                            sequences), i.e. ``rollout_is_ratio_fraction_high``
``oob_fraction``            IcePop band ``lo_hi`` instead of a cap: share of raw ratios outside
                            [lo, hi], whose weights are zeroed (``rollout_is_oob_ratio``)
``<criterion>/masked_fraction``, ``<criterion>/seq_masked_fraction``  the same, one criterion alone
``opsm_seq_masked_fraction`` off-policy sequence masking (``off_policy_mask_threshold`` set): share
                            of valid sequences OPSM masks (the trainer's
                            ``rollout_corr/opsm_seq_masked_fraction``)
``opsm_masked_fraction``    the share of valid tokens in those sequences
                            (``rollout_corr/opsm_masked_fraction``)
==========================  ======================================================================

OPSM needs each sequence's advantage sign. A dump holds no advantages, but it holds the outcome
``scores``, the ``prompt_index`` and (since rcx records it) the run's ``adv_estimator``: for the
outcome-only estimators (grpo, rloo, reinforce_plus_plus) the replay recomputes the advantages per
step exactly as the trainer does (:func:`replay_advantages`), in decoupled mode leaving fully
rejected sequences out of the group baselines when ``baseline_includes_rejected`` is false. gae's
advantages need the critic's values, which a dump does not hold: OPSM replay of a gae run is an
error (:class:`WhatifError`), as is a dump without a recorded estimator unless ``--adv-estimator``
names it. The OPSM mask is the trainer's own :func:`~rcx.algos.correction.off_policy_sequence_mask`
against the dumped training log-probs (pi_old in decoupled mode: the trainer's value exactly; in
bypass mode the trainer logs the mean over micro-batches, the replay pools the step).

Each per-step value equals the metric ``compute_rollout_correction`` reports when called on that
step alone (tests check it). *Overall* pools every token (and sequence) of every step for the
fractions and the weight mean, takes the max for ``weight_max`` and the mean over steps for
``ess``; ``ess_min`` and ``masked_fraction_max`` give the worst step.

Batch normalisation is per step (a dump step is a training batch): the stack is corrected without
it and each step's weights are divided by that step's own mean, as the correction would.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rcx.algos.advantages import compute_advantages, token_rewards_from_scores
from rcx.algos.correction import (
    LogRatios,
    compute_rollout_correction,
    off_policy_sequence_mask,
)
from rcx.algos.criteria import check_is_threshold, parse_rs_thresholds, split_threshold_entries
from rcx.config.findings import Finding
from rcx.config.loading import validate_raw
from rcx.errors import RcxError
from rcx.store.dumps import DumpStack

#: The IS/RS settings, as :func:`compute_rollout_correction` takes them.
IS_RS_KEYS = (
    "rollout_is",
    "rollout_is_threshold",
    "rollout_is_batch_normalize",
    "rollout_rs",
    "rollout_rs_threshold",
)
#: The off-policy sequence masking settings (OPSM's delta; who counts in group baselines).
OPSM_KEYS = ("off_policy_mask_threshold", "baseline_includes_rejected")
#: The correction settings a what-if can vary (leaf names of algorithm.rollout_correction).
CORRECTION_KEYS = IS_RS_KEYS + OPSM_KEYS
#: The advantage estimators a dump's scores and prompt_index determine (no critic values).
OUTCOME_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus")
RC_PREFIX = "algorithm.rollout_correction."
STAT_KEYS = (
    "masked_fraction",
    "seq_masked_fraction",
    "ess",
    "weight_mean",
    "weight_max",
    "truncated_fraction",
    "oob_fraction",
    "opsm_seq_masked_fraction",
    "opsm_masked_fraction",
)


class WhatifError(RcxError, ValueError):
    """A what-if cannot be replayed as asked; the message says what is missing and the way out."""


# --------------------------------------------------------------------------------- settings ---


@dataclass(frozen=True)
class CorrectionSettings:
    """The correction keys of one what-if config (:data:`CORRECTION_KEYS`)."""

    rollout_is: str | None = None
    rollout_is_threshold: float | str = 2.0  # a cap C, or an IcePop band "lo_hi"
    rollout_is_batch_normalize: bool = False
    rollout_rs: str | None = None
    rollout_rs_threshold: str | float | None = None
    off_policy_mask_threshold: float | None = None  # OPSM delta; None: off
    baseline_includes_rejected: bool = True

    def kwargs(self) -> dict[str, Any]:
        """The IS/RS keys, as ``compute_rollout_correction`` takes them."""
        return {k: getattr(self, k) for k in IS_RS_KEYS}

    def config(self) -> dict[str, Any]:
        """Every key of the config (``--format json``'s ``config``)."""
        return {k: getattr(self, k) for k in CORRECTION_KEYS}

    @property
    def label(self) -> str:
        """A short readable name, e.g. ``is=token C=2 rs=token_k1@0.6_1.6``."""
        parts = []
        if self.rollout_is:
            norm = "+norm" if self.rollout_is_batch_normalize else ""
            lower, upper = check_is_threshold(self.rollout_is_threshold)
            bound = f"C={upper:g}" if lower is None else f"band={lower:g}_{upper:g}"
            parts.append(f"is={self.rollout_is}{norm} {bound}")
        if self.rollout_rs:
            parts.append(f"rs={self.rollout_rs}@{self.rollout_rs_threshold}")
        if self.off_policy_mask_threshold is not None:
            parts.append(f"opsm={self.off_policy_mask_threshold:g}")
            if not self.baseline_includes_rejected:
                parts.append("baseline-excludes-rejected")
        return " ".join(parts) or "no correction"

    def overrides(self, keys: Sequence[str] = CORRECTION_KEYS) -> list[str]:
        """The KEY=VALUE overrides that select this config in ``rcx train`` (``keys`` only: a
        proposal about IS/RS alone passes :data:`IS_RS_KEYS`, leaving a run's OPSM as it is)."""
        out = []
        for key in keys:
            value = getattr(self, key)
            text = (
                "null"
                if value is None
                else str(value).lower()
                if isinstance(value, bool)
                else value
            )
            out.append(f"{RC_PREFIX}{key}={text}")
        return out


def correction_key(key: str) -> str:
    """``rollout_rs`` or ``algorithm.rollout_correction.rollout_rs`` -> ``rollout_rs``.

    Raises :class:`ValueError` for any other key (a what-if replays correction settings only).
    """
    leaf = key.removeprefix(RC_PREFIX)
    if leaf not in CORRECTION_KEYS:
        raise ValueError(
            f"{key!r} cannot be replayed offline; a what-if varies only "
            f"{', '.join(CORRECTION_KEYS)} (optionally prefixed {RC_PREFIX!r})"
        )
    return leaf


def settings_from_config(rc: Any) -> CorrectionSettings:
    """Settings from a rollout_correction config object or dict."""

    def get(k: str) -> Any:
        default = getattr(CorrectionSettings, k)
        return rc.get(k, default) if isinstance(rc, Mapping) else getattr(rc, k, default)

    rs = get("rollout_rs")
    threshold = get("rollout_is_threshold")
    delta = get("off_policy_mask_threshold")
    return CorrectionSettings(
        rollout_is=get("rollout_is"),
        rollout_is_threshold=threshold if isinstance(threshold, str) else float(threshold),
        rollout_is_batch_normalize=bool(get("rollout_is_batch_normalize")),
        rollout_rs=",".join(rs) if isinstance(rs, list) else rs,
        rollout_rs_threshold=get("rollout_rs_threshold"),
        off_policy_mask_threshold=None if delta is None else float(delta),
        baseline_includes_rejected=bool(get("baseline_includes_rejected")),
    )


def build_settings(
    base: Mapping[str, Any], grid: Sequence[tuple[str, Sequence[Any]]]
) -> tuple[list[CorrectionSettings], list[tuple[dict[str, Any], list[Finding]]]]:
    """The cartesian product of ``grid`` (leaf key, values) over ``base`` (leaf key -> value).

    Every config is checked with the validator (``rcx validate``'s finding codes); returns
    ``(valid settings, [(params, error findings) for each invalid config])``.
    """
    import itertools

    keys = [correction_key(k) for k, _ in grid]
    settings: list[CorrectionSettings] = []
    invalid: list[tuple[dict[str, Any], list[Finding]]] = []
    for combo in itertools.product(*(values for _, values in grid)):
        params = dict(zip(keys, combo, strict=True))
        rc = {**dict(base), **params}
        report = validate_raw({"algorithm": {"rollout_correction": rc}})
        errors = [f for f in report.errors if f.path.startswith(("algorithm", "rollout"))]
        if errors or report.config is None:
            invalid.append((params, errors or report.errors))
            continue
        settings.append(settings_from_config(report.config.algorithm.rollout_correction))
    return settings, invalid


# ----------------------------------------------------------------------------------- replay ---


@dataclass
class WhatifResult:
    """Statistics of one config: ``per_step[stat][k]`` for ``stack.steps[k]``, and ``overall``."""

    settings: CorrectionSettings
    steps: list[int]
    per_step: dict[str, list[float]]
    overall: dict[str, float]


@dataclass
class _Shared:
    """Per-dump quantities every config reuses: the correction's own log-ratios, and counts."""

    ratios: LogRatios  # valid tokens, clamped log-ratios, per-criterion statistics
    counts: torch.Tensor  # (N,) float64 valid tokens per row
    tokens_per_step: torch.Tensor  # (S,) float64
    seqs_per_step: torch.Tensor  # (S,) float64

    @property
    def valid(self) -> torch.Tensor:
        return self.ratios.valid  # (N, T) bool: in the mask and finite log-ratio

    @property
    def seq_valid(self) -> torch.Tensor:
        return self.ratios.seq_valid  # (N,) bool


def _per_step(stack: DumpStack, row_values: torch.Tensor) -> torch.Tensor:
    """Sum a ``(N,)`` row vector into ``(S,)`` per-step totals (float64)."""
    out = torch.zeros(stack.num_steps, dtype=torch.float64)
    return out.index_add_(0, stack.row_step, row_values.to(torch.float64))


def _per_step_max(stack: DumpStack, row_values: torch.Tensor) -> torch.Tensor:
    out = torch.full((stack.num_steps,), -math.inf, dtype=torch.float64)
    return out.scatter_reduce_(
        0, stack.row_step, row_values.to(torch.float64), "amax", include_self=True
    )


def shared_quantities(stack: DumpStack) -> _Shared:
    """The valid mask, clamped log-ratios and counts of the whole stack, from the correction."""
    ratios = LogRatios(stack.train_log_probs, stack.rollout_log_probs, stack.response_mask)
    counts = ratios.counts.to(torch.float64)  # (N,)
    return _Shared(
        ratios=ratios,
        counts=counts,
        tokens_per_step=_per_step(stack, counts),
        seqs_per_step=_per_step(stack, ratios.seq_valid),
    )


def _rejection_stats(
    stack: DumpStack, shared: _Shared, kept_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rejected tokens per step, rejected sequences per step) for a returned mask."""
    kept = (kept_mask.bool() & shared.valid).sum(-1).to(torch.float64)  # (N,)
    rejected = shared.counts - kept
    seq_rejected = (kept < shared.counts) & shared.seq_valid
    return _per_step(stack, rejected), _per_step(stack, seq_rejected)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan))


# ------------------------------------------------------------------------------------- OPSM ---


@dataclass(frozen=True)
class AdvantageSource:
    """How OPSM replay recomputes the advantages: the run's estimator and its settings."""

    estimator: str  # one of OUTCOME_ESTIMATORS
    norm_by_std: bool = True
    gamma: float = 1.0


def advantage_source(stack: DumpStack, estimator: str | None = None) -> AdvantageSource:
    """The advantage settings OPSM replay uses: the dumps' record, or ``estimator`` where the dumps
    record none (older dumps). Raises :class:`WhatifError` when the dumps lack scores or
    prompt_index, when no estimator is known, when ``estimator`` contradicts the record, or when
    the estimator is not outcome-only (gae needs the critic's values)."""
    if stack.scores is None or stack.prompt_index is None:
        raise WhatifError(
            "off_policy_mask_threshold: OPSM replay needs each sequence's advantage, recomputed "
            "from the dumps' scores and prompt_index, and these dumps lack them (or their length "
            "does not match the batch); replay them without OPSM, or dump a new run with "
            "trainer.dump_log_probs=true"
        )
    recorded = stack.advantage.get("adv_estimator")
    if recorded is not None and estimator is not None and estimator != recorded:
        raise WhatifError(
            f"--adv-estimator {estimator}: the dumps record adv_estimator={recorded}; "
            f"--adv-estimator is only for dumps that record none (leave it out)"
        )
    chosen = recorded or estimator
    if chosen is None:
        raise WhatifError(
            "off_policy_mask_threshold: OPSM replay needs the run's advantages, and these dumps "
            "do not record its adv_estimator (written before rcx recorded it); pass "
            f"--adv-estimator with the run's algorithm.adv_estimator "
            f"({' | '.join(OUTCOME_ESTIMATORS)}), or replay without OPSM"
        )
    if chosen not in OUTCOME_ESTIMATORS:
        why = (
            "whose advantages need the critic's values, which a dump does not hold"
            if chosen == "gae"
            else "which rcx does not know"
        )
        raise WhatifError(
            f"off_policy_mask_threshold: OPSM replay recomputes the advantages from the dumped "
            f"scores, which works for adv_estimator {', '.join(OUTCOME_ESTIMATORS)}; this run's "
            f"adv_estimator is {chosen!r}, {why}; replay without OPSM"
        )
    return AdvantageSource(
        estimator=chosen,
        norm_by_std=bool(stack.advantage.get("norm_adv_by_std_in_grpo", True)),
        gamma=float(stack.advantage.get("gamma", 1.0)),
    )


def replay_advantages(
    stack: DumpStack, source: AdvantageSource, in_baseline: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``(N, T)`` advantages the trainer computed, step by step, from the dumped scores.

    Each step is one training batch: grpo/rloo groups are that step's prompt_index, and
    reinforce_plus_plus whitens over that step's tokens. ``in_baseline`` ``(N,)`` bool names the
    sequences that count in group baselines (None: all), as in the trainer's stage 8.
    """
    assert stack.scores is not None and stack.prompt_index is not None
    parts = []
    for k in range(stack.num_steps):
        sl = stack.step_slice(k)
        scores, mask = stack.scores[sl], stack.response_mask[sl]
        advantages, _ = compute_advantages(
            source.estimator,
            scores,
            token_rewards_from_scores(scores, mask),
            mask,
            stack.prompt_index[sl],
            gamma=source.gamma,
            norm_by_std=source.norm_by_std,
            in_baseline=None if in_baseline is None else in_baseline[sl],
        )
        parts.append(advantages)
    return torch.cat(parts)


def is_bypass(stack: DumpStack) -> bool:
    """Whether the dumped run corrected in bypass mode (the dump's mode, else its config)."""
    if stack.mode is not None:
        return stack.mode == "bypass"
    return bool(stack.rollout_correction.get("bypass_mode", False))


class Replayer:
    """Replays configs over one :class:`DumpStack`, caching what configs share.

    Single-criterion rejection masks are cached by (criterion, threshold entry), so a grid that
    varies one criterion's bound pays for the others once. ``adv_estimator`` names the run's
    estimator for OPSM replay of dumps that record none (:func:`advantage_source`).
    """

    def __init__(self, stack: DumpStack, adv_estimator: str | None = None) -> None:
        self.stack = stack
        self.shared = shared_quantities(stack)
        self._correct = compute_rollout_correction
        self._criterion_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._adv_estimator = adv_estimator
        self._advantages: dict[bytes | None, torch.Tensor] = {}

    def advantages(self, in_baseline: torch.Tensor | None) -> torch.Tensor:
        """:func:`replay_advantages` for these baseline members, cached by them."""
        key = None if in_baseline is None else in_baseline.numpy().tobytes()
        if key not in self._advantages:
            source = advantage_source(self.stack, self._adv_estimator)
            self._advantages[key] = replay_advantages(self.stack, source, in_baseline)
        return self._advantages[key]

    def opsm_totals(
        self, settings: CorrectionSettings, rs_mask: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(numerator, denominator) per step of the two OPSM fractions for one config.

        ``rs_mask`` is the config's correction mask: in decoupled mode, with
        ``baseline_includes_rejected: false``, the sequences it empties leave the baselines.
        """
        stack, sh = self.stack, self.shared
        in_baseline = None
        if not settings.baseline_includes_rejected and not is_bypass(stack):
            in_baseline = rs_mask.sum(-1) > 0  # (N,)
        keep, _ = off_policy_sequence_mask(
            stack.train_log_probs,
            stack.rollout_log_probs,
            stack.response_mask,
            self.advantages(in_baseline),
            float(settings.off_policy_mask_threshold),  # type: ignore[arg-type]
        )
        masked = ~keep & sh.seq_valid  # (N,)
        return {
            "opsm_seq_masked_fraction": (_per_step(stack, masked), sh.seqs_per_step),
            "opsm_masked_fraction": (_per_step(stack, sh.counts * masked), sh.tokens_per_step),
        }

    def _run(self, **kwargs: Any) -> Any:
        s = self.stack
        return self._correct(s.train_log_probs, s.rollout_log_probs, s.response_mask, **kwargs)

    def criterion_stats(self, criterion: str, entry: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(rejected tokens, rejected sequences) per step for one criterion alone."""
        key = (criterion, entry)
        if key not in self._criterion_cache:
            result = self._run(rollout_rs=criterion, rollout_rs_threshold=entry)
            self._criterion_cache[key] = _rejection_stats(self.stack, self.shared, result.mask)
        return self._criterion_cache[key]

    def replay(self, settings: CorrectionSettings) -> WhatifResult:
        """Every statistic of the module docstring for one config."""
        stack, sh = self.stack, self.shared
        kwargs = settings.kwargs()
        kwargs["rollout_is_batch_normalize"] = False  # per step, below
        result = self._run(**kwargs)
        per_step: dict[str, torch.Tensor] = {}
        totals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        criteria = parse_rs_thresholds(settings.rollout_rs, settings.rollout_rs_threshold)
        if criteria:
            rej, seq_rej = _rejection_stats(stack, sh, result.mask)
            totals["masked_fraction"] = (rej, sh.tokens_per_step)
            totals["seq_masked_fraction"] = (seq_rej, sh.seqs_per_step)
            entries = split_threshold_entries(settings.rollout_rs_threshold)
            entries = entries * len(criteria) if len(entries) == 1 else entries
            for c, entry in zip(criteria, entries, strict=True):
                c_rej, c_seq = self.criterion_stats(c.criterion, entry)
                totals[f"{c.criterion}/masked_fraction"] = (c_rej, sh.tokens_per_step)
                totals[f"{c.criterion}/seq_masked_fraction"] = (c_seq, sh.seqs_per_step)

        weight_max_overall = None
        if result.weights is not None:
            w = result.weights.to(torch.float64)  # (N, T), 0 at invalid tokens
            w_sum = _per_step(stack, w.sum(-1))
            w_sq = _per_step(stack, (w * w).sum(-1))
            w_max = _per_step_max(stack, w.amax(-1))
            factor = torch.ones(stack.num_steps, dtype=torch.float64)
            if settings.rollout_is_batch_normalize:
                if settings.rollout_is == "token":
                    mean = w_sum / sh.tokens_per_step
                else:  # mean of the per-sequence weights over valid sequences
                    seq_w = torch.where(sh.seq_valid, w.sum(-1) / sh.counts.clamp_min(1), 0.0)
                    mean = _per_step(stack, seq_w) / sh.seqs_per_step
                factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
                per_step["norm_factor"] = factor
            # ESS 0 for a step whose weights an IcePop band zeroed entirely (not 0/0).
            per_step["ess"] = torch.where(
                w_sq > 0, w_sum**2 / (sh.tokens_per_step * w_sq.clamp_min(1e-300)), 0.0
            )
            totals["weight_mean"] = (w_sum / factor, sh.tokens_per_step)
            per_step["weight_max"] = w_max / factor
            weight_max_overall = float(per_step["weight_max"].max())
            lower, upper = check_is_threshold(settings.rollout_is_threshold)
            log_c = math.log(upper)
            log_lo = -math.inf if lower is None else math.log(lower)
            # Truncation: the share above C; an IcePop band: the share zeroed (out of band).
            stat = "truncated_fraction" if lower is None else "oob_fraction"
            if settings.rollout_is == "token":
                lr = sh.ratios.log_ratio
                out = ((lr > log_c) | (lr < log_lo)).sum(-1)
                totals[stat] = (_per_step(stack, out), sh.tokens_per_step)
            else:
                s_i = sh.ratios.seq_log_ratio
                out = ((s_i > log_c) | (s_i < log_lo)) & sh.seq_valid
                totals[stat] = (_per_step(stack, out), sh.seqs_per_step)

        if settings.off_policy_mask_threshold is not None:
            totals.update(self.opsm_totals(settings, result.mask))

        for name, (num, den) in totals.items():
            per_step[name] = _safe_div(num, den)
        overall = {
            name: float(num.sum() / den.sum()) if float(den.sum()) > 0 else math.nan
            for name, (num, den) in totals.items()
        }
        if "ess" in per_step:
            overall["ess"] = float(per_step["ess"].nanmean())
            overall["ess_min"] = float(per_step["ess"].min())
            overall["weight_max"] = weight_max_overall  # type: ignore[assignment]
        if "masked_fraction" in per_step:
            overall["masked_fraction_max"] = float(per_step["masked_fraction"].max())
        return WhatifResult(
            settings,
            list(stack.steps),
            {k: v.tolist() for k, v in per_step.items()},
            overall,
        )


def replay(
    stack: DumpStack, configs: Sequence[CorrectionSettings], adv_estimator: str | None = None
) -> list[WhatifResult]:
    """:class:`Replayer` over every config, in order. Raises :class:`WhatifError` before
    replaying anything when a config asks for OPSM and the dumps cannot give its advantages."""
    if any(s.off_policy_mask_threshold is not None for s in configs):
        advantage_source(stack, adv_estimator)
    replayer = Replayer(stack, adv_estimator)
    return [replayer.replay(s) for s in configs]


def replay_by_staleness(
    stack: DumpStack, configs: Sequence[CorrectionSettings], adv_estimator: str | None = None
) -> dict[int, list[WhatifResult]]:
    """:func:`replay` on the samples of each staleness level alone (``{level: results}``):
    what each config does to fresh and to stale samples. Raises :class:`WhatifError` when the
    dumps do not record staleness. (Advantages for OPSM are recomputed on the level's rows: the
    same for grpo/rloo groups, which share a version; reinforce_plus_plus whitens over them.)"""
    if stack.staleness is None:
        raise WhatifError(
            "these dumps do not record each sample's staleness (written by an older rcx); "
            "replay them without --by-staleness, or dump a new run"
        )
    return {
        level: replay(stack.subset(stack.staleness == level), configs, adv_estimator)
        for level in stack.staleness_levels()
    }


# ---------------------------------------------------------------------------------- display ---


def stat_columns(results: Sequence[WhatifResult]) -> list[str]:
    """The statistic names present in any result: the main ones first, then per criterion."""
    present = {k for r in results for k in r.overall}
    main = [k for k in STAT_KEYS if k in present]
    extra = [k for k in ("ess_min", "masked_fraction_max") if k in present]
    per_criterion = sorted(k for k in present if "/" in k)
    return main + extra + per_criterion


def format_stat(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}"


def results_json(results: Sequence[WhatifResult]) -> list[dict[str, Any]]:
    """Plain data for ``--format json``: one object per config."""
    return [
        {
            "config": r.settings.config(),
            "label": r.settings.label,
            "overrides": r.settings.overrides(),
            "overall": r.overall,
            "steps": r.steps,
            "per_step": r.per_step,
        }
        for r in results
    ]
