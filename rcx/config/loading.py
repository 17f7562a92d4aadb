"""Building a config from its sources: defaults < preset < config file < KEY=VALUE overrides.

:func:`validate_sources` never raises for a bad config: it returns every finding, so that
``rcx validate`` can list them all. :func:`load_config` raises :class:`ConfigError` instead.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from rcx.algos.criteria import is_off
from rcx.config.findings import Finding, check_config, error
from rcx.config.models import RcxConfig, short_repr
from rcx.config.yamlio import MAX_CHARS, YamlLimitError, describe_yaml_error, load_yaml

#: Fields whose override value is taken exactly as typed (the threshold grammar is its own).
VERBATIM_FIELDS = ("rollout_rs", "rollout_rs_threshold")

#: Keys of older releases that no longer exist, and what replaced them.
REMOVED_KEYS: dict[str, str] = {
    "rollout_rs_threshold_lower": "the lower bound is part of rollout_rs_threshold now: write 'L_U', e.g. '0.5_2.0'",
    "rollout_token_veto_threshold": "use a rejection criterion instead, e.g. rollout_rs=seq_max_k2 (rejects a sequence when any token's ratio is extreme)",
    "rollout_is_veto_threshold": "use a rejection criterion instead, e.g. rollout_rs=seq_max_k2 (rejects a sequence when any token's ratio is extreme)",
    "rollout_is_self_norm": "use rollout_is_batch_normalize",
    "rollout_is_threshold_lower": "IS truncation is upper-only (rollout_is_threshold); for a lower bound reject with rollout_rs=token_k1 and 'L_U'",
    "rollout_is_level": "use rollout_is (token | sequence | null)",
    "rollout_is_mode": "use rollout_is for weights and rollout_rs for rejection",
    "rollout_rs_lower": "the lower bound is part of rollout_rs_threshold now: write 'L_U'",
}


class ConfigError(ValueError):
    """A config is invalid. ``findings`` holds every problem found."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = findings
        errors = [f for f in findings if f.level == "error"]
        lines = [f"{f.code} {f.path}: {f.message}" for f in errors]
        super().__init__("invalid config:\n  " + "\n  ".join(lines))


@dataclass
class ValidationReport:
    """The outcome of validating a set of sources."""

    config: RcxConfig | None
    findings: list[Finding] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def valid(self) -> bool:
        return self.config is not None and not self.errors


# ---------------------------------------------------------------------------------- presets ---


def presets_dir() -> Path:
    """The folder holding the preset YAML files (``RCX_PRESETS_DIR`` overrides)."""
    env = os.environ.get("RCX_PRESETS_DIR")
    if env:
        return Path(env)
    packaged = Path(__file__).resolve().parent.parent / "presets"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "presets"


def list_presets() -> list[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def preset_description(name: str) -> str:
    """The first comment line of a preset file (its one-line purpose)."""
    for line in (presets_dir() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def read_preset(name: str) -> dict[str, Any]:
    path = presets_dir() / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, list_presets(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            [
                error(
                    "RCX-E011",
                    "--preset",
                    f"no preset {name!r}{hint}; available: {', '.join(list_presets())}",
                )
            ]
        )
    return read_config_file(path, source=f"preset {name}")


def read_config_file(path: str | Path, source: str | None = None) -> dict[str, Any]:
    """Read one YAML 1.2 config file into a nested dict."""
    where = source or str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CHARS * 4 + 1)  # a UTF-8 character is at most 4 bytes
    except OSError as e:
        raise ConfigError(
            [error("RCX-E011", str(path), f"cannot read config file: {e.strerror}")]
        ) from None
    if len(raw) > MAX_CHARS * 4:
        raise ConfigError(
            [error("RCX-E011", where, f"larger than a config may be ({MAX_CHARS:,} characters)")]
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [
                error(
                    "RCX-E011",
                    where,
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                    f"config files must be UTF-8 YAML",
                )
            ]
        ) from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            [error("RCX-E011", where, f"not accepted YAML: {describe_yaml_error(e)}")]
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [error("RCX-E011", where, f"must be a mapping of keys, got {type(data).__name__}")]
        )
    return data


# -------------------------------------------------------------------------------- overrides ---


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=VALUE`` -> (``"a.b.c"``, value). VALUE is YAML 1.2, except threshold strings."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("+")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(
            [
                error(
                    "RCX-E011",
                    text,
                    "an override must look like KEY=VALUE with a dotted key, e.g. trainer.seed=3",
                )
            ]
        )
    if is_verbatim_key(key):
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return key, None if is_off(value) else value
    try:
        return key, load_yaml(value) if value.strip() else None
    except YamlLimitError as e:
        raise ConfigError([error("RCX-E011", key, f"value refused: {e}")]) from None
    except yaml.YAMLError:
        return key, value


def is_verbatim_key(key: str) -> bool:
    """True for a key whose value is taken as typed, not as YAML (the RS settings)."""
    return key.rsplit(".", 1)[-1] in VERBATIM_FIELDS


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key = "a.b.c"``, creating mappings as needed."""
    *parents, leaf = key.split(".")
    node = tree
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def get_dotted(tree: Mapping[str, Any], key: str) -> Any:
    """``tree[a][b][c]`` for ``key = "a.b.c"``, or None when any part is missing."""
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping stays a leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_tree(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A new dict: ``over`` merged into ``base``, mappings merged recursively."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# ------------------------------------------------------------------------- key checking ---


def all_key_paths(model: type[BaseModel] = RcxConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the tree, leaves and sections."""
    out: list[str] = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        sub = _section_type(info.annotation)
        if sub is not None:
            out += all_key_paths(sub, path + ".")
    return out


def field_descriptions(model: type[BaseModel] = RcxConfig, prefix: str = "") -> dict[str, str]:
    """Dotted key -> its one-line description."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        out[path] = info.description or ""
        sub = _section_type(info.annotation)
        if sub is not None:
            out.update(field_descriptions(sub, path + "."))
    return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _suggest(path: str, siblings: list[str]) -> str:
    """A "did you mean" hint, best first: the same key one level deeper (``algorithm.rollout_is``
    -> ``algorithm.rollout_correction.rollout_is``), a close sibling, the same key elsewhere, a
    close key elsewhere; else the valid keys at this level."""
    parent, _, leaf = path.rpartition(".")
    keys = all_key_paths()
    deeper = [p for p in keys if p.startswith(parent + ".") and p.rsplit(".", 1)[-1] == leaf]
    if deeper:
        return f"did you mean {deeper[0]!r}?"
    close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"did you mean {(parent + '.' if parent else '') + close[0]!r}?"
    same_leaf = [p for p in keys if p.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return f"did you mean {same_leaf[0]!r}?"
    by_leaf = {p.rsplit(".", 1)[-1]: p for p in keys}
    near = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    if near:
        return f"did you mean {by_leaf[near[0]]!r}?"
    return f"valid keys here: {', '.join(siblings)}"


def strip_unknown_keys(
    raw: dict[str, Any], model: type[BaseModel] = RcxConfig, prefix: str = ""
) -> tuple[dict[str, Any], list[Finding]]:
    """Remove unknown and removed-legacy keys from ``raw``, reporting each (E001 / E010)."""
    clean: dict[str, Any] = {}
    findings: list[Finding] = []
    fields = model.model_fields
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key in REMOVED_KEYS:
            findings.append(error("RCX-E010", path, f"{key!r} was removed: {REMOVED_KEYS[key]}"))
            continue
        if key not in fields:
            findings.append(
                error("RCX-E001", path, f"unknown key {path!r}; {_suggest(path, list(fields))}")
            )
            continue
        sub = _section_type(fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            clean[key], sub_findings = strip_unknown_keys(value, sub, path + ".")
            findings += sub_findings
        else:
            clean[key] = value
    return clean, findings


def _loc_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def _drop_path(tree: dict[str, Any], loc: tuple[Any, ...]) -> None:
    keys = [p for p in loc if isinstance(p, str)]
    node: Any = tree
    for part in keys[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    if isinstance(node, dict) and keys:
        node.pop(keys[-1], None)


def build_config(raw: dict[str, Any]) -> tuple[RcxConfig | None, list[Finding]]:
    """Validate a merged raw tree: pydantic field errors become RCX-E009 findings.

    When some fields are invalid, the config is rebuilt without them (defaults in their place)
    so that the cross-field checks still run and every problem is reported at once; the
    returned config is then None.
    """
    try:
        return RcxConfig.model_validate(raw), []
    except ValidationError as exc:
        findings = []
        trimmed = copy.deepcopy(raw)
        for err in exc.errors(include_url=False):
            loc = tuple(
                p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))
            )
            # A union reports one error per member; keep the first per location.
            path = _loc_path(loc)
            if any(f.path == path for f in findings):
                continue
            if err["type"] == "value_error":  # our validators' messages quote the value
                message = str(err["ctx"]["error"])
            else:
                message = f"{err['msg']}; got {short_repr(err.get('input'))}"
            findings.append(error("RCX-E009", path, message))
            _drop_path(trimmed, loc)
        try:
            partial = RcxConfig.model_validate(trimmed)
        except ValidationError:
            return None, findings
        cross = [f for f in check_config(partial) if f.path not in {g.path for g in findings}]
        return None, findings + cross


def merge_sources(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """The raw tree: preset, then the config file, then each override, in that order."""
    raw: dict[str, Any] = {}
    if preset:
        raw = deep_merge(raw, read_preset(preset))
    if config_file:
        raw = deep_merge(raw, read_config_file(config_file))
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(raw, key, value)
    return raw


def validate_sources(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ValidationReport:
    """Merge the sources and report every finding; never raises for a bad config."""
    try:
        raw = merge_sources(preset, config_file, overrides)
    except ConfigError as e:
        return ValidationReport(None, e.findings)
    return validate_raw(raw)


def validate_raw(raw: dict[str, Any]) -> ValidationReport:
    """Findings for a merged raw tree (unknown keys, field values, cross-field rules)."""
    clean, findings = strip_unknown_keys(raw)
    cfg, value_findings = build_config(clean)
    findings += value_findings
    if cfg is not None:
        findings += check_config(cfg)
    return ValidationReport(cfg, findings, raw)


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> RcxConfig:
    """The validated config, or :class:`ConfigError` listing every error. Warnings are dropped;
    use :func:`validate_sources` to see them."""
    report = validate_sources(preset, config_file, overrides)
    if not report.valid:
        raise ConfigError(report.findings)
    assert report.config is not None
    return report.config
