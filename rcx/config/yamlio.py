"""YAML 1.2 (core schema) reading and commented YAML writing.

PyYAML implements YAML 1.1, where ``0.5_2`` is the float 0.52, ``yes``/``on`` are booleans and
``1e-3`` is a string. rcx reads YAML 1.2's core schema instead: only ``true``/``false`` are
booleans, numbers have no underscores, and ``1e-3`` is a float. That is what makes a threshold
such as ``rollout_rs_threshold: 0.5_2`` reach the grammar as the string ``0.5_2``.

Hostile or broken input is refused with a one-line :class:`YamlLimitError` before it can cost
time or memory: a document over :data:`MAX_CHARS` characters, nesting deeper than
:data:`MAX_DEPTH`, more than :data:`MAX_NODES` values once every alias is expanded (aliases and
``<<`` merge keys stay usable; an alias bomb is refused), a recursive alias, and a key given
twice in one mapping (naming both lines). Files must be UTF-8 (checked by the config reader).
"""

from __future__ import annotations

import math
import re
from typing import Any

import yaml

#: Longest document read (characters): configs and sweep files are a few KB, and PyYAML's pure
#: Python parser needs ~2 s for 100 KB of dense YAML.
MAX_CHARS = 100_000
#: Deepest nesting of mappings and sequences (the config tree itself is 4 deep).
MAX_DEPTH = 64
#: Most values (mapping keys, values and sequence items) once every alias is expanded.
MAX_NODES = 50_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlLimitError(yaml.YAMLError):
    """YAML refused for its shape (size, depth, aliases, duplicate keys); a one-line message."""


def describe_yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error on one line: the problem and where (line, column)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem:
        mark = e.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        context = f"{e.context} " if e.context else ""
        return f"{context}{e.problem}{where}".replace("\n", " ")
    return " ".join(str(e).split())


class Yaml12Loader(yaml.SafeLoader):
    """A SafeLoader whose implicit scalar types follow the YAML 1.2 core schema, with limits."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: refuse before Python's recursion limit does.
        if self._depth >= MAX_DEPTH:
            line = self.peek_event().start_mark.line + 1
            raise YamlLimitError(f"nested deeper than {MAX_DEPTH} levels (line {line})")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_tree(node)
        return node


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
    try:
        if text.startswith("0o"):
            return int(text[2:], 8)
        if text.startswith("0x"):
            return int(text[2:], 16)
        return int(text, 10)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise YamlLimitError(
            f"an integer of {len(text):,} digits (line {node.start_mark.line + 1})"
        ) from None


def _construct_float(loader: yaml.SafeLoader, node: yaml.Node) -> float:
    text = loader.construct_scalar(node).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _construct_float)


def _key_text(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else f"<{node.id}>"


def _check_tree(root: yaml.Node) -> None:
    """Refuse duplicate keys, recursive aliases and more than MAX_NODES expanded values.

    Each node is visited once (an alias is the same node object as its anchor), its expanded
    size memoised, so checking an alias bomb costs as little as composing it.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node, path: str) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            line = node.start_mark.line + 1
            raise YamlLimitError(f"{path or 'the document'}: a recursive alias (line {line})")
        open_nodes.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for k, v in node.value:
                if k.tag == _MERGE_TAG:
                    total += size(v, path)
                    continue
                name = _key_text(k)
                child = f"{path}.{name}" if path else name
                if isinstance(k, yaml.ScalarNode):
                    line = k.start_mark.line + 1
                    if (k.tag, k.value) in seen:
                        lines = f"lines {seen[k.tag, k.value]} and {line}"
                        raise YamlLimitError(f"{child}: duplicate key ({lines}); give it once")
                    seen[k.tag, k.value] = line
                total += size(k, child) + size(v, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                total += size(item, f"{path}[{i}]")
        open_nodes.discard(key)
        if total > MAX_NODES:
            raise YamlLimitError(
                f"{path or 'the document'}: more than {MAX_NODES:,} values once aliases are "
                f"expanded (an alias bomb?); write the values out or use fewer aliases"
            )
        sizes[key] = total
        return total

    size(root, "")


def load_yaml(text: str) -> Any:
    """Parse YAML 1.2 core-schema text (raises ``yaml.YAMLError`` on malformed or refused input:
    :class:`YamlLimitError` for the limits above)."""
    if len(text) > MAX_CHARS:
        raise YamlLimitError(
            f"{len(text):,} characters, more than the {MAX_CHARS:,} a config may have"
        )
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
