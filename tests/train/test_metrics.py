"""The end-of-run summary: what a person reads after ``rcx train``."""

from __future__ import annotations

from pathlib import Path

from rcx.train.metrics import run_summary

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
