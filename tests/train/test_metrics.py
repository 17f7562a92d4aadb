"""The end-of-run summary: what a person reads after ``rcx train``."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from rcx.train.metrics import PlainProgress, format_duration, run_summary

TRACKING = "MLflow run abc in /x/mlflow.db\n  view: cd /x && mlflow ui"


def test_run_summary_reads_accuracy_mismatch_speed_and_places():
    history = {
        "val/accuracy": [(0, 0.426), (50, 0.60), (100, 0.695)],
        "val/sampled_accuracy": [(0, 0.262), (100, 0.438)],
        # mean kl = (0.0 + 0.002) / 2; masked tokens (0 + 0.01) / 2; ESS (1 + 0.99) / 2
        "rollout_corr/kl": [(1, 0.0), (2, 0.002)],
        "rollout_corr/rollout_rs_masked_fraction": [(1, 0.0), (2, 0.01)],
        "rollout_corr/rollout_is_eff_sample_size": [(1, 1.0), (2, 0.99)],
        "rollout/staleness": [(1, 0.0), (2, 1.0)],
        "timing/step": [(1, 0.4), (2, 0.6), (3, 0.5)],
    }
    lines = run_summary(
        history,
        steps_run=3,
        wall_s=6.0,
        tracking=TRACKING,
        plot=Path("ckpt/metrics.png"),
        checkpoint=Path("ckpt/global_step_3"),
    )
    assert lines[0] == (
        "validation accuracy  42.6% -> 69.5% greedy (+26.9 points), 26.2% -> 43.8% sampled"
    )
    assert lines[1] == (
        "mismatch, mean of 2 steps  kl 1.00e-03 | RS-masked tokens 0.50% | IS ESS 0.995"
        " | staleness 0.50"
    )
    # 3 steps in 6 s = 0.50 steps/s; the median of 0.4, 0.6, 0.5 is 0.5
    assert lines[2] == "speed  3 steps in 6 s, set-up included (0.50 steps/s); median step 0.50 s"
    assert lines[3] == "MLflow run abc in /x/mlflow.db\n    view: cd /x && mlflow ui"
    assert lines[4:] == ["plots  ckpt/metrics.png", "checkpoint  ckpt/global_step_3"]


def test_run_summary_leaves_out_what_was_not_logged():
    lines = run_summary(
        {"reward/mean": [(1, 0.5)]},
        steps_run=1,
        wall_s=1.0,
        tracking="MLflow tracking off",
        plot=None,
        checkpoint=None,
    )
    assert lines == ["MLflow tracking off"]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def plain_lines(steps: int, seconds_per_step: float, total: int = 100, first: int = 1):
    """The lines PlainProgress prints off a terminal for ``steps`` steps of equal duration."""
    out, clock = io.StringIO(), FakeClock()
    progress = PlainProgress(
        Console(file=out, force_terminal=False, width=200), total, first_step=first, clock=clock
    )
    for step in range(first, first + steps):
        clock.now += seconds_per_step
        metrics = {"reward/mean": 0.41234, "reward/accuracy": 0.375, "rollout_corr/kl": 0.0017}
        progress.update(step, metrics)
    return out.getvalue().splitlines()


def test_plain_progress_prints_every_ten_steps_with_speed_and_eta():
    lines = plain_lines(25, 0.5)
    assert [ln.split()[1] for ln in lines] == ["1/100", "11/100", "21/100"]
    assert lines[1] == ("step 11/100  reward 0.412  acc 0.375  kl 0.0017  0.50 s/step  ETA 44s")


def test_plain_progress_prints_every_ten_seconds_when_steps_are_slow():
    lines = plain_lines(4, 6.0, total=50)
    # 6 s a step: a line at step 1, then once 10 s have passed since the last line (step 3).
    assert [ln.split()[1] for ln in lines] == ["1/50", "3/50"]
    assert lines[-1].endswith("6.00 s/step  ETA 4m42s")


def test_plain_progress_always_prints_the_last_step_and_counts_from_a_resume():
    lines = plain_lines(5, 1.0, total=45, first=41)
    assert [ln.split()[1] for ln in lines] == ["41/45", "45/45"]
    assert lines[-1].endswith("1.00 s/step  ETA 0s")


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 59.6, 185, 3725)] == ["0s", "1m00s", "3m05s", "1h02m"]
