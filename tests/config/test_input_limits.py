"""Input limits: YAML shape (size, depth, aliases, duplicate keys), YAML 1.2 numbers, and the
checks against this machine (checkpoint folder, memory estimate)."""

from __future__ import annotations

import os
import re
import time

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rcx.config import limits, validate_sources
from rcx.config.loading import read_config_file
from rcx.config.yamlio import MAX_DEPTH, MAX_NODES, YamlLimitError, load_yaml

RC = "algorithm.rollout_correction"


# ------------------------------------------------------------------------------ YAML shape ---


def bomb(width: int, levels: int) -> str:
    lines = [f"l0: &l0 [{','.join(['x'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 12))
def test_alias_expansion_is_capped_and_cheap(width, levels):
    text = bomb(width, levels)
    expanded = sum(width**i for i in range(1, levels + 1)) + levels  # list items + keys
    start = time.perf_counter()
    if expanded > MAX_NODES * 1.1:
        with pytest.raises(YamlLimitError, match="aliases are expanded"):
            load_yaml(text)
    elif expanded < MAX_NODES * 0.5:
        assert len(load_yaml(text)) == levels
    assert time.perf_counter() - start < 1.0


@settings(max_examples=10, deadline=None)
@given(st.integers(MAX_DEPTH + 1, 3000), st.sampled_from(["flow", "block"]))
def test_deep_nesting_is_refused_fast(depth, style):
    if style == "flow":
        text = "a: " + "[" * depth + "]" * depth
    else:
        text = "".join(" " * i + f"k{i}:\n" for i in range(depth)) + " " * depth + "x: 1\n"
    start = time.perf_counter()
    with pytest.raises(YamlLimitError):
        load_yaml(text)
    assert time.perf_counter() - start < 1.0


def test_moderate_nesting_and_merge_keys_still_work():
    assert load_yaml("a: " + "[" * 50 + "]" * 50) is not None
    data = load_yaml("base: &b {x: 1, y: 2}\nuse:\n  <<: *b\n  y: 3\n")
    assert data["use"] == {"x": 1, "y": 3}


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("a: 1\nb: 2\na: 3\n", "a: duplicate key (lines 1 and 3)"),
        ("t:\n  s: 1\n  s: 2\n", "t.s: duplicate key (lines 2 and 3)"),
        ("{x: 1, x: 2}", "x: duplicate key"),
        ("a: &a [*a]\n", "recursive alias"),
    ],
)
def test_duplicate_keys_and_recursive_aliases(text, says):
    with pytest.raises(YamlLimitError, match=re.escape(says)):
        load_yaml(text)


def test_not_utf8_and_too_large_files(tmp_path):
    from rcx.config import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"a: \xc3\x28\n")
    with pytest.raises(ConfigError, match="not UTF-8") as e:
        read_config_file(bad)
    assert e.value.findings[0].code == "RCX-E011"
    big = tmp_path / "big.yaml"
    big.write_bytes(b"a: " + b"1" * 1_000_000)
    with pytest.raises(ConfigError, match="larger than a config may be|characters"):
        read_config_file(big)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbftrainer: {seed: 3}\n")
    assert read_config_file(bom) == {"trainer": {"seed": 3}}


def test_yaml_errors_are_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: [1, 2\nb: 3\n")
    report = validate_sources(config_file=path)
    (f,) = report.findings
    assert f.code == "RCX-E011" and "\n" not in f.message and "line" in f.message


# ------------------------------------------------------------------------- YAML 1.2 numbers ---

UNDERSCORED = st.builds(
    lambda a, b, exp: f"{a}_{b}{exp}",
    st.integers(0, 999),
    st.integers(0, 999),
    st.sampled_from(["", "e-4", ".5", "e3"]),
)


@settings(max_examples=40, deadline=None)
@given(UNDERSCORED, st.sampled_from(["actor_rollout_ref.actor.optim.lr", "critic.optim.lr",
                                     "trainer.seed", "data.train_batch_size",
                                     "actor_rollout_ref.rollout.temperature"]))  # fmt: skip
def test_numbers_with_underscores_stay_strings_and_are_refused(text, key):
    assert load_yaml(f"k: {text}")["k"] == text
    report = validate_sources(overrides=[f"{key}={text}"])
    errors = [f for f in report.errors if f.path == key]
    assert [f.code for f in errors] == ["RCX-E009"], report.findings
    assert "no '_'" in errors[0].message and repr(text) in errors[0].message


@settings(max_examples=20, deadline=None)
@given(st.floats(1.01, 100).map(lambda x: round(x, 2)), st.floats(1.01, 100))
def test_lo_hi_above_one_is_a_band_never_a_number(lo, hi):
    # "1.5_2" is the band [1.5, 2] (which excludes r = 1: refused), never the YAML 1.1 number 1.52.
    report = validate_sources(overrides=[f"{RC}.rollout_is_threshold={lo}_{hi}"])
    (f,) = report.errors
    assert f.code == "RCX-E005" and "0 < lo < 1 < hi" in f.message


@settings(max_examples=20, deadline=None)
@given(st.floats(0.01, 0.99).map(lambda x: round(x, 2)), st.floats(1.01, 100))
def test_lo_hi_band_is_parsed_exactly_as_written(lo, hi):
    report = validate_sources(
        overrides=[f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold={lo}_{hi!r}"]
    )
    assert report.valid, report.findings
    spec = report.config.algorithm.rollout_correction.spec
    assert (spec.is_lower, spec.is_threshold) == (lo, hi)


def test_quoted_yaml12_numbers_are_still_numbers():
    report = validate_sources(overrides=["actor_rollout_ref.actor.optim.lr='1e-3'"])
    assert report.valid, report.findings
    assert report.config.actor_rollout_ref.actor.optim.lr == 1e-3


@pytest.mark.parametrize(
    "override",
    [
        f"{RC}.rollout_is_threshold=.inf",  # the grammar's own message (E005)
        "trainer.seed=4294967295",
        "trainer.seed=0",
        "actor_rollout_ref.rollout.temperature=0.01",
        "actor_rollout_ref.rollout.temperature=100",
        "trainer.project_name=" + "p" * 200,
    ],
)
def test_limits_are_inclusive_where_documented(override):
    report = validate_sources(overrides=[override])
    assert not [f for f in report.findings if f.code == "RCX-E009"], report.findings


# ------------------------------------------------------------------------- this machine ---


def test_checkpoint_dir_problem(tmp_path):
    assert limits.checkpoint_dir_problem(str(tmp_path / "new" / "deeper")) is None
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in limits.checkpoint_dir_problem(str(tmp_path / "file" / "x"))
    assert "is not a folder" in limits.checkpoint_dir_problem(str(tmp_path / "file"))
    assert "bytes" in limits.checkpoint_dir_problem(str(tmp_path / ("n" * 300)))
    assert "NUL" in limits.checkpoint_dir_problem("a\0b")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in limits.checkpoint_dir_problem(str(locked / "x"))


@pytest.mark.slow  # imports transformers (~4 s)
def test_tiny_shape_matches_the_built_in_model():
    from rcx.models.loading import build_char_tokenizer, tiny_config

    cfg = tiny_config(build_char_tokenizer())
    assert limits.ModelShape(cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == limits.TINY


def test_model_shape_from_a_local_config(tmp_path):
    assert limits.model_shape(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(
        '{"vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2}'
    )
    assert limits.model_shape(str(tmp_path)) == limits.ModelShape(1000, 64, 2)


def test_step_memory_counts_micro_batches_and_vllm():
    full = limits.step_memory(limits.TINY, 32, 8, 16, 8, None, "hf")
    micro = limits.step_memory(limits.TINY, 32, 8, 16, 8, 4, "hf")
    vllm = limits.step_memory(limits.TINY, 32, 8, 16, 8, None, "vllm")
    assert micro.forward * 64 == full.forward and micro.kv_cache == full.kv_cache
    assert vllm.kv_cache == vllm.scores == 0 and vllm.forward == full.forward


def test_memory_findings_follow_the_machine(monkeypatch):
    monkeypatch.setattr(limits, "available_memory", lambda: 10**12)
    assert validate_sources(overrides=["data.train_batch_size=1000"]).valid
    monkeypatch.setattr(limits, "available_memory", lambda: 10**8)
    report = validate_sources(overrides=["data.train_batch_size=1000"])
    assert [f.code for f in report.errors] == ["RCX-E013"]
    monkeypatch.setattr(limits, "available_memory", lambda: None)
    assert validate_sources(overrides=["data.train_batch_size=100000"]).valid


def test_yaml_module_is_pyyaml():
    assert issubclass(YamlLimitError, yaml.YAMLError)
