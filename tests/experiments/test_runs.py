"""rcx runs compare: final metrics and curves across MLflow runs, a sweep parent standing for
its trials."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcx.cli import app
from rcx.cli.experiments import short_names
from rcx.experiments.runs import RunsError, compare_runs, plot_comparison
from rcx.store.tracking import open_tracker


def log_run(uri: str, name: str, params: dict[str, str], curve: list[float], parent=None) -> str:
    tracker = open_tracker(
        logger=["mlflow"],
        project_name="rcx-runs-tests",
        experiment_name=name,
        tracking_uri=uri,
        parent_run_id=parent,
    )
    tracker.log_params(params)
    for step, value in enumerate(curve):
        tracker.log_metrics({"val/reward_mean": value, "rollout_corr/kl": value / 100}, step=step)
    tracker.finish("FINISHED")
    return tracker.run_id


@pytest.fixture
def sweep_runs(mlflow_uri: str, run_name: str) -> dict[str, str]:
    parent = open_tracker(
        logger=["mlflow"],
        project_name="rcx-runs-tests",
        experiment_name=run_name,
        tracking_uri=mlflow_uri,
    )
    ids = {"parent": parent.run_id}
    common = {"trainer.seed": "1", "trainer.experiment_name": "x"}
    for i, (cap, curve) in enumerate([("1.5", [0.1, 0.3, 0.2]), ("3.0", [0.1, 0.5])]):
        params = {**common, "algorithm.rollout_correction.rollout_is_threshold": cap}
        params["trainer.experiment_name"] = f"{run_name}-t0{i}"
        ids[f"t0{i}"] = log_run(mlflow_uri, f"{run_name}-t0{i}", params, curve, parent.run_id)
    parent.finish("FINISHED")
    return ids


def test_a_sweep_parent_stands_for_its_trials(mlflow_uri: str, sweep_runs: dict[str, str]) -> None:
    comparison = compare_runs([sweep_runs["parent"]], tracking_uri=mlflow_uri)
    assert [r.run_id for r in comparison.runs] == [sweep_runs["t00"], sweep_runs["t01"]]
    # Only the differing param is shown; the run name differs by construction and is ignored.
    assert comparison.differing_params == ["algorithm.rollout_correction.rollout_is_threshold"]
    assert comparison.metrics == ["val/reward_mean", "rollout_corr/kl"]  # the logged defaults
    from rcx.experiments.runs import final_value

    # The value at the last step (0.2), not the best one (0.3).
    assert [final_value(r, "val/reward_mean") for r in comparison.runs] == [0.2, 0.5]
    assert comparison.runs[0].history["val/reward_mean"] == [(0, 0.1), (1, 0.3), (2, 0.2)]


def test_plain_runs_and_chosen_metrics(
    mlflow_uri: str, sweep_runs: dict[str, str], tmp_path: Path
) -> None:
    comparison = compare_runs(
        [sweep_runs["t01"], sweep_runs["t00"], sweep_runs["t01"]],
        metrics=["rollout_corr/kl"],
        tracking_uri=mlflow_uri,
    )
    assert [r.run_id for r in comparison.runs] == [sweep_runs["t01"], sweep_runs["t00"]]
    assert comparison.metrics == ["rollout_corr/kl"]
    png = plot_comparison(comparison, tmp_path / "c.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_unknown_run_and_missing_store(mlflow_uri: str, tmp_path: Path) -> None:
    with pytest.raises(RunsError, match="no run 'deadbeef'"):
        compare_runs(["deadbeef"], tracking_uri=mlflow_uri)
    missing = tmp_path / "none" / "mlflow.db"
    with pytest.raises(RunsError, match="no MLflow store at"):
        compare_runs(["x"], tracking_uri=f"sqlite:///{missing}")
    assert not missing.exists()  # not created as a side effect


def test_an_unreachable_server_is_a_clear_error_within_seconds() -> None:
    import time

    start = time.monotonic()
    with pytest.raises(RunsError, match=r"http://127.0.0.1:9 is not reachable.*--tracking-uri"):
        compare_runs(["abc"], tracking_uri="http://127.0.0.1:9")  # nothing listens on port 9
    assert time.monotonic() - start < 30  # MLflow's own retries took minutes


def test_cli_table_and_plot(mlflow_uri: str, sweep_runs: dict[str, str], tmp_path: Path) -> None:
    png = tmp_path / "runs.png"
    result = CliRunner().invoke(
        app,
        [
            "runs",
            "compare",
            sweep_runs["parent"],
            "--tracking-uri",
            mlflow_uri,
            "--metric",
            "val/reward_mean",
            "--metric",
            "reward/mean",
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "t00" in result.output and "t01" in result.output
    assert "rollout_is_threshold" in result.output
    row = next(ln for ln in result.output.splitlines() if "val/reward_mean" in ln)
    assert "0.2" in row and "0.5" in row
    assert "no run logged 'reward/mean'" in result.output
    assert png.is_file()


def test_cli_unknown_run_is_a_clear_error(mlflow_uri: str) -> None:
    result = CliRunner().invoke(app, ["runs", "compare", "nope", "--tracking-uri", mlflow_uri])
    assert result.exit_code == 1
    assert "no run 'nope'" in result.output
    assert "Traceback" not in result.output


def test_short_names_drop_the_common_prefix() -> None:
    assert short_names(["thr-sweep-t00", "thr-sweep-t01"]) == ["t00", "t01"]
    assert short_names(["alpha", "beta"]) == ["alpha", "beta"]
    assert short_names(["only"]) == ["only"]
