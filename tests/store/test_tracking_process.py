"""MLflow in its own process: the training side never imports it, failures come back with their
verdict, a dead tracking process ends the run's writes with a warning, not a hang."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rcx.store import tracking_process
from rcx.store.outbox import is_transient
from rcx.store.tracking import MlflowTracker, TrackingError
from rcx.store.tracking_process import RemoteError, TrackingProcess


def test_a_tracked_run_never_imports_mlflow_in_the_training_process(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        from rcx.store.tracking import open_tracker
        tracker = open_tracker(logger=["mlflow"], project_name="p", experiment_name="e",
                               tracking_uri="sqlite:///{tmp_path}/mlflow.db")
        tracker.log_params({{"a": "1"}})
        tracker.log_metrics({{"reward/mean": 0.5}}, step=1)
        tracker.finish("FINISHED")
        print(tracker.run_id)
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "sqlalchemy")))
        """
    )
    root = str(Path(__file__).resolve().parents[2])
    # An empty cache: the store is created from scratch (not copied from a cached template).
    env = {**os.environ, "PYTHONPATH": root, "RCX_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "database tables" not in done.stderr  # a new store's INFO lines stay quiet
    run_id, modules = done.stdout.split()[0], done.stdout.split("\n")[1]
    assert modules == "[]"
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"reward/mean": 0.5}


def test_the_child_runs_in_its_own_session_and_calls_come_back_with_their_verdict(
    mlflow_uri: str, run_name: str
) -> None:
    process = TrackingProcess()
    try:
        assert os.getsid(process.pid) != os.getsid(0)  # Ctrl-C in a terminal does not reach it
        client = tracking_process.RemoteClient(process, mlflow_uri)
        info = client.open_run("rcx-tests", run_name, None, None, {})
        with pytest.raises(RemoteError) as refused:
            client.set_tag("0" * 32, "k", "v")  # no such run: HTTP 404, a retry cannot help
        assert not is_transient(refused.value) and "0" * 32 in str(refused.value)
        client.set_terminated(info["run_id"], "FINISHED")
    finally:
        process.close()
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(info["run_id"]).info.status == "FINISHED"


def test_an_unusable_store_is_still_a_tracking_error(tmp_path: Path) -> None:
    (tmp_path / "mlflow.db").mkdir()
    with pytest.raises(TrackingError, match="is a folder"):
        MlflowTracker.start(
            experiment="p", run_name="e", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"
        )


def test_a_dead_tracking_process_warns_and_finish_returns(mlflow_uri: str, run_name: str) -> None:
    tracker = MlflowTracker.start(
        experiment="rcx-tests", run_name=run_name, tracking_uri=mlflow_uri
    )
    tracker.log_metrics({"reward/mean": 0.1}, step=1)
    assert tracker._outbox.flush(30)
    os.kill(tracker._client.process.pid, signal.SIGKILL)
    tracker._client.process._proc.wait()
    tracker.log_metrics({"reward/mean": 0.2}, step=2)
    with pytest.warns(UserWarning, match="tracking process exited"):
        tracker.finish("FINISHED")
    steps = MlflowClient(tracking_uri=mlflow_uri).get_metric_history(tracker.run_id, "reward/mean")
    assert [m.step for m in steps] == [1]
    assert tracking_process.shared_process().alive()  # the next run gets a fresh one
