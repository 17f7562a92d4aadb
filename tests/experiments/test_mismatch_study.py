"""bench/mismatch_study.py: the smoke configuration end to end, and its arithmetic by hand.

The smoke run goes through the same code path as ``--quick`` and the full study (config
overrides -> ``train`` -> summary -> aggregation -> Markdown, CSV, plot), shrunk to an untrained
model and 2 steps so that it takes seconds.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "mismatch_study.py"


@pytest.fixture(scope="module")
def study(bench_script):
    yield from bench_script("mismatch_study")


def rewrite_report(out: Path) -> str:
    """``--report --out out`` (no training); the rewritten Markdown."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--report", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return (out / "mismatch_study.md").read_text()


def test_smoke_run_writes_table_csv_and_plot(study, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--jobs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    with (tmp_path / "mismatch_study.csv").open() as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    assert tuple(reader.fieldnames) == study.CSV_COLUMNS
    assert [(r["source"], r["arm"]) for r in rows] == [
        ("stale8", "reference"),
        ("stale8", "uncorrected"),
        ("stale8", "bypass_ppo_clip"),
    ]
    assert all(r["seeds"] == "1" and 0.0 <= float(r["final_val_acc"]) <= 1.0 for r in rows)

    md = (tmp_path / "mismatch_study.md").read_text()
    assert "Status: **complete** — 3 of 3 runs (smoke mode)" in md
    assert "| source | arm | seeds | final val acc % |" in md
    assert "`algorithm.rollout_correction.bypass_mode=true`" in md  # the arm mapping
    assert (tmp_path / "mismatch_study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --report rewrites the same outputs from the recorded runs, without training.
    (tmp_path / "mismatch_study.md").unlink()
    assert "3 of 3 runs" in rewrite_report(tmp_path)

    # A later session that ran another source with --resume: --report covers both sessions.
    runs = tmp_path / "mismatch_study_runs.jsonl"
    lines = runs.read_text().splitlines()
    meta = json.loads(lines[0])
    meta["meta"].update(sources=["stale4"], planned=1)
    record = json.loads(next(line for line in lines if '"key"' in line))
    record.update(key="stale4/uncorrected/1", source="stale4", arm="uncorrected")
    runs.write_text("\n".join([*lines, json.dumps(meta), json.dumps(record)]) + "\n")
    md = rewrite_report(tmp_path)
    assert (
        "4 of 4 runs" in md
        and "| stale8 | uncorrected |" in md
        and "| stale4 | uncorrected |" in md
    )


def test_normalised_auc_is_the_mean_under_the_trapezoid(study) -> None:
    # (0, 0.2) -> (10, 0.4) -> (20, 0.4): areas 10*0.3 + 10*0.4 = 7, over 20 steps = 0.35
    assert study.normalised_auc([(0, 0.2), (10, 0.4), (20, 0.4)]) == pytest.approx(0.35)
    assert study.normalised_auc([(5, 0.7)]) == 0.7


def test_grad_spikes_counts_steps_above_ten_times_the_median(study) -> None:
    # median of [1, 1, 1, 1, 10.5, 30] is 1: 10.5 and 30 are spikes, 10.0 would not be
    history = {"actor/grad_norm": [(i, v) for i, v in enumerate([1, 1, 1, 1, 10.5, 30])]}
    assert study.grad_spikes(history) == 2
    assert study.grad_spikes({}) == 0


def _record(study, source: str, arm: str, seed: int, acc: float) -> dict:
    return {
        "key": f"{source}/{arm}/{seed}",
        "source": source,
        "arm": arm,
        "seed": seed,
        "final_val_acc": acc,
        "final_sampled_acc": acc,
        "val_auc": acc,
        "grad_spikes": 0,
        "ess_mean": None,
        "masked_mean": None,
        "kl_mean": 0.1,
        "wall_s": 1.0,
        "curves": {"val_acc": [(90, acc), (100, acc)]},
    }


def test_gap_recovered_uses_the_shared_reference(study) -> None:
    # reference 0.60 (shared, source "none"), uncorrected 0.20, token TIS 0.50:
    # gap 0.40, recovered (0.50 - 0.20) / 0.40 = 75 %
    records = [
        _record(study, "none", "reference", 1, 0.62),
        _record(study, "none", "reference", 2, 0.58),
        _record(study, "stale8", "uncorrected", 1, 0.20),
        _record(study, "stale8", "token_tis", 1, 0.50),
    ]
    rows = {r["arm"]: r for r in study.aggregate(records, ["stale8"])}
    assert rows["reference"]["final_val_acc"] == pytest.approx(0.60)
    assert rows["reference"]["final_val_acc_std"] == pytest.approx(math.sqrt(0.0008))
    assert rows["token_tis"]["gap_recovered"] == pytest.approx(0.75)
    assert rows["token_tis"]["delta_vs_uncorrected"] == pytest.approx(0.30)
    assert rows["token_tis"]["late_val_acc"] == pytest.approx(0.50)  # mean of the last evals
    assert math.isnan(rows["uncorrected"]["gap_recovered"])
    assert study.best_corrected(records, "stale8", list(study.ARMS)) == "token_tis"
