"""bench/async_study.py: its arithmetic by hand (training clock, time to target, aggregation) and
the smoke configuration end to end (slow tier: it trains one-step-off runs, a rollout process
each)."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "async_study.py"


@pytest.fixture(scope="module")
def study(bench_script):
    yield from bench_script("async_study")


def test_the_training_clock_sums_step_times_and_skips_validation(study) -> None:
    history = {"timing/step": [(2, 1.5), (1, 4.0), (3, 0.5)], "timing/validation": [(3, 99.0)]}
    assert study.training_clock(history) == {1: 4.0, 2: 5.5, 3: 6.0}


def test_time_to_target_is_the_clock_at_the_first_validation_reaching_it(study) -> None:
    clock = {s: 2.0 * s for s in range(1, 31)}
    curve = [(0, 0.7), (10, 0.45), (20, 0.55), (30, 0.5)]
    assert study.time_to_target(curve, clock, 0.5) == 40.0  # step 0 (before training) ignored
    assert study.time_to_target(curve, clock, 0.6) is None


def _record(mode: str, arm: str, seed: int, acc: float, train_s: float, t50: float | None) -> dict:
    return {
        "key": f"{mode}/{arm}/{seed}",
        "mode": mode,
        "arm": arm,
        "seed": seed,
        "final_val_acc": acc,
        "train_s": train_s,
        "steps": 100,
        "staleness_mean": 0.0 if mode == "sync" else 1.0,
        "staleness_max": 0.0 if mode == "sync" else 1.0,
        "dropped": 0,
        "kl_mean": 1e-3,
        # reaches 50 % at step 10 (at t50 s of training) when t50 is given, never 60 %
        "curves": {
            "val_acc": [(10, 0.55 if t50 is not None else 0.4), (90, 0.45), (100, 0.45)],
            "clock": [(10, t50 or 1.0), (90, train_s * 0.9), (100, train_s)],
        },
    }


def test_rows_give_speed_up_against_sync_and_who_reached_the_target(study) -> None:
    records = [
        _record("sync", "uncorrected", 1, 0.7, 40.0, 10.0),
        _record("sync", "uncorrected", 2, 0.8, 60.0, 14.0),
        _record("one_step_off", "bypass_ppo_clip", 1, 0.6, 25.0, 8.0),
        _record("one_step_off", "bypass_ppo_clip", 2, 0.7, 25.0, None),
    ]
    rows = {(r["mode"], r["arm"]): r for r in study.aggregate(records)}
    sync, async_ = rows["sync", "uncorrected"], rows["one_step_off", "bypass_ppo_clip"]
    assert sync["speedup_vs_sync"] == pytest.approx(1.0)
    assert async_["speedup_vs_sync"] == pytest.approx(50.0 / 25.0)
    assert sync["time_to_50"] == pytest.approx(12.0) and sync["time_to_50_reached"] == 2
    assert async_["time_to_50"] == pytest.approx(8.0) and async_["time_to_50_reached"] == 1
    assert math.isnan(async_["time_to_60"]) and async_["time_to_60_reached"] == 0
    table = "\n".join(study.results_table(list(rows.values())))
    assert "8.0 (1 of 2 reached)" in table and "2.00×" in table
    # With a sync row of the same arm, the speed-up is against it (bypass's own step is faster).
    records.append(_record("sync", "bypass_ppo_clip", 1, 0.7, 30.0, 9.0))
    rows = {(r["mode"], r["arm"]): r for r in study.aggregate(records)}
    assert rows["one_step_off", "bypass_ppo_clip"]["speedup_vs_sync"] == pytest.approx(30 / 25)


@pytest.mark.slow
def test_smoke_run_writes_the_table(study, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--modes", "sync", "one_step_off",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    with (tmp_path / "async_study.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["mode"], r["arm"]) for r in rows] == [
        ("sync", "uncorrected"),
        ("sync", "bypass_ppo_clip"),
        ("one_step_off", "uncorrected"),
        ("one_step_off", "bypass_ppo_clip"),
        ("one_step_off", "icepop_token"),
    ]
    assert float(rows[2]["staleness_max"]) == 1.0 and float(rows[0]["staleness_max"]) == 0.0
    md = (tmp_path / "async_study.md").read_text()
    assert "Status: **complete** — 5 of 5 runs (smoke mode)" in md
