"""Calibration: propose an IS cap and RS bounds that meet targets on dumped mismatch.

Targets: at most ``max_masked`` of valid tokens rejected by RS (all criteria together), and an
IS effective sample size of at least ``min_ess``. "Overall" values are the what-if's (pooled
masked fraction; ESS averaged over steps); with ``worst_step`` the targets must hold at every
dumped step instead.

How a proposal is made, and why:

1. **RS, one criterion at a time.** Candidate bounds are quantiles of the criterion's own
   statistic on the dump (rejection levels from 1e-4 to 0.5), rounded to 4 significant digits:
   for k1 criteria a symmetric interval ``1/U_U`` in ratio space (U from the quantiles of
   ``|log r|``, of ``|sum log r|`` or of ``|mean log r|``), for k2/k3 the upper bound U on the
   statistic itself. Each candidate is evaluated exactly (with :mod:`rcx.algos.correction`, through the
   what-if) and the *tightest* bound whose masked fraction stays within the criterion's share of
   the budget (``max_masked / number of criteria``) is proposed: it removes the most extreme
   tokens the budget allows, but never goes tighter than ``rcx validate`` accepts without its
   "rejects almost everything" warning (RCX-W007, ``|log r| < 0.02``). Since a token is rejected when any criterion rejects it, the joint
   masked fraction is at most the sum of the shares, so the combined proposal meets the target.
2. **IS cap.** Truncating at a lower cap raises the ESS but biases the estimate more; the
   proposal is the *largest* candidate cap (at most 10) whose ESS meets ``min_ess`` (least
   truncation that does). ESS does not depend on RS (it is taken over all valid tokens).
3. The combined config is replayed once more and reported: every number printed is measured on
   the dump, not predicted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rcx.algos.criteria import CRITERIA, resolve_rs_criteria
from rcx.algos.losses import LOG_RATIO_BOUND
from rcx.config.findings import TIGHT_LOG_RATIO
from rcx.errors import RcxError
from rcx.experiments.whatif import IS_RS_KEYS, CorrectionSettings, Replayer, WhatifResult
from rcx.store.dumps import DumpStack

#: Rejection levels whose quantiles give the candidate RS bounds (share of units beyond it).
REJECTION_LEVELS = tuple(
    float(f"{x:.3g}") for x in torch.logspace(-4, math.log10(0.5), 28).tolist()
)
#: Candidate IS caps (besides quantiles of the ratios). Nothing above MAX_CAP is proposed: a cap
#: that high hardly truncates, and when even it meets the ESS target, so does any lower one.
IS_CAPS = (1.01, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0)
MAX_CAP = 10.0
IsLevel = Literal["token", "sequence"]


class CalibrationError(RcxError, ValueError):
    """Calibration cannot run (bad criteria or targets); the message says what is accepted."""


@dataclass
class Targets:
    max_masked: float = 0.05
    min_ess: float = 0.9
    worst_step: bool = False

    def check(self) -> None:
        if not 0.0 <= self.max_masked < 1.0:
            raise CalibrationError(f"--max-masked must be in [0, 1), got {self.max_masked}")
        if not 0.0 < self.min_ess <= 1.0:
            raise CalibrationError(f"--min-ess must be in (0, 1], got {self.min_ess}")

    @property
    def masked_key(self) -> str:
        return "masked_fraction_max" if self.worst_step else "masked_fraction"

    @property
    def ess_key(self) -> str:
        return "ess_min" if self.worst_step else "ess"


@dataclass
class RsPoint:
    """One candidate bound of one criterion, as measured on the dump."""

    entry: str  # the threshold entry, exactly as it would be written in the config
    bound: float  # U (k1: the interval is [1/U, U])
    masked_fraction: float
    masked_fraction_max: float  # worst step
    seq_masked_fraction: float
    too_tight: bool = False  # tighter than rcx validate accepts without RCX-W007: never proposed


@dataclass
class IsPoint:
    """One candidate IS bound: a cap C, or (``band``) the IcePop band [1/C, C]."""

    cap: float
    ess: float
    ess_min: float
    truncated_fraction: float  # share truncated (cap) or zeroed (band)
    band: bool = False

    @property
    def threshold(self) -> float | str:
        """``rollout_is_threshold`` as it would be written: ``C`` or ``"lo_hi"``."""
        return band_entry(self.cap) if self.band else self.cap


def band_entry(upper: float) -> str:
    """The symmetric IcePop band ``1/U_U`` as a threshold string, e.g. ``0.5_2``."""
    return f"{1.0 / upper:.4g}_{upper:g}"


@dataclass
class Calibration:
    targets: Targets
    criteria: list[str]
    rs_curves: dict[str, list[RsPoint]]
    rs_chosen: dict[str, RsPoint | None]
    is_level: IsLevel | None
    is_curve: list[IsPoint]
    is_chosen: IsPoint | None
    proposal: CorrectionSettings
    measured: WhatifResult | None
    notes: list[str] = field(default_factory=list)

    @property
    def met(self) -> dict[str, bool]:
        """Which targets the proposal meets on the dump."""
        out: dict[str, bool] = {}
        if self.measured is None:
            return out
        overall = self.measured.overall
        if self.criteria:
            out["max_masked"] = overall[self.targets.masked_key] <= self.targets.max_masked
        if self.is_level:
            out["min_ess"] = overall[self.targets.ess_key] >= self.targets.min_ess
        return out

    def overrides(self) -> list[str]:
        """The KEY=VALUE overrides that apply the proposal."""
        return self.proposal.overrides(IS_RS_KEYS)  # calibrate proposes IS/RS only


# --------------------------------------------------------------------------- statistics ---


def criterion_statistic(replayer: Replayer, criterion: str) -> torch.Tensor:
    """Per-unit deviation of a criterion (valid tokens or valid sequences), 1-D float64.

    k1: ``|log r|`` (token), ``|clamp(sum log r)|`` or ``|mean log r|`` (sequence); a unit is kept
    by ``1/U_U`` iff this is <= log U. k2/k3: the statistic compared with U.
    """
    ratios = replayer.shared.ratios
    level, statistic, aggregation = CRITERIA[criterion]
    if level == "token":
        values = ratios.token_statistic(statistic)[ratios.valid]
    else:
        values = ratios.sequence_statistic(statistic, aggregation)[ratios.seq_valid]
    values = values.to(torch.float64)
    return values.abs() if statistic == "k1" else values


def _round_up(x: float) -> float:
    """``x`` to 4 significant digits, never below x (the bound written keeps what x keeps)."""
    if x <= 0 or not math.isfinite(x):
        return x
    digits = 3 - math.floor(math.log10(x))
    scale = 10.0**digits
    return math.ceil(x * scale - 1e-9) / scale


def tightest_sane_value(criterion: str) -> float:
    """The floor of a criterion's statistic bound: the validator's RCX-W007 limit.

    ``rcx validate`` warns when a bound keeps only tokens with ``|log r| < TIGHT_LOG_RATIO``
    (it would reject almost everything at typical mismatch); calibration never proposes a bound
    tighter than that, even when the rejection budget would allow it. In the statistic's space:
    ``|log r|`` itself for k1, ``0.5 log_r^2`` for k2, ``r - 1 - log r`` at ``log r = +limit``
    for k3.
    """
    statistic = CRITERIA[criterion][1]
    x = TIGHT_LOG_RATIO * 1.001  # strictly outside the warning, after rounding too
    if statistic == "k1":
        return x
    if statistic == "k2":
        return 0.5 * x * x
    return math.expm1(x) - x


def candidate_entries(replayer: Replayer, criterion: str) -> list[tuple[str, float]]:
    """(threshold entry, U) candidates from quantiles of the criterion's statistic, loosest first.

    The floor :func:`tightest_sane_value` is always a candidate; candidates tighter than it are
    kept (the curve shows them) but :func:`rs_curve` marks them ``too_tight``.
    """
    values = criterion_statistic(replayer, criterion)
    if values.numel() == 0:
        return []
    levels = torch.tensor([1.0 - q for q in REJECTION_LEVELS], dtype=torch.float64)
    floor = tightest_sane_value(criterion)
    quantiles = [q for q in torch.quantile(values, levels).tolist() if q > 0] + [floor]
    k1 = CRITERIA[criterion][1] == "k1"
    out: dict[str, float] = {}
    for q in quantiles:
        if k1:
            upper = _round_up(math.exp(min(q, LOG_RATIO_BOUND)))
            # 1/U is written rounded down so the interval is never narrower than [1/U, U].
            entry = f"{_fmt_down(1.0 / upper)}_{_fmt(upper)}"
        else:
            upper = _round_up(q)
            entry = _fmt(upper)
        out.setdefault(entry, upper)
    return sorted(out.items(), key=lambda kv: -kv[1])


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _fmt_down(x: float) -> str:
    """``x`` to 4 significant digits, rounded down."""
    digits = 3 - math.floor(math.log10(x))
    scale = 10.0**digits
    return f"{math.floor(x * scale + 1e-9) / scale:.4g}"


# ------------------------------------------------------------------------------- curves ---


def rs_curve(replayer: Replayer, criterion: str) -> list[RsPoint]:
    """Masked fractions of every candidate bound of one criterion, loosest first."""
    points = []
    floor = tightest_sane_value(criterion)
    floor_bound = _round_up(math.exp(floor)) if CRITERIA[criterion][1] == "k1" else _round_up(floor)
    for entry, upper in candidate_entries(replayer, criterion):
        rejected, seq_rejected = replayer.criterion_stats(criterion, entry)
        sh = replayer.shared
        per_step = rejected / sh.tokens_per_step.clamp_min(1)
        points.append(
            RsPoint(
                entry=entry,
                bound=upper,
                masked_fraction=float(rejected.sum() / sh.tokens_per_step.sum()),
                masked_fraction_max=float(per_step.max()),
                seq_masked_fraction=float(seq_rejected.sum() / sh.seqs_per_step.sum()),
                too_tight=upper < floor_bound,
            )
        )
    return points


def is_curve(replayer: Replayer, level: IsLevel, band: bool = False) -> list[IsPoint]:
    """ESS and truncated share for each candidate cap, largest cap first; with ``band``, ESS and
    zeroed share of each symmetric IcePop band [1/C, C] instead, widest first."""
    sh = replayer.shared
    if level == "token":
        units = sh.ratios.log_ratio[sh.valid].to(torch.float64)
    else:
        units = sh.ratios.seq_log_ratio[sh.seq_valid].to(torch.float64)
    levels = torch.tensor([0.5, 0.75, 0.9, 0.95, 0.99, 0.999], dtype=torch.float64)
    from_data = [math.exp(q) for q in torch.quantile(units, levels).tolist()]
    caps = {_round_up(c) for c in (*IS_CAPS, *from_data) if 1.0 + 1e-6 < c <= MAX_CAP}
    caps = sorted(caps, reverse=True)
    points = []
    stat = "oob_fraction" if band else "truncated_fraction"
    for cap in caps:
        threshold = band_entry(cap) if band else cap
        r = replayer.replay(CorrectionSettings(rollout_is=level, rollout_is_threshold=threshold))
        points.append(IsPoint(cap, r.overall["ess"], r.overall["ess_min"], r.overall[stat], band))
    return points


# ---------------------------------------------------------------------------- proposal ---


def choose_rs(points: Sequence[RsPoint], budget: float, key: str) -> RsPoint | None:
    """The tightest bound (most rejection) whose masked fraction is within ``budget``, among the
    points that are not ``too_tight``."""
    fitting = [p for p in points if getattr(p, key) <= budget and not p.too_tight]
    return min(fitting, key=lambda p: p.bound) if fitting else None


def choose_cap(points: Sequence[IsPoint], min_ess: float, key: str) -> IsPoint | None:
    """The largest cap (least truncation) whose ESS meets ``min_ess``."""
    fitting = [p for p in points if getattr(p, key) >= min_ess]
    return max(fitting, key=lambda p: p.cap) if fitting else None


def resolve_criteria(criteria: str | Sequence[str] | None) -> list[str]:
    """Canonical criterion names (aliases resolved); each at most once."""
    if criteria is None:
        return []
    text = criteria if isinstance(criteria, str) else ",".join(criteria)
    try:
        names, _ = resolve_rs_criteria(text)
    except ValueError as e:
        raise CalibrationError(f"--criteria: {e}") from None
    if len(set(names)) != len(names):
        raise CalibrationError(f"--criteria {text!r}: list each criterion once")
    return names


def calibrate(
    stack: DumpStack,
    *,
    criteria: Sequence[str],
    targets: Targets,
    is_level: IsLevel | None = "token",
    band: bool = False,
) -> Calibration:
    """Propose settings for ``criteria`` and ``is_level`` that meet ``targets`` on ``stack``.

    With ``band`` the IS proposal is the widest symmetric IcePop band [1/C, C] whose ESS meets
    the target (least zeroing that does) instead of the largest cap.

    A criterion (or the IS cap) for which no candidate meets its target gets the candidate
    closest to it (loosest bound, lowest cap) and a note; :attr:`Calibration.met` then says so.
    """
    targets.check()
    names = resolve_criteria(list(criteria))
    replayer = Replayer(stack)
    notes: list[str] = []
    masked_key = "masked_fraction_max" if targets.worst_step else "masked_fraction"
    budget = targets.max_masked / len(names) if names else 0.0
    curves, chosen, entries = {}, {}, []
    for name in names:
        curve = rs_curve(replayer, name)
        curves[name] = curve
        pick = choose_rs(curve, budget, masked_key)
        if pick is None and curve:
            pick = curve[0]
            notes.append(
                f"{name}: even the loosest candidate ({pick.entry}) rejects "
                f"{getattr(pick, masked_key):.2%} > the budget {budget:.2%}"
            )
        if pick is None:
            notes.append(f"{name}: no mismatch measurable on this dump; no bound proposed")
        tighter = [p for p in curve if pick is not None and p.bound < pick.bound]
        if tighter and all(p.too_tight for p in tighter) and budget > 0:
            fits = [p for p in tighter if getattr(p, masked_key) <= budget]
            if fits:
                notes.append(
                    f"{name}: the budget allows tighter bounds, but {pick.entry} is the tightest "
                    f"rcx validate accepts without RCX-W007 (|log r| < {TIGHT_LOG_RATIO})"
                )
        chosen[name] = pick
        if pick is not None:
            entries.append((name, pick.entry))

    cap_curve: list[IsPoint] = []
    cap: IsPoint | None = None
    if is_level is not None:
        ess_key = "ess_min" if targets.worst_step else "ess"
        cap_curve = is_curve(replayer, is_level, band)
        cap = choose_cap(cap_curve, targets.min_ess, ess_key)
        if cap is None and cap_curve:
            cap = cap_curve[-1]
            notes.append(
                f"IS: even a cap of {cap.cap:g} leaves ESS {getattr(cap, ess_key):.3f} < "
                f"{targets.min_ess} (the mismatch is beyond what truncation fixes; consider "
                f"rejecting the worst tokens or sequences)"
            )
        elif cap is not None and cap is cap_curve[0]:
            notes.append(
                f"IS: ESS meets {targets.min_ess} even at the largest cap tried ({cap.cap:g}): "
                f"truncation is barely needed on this dump"
            )

    proposal = CorrectionSettings(
        rollout_is=is_level,
        rollout_is_threshold=cap.threshold if cap is not None else 2.0,
        rollout_rs=",".join(n for n, _ in entries) or None,
        rollout_rs_threshold=",".join(e for _, e in entries) or None,
    )
    measured = replayer.replay(proposal) if (entries or is_level) else None
    return Calibration(
        targets, names, curves, chosen, is_level, cap_curve, cap, proposal, measured, notes
    )


def calibrate_by_staleness(stack: DumpStack, **options: Any) -> dict[int, Calibration]:
    """:func:`calibrate` once per staleness level of the dumped samples (their ``staleness``:
    updates between the weights that generated a sample and the step that trained on it), on
    that level's rows alone; ``options`` as for :func:`calibrate`. Stale samples carry more
    mismatch, so one threshold for all is either too loose for the stale ones or too tight for
    the fresh ones: this shows by how much. Raises :class:`CalibrationError` when the dumps do
    not record staleness (dumps from before rcx recorded it)."""
    if stack.staleness is None:
        raise CalibrationError(
            "these dumps do not record each sample's staleness (written by an older rcx); "
            "calibrate them without --by-staleness, or dump a new run"
        )
    return {
        level: calibrate(stack.subset(stack.staleness == level), **options)
        for level in stack.staleness_levels()
    }


# --------------------------------------------------------------------------------- plot ---


def plot_calibration(cal: Calibration, path: Path) -> Path | None:
    """The trade-off curves: masked fraction against each RS bound, ESS against the IS cap."""
    panels = [n for n in cal.criteria if cal.rs_curves.get(n)]
    with_is = bool(cal.is_curve)
    count = len(panels) + with_is
    if count == 0:
        return None
    from rcx.store.plots import panel_grid, save_figure

    fig, axes = panel_grid(count, max_cols=count, panel_size=(4.8, 3.8))
    key = cal.targets.masked_key
    for ax, name in zip(axes, panels, strict=False):
        curve = cal.rs_curves[name]
        ax.plot([p.bound for p in curve], [getattr(p, key) for p in curve], marker=".")
        budget = cal.targets.max_masked / max(len(cal.criteria), 1)
        ax.axhline(budget, color="gray", ls="--", lw=1, label=f"budget {budget:.2%}")
        pick = cal.rs_chosen.get(name)
        if pick is not None:
            ax.plot([pick.bound], [getattr(pick, key)], "o", color="red", label=pick.entry)
        k1 = CRITERIA[name][1] == "k1"
        tight = [p for p in curve if p.too_tight]
        if tight:
            ax.plot(
                [p.bound for p in tight],
                [getattr(p, key) for p in tight],
                "x",
                color="gray",
                label="too tight (RCX-W007)",
            )
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("U (keeps r in [1/U, U])" if k1 else "U (upper bound)")
        ax.set_ylabel(key.replace("_", " "))
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if with_is:
        ax = axes[-1]
        ess_key = cal.targets.ess_key
        caps = [p.cap for p in cal.is_curve]
        ax.plot(caps, [getattr(p, ess_key) for p in cal.is_curve], marker=".", label=ess_key)
        ax.plot(caps, [p.truncated_fraction for p in cal.is_curve], marker=".", label="truncated")
        ax.axhline(cal.targets.min_ess, color="gray", ls="--", lw=1, label="ESS target")
        if cal.is_chosen is not None:
            ax.plot(
                [cal.is_chosen.cap],
                [getattr(cal.is_chosen, ess_key)],
                "o",
                color="red",
                label=f"C={cal.is_chosen.cap:g}",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"IS cap C ({cal.is_level})")
        ax.set_title("IS truncation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
