"""Rejection-sampling criteria, the threshold grammar and the parsed correction settings.

``rollout_rs`` names one or more criteria, comma-separated; ``rollout_rs_threshold`` gives one
entry per criterion (or a single entry shared by all). A k1 entry is ``L_U`` (keep when
``L <= r <= U``) or a single number ``U`` meaning ``1/U_U``; a k2/k3 entry is one positive number,
the upper bound on the statistic. The string is taken exactly as written: ``0.5_2`` is L=0.5, U=2.

This module holds the only parser of that grammar (:func:`parse_rs`); the validated config
carries its result (:class:`CorrectionSpec`), so nothing parses again at train time. Nothing here
imports torch: the validator and the CLI use it before any model is loaded.
"""

from __future__ import annotations

import difflib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

Level = Literal["token", "sequence"]
Statistic = Literal["k1", "k2", "k3"]
Aggregation = Literal["token", "sum", "mean", "max"]

#: Every canonical criterion: name -> (level, statistic, per-sequence aggregation).
CRITERIA: dict[str, tuple[Level, Statistic, Aggregation]] = {
    "token_k1": ("token", "k1", "token"),
    "token_k2": ("token", "k2", "token"),
    "token_k3": ("token", "k3", "token"),
    "seq_sum_k1": ("sequence", "k1", "sum"),
    "seq_sum_k2": ("sequence", "k2", "sum"),
    "seq_sum_k3": ("sequence", "k3", "sum"),
    "seq_mean_k1": ("sequence", "k1", "mean"),
    "seq_mean_k2": ("sequence", "k2", "mean"),
    "seq_mean_k3": ("sequence", "k3", "mean"),
    "seq_max_k2": ("sequence", "k2", "max"),
    "seq_max_k3": ("sequence", "k3", "max"),
}

#: Names from older releases, accepted with a notice (finding RCX-W005).
LEGACY_ALIASES: dict[str, str] = {
    "token": "token_k1",
    "sequence": "seq_sum_k1",
    "geometric": "seq_mean_k1",
}

#: Values of ``rollout_rs`` / ``rollout_is`` that mean "off".
OFF_VALUES = frozenset({"", "null", "none", "None", "Null", "NULL", "~"})


class ConfigValueError(ValueError):
    """A configuration value is invalid. ``code`` is the finding code the validator reports."""

    def __init__(self, code: str, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.path = path


class LegacyAliasWarning(UserWarning):
    """A legacy criterion alias (``token``, ``sequence``, ``geometric``) was used."""


@dataclass(frozen=True)
class RSCriterion:
    """One parsed rejection criterion.

    ``lower``/``upper`` bound the ratio r (k1, sequence variants: exp of the sum or mean of
    log r) or, for k2/k3, ``upper`` bounds the statistic and ``lower`` is None.
    """

    criterion: str
    level: Level
    statistic: Statistic
    aggregation: Aggregation
    lower: float | None
    upper: float

    def keeps(self) -> str:
        """The keep rule in words, e.g. ``0.5 <= r <= 2``."""
        subject = {
            "token": "r",
            "sum": "exp(sum log r)",
            "mean": "exp(mean log r)",
        }
        if self.statistic == "k1":
            return f"{_fmt(self.lower)} <= {subject[self.aggregation]} <= {_fmt(self.upper)}"
        stat = self.statistic
        agg = {"token": stat, "sum": f"sum {stat}", "mean": f"mean {stat}", "max": f"max {stat}"}
        return f"{agg[self.aggregation]} <= {_fmt(self.upper)}"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def is_off(value: object) -> bool:
    """True when a ``rollout_rs`` / ``rollout_is`` value means disabled (None, "null", "")."""
    return value is None or (isinstance(value, str) and value.strip() in OFF_VALUES)


def _as_text(value: object) -> str:
    """Lists from YAML (``[token_k1, seq_max_k2]``) are accepted and joined with commas."""
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def resolve_rs_criteria(rollout_rs: object) -> tuple[list[str], list[tuple[str, str]]]:
    """Canonical criterion names for ``rollout_rs`` and the legacy aliases that were resolved.

    Returns ``(names, aliases)`` where ``aliases`` holds ``(alias, canonical)`` pairs.
    Raises :class:`ConfigValueError` (RCX-E002) for an unknown or empty criterion.
    """
    if is_off(rollout_rs):
        return [], []
    if isinstance(rollout_rs, bool) or not isinstance(rollout_rs, (str, list, tuple)):
        raise ConfigValueError(
            "RCX-E002",
            f"rollout_rs must be a comma-separated string of criteria or null, got "
            f"{rollout_rs!r}; accepted criteria: {', '.join(CRITERIA)}",
        )
    names: list[str] = []
    aliases: list[tuple[str, str]] = []
    for raw in _as_text(rollout_rs).split(","):
        name = raw.strip()
        if name in LEGACY_ALIASES:
            aliases.append((name, LEGACY_ALIASES[name]))
            name = LEGACY_ALIASES[name]
        if name not in CRITERIA:
            raise ConfigValueError("RCX-E002", _unknown_criterion_message(name, rollout_rs))
        if name in names:
            raise ConfigValueError(
                "RCX-E002",
                f"rollout_rs lists {name!r} more than once (after resolving aliases); list each "
                f"criterion once",
            )
        names.append(name)
    return names, aliases


def check_is_level(rollout_is: object) -> str | None:
    """The IS level ``token`` / ``sequence``, or None when off; RCX-E009 otherwise."""
    if is_off(rollout_is):
        return None
    if rollout_is not in ("token", "sequence"):
        raise ConfigValueError(
            "RCX-E009", f"rollout_is must be 'token', 'sequence' or null, got {rollout_is!r}"
        )
    return str(rollout_is)


def check_is_threshold(threshold: object) -> tuple[float | None, float]:
    """The IS bounds ``(lower, upper)`` of ``rollout_is_threshold``; ConfigValueError RCX-E005.

    A number C (> 1, finite) is the truncation cap: ``(None, C)``, ``w = min(r, C)``. A string
    ``"lo_hi"`` (0 < lo < 1 < hi, verl's IcePop band) keeps the weight r where ``lo <= r <= hi``
    and sets it to 0 outside: ``(lo, hi)``. The string is read exactly as written: ``1.5_2`` is
    never the number 1.52. A string holding one number means that number.
    """
    if isinstance(threshold, str):
        text = threshold.strip()
        if "_" in text:
            return _is_band(text)
        try:
            threshold = float(text)
        except ValueError:
            raise ConfigValueError(
                "RCX-E005",
                f"rollout_is_threshold must be a number C > 1 or a band 'lo_hi' (e.g. '0.5_5.0'), "
                f"got {threshold!r}",
            ) from None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ConfigValueError(
            "RCX-E005",
            f"rollout_is_threshold must be a number C > 1 or a band 'lo_hi', got {threshold!r}",
        )
    threshold = float(threshold)
    if not (math.isfinite(threshold) and threshold > 1.0):
        raise ConfigValueError(
            "RCX-E005",
            f"rollout_is_threshold must be > 1 (a cap at or below 1 makes every weight a "
            f"constant), got {threshold}",
        )
    return None, threshold


def _is_band(text: str) -> tuple[float, float]:
    """``"lo_hi"`` -> (lo, hi), with 0 < lo < 1 < hi, both finite (RCX-E005 otherwise)."""
    parts = text.split("_")
    try:
        if len(parts) != 2:
            raise ValueError
        lower, upper = float(parts[0]), float(parts[1])
    except ValueError:
        raise ConfigValueError(
            "RCX-E005",
            f"rollout_is_threshold band {text!r} must be 'lo_hi' with two numbers, e.g. '0.5_5.0'",
        ) from None
    if not (math.isfinite(lower) and math.isfinite(upper) and 0.0 < lower < 1.0 < upper):
        raise ConfigValueError(
            "RCX-E005",
            f"rollout_is_threshold band {text!r} needs 0 < lo < 1 < hi (a band that excludes "
            f"r = 1 zeroes every on-policy weight), got lo={parts[0]}, hi={parts[1]}",
        )
    return lower, upper


def _unknown_criterion_message(name: str, rollout_rs: object) -> str:
    if not name:
        return (
            f"rollout_rs {_as_text(rollout_rs)!r} has an empty criterion (stray comma?); "
            f"accepted: {', '.join(CRITERIA)}"
        )
    close = difflib.get_close_matches(name, [*CRITERIA, *LEGACY_ALIASES], n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown rejection criterion {name!r}{hint}; accepted: {', '.join(CRITERIA)}"


def split_threshold_entries(rollout_rs_threshold: object) -> list[str]:
    """The comma-separated entries of a threshold, verbatim (a float becomes one entry)."""
    if isinstance(rollout_rs_threshold, bool):
        raise ConfigValueError(
            "RCX-E004",
            f"rollout_rs_threshold must be a number or a string, got {rollout_rs_threshold!r}",
        )
    if isinstance(rollout_rs_threshold, (int, float)):
        return [repr(float(rollout_rs_threshold))]
    return [e.strip() for e in _as_text(rollout_rs_threshold).split(",")]


def _parse_positive(text: str, criterion: str, entry: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigValueError(
            "RCX-E004",
            f"threshold entry {entry!r} for {criterion}: {text!r} is not a number",
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigValueError(
            "RCX-E004",
            f"threshold entry {entry!r} for {criterion}: bounds must be finite and > 0, got {text}",
        )
    return value


def parse_threshold_entry(criterion: str, entry: str) -> RSCriterion:
    """Parse one threshold entry for one canonical criterion (grammar in the module docstring)."""
    level, statistic, aggregation = CRITERIA[criterion]
    if entry == "":
        raise ConfigValueError("RCX-E004", f"missing threshold entry for {criterion}")
    if statistic != "k1":
        if "_" in entry:
            raise ConfigValueError(
                "RCX-E004",
                f"threshold entry {entry!r} for {criterion}: k2/k3 criteria take one upper bound "
                f"(e.g. '2.5'), not 'L_U'",
            )
        upper = _parse_positive(entry, criterion, entry)
        return RSCriterion(criterion, level, statistic, aggregation, None, upper)
    parts = entry.split("_")
    if len(parts) == 1:
        upper = _parse_positive(parts[0], criterion, entry)
        if upper <= 1:
            raise ConfigValueError(
                "RCX-E004",
                f"threshold entry {entry!r} for {criterion}: a single number U means [1/U, U] and "
                f"needs U > 1; write 'L_U' for other bounds",
            )
        return RSCriterion(criterion, level, statistic, aggregation, 1.0 / upper, upper)
    if len(parts) != 2:
        raise ConfigValueError(
            "RCX-E004",
            f"threshold entry {entry!r} for {criterion}: expected 'L_U' (e.g. '0.5_2.0') or one "
            f"number U",
        )
    lower = _parse_positive(parts[0], criterion, entry)
    upper = _parse_positive(parts[1], criterion, entry)
    if lower >= upper:
        raise ConfigValueError(
            "RCX-E004",
            f"threshold entry {entry!r} for {criterion}: lower bound {parts[0]} must be below "
            f"upper bound {parts[1]}",
        )
    return RSCriterion(criterion, level, statistic, aggregation, lower, upper)


@dataclass
class ParsedRS:
    """What :func:`parse_rs` found: the criteria, every problem, and the aliases it resolved.

    ``criteria`` is empty when RS is off or when any problem was found. Each problem is a
    :class:`ConfigValueError` whose ``path`` is the field at fault (``rollout_rs`` or
    ``rollout_rs_threshold``).
    """

    criteria: list[RSCriterion] = field(default_factory=list)
    problems: list[ConfigValueError] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)


def parse_rs(rollout_rs: object, rollout_rs_threshold: object) -> ParsedRS:
    """Parse ``rollout_rs`` and ``rollout_rs_threshold``, collecting every problem.

    The one parser of the threshold grammar (module docstring): ``rcx validate`` reports all of
    its problems at once, :func:`parse_rs_thresholds` raises the first. Codes: RCX-E002 (unknown
    or repeated criterion), RCX-E003 (entry count is neither 1 nor the number of criteria),
    RCX-E004 (malformed or missing entry, one problem per bad entry).
    """
    out = ParsedRS()
    try:
        names, out.aliases = resolve_rs_criteria(rollout_rs)
    except ConfigValueError as e:
        out.problems.append(_at("rollout_rs", e))
        return out
    if not names:
        return out
    path = "rollout_rs_threshold"
    if is_off(rollout_rs_threshold):
        out.problems.append(
            ConfigValueError(
                "RCX-E004",
                f"rollout_rs is set ({', '.join(names)}) but rollout_rs_threshold is missing; "
                f"give one entry per criterion, e.g. '0.5_2.0' for token_k1 or '2.5' for "
                f"seq_max_k2",
                path,
            )
        )
        return out
    try:
        entries = split_threshold_entries(rollout_rs_threshold)
    except ConfigValueError as e:
        out.problems.append(_at(path, e))
        return out
    if len(entries) == 1:
        entries = entries * len(names)
    elif len(entries) != len(names):
        out.problems.append(
            ConfigValueError(
                "RCX-E003",
                f"rollout_rs_threshold has {len(entries)} entries for {len(names)} criteria "
                f"({', '.join(names)}); give one entry per criterion, in order, or a single "
                f"shared entry",
                path,
            )
        )
        return out
    criteria = []
    for name, entry in zip(names, entries, strict=True):
        try:
            criteria.append(parse_threshold_entry(name, entry))
        except ConfigValueError as e:
            out.problems.append(_at(path, e))
    if not out.problems:
        out.criteria = criteria
    return out


def _at(path: str, error: ConfigValueError) -> ConfigValueError:
    """``error`` attributed to the field ``path``."""
    return ConfigValueError(error.code, error.message, path)


def parse_rs_thresholds(
    rollout_rs: str | list[str] | None, rollout_rs_threshold: str | float | None
) -> list[RSCriterion]:
    """The criteria of :func:`parse_rs`, or its first problem raised.

    Returns ``[]`` when RS is off. Legacy aliases are resolved with a
    :class:`LegacyAliasWarning`. Raises :class:`ConfigValueError` (a ``ValueError``).
    """
    parsed = parse_rs(rollout_rs, rollout_rs_threshold)
    _warn_aliases(parsed.aliases)
    if parsed.problems:
        raise parsed.problems[0]
    return parsed.criteria


def _warn_aliases(aliases: list[tuple[str, str]]) -> None:
    for alias, canonical in aliases:
        warnings.warn(
            f"rollout_rs alias {alias!r} is a legacy name; use {canonical!r}",
            LegacyAliasWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class CorrectionSpec:
    """The parsed rollout-correction settings: what the correction computes, nothing to re-parse.

    ``is_level`` is ``token``, ``sequence`` or None (IS off); ``is_threshold`` is the cap C > 1,
    or the upper end of an IcePop band when ``is_lower`` is set (weights outside
    ``[is_lower, is_threshold]`` are zeroed, not truncated); ``criteria`` are the RS criteria,
    empty when RS is off; ``opsm_threshold`` is delta of off-policy sequence masking (None: off).
    """

    is_level: Level | None = None
    is_threshold: float = 2.0
    is_batch_normalize: bool = False
    criteria: tuple[RSCriterion, ...] = ()
    is_lower: float | None = None
    opsm_threshold: float | None = None

    @property
    def is_band(self) -> bool:
        """True for an IcePop band (zero outside [lo, hi]); False for truncation at C."""
        return self.is_lower is not None

    def is_rule(self) -> str:
        """The IS rule in words, e.g. ``w = min(r, 2)`` or ``w = r if 0.5 <= r <= 5 else 0``."""
        if self.is_lower is None:
            return f"w = min(r, {_fmt(self.is_threshold)})"
        return f"w = r if {_fmt(self.is_lower)} <= r <= {_fmt(self.is_threshold)} else 0"


@dataclass
class ParsedCorrection:
    """What :func:`parse_correction` found; ``spec`` is None when there is any problem."""

    spec: CorrectionSpec | None
    problems: list[ConfigValueError]
    aliases: list[tuple[str, str]]


def parse_correction(
    rollout_is: object = None,
    rollout_is_threshold: object = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: object = None,
    rollout_rs_threshold: object = None,
    off_policy_mask_threshold: float | None = None,
) -> ParsedCorrection:
    """Parse the correction settings (verl's names; ``off_policy_mask_threshold`` is TRL's) into
    a :class:`CorrectionSpec`, collecting every problem (IS level RCX-E009, IS cap or band
    RCX-E005, whether or not IS is on, OPSM delta RCX-E009, and those of :func:`parse_rs`)."""
    problems: list[ConfigValueError] = []
    level = threshold = None
    lower: float | None = None
    try:
        level = check_is_level(rollout_is)
    except ConfigValueError as e:
        problems.append(_at("rollout_is", e))
    try:
        lower, threshold = check_is_threshold(rollout_is_threshold)
    except ConfigValueError as e:
        problems.append(_at("rollout_is_threshold", e))
    try:
        check_opsm_threshold(off_policy_mask_threshold)
    except ConfigValueError as e:
        problems.append(_at("off_policy_mask_threshold", e))
    rs = parse_rs(rollout_rs, rollout_rs_threshold)
    problems += rs.problems
    spec = None
    if not problems:
        spec = CorrectionSpec(
            is_level=level,  # type: ignore[arg-type]
            is_threshold=2.0 if threshold is None else threshold,
            is_batch_normalize=bool(rollout_is_batch_normalize),
            criteria=tuple(rs.criteria),
            is_lower=lower,
            opsm_threshold=None
            if off_policy_mask_threshold is None
            else float(off_policy_mask_threshold),
        )
    return ParsedCorrection(spec, problems, rs.aliases)


def check_opsm_threshold(delta: object) -> float | None:
    """delta of off-policy sequence masking: None (off) or a finite number >= 0 (RCX-E009)."""
    if delta is None:
        return None
    if (
        isinstance(delta, bool)
        or not isinstance(delta, (int, float))
        or not (math.isfinite(delta) and delta >= 0)
    ):
        raise ConfigValueError(
            "RCX-E009",
            f"off_policy_mask_threshold must be null (off) or a finite number >= 0 (mean "
            f"per-token KL in nats, e.g. 0.5), got {delta!r}",
        )
    return float(delta)


def correction_spec(**settings: Any) -> CorrectionSpec:
    """The :class:`CorrectionSpec` of :func:`parse_correction` (same keyword arguments), or its
    first problem raised (legacy aliases warn with :class:`LegacyAliasWarning`)."""
    parsed = parse_correction(**settings)
    _warn_aliases(parsed.aliases)
    if parsed.problems:
        raise parsed.problems[0]
    assert parsed.spec is not None
    return parsed.spec


def _k3_root(upper: float, above_one: bool) -> float:
    """Solve r - 1 - log r = upper for r > 1 (above_one) or r < 1, by bisection."""
    lo, hi = (1.0, 1.0 + upper + 50.0) if above_one else (1e-300, 1.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        k3 = mid - 1.0 - math.log(mid)
        if (k3 > upper) == above_one:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def token_ratio_interval(criterion: RSCriterion) -> tuple[float, float] | None:
    """The interval of per-token ratios r that a kept token is guaranteed to lie in, if any.

    ``token_*`` and ``seq_max_*`` bound every token directly; ``seq_sum_k2/k3`` imply the same
    per-token bound (each k >= 0, so no single term can exceed the sum). ``seq_sum_k1``,
    ``seq_mean_*`` bound an aggregate only: no per-token interval (None).
    """
    if criterion.statistic == "k1":
        if criterion.aggregation != "token":
            return None
        assert criterion.lower is not None
        return criterion.lower, criterion.upper
    if criterion.aggregation == "mean":
        return None
    if criterion.statistic == "k2":
        bound = math.sqrt(2.0 * criterion.upper)  # 0.5*log_r**2 <= U  <=>  |log r| <= sqrt(2U)
        return math.exp(-min(bound, 700.0)), math.exp(min(bound, 700.0))
    return _k3_root(criterion.upper, above_one=False), _k3_root(criterion.upper, above_one=True)
