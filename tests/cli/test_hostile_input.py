"""Hostile and broken input meets the CLI: one clear error line naming the key, never a traceback.

Issue 15's "Tracebacks from input" and "Silently wrong" cases that validation covers, each as the
command a user would type, and property tests for markup in keys, values and grid names.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.markup import render
from typer.testing import CliRunner

from rcx.cli import app
from rcx.cli.common import esc
from rcx.config import limits

runner = CliRunner()
RC = "algorithm.rollout_correction"
ERROR_LINE = re.compile(r"^(?:error\s+RCX-E\d{3} |error )")


def refused(args: list[str], key: str, *, code: str | None = None) -> str:
    """Run ``rcx ARGS``: exit 1, no traceback, exactly one error line, naming ``key``."""
    result = runner.invoke(app, args)
    out = result.output
    assert result.exit_code == 1, out
    assert result.exception is None or isinstance(result.exception, SystemExit), out
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, out
    assert key in errors[0], out
    if code is not None:
        assert code in errors[0], out
    return errors[0]


@pytest.fixture(autouse=True)
def _machine(monkeypatch):
    """Validate as on an 8 GB machine, whatever this one has."""
    monkeypatch.setattr(limits, "available_memory", lambda: 8 * 10**9)


# ------------------------------------------------------------------------------- markup ---


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["validate", "[/bold]=1"], "[/bold]"),
        (["validate", f"{RC}.rollout_rs=[/red]"], "'[/red]'"),
        (["validate", f"{RC}.rollout_rs=ray[default]"], "'ray[default]'"),
        (["validate", "trainer.logger=[values]"], "'values'"),
        (["validate", "data.train_batch_size=[values]"], "['values']"),
    ],
)
def test_markup_in_keys_and_values_is_printed_as_typed(args, key):
    refused(args, key)


def test_markup_in_a_grid_key_is_printed_as_typed(tmp_path):
    result = runner.invoke(
        app, ["sweep", "--grid", "[/x]=1,2", "--dry-run", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "RCX-E001 [/x]: unknown key '[/x]'" in result.output


PRINTABLE = st.characters(blacklist_categories=("Cc", "Cs"))  # Rich drops control codes


@given(st.text(PRINTABLE, max_size=40), st.text(alphabet="[]/\\:xab@#", max_size=12))
def test_esc_prints_any_text_exactly(text, other):
    assert render(esc(text)).plain == text
    assert render(f"[bold]{esc(text)}[/]").plain == text
    assert render(f"[red]{esc(other)}[/red]: {esc(text)}").plain == f"{other}: {text}"
    assert render(esc(other) + esc(text) + esc(other)).plain == other + text + other


BRACKETY = st.text(alphabet="[]/\\ab=#@ ", min_size=1, max_size=12)


@settings(max_examples=30, deadline=None)
@given(BRACKETY.filter(lambda s: "=" not in s and s.strip() and "." not in s))
def test_any_markup_key_is_one_e001_line(key):
    line = refused(["validate", f"{key}=1"], key.strip().lstrip("+"), code="RCX-E001")
    assert line.startswith("error")


@settings(max_examples=30, deadline=None)
@given(BRACKETY)
def test_any_markup_value_never_crashes(value):
    result = runner.invoke(app, ["validate", f"trainer.project_name={value}x"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(BRACKETY.filter(lambda s: "=" not in s and "," not in s and s.strip()))
def test_any_markup_grid_name_never_crashes(tmp_path, key):
    result = runner.invoke(
        app, ["sweep", "--grid", f"{key}=1,2", "--dry-run", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------- values and limits ---


@pytest.mark.parametrize(
    ("override", "key", "code", "says"),
    [
        ("trainer.seed=99999999999999999999999999", "trainer.seed", "E009", "4294967295"),
        ("trainer.seed=-1", "trainer.seed", "E009", "greater than or equal to 0"),
        ("actor_rollout_ref.actor.optim.lr=inf", "actor_rollout_ref.actor.optim.lr", "E009",
         "a finite number > 0"),
        ("actor_rollout_ref.actor.optim.lr=.inf", "actor_rollout_ref.actor.optim.lr", "E009",
         "not finite"),
        ("critic.optim.lr=.nan", "critic.optim.lr", "E009", "not finite"),
        ("actor_rollout_ref.actor.entropy_coeff=.inf", "actor_rollout_ref.actor.entropy_coeff",
         "E009", "not finite"),
        ("actor_rollout_ref.rollout.temperature=1e-300", "actor_rollout_ref.rollout.temperature",
         "E009", "0.01"),
        ("actor_rollout_ref.rollout.temperature=1000", "actor_rollout_ref.rollout.temperature",
         "E009", "100"),
        ("actor_rollout_ref.actor.temperature=1e-300", "actor_rollout_ref.actor.temperature",
         "E009", "0.01"),
        ("data.train_batch_size=100000", "data.train_batch_size", "E013", "available here"),
        ("data.builtin.num_train=1000000000", "data.builtin.num_train", "E013", "available here"),
        ("trainer.project_name=" + "p" * 300, "trainer.project_name", "E009", "256"),
        ("trainer.experiment_name=" + "e" * 251, "trainer.experiment_name", "E009", "250"),
        ("trainer.default_local_dir=/dev/null/x", "trainer.default_local_dir", "E012",
         "'/dev/null' is not a folder"),
        ("trainer.default_local_dir=/tmp/" + "d" * 300, "trainer.default_local_dir", "E012",
         "bytes"),
        (f"{RC}.rollout_is_threshold=1.5_2", f"{RC}.rollout_is_threshold", "E005", "0 < lo < 1"),
        ("trainer.seed=1_0", "trainer.seed", "E009", "no '_'"),
        ("actor_rollout_ref.actor.optim.betas=[0.9,0_9]", "actor_rollout_ref.actor.optim.betas",
         "E009", "no '_'"),
        ("trainer.seed=" + "9" * 5000, "trainer.seed", "E011", "5,000 digits"),
    ],
)  # fmt: skip
def test_values_that_crashed_training_are_refused_at_validate(override, key, code, says):
    line = refused(["validate", override], key, code=f"RCX-{code}")
    assert says in line
    assert len(line) < 400


def test_memory_estimate_is_explained_and_micro_batches_help():
    line = refused(["validate", "data.train_batch_size=100000"], "data.train_batch_size")
    assert "KV cache" in line and "ppo_micro_batch_size_per_gpu" in line
    ok = runner.invoke(app, ["validate", "data.train_batch_size=256"])
    assert ok.exit_code == 0, ok.output


def test_default_config_fits_and_validates():
    result = runner.invoke(app, ["validate"])
    assert result.exit_code == 0, result.output


# --------------------------------------------------------------------------------- files ---


def write(tmp_path, data: bytes | str, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


RECURSIVE = "algorithm:\n  rollout_correction:\n    rollout_rs_threshold: &t [*t]\n"
BOMB = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"trainer:\n  seed: 1\n\xff\xfe junk\n", "not UTF-8"),
        ("a: " + "[" * 2000 + "]" * 2000 + "\n", "nested deeper than 64"),
        (BOMB, "aliases are expanded"),
        (RECURSIVE, "recursive alias"),
        ("trainer:\n  seed: 1\n  project_name: p\n  seed: 2\n", "trainer.seed: duplicate key (lines 2 and 4)"),
        ("x: " + "1" * 200_000 + "\n", "characters"),
    ],
)  # fmt: skip
def test_hostile_files_are_one_e011_line(tmp_path, data, says):
    path = write(tmp_path, data)
    line = refused(["validate", path], path, code="RCX-E011")
    assert says in line


def test_alias_bomb_is_small_and_refused_fast(tmp_path):
    import time

    assert len(BOMB) < 500
    path = write(tmp_path, BOMB)
    start = time.perf_counter()
    refused(["validate", path], path)
    assert time.perf_counter() - start < 1.0


def test_alias_bomb_inside_a_threshold(tmp_path):
    text = BOMB.replace("i: &i", "algorithm:\n  rollout_correction:\n    rollout_rs_threshold: &i")
    path = write(tmp_path, text)
    refused(["validate", path], path, code="RCX-E011")


def test_yaml12_number_in_a_file_is_a_string_then_refused(tmp_path):
    path = write(tmp_path, "actor_rollout_ref:\n  actor:\n    optim:\n      lr: 1_0e-4\n")
    line = refused(["validate", path], "actor_rollout_ref.actor.optim.lr", code="RCX-E009")
    assert "'1_0e-4'" in line and "a finite number > 0" in line


def test_binary_sweep_file_is_one_line(tmp_path):
    path = write(tmp_path, b"grid:\n  \xff: [1]\n", "s.yaml")
    line = refused(["sweep", "--sweep", path, "--dry-run"], path)
    assert "not UTF-8" in line


def test_duplicate_keys_in_a_sweep_file_are_refused(tmp_path):
    path = write(tmp_path, "name: a\nname: b\n", "s.yaml")
    line = refused(["sweep", "--sweep", path, "--dry-run"], path)
    assert "name: duplicate key (lines 1 and 2)" in line
