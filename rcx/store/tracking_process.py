"""MLflow in a process of its own: the training process never imports it.

Importing MLflow and opening its store costs 1.5 s of CPU (``import mlflow`` alone ~1 s), paid
before step 1 when it happens in the training process. One child process per training process
(:func:`shared_process`, started with ``python -c`` on this interpreter) imports MLflow and owns
its clients; :class:`MlflowTracker <rcx.store.tracking.MlflowTracker>` talks to it through a
:class:`RemoteClient`, one synchronous call at a time over a pipe (pickled builtins only: no
MLflow object crosses it). ``rcx train`` starts the process (:func:`prestart`) before it imports
torch and transformers, so that the two imports run side by side on two cores; with one core
the total is what it was.

Decisions:

* **Nothing changes above the client.** The tracker's background writer
  (:mod:`rcx.store.outbox`) keeps the order, the retries, the memory bound and the bounded wait
  at the end; its thread blocks in :meth:`RemoteClient.call` as it blocked in MLflow's client.
  A failure in the child comes back as :class:`RemoteError` with MLflow's message and the
  child's verdict on whether a retry can help (:func:`rcx.store.outbox.is_transient`); a
  :class:`~rcx.store.tracking.TrackingError` (unreachable server, unusable store) is raised
  again as itself, so ``rcx train`` still fails at once with one line.
* **Signals**: the child runs in its own session and ignores SIGINT, so Ctrl-C reaches the
  trainer alone, which then writes the KILLED status through the child.
* **Lifetime**: the child exits when its pipe closes: at the training process's exit (an
  ``atexit`` hook closes it and reaps the child, killing it after :data:`EXIT_WAIT_S` if a
  write to a lost server is still running), or when that process dies, however it dies.
* **Environment**: each open carries the training process's environment (``MLFLOW_*``,
  ``RCX_CACHE_DIR``), so the child sees what an in-process client would have seen.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

#: How long the exit hook waits for the child to end before it kills it.
EXIT_WAIT_S = 0.5


class MetricValue(NamedTuple):
    """One metric value as it crosses the pipe (MLflow's ``Metric`` fields)."""

    key: str
    value: float
    timestamp: int
    step: int


class RemoteError(RuntimeError):
    """A call the tracking process could not carry out. ``transient``: whether a later attempt
    can succeed (the store was not reached); ``detail``: the child's traceback, if any."""

    def __init__(self, message: str, *, transient: bool, detail: str = "") -> None:
        super().__init__(message)
        self.transient = transient
        self.detail = detail


# --------------------------------------------------------------------------- the training side


class TrackingProcess:
    """The child process and its pipe; :meth:`call` is thread-safe (one call at a time)."""

    def __init__(self) -> None:
        package_root = str(Path(__file__).resolve().parents[2])  # this rcx, not another install
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from rcx.store.tracking_process import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            start_new_session=True,  # Ctrl-C and job control go to the trainer alone
        )
        self.owner = os.getpid()  # a forked copy of this object must not use the pipe
        self._lock = threading.Lock()
        self._unanswered = 0  # requests sent without waiting (prestart), answered first
        self._closed = False

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return not self._closed and os.getpid() == self.owner and self._proc.poll() is None

    def send_nowait(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Send a request whose answer is read (and dropped) before the next call's."""
        with self._lock:
            self._write((method, args, kwargs))
            self._unanswered += 1

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` in the child and return its result, or raise what it raised."""
        with self._lock:
            self._write((method, args, kwargs))
            while self._unanswered:
                self._read()
                self._unanswered -= 1
            kind, *payload = self._read()
        if kind == "ok":
            return payload[0]
        error, message, transient, detail = payload
        if error == "TrackingError":
            from rcx.store.tracking import TrackingError

            raise TrackingError(message)
        raise RemoteError(message, transient=transient, detail=detail)

    def close(self, wait_s: float = EXIT_WAIT_S) -> int | None:
        """Close the pipe and reap the child (killed after ``wait_s``); its exit code."""
        self._closed = True
        for stream in (self._proc.stdin, self._proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            return self._proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait()

    def _write(self, message: tuple[Any, ...]) -> None:
        if not self.alive():
            raise self._gone()
        try:
            pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise self._gone() from exc

    def _read(self) -> tuple[Any, ...]:
        try:
            return pickle.load(self._proc.stdout)
        except (EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
            raise self._gone() from exc

    def _gone(self) -> RemoteError:
        code = self._proc.poll()
        how = "was closed" if self._closed else f"exited (code {code})"
        return RemoteError(f"the MLflow tracking process {how}", transient=False)


_shared: TrackingProcess | None = None
_shared_lock = threading.Lock()


def shared_process() -> TrackingProcess:
    """This process's tracking process, started if there is none (or it died, or belongs to
    the process this one was forked from)."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive():
            if _shared is None or _shared.owner != os.getpid():
                atexit.register(_close_shared)
            _shared = TrackingProcess()
        return _shared


def _close_shared() -> None:
    with _shared_lock:
        if _shared is not None and _shared.owner == os.getpid():
            _shared.close()


def prestart(uri: str, experiment: str) -> None:
    """Start the tracking process and have it open the store ``uri`` (and look up
    ``experiment``) while this process goes on; errors are reported by the real open."""
    # On failure the tracker starts its own process, and reports why that fails.
    with contextlib.suppress(OSError, RemoteError):
        shared_process().send_nowait("prepare", uri, dict(os.environ), experiment)


class RemoteClient:
    """The MLflow calls a tracker makes, for the store ``uri``, run in the tracking process."""

    def __init__(self, process: TrackingProcess, uri: str) -> None:
        self.process = process
        self.uri = uri

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.process.call(method, self.uri, *args, **kwargs)

    def open_run(
        self,
        experiment: str,
        run_name: str,
        resume_run_id: str | None,
        parent_run_id: str | None,
        tags: Mapping[str, str] | None,
    ) -> dict[str, Any]:
        """Reopen ``resume_run_id`` or create a run: its ``run_id``, ``experiment_id``,
        ``resumed``, ``previous_status`` and ``previous_end_time``."""
        return self._call(
            "open_run",
            dict(os.environ),
            experiment,
            run_name,
            resume_run_id,
            parent_run_id,
            dict(tags or {}),
        )

    def log_batch(
        self,
        run_id: str,
        metrics: Sequence[MetricValue] = (),
        params: Sequence[tuple[str, str]] = (),
        tags: Sequence[tuple[str, str]] = (),
    ) -> None:
        self._call(
            "log_batch",
            run_id,
            [tuple(m) for m in metrics],
            [tuple(p) for p in params],
            [tuple(t) for t in tags],
        )

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifact", run_id, os.path.abspath(path), artifact_path)

    def log_artifacts(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", run_id, os.path.abspath(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._call("log_text", run_id, text, artifact_file)

    def set_terminated(self, run_id: str, status: str, end_time: int | None = None) -> None:
        self._call("set_terminated", run_id, status, end_time)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._call("set_tag", run_id, key, value)

    def delete_tag(self, run_id: str, key: str) -> None:
        self._call("delete_tag", run_id, key)

    def get_params(self, run_id: str) -> dict[str, str]:
        return self._call("get_params", run_id)

    def get_tags(self, run_id: str) -> dict[str, str]:
        return self._call("get_tags", run_id)

    def metric_steps(self, run_id: str, key: str) -> list[int]:
        """The steps at which ``key`` was logged in the run."""
        return self._call("metric_steps", run_id, key)

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        """A new run's id."""
        return self._call("create_run", experiment_id, run_name, dict(tags))

    def find_child(self, experiment_id: str, parent_run_id: str, run_name: str) -> str | None:
        """The id of ``parent_run_id``'s child run named ``run_name``, or None."""
        return self._call("find_child", experiment_id, parent_run_id, run_name)


# --------------------------------------------------------------------------- the child


class Backend:
    """The child's side: one ``MlflowClient`` per store, each call a method here."""

    def __init__(self) -> None:
        from mlflow.tracking import MlflowClient  # the import this process exists for

        self._client_class = MlflowClient
        self._clients: dict[str, Any] = {}

    def client(self, uri: str) -> Any:
        """The client of ``uri``, made (the store checked and, if new, seeded) on first use."""
        from rcx.store.tracking import sqlite_path

        db = sqlite_path(uri)
        if uri in self._clients and (db is None or db.exists()):
            return self._clients[uri]
        self._clients[uri] = self._client_class(tracking_uri=uri)
        return self._clients[uri]

    def _use_environment(self, env: Mapping[str, str]) -> None:
        from rcx.store.tracking import RUN_HTTP_RETRIES, RUN_HTTP_TIMEOUT_S

        os.environ.clear()
        os.environ.update(env)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(RUN_HTTP_RETRIES))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(RUN_HTTP_TIMEOUT_S))

    def _open_store(self, uri: str, env: Mapping[str, str]) -> Any:
        import logging

        from rcx.store.tracking import check_reachable, seed_sqlite_store, sqlite_path

        # A new SQLite store announces its schema migrations at INFO; rcx prints the store itself.
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
        self._use_environment(env)
        check_reachable(uri)
        if (db := sqlite_path(uri)) is not None and not db.exists():
            seed_sqlite_store(db)
        return self.client(uri)

    def prepare(self, uri: str, env: Mapping[str, str], experiment: str) -> None:
        """Open the store ahead of :meth:`open_run` (what can be done before the run is known)."""
        self._open_store(uri, env).get_experiment_by_name(experiment)

    def open_run(
        self,
        uri: str,
        env: Mapping[str, str],
        experiment: str,
        run_name: str,
        resume_run_id: str | None,
        parent_run_id: str | None,
        tags: Mapping[str, str],
    ) -> dict[str, Any]:
        from mlflow.exceptions import MlflowException

        from rcx.store.tracking import TrackingError, _get_or_create_experiment

        client = self._open_store(uri, env)
        try:
            if resume_run_id and (run := _get_run_or_none(client, resume_run_id)) is not None:
                client.update_run(resume_run_id, status="RUNNING")
                return {
                    "run_id": resume_run_id,
                    "experiment_id": run.info.experiment_id,
                    "resumed": True,
                    "previous_status": run.info.status,
                    "previous_end_time": run.info.end_time,
                }
            experiment_id = _get_or_create_experiment(client, experiment, uri)
            run_tags = dict(tags)
            if parent_run_id:
                run_tags["mlflow.parentRunId"] = parent_run_id
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        except MlflowException as exc:
            raise TrackingError(f"MLflow store {uri}: {exc.message}") from exc
        return {
            "run_id": run.info.run_id,
            "experiment_id": experiment_id,
            "resumed": False,
            "previous_status": None,
            "previous_end_time": None,
        }

    def log_batch(
        self,
        uri: str,
        run_id: str,
        metrics: Sequence[tuple[Any, ...]],
        params: Sequence[tuple[str, str]],
        tags: Sequence[tuple[str, str]],
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.client(uri).log_batch(
            run_id,
            metrics=[Metric(*m) for m in metrics],
            params=[Param(*p) for p in params],
            tags=[RunTag(*t) for t in tags],
        )

    def log_artifact(self, uri: str, run_id: str, path: str, artifact_path: str | None) -> None:
        self.client(uri).log_artifact(run_id, path, artifact_path)

    def log_artifacts(self, uri: str, run_id: str, path: str, artifact_path: str | None) -> None:
        self.client(uri).log_artifacts(run_id, path, artifact_path)

    def log_text(self, uri: str, run_id: str, text: str, artifact_file: str) -> None:
        self.client(uri).log_text(run_id, text, artifact_file)

    def set_terminated(self, uri: str, run_id: str, status: str, end_time: int | None) -> None:
        self.client(uri).set_terminated(run_id, status=status, end_time=end_time)

    def set_tag(self, uri: str, run_id: str, key: str, value: str) -> None:
        self.client(uri).set_tag(run_id, key, value)

    def delete_tag(self, uri: str, run_id: str, key: str) -> None:
        self.client(uri).delete_tag(run_id, key)

    def get_params(self, uri: str, run_id: str) -> dict[str, str]:
        return dict(self.client(uri).get_run(run_id).data.params)

    def get_tags(self, uri: str, run_id: str) -> dict[str, str]:
        return dict(self.client(uri).get_run(run_id).data.tags)

    def metric_steps(self, uri: str, run_id: str, key: str) -> list[int]:
        return [int(m.step) for m in self.client(uri).get_metric_history(run_id, key)]

    def create_run(
        self, uri: str, experiment_id: str, run_name: str, tags: Mapping[str, str]
    ) -> str:
        run = self.client(uri).create_run(experiment_id, run_name=run_name, tags=dict(tags))
        return run.info.run_id

    def find_child(
        self, uri: str, experiment_id: str, parent_run_id: str, run_name: str
    ) -> str | None:
        runs = self.client(uri).search_runs(
            [experiment_id],
            filter_string=(
                f"tags.mlflow.parentRunId = '{parent_run_id}' "
                f"and attributes.run_name = '{run_name}'"
            ),
            max_results=1,
        )
        return runs[0].info.run_id if runs else None


def _get_run_or_none(client: Any, run_id: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _error_reply(exc: BaseException) -> tuple[Any, ...]:
    from rcx.store.outbox import is_transient

    text = str(exc).strip() or type(exc).__name__
    detail = "".join(traceback.format_exception(exc))
    try:
        transient = is_transient(exc)
    except Exception:  # noqa: BLE001 - a verdict only
        transient = False
    return ("err", type(exc).__name__, text, transient, detail)


def serve() -> None:
    """The child's loop: read a request, run it, answer; return when the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests = os.fdopen(os.dup(0), "rb")
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever MLflow prints goes to stderr, never into the answers
    backend = Backend()
    while True:
        try:
            method, args, kwargs = pickle.load(requests)
        except (EOFError, OSError):
            _exit_now()
        try:
            reply: tuple[Any, ...] = ("ok", getattr(backend, method)(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            reply = _error_reply(exc)
        try:
            pickle.dump(reply, answers, protocol=pickle.HIGHEST_PROTOCOL)
            answers.flush()
        except (OSError, ValueError):
            _exit_now()


def _exit_now() -> None:
    """End the child at once: every call was answered (each write is committed before its
    answer), and MLflow's interpreter teardown took ~1 s that the training process waited for."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
