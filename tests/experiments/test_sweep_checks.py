"""What a sweep checks before it runs: grid keys that cannot change training, and name clashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from rcx.config import load_config
from rcx.config.loading import merge_sources
from rcx.experiments.sweep import (
    SweepError,
    inert_axes,
    inert_keys,
    mismatch_sources,
    name_clash,
    parse_grid,
    plan_sweep,
    run_sweep,
    save_state,
    unmatched_correction_axes,
)

RC = "algorithm.rollout_correction"
IS_KEYS = {f"{RC}.rollout_is_threshold", f"{RC}.rollout_is_batch_normalize"}


def keys_of(preset: str, *overrides: str) -> set[str]:
    return set(inert_keys(load_config(preset=preset, overrides=list(overrides))))


def test_inert_keys_follow_the_update_plan():
    # bypass + ppo_clip: the IS weights are metrics-only, so every IS key is inert.
    assert keys_of("grpo-multi-rs") == IS_KEYS | {f"{RC}.rollout_is"}
    # REINFORCE in bypass mode multiplies the loss by the weights: nothing is inert.
    assert keys_of("rloo-seq-is") == {f"{RC}.rollout_rs_threshold"}
    # Decoupled: the weights enter the loss, loss_type does not.
    assert keys_of("gae-seq-is-rs") == {f"{RC}.loss_type"}
    # No IS at all: its cap and normalisation are inert (rollout_is itself is not: setting it
    # to token or sequence would change training).
    assert keys_of("grpo-rs-only") == IS_KEYS


def plan_for(tmp_path: Path, preset: str, *grid: str, name: str = "s"):
    axes = [parse_grid(g) for g in grid]
    return plan_sweep(merge_sources(preset, None, []), axes, name=name, out_dir=tmp_path / name)


def test_an_axis_is_inert_only_when_it_is_inert_in_every_trial(tmp_path: Path):
    threshold = f"{RC}.rollout_is_threshold=1.5,3"
    plan = plan_for(tmp_path, "grpo-multi-rs", threshold)
    assert list(inert_axes(plan)) == [f"{RC}.rollout_is_threshold"]
    assert "metrics-only (RCX-W002)" in inert_axes(plan)[f"{RC}.rollout_is_threshold"]
    # With bypass off in half the trials, the cap changes what those trials train.
    mixed = plan_for(tmp_path, "grpo-multi-rs", threshold, f"{RC}.bypass_mode=true,false")
    assert inert_axes(mixed) == {}
    assert inert_axes(plan_for(tmp_path, "rloo-seq-is", threshold)) == {}


def test_a_sweep_name_in_use_is_a_clash_until_resumed(tmp_path: Path):
    plan = plan_for(tmp_path, "rloo-seq-is", f"{RC}.rollout_is_threshold=1.5,3", name="taken")
    assert name_clash(plan, resume=False) is None
    save_state(plan.out_dir, {"trials": {}})
    clash = name_clash(plan, resume=False)
    assert clash is not None and "'taken' already exists" in clash and "--resume" in clash
    assert name_clash(plan, resume=True) is None
    with pytest.raises(SweepError, match="already exists"):
        run_sweep(plan, trial_fn=lambda spec: None)


def test_dry_run_reports_a_name_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from typer.testing import CliRunner

    from rcx.cli import app

    monkeypatch.chdir(tmp_path)
    args = ["sweep", "--preset", "rloo-seq-is", "--name", "again", "--dry-run"]
    args += ["--grid", f"{RC}.rollout_is_threshold=1.5,3"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0 and "dry run: 2 valid trials" in first.output
    save_state(tmp_path / "sweeps" / "again", {"trials": {}})  # as a sweep that ran leaves it
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 1
    assert "a sweep named 'again' already exists" in second.output
    assert "(dry run: nothing started)" in second.output


def test_mismatch_sources_name_each_source():
    assert mismatch_sources(load_config(preset="rloo-seq-is")) == []
    cfg = load_config(
        preset="rloo-seq-is",
        overrides=[
            "actor_rollout_ref.rollout.dtype=bfloat16",
            "actor_rollout_ref.rollout.weight_sync_interval=4",
            "actor_rollout_ref.rollout.top_p=0.9",
            "actor_rollout_ref.actor.temperature=0.8",
        ],
    )
    assert mismatch_sources(cfg) == [
        "rollout.dtype=bfloat16",
        "rollout.weight_sync_interval=4",
        "rollout.top_p=0.9",
        "actor.temperature=0.8",
    ]
    # Bypass mode with two mini-batches per step: the second sees an updated policy.
    two = load_config(
        preset="rloo-seq-is", overrides=["actor_rollout_ref.actor.ppo_mini_batch_size=16"]
    )
    assert mismatch_sources(two) == ["several updates per step in bypass mode"]


def test_correction_axes_without_any_mismatch_are_reported(tmp_path: Path):
    grid = f"{RC}.rollout_is_threshold=1.5,3"
    assert unmatched_correction_axes(plan_for(tmp_path, "rloo-seq-is", grid)) == [
        f"{RC}.rollout_is_threshold"
    ]
    stale = "actor_rollout_ref.rollout.weight_sync_interval=1,4"
    assert unmatched_correction_axes(plan_for(tmp_path, "rloo-seq-is", grid, stale)) == []
    # A grid over something else than the correction is not its business.
    lr = "actor_rollout_ref.actor.optim.lr=1e-4,3e-4"
    assert unmatched_correction_axes(plan_for(tmp_path, "rloo-seq-is", lr)) == []
