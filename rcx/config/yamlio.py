"""YAML 1.2 (core schema) reading and commented YAML writing.

PyYAML implements YAML 1.1, where ``0.5_2`` is the float 0.52, ``yes``/``on`` are booleans and
``1e-3`` is a string. rcx reads YAML 1.2's core schema instead: only ``true``/``false`` are
booleans, numbers have no underscores, and ``1e-3`` is a float. That is what makes a threshold
such as ``rollout_rs_threshold: 0.5_2`` reach the grammar as the string ``0.5_2``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml


class Yaml12Loader(yaml.SafeLoader):
    """A SafeLoader whose implicit scalar types follow the YAML 1.2 core schema."""


_YAML11_NUMERIC_TAGS = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
}
# Drop YAML 1.1's bool/int/float resolvers (they accept 0.5_2, yes, on, ...); keep null etc.
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _YAML11_NUMERIC_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _construct_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def load_yaml(text: str) -> Any:
    """Parse YAML 1.2 core-schema text (raises ``yaml.YAMLError`` on malformed input)."""
    return yaml.load(text, Loader=Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def dump_yaml(data: Any) -> str:
    """Dump plain data as block YAML, keys in insertion order."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)


def dump_commented_yaml(
    data: dict[str, Any], descriptions: dict[str, str], prefix: str = ""
) -> str:
    """Block YAML with each key's description (by dotted path) as a trailing comment."""
    lines: list[str] = []
    _emit(data, descriptions, prefix, 0, lines)
    return "\n".join(lines) + "\n"


def _emit(
    data: dict[str, Any], desc: dict[str, str], prefix: str, depth: int, out: list[str]
) -> None:
    pad = "  " * depth
    for key, value in data.items():
        path = f"{prefix}{key}"
        comment = f"  # {desc[path]}" if path in desc else ""
        if isinstance(value, dict):
            out.append(f"{pad}{key}:{comment}")
            _emit(value, desc, path + ".", depth + 1, out)
        else:
            scalar = yaml.safe_dump(
                value, default_flow_style=True, width=10_000, allow_unicode=True
            ).strip()
            scalar = scalar.removesuffix("\n...").removesuffix("...").strip()
            out.append(f"{pad}{key}: {scalar}{comment}")
