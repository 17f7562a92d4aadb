"""Configuration: the typed tree, its loading and precedence, and the findings of ``rcx validate``.

The threshold grammar lives in :mod:`rcx.algos.criteria` (torch-free); its public names are
re-exported here (``rcx.config.parse_rs_thresholds`` and friends). A validated
``RolloutCorrectionConfig`` carries its parse (``.spec``), so nothing parses it again.
Nothing in this package imports torch, so ``rcx validate`` starts fast.
"""

from rcx.algos.criteria import (
    CRITERIA,
    LEGACY_ALIASES,
    ConfigValueError,
    CorrectionSpec,
    LegacyAliasWarning,
    RSCriterion,
    check_is_threshold,
    parse_rs_thresholds,
    token_ratio_interval,
)
from rcx.config.findings import CODES, Finding, check_config
from rcx.config.loading import (
    ConfigError,
    ValidationReport,
    list_presets,
    load_config,
    merge_sources,
    validate_raw,
    validate_sources,
)
from rcx.config.models import RcxConfig, RolloutCorrectionConfig

__all__ = [
    "CODES",
    "CRITERIA",
    "LEGACY_ALIASES",
    "ConfigError",
    "ConfigValueError",
    "CorrectionSpec",
    "Finding",
    "LegacyAliasWarning",
    "RSCriterion",
    "RcxConfig",
    "RolloutCorrectionConfig",
    "ValidationReport",
    "check_config",
    "check_is_threshold",
    "list_presets",
    "load_config",
    "merge_sources",
    "parse_rs_thresholds",
    "token_ratio_interval",
    "validate_raw",
    "validate_sources",
]
