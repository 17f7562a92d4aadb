"""YAML 1.2 core schema: what PyYAML's 1.1 reading gets wrong for rcx configs."""

import math

import pytest

from rcx.config.yamlio import dump_commented_yaml, load_yaml


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5_2", "0.5_2"),  # YAML 1.1: 0.52
        ("0.6_1.6,2.5", "0.6_1.6,2.5"),
        ("1e-3", 0.001),  # YAML 1.1: a string
        ("3.0e-4", 0.0003),
        ("yes", "yes"),  # YAML 1.1: True
        ("on", "on"),
        ("True", True),
        ("false", False),
        ("010", 10),  # YAML 1.1: octal 8
        ("0o17", 15),
        ("0x1f", 31),
        ("1_000", "1_000"),
        (".inf", math.inf),
        ("null", None),
        ("~", None),
        ('["console","mlflow"]', ["console", "mlflow"]),
    ],
)
def test_core_schema_scalars(text, expected):
    assert load_yaml(f"k: {text}")["k"] == expected


def test_nan():
    assert math.isnan(load_yaml("k: .nan")["k"])


def test_commented_dump_round_trips_and_annotates():
    data = {"a": {"b": "0.5_2", "c": [1, 2]}, "d": None}
    text = dump_commented_yaml(data, {"a.b": "the b key", "d": "the d key"})
    assert "b: '0.5_2'  # the b key" in text
    assert "d: null  # the d key" in text
    assert load_yaml(text) == data
