"""MLflow tracking: store resolution and seeding, params, queued metrics, status, resume, child
runs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient

from rcx.store import tracking
from rcx.store.outbox import Outbox
from rcx.store.tracking import (
    MAX_PARAM_VALUE_LENGTH,
    TRUNCATION_MARKER,
    MlflowTracker,
    NullTracker,
    TrackingError,
    check_reachable,
    flatten_config,
    open_tracker,
    plot_history,
    resolve_tracking_uri,
)


def _start(uri: str, name: str, **kw) -> MlflowTracker:
    return MlflowTracker.start(experiment="rcx-tests", run_name=name, tracking_uri=uri, **kw)


def test_flatten_config_dots_keys_and_renders_values() -> None:
    tree = {"a": {"b": {"c": 1}, "d": None, "e": [1, "x"]}, "s": "grpo", "f": 3e-4, "t": True}
    assert flatten_config(tree) == {
        "a.b.c": "1",
        "a.d": "null",
        "a.e": '[1, "x"]',
        "s": "grpo",
        "f": "0.0003",
        "t": "true",
    }


def test_flatten_config_truncates_to_mlflow_limit() -> None:
    flat = flatten_config({"long": "x" * (MAX_PARAM_VALUE_LENGTH + 10), "short": "y"})
    assert len(flat["long"]) == MAX_PARAM_VALUE_LENGTH
    assert flat["long"].endswith(TRUNCATION_MARKER)
    assert flat["short"] == "y"


def test_default_store_is_sqlite_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, cwd=tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri(None) == "http://example:5000"
    assert resolve_tracking_uri("sqlite:////x/y.db") == "sqlite:////x/y.db"


def test_null_tracker_when_mlflow_not_in_logger() -> None:
    tracker = open_tracker(logger=["console"], project_name="p", experiment_name="e")
    assert isinstance(tracker, NullTracker)
    assert tracker.run_id is None
    tracker.log_metrics({"a": 1.0}, step=1)
    tracker.finish("FINISHED")


def test_run_records_params_metrics_artifacts_and_status(mlflow_uri: str, run_name: str) -> None:
    tracker = _start(mlflow_uri, run_name)
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in tracker.describe()
    tracker.log_params({"trainer.seed": "1", "algorithm.adv_estimator": "grpo"})
    tracker.log_metrics({"reward/mean": 0.25, "rollout_corr/kl": 0.01}, step=1)
    tracker.log_metrics({"reward/mean": 0.5, "rollout_corr/kl": 0.02}, step=2)
    tracker.log_text("trainer:\n  seed: 1\n", "config.yaml")
    tracker.finish("FINISHED")
    tracker.finish("FAILED")  # idempotent: the first status stays

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == run_name
    assert run.info.status == "FINISHED"
    assert run.data.params == {"trainer.seed": "1", "algorithm.adv_estimator": "grpo"}
    history = client.get_metric_history(tracker.run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "rcx-tests"
    # Artifacts of a SQLite store live beside the database.
    assert experiment.artifact_location.endswith("/mlruns")


def test_more_metrics_than_one_batch_allows(mlflow_uri: str, run_name: str) -> None:
    tracker = _start(mlflow_uri, run_name)
    tracker.log_metrics({f"m/{i}": float(i) for i in range(1500)}, step=3)
    tracker.finish("FINISHED")
    metrics = MlflowClient(tracking_uri=mlflow_uri).get_run(tracker.run_id).data.metrics
    assert len(metrics) == 1500 and metrics["m/1499"] == 1499.0


def test_resume_reopens_same_run_and_tolerates_changed_params(
    mlflow_uri: str, run_name: str
) -> None:
    first = _start(mlflow_uri, run_name)
    first.log_params({"trainer.total_training_steps": "2", "trainer.seed": "1"})
    first.log_metrics({"reward/mean": 0.1}, step=1)
    first.finish("KILLED")
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    second = _start(mlflow_uri, run_name, resume_run_id=first.run_id)
    assert second.resumed and second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    notes = second.log_params(
        {"trainer.total_training_steps": "4", "trainer.seed": "1", "trainer.new_key": "x"}
    )
    assert notes == [
        "param changed on resume (kept the first value in MLflow): trainer.total_training_steps: 2 -> 4"
    ]
    second.log_metrics({"reward/mean": 0.2}, step=2)
    second.finish("FINISHED")
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.total_training_steps"] == "2"
    assert run.data.params["trainer.new_key"] == "x"
    assert "2 -> 4" in run.data.tags["rcx.resume.changed_params"]
    steps = [m.step for m in client.get_metric_history(first.run_id, "reward/mean")]
    assert steps == [1, 2]


def test_resume_of_unknown_run_id_starts_a_new_run(mlflow_uri: str, run_name: str) -> None:
    tracker = _start(mlflow_uri, run_name, resume_run_id="0" * 32)
    assert not tracker.resumed and tracker.run_id != "0" * 32
    tracker.finish("FINISHED")


def test_child_run_is_nested_under_parent(mlflow_uri: str, run_name: str) -> None:
    parent = _start(mlflow_uri, run_name + "-sweep")
    child = _start(mlflow_uri, run_name + "-trial0", parent_run_id=parent.run_id)
    child.finish("FAILED")
    parent.finish("FINISHED")
    run = MlflowClient(tracking_uri=mlflow_uri).get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.info.status == "FAILED"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_unreachable_server_fails_fast_with_clear_error() -> None:
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingError) as info:
        open_tracker(logger=["mlflow"], project_name="p", experiment_name="e", tracking_uri=uri)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert uri in message and "not reachable" in message and "trainer.tracking_uri" in message


def test_sqlite_store_in_unwritable_place_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(TrackingError, match="cannot create the MLflow store directory"):
        check_reachable(f"sqlite:///{blocker}/sub/mlflow.db")


def test_plot_history_draws_only_logged_keys(tmp_path: Path) -> None:
    history = {
        "reward/mean": [(1, 0.2), (2, 0.4)],
        "val/accuracy": [(0, 0.1), (2, 0.3)],
        "val/sampled_accuracy": [(0, 0.05), (2, 0.2)],
        "rollout_corr/kl": [(1, 0.01), (2, 0.03)],
    }
    out = plot_history(history, tmp_path / "plots" / "metrics.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_history({"other": [(1, 1.0)]}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_printed_mlflow_command_runs_without_an_activated_venv(monkeypatch) -> None:
    """The `view:` line names this interpreter's mlflow by its path when PATH does not find it,
    so that it works when pasted into a shell where the venv is not active."""
    from rcx.store.tracking import mlflow_command

    bare_path = "/usr/bin:/bin"
    monkeypatch.setenv("PATH", bare_path)
    command = mlflow_command()
    assert command != "mlflow" and "mlflow" in command
    done = subprocess.run(
        f"{command} --version", shell=True, env={"PATH": bare_path}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "version" in done.stdout
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{bare_path}")
    assert mlflow_command() == "mlflow"


def test_new_sqlite_store_is_a_copy_of_the_cached_empty_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run_name: str
) -> None:
    monkeypatch.setenv("RCX_CACHE_DIR", str(tmp_path / "cache"))
    db = tmp_path / "store" / "mlflow.db"
    tracker = _start(f"sqlite:///{db}", run_name)
    tracker.log_metrics({"reward/mean": 0.5}, step=1)
    tracker.finish("FINISHED")
    assert [p.name for p in (tmp_path / "cache" / "mlflow").iterdir()] == [
        f"empty-{mlflow.__version__}.db"
    ]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert [m.value for m in client.get_metric_history(tracker.run_id, "reward/mean")] == [0.5]
    # MLflow made its Default experiment on opening the copy (the template holds none), so its
    # artifact location is MLflow's own choice, not a path in the cache.
    default = client.get_experiment("0")
    assert default.name == "Default"
    assert str(tmp_path / "cache") not in default.artifact_location


def test_seeding_never_replaces_an_existing_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    template = tmp_path / "template.db"
    template.write_text("empty store")
    monkeypatch.setattr(tracking, "_empty_store_template", lambda: template)
    db = tmp_path / "mlflow.db"
    db.write_text("someone's runs")
    tracking.seed_sqlite_store(db)
    assert db.read_text() == "someone's runs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "template.db"]
    fresh = tmp_path / "new" / "mlflow.db"
    fresh.parent.mkdir()
    tracking.seed_sqlite_store(fresh)
    assert fresh.read_text() == "empty store"


def test_metrics_are_queued_and_a_refused_batch_warns_when_the_run_finishes(
    mlflow_uri: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = _start(mlflow_uri, run_name)
    calls = []

    def log_batch(run_id, metrics=(), **kw):
        calls.append([m.step for m in metrics])
        raise MlflowException("metric value rejected", INVALID_PARAMETER_VALUE)  # HTTP 400

    monkeypatch.setattr(tracker._client, "log_batch", log_batch)
    tracker.log_metrics({"reward/mean": 0.5}, step=3)  # returns: nothing raised yet
    with pytest.warns(UserWarning, match="metrics of step 3 failed: metric value rejected"):
        tracker.finish("FINISHED")
    assert calls == [[3]]  # refused for good: not retried
    assert MlflowClient(tracking_uri=mlflow_uri).get_run(tracker.run_id).info.status == "FINISHED"


class FlakyClient:
    """An MLflow client whose server is down (each call fails as a lost connection does) until
    ``up`` is set; records what reached the server."""

    def __init__(self) -> None:
        self.up = threading.Event()
        self.steps: list[int] = []
        self.status: str | None = None

    def _serve(self) -> None:
        if not self.up.is_set():
            time.sleep(0.05)  # a slow failure: training must not wait for it
            raise MlflowException("API request failed: Connection refused")  # HTTP 500

    def log_batch(self, run_id: str, metrics=(), **kw) -> None:
        self._serve()
        self.steps += sorted({m.step for m in metrics})

    def set_terminated(self, run_id: str, status: str, end_time=None) -> None:
        self._serve()
        self.status = status


def _flaky_tracker(client: FlakyClient, **outbox: object) -> MlflowTracker:
    return MlflowTracker(
        "http://127.0.0.1:1",
        "run0",
        "0",
        _client=client,
        local_copy=Path("/ckpt/run"),
        _outbox=Outbox(retry_delays_s=(0.01,), **outbox),
    )


def _wait_until(condition: Callable[[], bool], timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_lost_server_never_blocks_a_step_and_gets_everything_in_order_when_back() -> None:
    client = FlakyClient()
    tracker = _flaky_tracker(client)
    tracker.log_metrics({"reward/mean": 0.1}, step=1)
    _wait_until(lambda: tracker._outbox.failure is not None)
    started = time.monotonic()
    with pytest.warns(UserWarning, match="not answering .*Connection refused.*training continues"):
        for step in range(2, 40):
            tracker.log_metrics({"reward/mean": 0.1 * step}, step=step)
    assert time.monotonic() - started < 0.5  # 38 steps; one failed attempt alone takes 0.05 s
    assert client.steps == [] and client.status is None
    client.up.set()  # the server is back: the buffer drains, then the status is written
    tracker.finish("FINISHED")
    assert client.steps == list(range(1, 40))
    assert client.status == "FINISHED"


def test_a_server_still_gone_at_the_end_is_reported_and_finish_returns_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tracking, "FINISH_WAIT_S", 0.5)
    client = FlakyClient()
    tracker = _flaky_tracker(client, max_items=3)  # room for 3 steps of one metric
    client.up.set()
    tracker.log_metrics({"reward/mean": 0.1}, step=1)
    tracker._outbox.flush(5)
    client.up.clear()
    with pytest.warns(UserWarning) as caught:
        for step in range(2, 7):
            tracker.log_metrics({"reward/mean": 0.1}, step=step)
        started = time.monotonic()
        tracker.finish("KILLED")
    assert time.monotonic() - started < 2
    messages = [str(w.message) for w in caught]
    assert any("buffer is full, the metrics of step 5" in m for m in messages)
    (final,) = [m for m in messages if "did not answer within 0.5 s" in m]
    assert "metrics after step 1 (2 writes dropped" in final
    assert "final status KILLED could not be written" in final
    assert "show the run as RUNNING: its status is unknown" in final
    assert "/ckpt/run (state.pt" in final
    assert client.steps == [1] and client.status is None
    client.up.set()  # too late: the writer was closed and writes nothing more
    time.sleep(0.1)
    assert client.steps == [1] and client.status is None


@pytest.mark.parametrize("kind", ["corrupt", "folder"])
def test_a_corrupt_or_folder_sqlite_store_is_one_clear_line_at_once(
    tmp_path: Path, kind: str
) -> None:
    from rcx.experiments.runs import RunsError, open_client

    db = tmp_path / "mlflow.db"
    if kind == "folder":
        db.mkdir()
    else:
        db.write_bytes(b"\x00garbage that is not sqlite" * 10)
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not an SQLite database|is a folder") as info:
        tracking.check_reachable(f"sqlite:///{db}")
    assert "\n" not in str(info.value) and str(db) in str(info.value)
    with pytest.raises(RunsError, match="not an SQLite database|is a folder"):
        open_client(f"sqlite:///{db}")
    assert time.monotonic() - start < 5


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``(uri, process)`` of an ``mlflow server`` on 127.0.0.1 with its own SQLite store
    (``tmp_path/server.db``), stopped (killed with its workers) when the test ends."""
    port = _closed_port()
    db = tmp_path / "server.db"
    tracking.seed_sqlite_store(db)  # spares the server MLflow's migrations
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
        + ["--backend-store-uri", f"sqlite:///{db}", "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the workers die with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for_health(uri, server)
        yield uri, server
    finally:
        _kill_group(server)


def _wait_for_health(uri: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, "mlflow server exited at start"
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)


def _kill_group(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)  # also ends a stopped (SIGSTOP) group
        server.wait()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_server_lost_mid_run_slows_no_step_and_the_end_reports_the_status_unknown(
    tiny_config, mlflow_server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fault: str
) -> None:
    """The server is killed (connections refused) or hung (SIGSTOP: connections accepted, never
    answered, as behind a lost network) once step 1 is written. Measured (6 tiny steps, 2 busy
    cores, train() wall): no loss 7.5 s; before the outbox, killed 15.9 s and hung 195.9 s (each
    artifact upload and the status update waited out 3 x 30 s of HTTP timeouts), the run left
    RUNNING with no word; now 36.1 s and 36.9 s (FINISH_WAIT_S = 30 s for the server to return),
    then the warning below. Steps were not slowed before or after (~0.2 s each)."""
    from rcx.train.trainer import train

    uri, server = mlflow_server
    monkeypatch.setattr(tracking, "FINISH_WAIT_S", 3.0)
    monkeypatch.setattr(tracking, "STALL_WARN_S", 0.2)  # a hung server is said to be so at once
    stamps: list[tuple[int, float]] = []
    log_metrics = MlflowTracker.log_metrics

    def log_then_lose_the_server(self: MlflowTracker, metrics, step: int) -> None:
        log_metrics(self, metrics, step)
        stamps.append((step, time.monotonic()))
        if step == 1:
            assert self._outbox.flush(30)  # step 1 is in the store
            os.killpg(server.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)

    monkeypatch.setattr(MlflowTracker, "log_metrics", log_then_lose_the_server)
    cfg = tiny_config(
        "grpo-multi-rs", "trainer.total_training_steps=8", f"trainer.tracking_uri={uri}"
    )
    with pytest.warns(UserWarning) as caught:
        result = train(cfg)
    returned = time.monotonic()

    assert result.status == "FINISHED" and [s for s, _ in stamps][-1] == 8
    after_loss = [t for s, t in stamps if s >= 1]
    slowest_step = max(b - a for a, b in zip(after_loss, after_loss[1:], strict=False))
    assert slowest_step < 10, f"a step took {slowest_step:.1f} s after the server was lost"
    # Checkpoint, plot and the bounded wait: far under one HTTP timeout (30 s) per write.
    assert returned - stamps[-1][1] < tracking.FINISH_WAIT_S + 20
    messages = [str(w.message) for w in caught]
    assert any("is not answering" in m and "training continues" in m for m in messages)
    (final,) = [m for m in messages if "did not answer within 3 s" in m]
    assert "its metrics after step 1 and its final status FINISHED could not be written" in final
    assert "MLflow will show the run as RUNNING: its status is unknown there" in final
    assert f"{tmp_path / 'ckpt'}" in final and "state.pt" in final

    _kill_group(server)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'server.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "RUNNING"
    assert [m.step for m in client.get_metric_history(result.run_id, "reward/mean")] == [1]
