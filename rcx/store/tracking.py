"""Experiment tracking: MLflow behind a five-method interface, or nothing at all.

The trainer talks to a :class:`Tracker` only::

    tracker = open_tracker(cfg)                 # MlflowTracker or NullTracker
    tracker.log_params(flatten_config(tree))    # once, at start
    tracker.log_metrics({"reward/mean": .4}, step=1)   # one batched call per step
    tracker.log_artifact(path) / tracker.log_text(text, "config.yaml")
    tracker.finish("FINISHED" | "FAILED" | "KILLED")

A sweep's parent run also ends, tags and untags its child runs (``end_child_run``,
``delete_run_tag``, ``set_tag``), so that sweeps need no MLflow client of their own.

Decisions:

* **Store.** ``trainer.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI`` if set, else a local
  SQLite database ``./mlflow.db`` in the working directory (MLflow 3's own default; its plain
  file store is in maintenance mode and refuses to start without an opt-in). For a SQLite store
  rcx puts the artifacts of a *new* experiment next to the database, in ``mlruns/``, so that the
  two travel together; ``mlflow ui --backend-store-uri sqlite:///mlflow.db`` run from that
  directory shows both. A *new* SQLite store is a copy of an empty one made once per MLflow
  version in the rcx cache (``$RCX_CACHE_DIR/mlflow/``): MLflow's own set-up replays every schema
  migration with a disk sync after each (3-8 s); the copy takes milliseconds, and MLflow still
  verifies its schema on opening.
* **Reachability.** An ``http(s)`` store is contacted once before training, with retries off and a
  short timeout (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT``), so an
  unreachable server fails in seconds with :class:`TrackingError` instead of mid-run.
* **Names.** Experiment = ``trainer.project_name``, run name = ``trainer.experiment_name``.
  A sweep passes ``parent_run_id`` to nest a trial under its parent run
  (tag ``mlflow.parentRunId``).
* **Params** are the flattened resolved config (``a.b.c`` keys); values longer than MLflow's
  limit are truncated with a marker, and the full config is always logged as an artifact.
  Params are immutable in MLflow: when a run is resumed, new keys are added, and keys whose value
  changed (``trainer.total_training_steps`` typically) are recorded in the tag
  ``rcx.resume.changed_params`` instead of failing.
* **Metrics** go out as one ``log_batch`` per step (chunked at MLflow's 1000-entity limit);
  they, the artifacts and texts, and the final status are written in order by a background
  thread (:mod:`rcx.store.outbox`), so a step waits for no database or server. MLflow itself
  runs in a process of its own (:mod:`rcx.store.tracking_process`): this process never imports
  it, and ``rcx train`` starts that process before torch loads, so the two load side by side. A store that
  stops answering (server killed, network lost) is retried in the background, its writes held
  in bounded memory, and training goes on at full speed (one warning says so). A write the
  store refuses warns once and training continues: the run's own history (kept by the trainer,
  saved in each checkpoint's ``state.pt``) is not lost, and losing a 3-hour run to a dashboard
  hiccup is worse.
* **Status** is ``FINISHED``, ``FAILED`` or ``KILLED`` as it happened, written after the run's
  last metrics; ``finish`` waits at most :data:`FINISH_WAIT_S` for the store. If it is still
  gone, a warning says which steps and which status were not written (MLflow keeps showing the
  run RUNNING: its status is unknown there) and where the local copy is, and the process exits.
  A resumed run goes back to ``RUNNING`` under the same run id (stored in the checkpoint).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Protocol

from rcx.errors import RcxError
from rcx.store.outbox import Operation, Outbox

RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlruns"
# MLflow's limits (mlflow.utils.validation): param values 6000 chars, 100 params/tags per batch,
# 1000 metrics per batch. Kept here so a server with the same limits never rejects a batch.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
TRUNCATION_MARKER = "...[truncated]"
# Reachability check: fail in seconds, not after MLflow's default 5 retries x 120 s.
CHECK_TIMEOUT_S = 5
RUN_HTTP_RETRIES = 2
RUN_HTTP_TIMEOUT_S = 30
#: The longest ``finish`` waits for a store that does not answer to take the run's last writes.
FINISH_WAIT_S = 30.0
#: A write that has had no answer for this long is reported as an outage (a hung server).
STALL_WARN_S = 10.0
# Panels of the end-of-run PNG, in this order: each a tuple of curves drawn together.
PLOT_PANELS: tuple[tuple[str, ...], ...] = (
    ("reward/mean",),
    ("val/accuracy", "val/sampled_accuracy"),
    ("rollout_corr/kl",),
    ("rollout_corr/rollout_is_eff_sample_size",),
    ("rollout_corr/rollout_rs_masked_fraction",),
    ("actor/pg_clipfrac",),
)


class TrackingError(RcxError, RuntimeError):
    """The tracking backend cannot be used; the message says why and what to do."""


class Tracker(Protocol):
    """What the trainer needs from a tracking backend."""

    run_id: str | None

    def describe(self) -> str:
        """One or two lines for the console: where the run is stored and how to view it."""
        ...

    def log_params(self, params: Mapping[str, str]) -> list[str]:
        """Log flattened params; return human-readable notes (e.g. changed values on resume)."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log every metric of one step in one batched call."""
        ...

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a local file (or directory) under ``artifact_path``."""
        ...

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file``."""
        ...

    def finish(self, status: RunStatus) -> None:
        """End the run with ``status``. Idempotent."""
        ...


@dataclass
class NullTracker:
    """Tracker used when ``mlflow`` is not in ``trainer.logger``: accepts everything, stores nothing."""

    run_id: str | None = None

    def describe(self) -> str:
        return 'MLflow tracking off (add "mlflow" to trainer.logger to record this run).'

    def log_params(self, params: Mapping[str, str]) -> list[str]:
        return []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def finish(self, status: RunStatus) -> None:
        pass


# --------------------------------------------------------------------------- store resolution


def mlflow_command() -> str:
    """How a shell runs this Python's MLflow, pasted as is: ``mlflow`` when that is the one on
    ``PATH`` (an activated venv), else the full path of the script next to this interpreter (a
    venv that is not activated), else ``<python> -m mlflow``."""
    script = Path(sys.executable).parent / "mlflow"
    if not script.is_file():
        return f"{shlex.quote(sys.executable)} -m mlflow"
    on_path = shutil.which("mlflow")
    if on_path and Path(on_path).resolve() == script.resolve():
        return "mlflow"
    return shlex.quote(str(script))


def resolve_tracking_uri(tracking_uri: str | None, cwd: Path | None = None) -> str:
    """The store URI a run will use: explicit > ``$MLFLOW_TRACKING_URI`` > ``./mlflow.db``.

    A relative SQLite path is made absolute against ``cwd`` so that the printed location is exact.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_DB_NAME}"
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        db = (cwd or Path.cwd()) / db
        uri = f"sqlite:///{db}"
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI, or None for any other scheme."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    rest = uri[len(prefix) :]
    # sqlite:////abs/path -> "/abs/path"; sqlite:///rel.db -> "rel.db"
    return Path(rest)


def is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


@contextmanager
def _env(**values: str) -> Iterator[None]:
    """Temporarily set environment variables (restored afterwards, even on error)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_reachable(uri: str, timeout_s: int = CHECK_TIMEOUT_S) -> None:
    """Raise :class:`TrackingError` unless the store at ``uri`` answers within ``timeout_s``.

    For ``http(s)`` the server is asked for one experiment with MLflow's HTTP retries disabled;
    for SQLite the database's directory must exist or be creatable and be writable.
    """
    db = sqlite_path(uri)
    if db is not None:
        check_sqlite_store(db)
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"cannot create the MLflow store directory {db.parent}: {exc}"
            ) from exc
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"the MLflow store directory {db.parent} is not writable")
        return
    if not is_http(uri):
        return  # databricks, postgresql, ...: MLflow's own errors are already specific
    from mlflow.tracking import MlflowClient

    with _env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout_s)):
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot use this server"
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise TrackingError(
                f"MLflow tracking server {uri} is not reachable ({first_line[:300]}).\n"
                f"Start it (e.g. `mlflow server --host 127.0.0.1 --port 5000`), fix "
                f"trainer.tracking_uri, or unset it to use the local store ./{DEFAULT_DB_NAME}."
            ) from exc


#: The first bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_store_problem(db: Path) -> str | None:
    """Why the existing path ``db`` cannot be an MLflow SQLite store (a folder, not an SQLite
    file), or None when it can or does not exist yet. Reads 16 bytes: answers in milliseconds,
    where MLflow retries for minutes or fails with a traceback."""
    if db.is_dir():
        return f"the MLflow store {db} is a folder, not an SQLite database file"
    if not db.is_file():
        return None  # absent (created later) or beyond a parent that is not a folder
    try:
        with open(db, "rb") as f:
            header = f.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"the MLflow store {db} cannot be read: {exc}"
    if header and header != SQLITE_HEADER:
        return f"the MLflow store {db} is not an SQLite database (corrupt or another kind of file)"
    return None


def check_sqlite_store(db: Path) -> None:
    """Raise :class:`TrackingError` with :func:`sqlite_store_problem` and what to do."""
    if problem := sqlite_store_problem(db):
        raise TrackingError(
            f"{problem}; move it aside, or point trainer.tracking_uri (--tracking-uri) at "
            f"another store"
        )


def seed_sqlite_store(db: Path) -> None:
    """Create the SQLite store ``db`` as a copy of an empty store at MLflow's current schema.

    The empty store is made once per MLflow version in ``$RCX_CACHE_DIR/mlflow/``, by MLflow's
    own table set-up, with SQLite's per-statement disk sync off (it is a cache: a broken copy is
    caught by MLflow's schema check). Never replaces an existing ``db``: the copy is linked into
    place, which fails if another process made the store first. Any failure leaves ``db`` absent,
    and MLflow then creates it the slow way.
    """
    try:
        template = _empty_store_template()
        scratch = db.with_name(f".{db.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, scratch)
        try:
            os.link(scratch, db)
        except FileExistsError:
            pass
        finally:
            scratch.unlink()
    except Exception:  # noqa: BLE001 - an optimisation only: MLflow's own set-up still works
        return


def _empty_store_template() -> Path:
    """``$RCX_CACHE_DIR/mlflow/empty-<mlflow version>.db``, made if absent."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    from rcx.cache import cache_root

    template = cache_root() / "mlflow" / f"empty-{mlflow.__version__}.db"
    if template.is_file():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    scratch = template.with_name(f".{template.name}.{os.getpid()}.tmp")
    engine = sqlalchemy.create_engine(f"sqlite:///{scratch}")
    sqlalchemy.event.listen(engine, "connect", _no_disk_sync)
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()
    os.replace(scratch, template)
    return template


def _no_disk_sync(connection: Any, _record: Any) -> None:
    connection.execute("PRAGMA synchronous = OFF")


# --------------------------------------------------------------------------- params


def flatten_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config into ``{"a.b.c": "value"}`` with MLflow-safe string values.

    Scalars are rendered as JSON (``null``, ``true``, ``3e-4``) except strings, which stay bare;
    lists are JSON. Values longer than :data:`MAX_PARAM_VALUE_LENGTH` are truncated and end with
    :data:`TRUNCATION_MARKER`.
    """
    from rcx.config.loading import flatten_tree

    flat: dict[str, str] = {}
    for name, value in flatten_tree(tree, prefix).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_VALUE_LENGTH:
            text = text[: MAX_PARAM_VALUE_LENGTH - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
        flat[name] = text
    return flat


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- MLflow


@dataclass
class MlflowTracker:
    """One MLflow run, driven through an ``MlflowClient`` in the tracking process (a
    :class:`~rcx.store.tracking_process.RemoteClient`; no global ``mlflow.start_run`` state).

    Build it with :meth:`start`; ``resumed`` tells whether an existing run was reopened.
    """

    uri: str
    run_id: str
    experiment_id: str
    resumed: bool = False
    _client: Any = field(default=None, repr=False)
    #: The folder that keeps the run's history when the store does not (the checkpoint folder).
    local_copy: Path | None = None
    _finished: bool = False
    _warned: bool = False
    _warned_outage: bool = False
    _outbox: Outbox = field(default_factory=Outbox, repr=False)
    #: A reopened run's status and end time before this invocation (see :meth:`abandon`).
    previous_status: str | None = None
    previous_end_time: int | None = None

    @classmethod
    def start(
        cls,
        *,
        experiment: str,
        run_name: str,
        tracking_uri: str | None = None,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
        local_copy: Path | None = None,
    ) -> MlflowTracker:
        """Open a run: reopen ``resume_run_id`` if it exists in this store, else create one.
        ``local_copy`` is where the run's history is kept locally, named when the store is lost.

        Raises :class:`TrackingError` if the store cannot be reached or the run cannot be made.
        """
        uri = resolve_tracking_uri(tracking_uri)
        from rcx.store.tracking_process import RemoteClient, shared_process

        client = RemoteClient(shared_process(), uri)
        info = client.open_run(experiment, run_name, resume_run_id, parent_run_id, tags)
        tracker = cls(
            uri, info["run_id"], info["experiment_id"], info["resumed"], client, local_copy
        )
        tracker.previous_status = info["previous_status"]
        tracker.previous_end_time = info["previous_end_time"]
        return tracker

    def describe(self) -> str:
        db = sqlite_path(self.uri)
        verb = "resumed" if self.resumed else "run"
        if db is not None:
            view = (
                f"cd {shlex.quote(str(db.parent))} && {mlflow_command()} ui "
                f"--backend-store-uri {shlex.quote(f'sqlite:///{db.name}')}"
            )
            where = f"{db} (artifacts in {db.parent / DEFAULT_ARTIFACT_DIR})"
        else:
            view = f"open {self.uri}"
            where = self.uri
        return f"MLflow {verb} {self.run_id} in {where}\n  view: {view}"

    def log_params(self, params: Mapping[str, str]) -> list[str]:
        existing = self._client.get_params(self.run_id) if self.resumed else {}
        new = [(k, v) for k, v in params.items() if k not in existing]
        changed = [
            f"{k}: {existing[k]} -> {v}"
            for k, v in params.items()
            if k in existing and existing[k] != v
        ]
        for chunk in _chunks(new, MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=list(chunk))
        truncated = [k for k, v in params.items() if v.endswith(TRUNCATION_MARKER)]
        tags = []
        if changed:
            tags.append(("rcx.resume.changed_params", "\n".join(changed)[:8000]))
        if truncated:
            tags.append(("rcx.truncated_params", ",".join(truncated)[:8000]))
        if tags:
            self._client.log_batch(self.run_id, tags=tags)
        return [f"param changed on resume (kept the first value in MLflow): {c}" for c in changed]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue the step's metrics for the background writer; returns without waiting."""
        from rcx.store.tracking_process import MetricValue

        now_ms = int(time.time() * 1000)
        entries = [
            MetricValue(k, float(v), now_ms, step) for k, v in metrics.items() if _is_number(v)
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            send = partial(self._client.log_batch, self.run_id, metrics=list(chunk))
            self._outbox.put(Operation(f"metrics of step {step}", send, step, len(chunk)))
        self._report_writer_state()

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Queue the upload of the file (or folder) ``path``; it must stay in place until the run
        ends."""
        upload = self._client.log_artifacts if Path(path).is_dir() else self._client.log_artifact
        send = partial(upload, self.run_id, str(path), artifact_path)
        self._outbox.put(Operation(f"artifact upload of {path}", send))
        self._report_writer_state()

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue ``text`` as the artifact ``artifact_file``."""
        send = partial(self._client.log_text, self.run_id, text, artifact_file)
        self._outbox.put(Operation(f"artifact {artifact_file}", send))
        self._report_writer_state()

    def finish(self, status: RunStatus) -> None:
        """Write ``status`` after every queued write, waiting at most :data:`FINISH_WAIT_S` for
        the store; if it does not answer by then, warn what was not written and return.
        Idempotent."""
        if self._finished:
            return
        self._finished = True
        self._end_run(status, end_time=None)

    def _end_run(self, status: str, end_time: int | None) -> None:
        """Queue the final status and wait for the outbox; warn about what it could not write."""
        send = partial(self._client.set_terminated, self.run_id, status=status, end_time=end_time)
        terminate = Operation(f"status {status}", send)
        self._outbox.put(terminate, essential=True)
        try:
            drained = self._outbox.flush(FINISH_WAIT_S)
        except KeyboardInterrupt:  # Ctrl-C while waiting: stop waiting, say what is missing
            drained = False
        unwritten = self._outbox.close()
        self._warned_outage = True  # the message below says it, if the store is still away
        self._report_rejections(terminate)
        if not drained:
            warnings.warn(self._unwritten_message(status, unwritten), stacklevel=3)

    def _report_writer_state(self) -> None:
        """Warn once when the store stops answering, and once about refused writes and steps
        dropped because the buffer was full."""
        outbox = self._outbox
        if not self._warned_outage and (
            outbox.failure is not None or outbox.stalled_s() > STALL_WARN_S
        ):
            self._warned_outage = True
            why = (
                _first_line(outbox.failure)
                if outbox.failure is not None
                else f"no answer for {STALL_WARN_S:g} s"
            )
            warnings.warn(
                f"MLflow store {self.uri} is not answering ({why}); training continues: its "
                f"writes are kept in memory and retried in the background",
                stacklevel=3,
            )
        if outbox.dropped:
            self._warn_once(
                f"MLflow store {self.uri} has been away too long: the writer's buffer is full, "
                f"the {outbox.first_dropped} and later writes that do not fit are dropped"
            )
        if outbox.rejected:
            first = outbox.rejected[0]
            self._warn_once(f"MLflow {first.operation.what} failed: {_first_line(first.error)}")

    def _report_rejections(self, terminate: Operation) -> None:
        """Warn about refused writes: the final status above all, else the first one."""
        for rejection in self._outbox.rejected:
            if rejection.operation is terminate:
                warnings.warn(
                    f"could not mark MLflow run {self.run_id} "
                    f"{terminate.what.removeprefix('status ')}: {_first_line(rejection.error)}",
                    stacklevel=4,
                )
                return
        self._report_writer_state()

    def _unwritten_message(self, status: str, unwritten: Sequence[Operation]) -> str:
        """What the store did not receive, how MLflow shows the run, and where the copy is."""
        last = self._outbox.last_written_step
        steps = "its metrics" if last is None else f"its metrics after step {last}"
        if dropped := self._outbox.dropped:
            steps += f" ({dropped} writes dropped when the buffer was full)"
        where = (
            f"{self.local_copy} (state.pt of each checkpoint there holds the full history)"
            if self.local_copy is not None
            else "the checkpoint folder (state.pt of each checkpoint holds the full history)"
        )
        reason = _first_line(self._outbox.failure) if self._outbox.failure else "no answer"
        return (
            f"MLflow store {self.uri} did not answer within {FINISH_WAIT_S:g} s ({reason}): "
            f"for run {self.run_id}, {steps} and its final status {status} could not be written "
            f"({len(unwritten)} writes lost). MLflow will show the run as RUNNING: its status is "
            f"unknown there. The local copy is in {where}."
        )

    def abandon(self, status: RunStatus = "FAILED") -> None:
        """End an invocation that failed before training: a reopened run gets back the status
        and end time it had (a run left RUNNING by a hard kill becomes KILLED); a run this
        invocation created ends with ``status``. Idempotent."""
        if not self.resumed or self.previous_status is None:
            self.finish(status)
            return
        if self._finished:
            return
        self._finished = True
        previous = "KILLED" if self.previous_status == "RUNNING" else self.previous_status
        self._end_run(previous, end_time=self.previous_end_time)

    def last_logged_step(self, keys: Sequence[str]) -> int:
        """The highest step at which this (reopened) run logged any of ``keys``; -1 if none."""
        if not self.resumed:
            return -1
        steps = [-1]
        try:
            for key in keys:
                steps += self._client.metric_steps(self.run_id, key)
        except Exception as exc:  # noqa: BLE001 - then replayed steps may be logged twice
            self._warn_once(f"could not read the logged steps of run {self.run_id}: {exc}")
        return max(steps)

    def set_tag(self, key: str, value: str) -> None:
        """Set a tag on this run."""
        self._client.set_tag(self.run_id, key, value)

    def end_child_run(
        self,
        run_name: str,
        status: RunStatus,
        *,
        run_id: str | None = None,
        error: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """End the child run ``run_id`` (else the one named ``run_name``, else a new one with
        ``tags``) with ``status``, recording ``error`` as a tag and as ``error.txt``; its id."""
        client = self._client
        run_id = run_id or self._find_child(run_name)
        if run_id is None:
            child_tags = {"mlflow.parentRunId": self.run_id, **(tags or {})}
            run_id = client.create_run(self.experiment_id, run_name, child_tags)
        if error:
            client.set_tag(run_id, "rcx.error", error[:4900])
            client.log_text(run_id, error, "error.txt")
        client.set_terminated(run_id, status=status)
        return run_id

    def delete_run_tag(self, run_id: str, key: str) -> None:
        """Drop the tag ``key`` of the run ``run_id`` (a child, typically) if it has one."""
        if key in self._client.get_tags(run_id):
            self._client.delete_tag(run_id, key)

    def _find_child(self, run_name: str) -> str | None:
        return self._client.find_child(self.experiment_id, self.run_id, run_name)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message + " (further tracking errors are not repeated)", stacklevel=3)


def abandon(tracker: Any, status: RunStatus = "FAILED") -> None:
    """End ``tracker``'s run after a failure before training started without changing the status
    of a run it reopened (``tracker.abandon`` where it has one, else ``finish(status)``)."""
    method = getattr(tracker, "abandon", None)
    if method is not None:
        method(status)
    else:
        tracker.finish(status)


def _first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type when empty), at most 300 characters."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _get_or_create_experiment(client: Any, name: str, uri: str) -> str:
    """Experiment id for ``name``; new SQLite experiments keep artifacts beside the database."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    db = sqlite_path(uri)
    location = (db.parent / DEFAULT_ARTIFACT_DIR).as_uri() if db is not None else None
    return client.create_experiment(name, artifact_location=location)


# --------------------------------------------------------------------------- entry points


def prestart_tracking(tracking_uri: str | None, project_name: str) -> None:
    """Start the MLflow process of :class:`MlflowTracker` now and have it open the store, so
    that it loads while this process imports torch (:mod:`rcx.store.tracking_process`)."""
    from rcx.store.tracking_process import prestart

    prestart(resolve_tracking_uri(tracking_uri), project_name)


def open_tracker(
    *,
    logger: Sequence[str],
    project_name: str,
    experiment_name: str,
    tracking_uri: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    local_copy: Path | None = None,
) -> Tracker:
    """An :class:`MlflowTracker` if ``"mlflow"`` is in ``logger``, else a :class:`NullTracker`.
    ``local_copy``: the folder that keeps the run's history (named if the store is lost)."""
    if "mlflow" not in logger:
        return NullTracker()
    return MlflowTracker.start(
        experiment=project_name,
        run_name=experiment_name,
        tracking_uri=tracking_uri,
        resume_run_id=resume_run_id,
        parent_run_id=parent_run_id,
        tags=tags,
        local_copy=local_copy,
    )


def plot_history(history: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path | None:
    """Draw the :data:`PLOT_PANELS` curves present in ``history`` (key -> [(step, value)]) as a
    PNG, one panel per group. Returns the path written, or None when none of the keys was logged.
    Uses the Agg backend, so it works without a display.
    """
    panels = [[k for k in panel if history.get(k)] for panel in PLOT_PANELS]
    panels = [keys for keys in panels if keys]
    if not panels:
        return None
    from rcx.store.plots import panel_grid, plot_curve, save_figure

    fig, axes = panel_grid(len(panels))
    for ax, keys in zip(axes, panels, strict=True):
        for key in keys:
            plot_curve(ax, history[key], key)
        ax.set_title(", ".join(keys), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    return save_figure(fig, path)
