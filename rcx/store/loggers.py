"""The optional loggers of ``trainer.logger``: TensorBoard and Weights & Biases, beside MLflow.

MLflow stays the primary tracker (:mod:`rcx.store.tracking`): it owns the run id, resume and
sweeps. ``tensorboard`` and ``wandb`` are extra :class:`~rcx.store.tracking.Tracker` backends
that receive the same params and metrics; :func:`with_loggers` composes them with the primary::

    tracker = with_loggers(open_tracker(...), logger, run_dir=..., project=..., run_name=...)

Decisions:

* **Optional packages.** Each backend's package is an extra (``pip install 'rcx[tensorboard]'``,
  ``'rcx[wandb]'``) and is imported only when the backend is selected. :func:`missing_packages`
  finds an absent one without importing anything (``importlib.util.find_spec``), so ``rcx
  validate`` reports it (RCX-E014) and the trainer refuses to start before any run is opened.
* **Where.** Both write under the run folder (the checkpoint folder,
  ``checkpoints/<project_name>/<experiment_name>`` by default): TensorBoard event files in
  ``tensorboard/``, W&B's run directory in ``wandb/``.
* **W&B offline by default.** No account and no network: ``mode`` is ``$WANDB_MODE`` if set,
  else ``offline`` (``wandb sync <dir>`` uploads later; ``WANDB_MODE=online`` logs live). The
  W&B run id is the MLflow run id when there is one, so the two name the same run.
* **What each receives.** Params (the flattened config) and every step's metrics. Artifacts and
  texts (config.yaml, plots, dumps) stay with MLflow. A backend's failure mid-run warns once and
  training continues, as for MLflow.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcx.store.tracking import RunStatus, Tracker, TrackingError, abandon, open_tracker

#: Logger name -> (the module it needs, the rcx extra that installs it).
OPTIONAL_LOGGERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
}
TENSORBOARD_DIR = "tensorboard"
#: Default W&B mode when ``$WANDB_MODE`` is unset: no account, no network.
WANDB_DEFAULT_MODE = "offline"


def wandb_mode() -> str:
    """``$WANDB_MODE`` if set, else :data:`WANDB_DEFAULT_MODE` (offline)."""
    return os.environ.get("WANDB_MODE") or WANDB_DEFAULT_MODE


def missing_package_message(logger: str) -> str:
    """One line: the logger, the package it lacks and the command that installs it."""
    module, extra = OPTIONAL_LOGGERS[logger]
    return (
        f"trainer.logger has {logger!r} but the {module} package is not installed: "
        f"pip install 'rcx[{extra}]'"
    )


def missing_packages(logger: Sequence[str]) -> list[str]:
    """The selected optional loggers whose package cannot be found (nothing is imported)."""
    return [
        name
        for name in logger
        if name in OPTIONAL_LOGGERS and importlib.util.find_spec(OPTIONAL_LOGGERS[name][0]) is None
    ]


def require_packages(logger: Sequence[str]) -> None:
    """Raise :class:`TrackingError` naming the extra to install if a selected logger's package
    is missing."""
    if missing := missing_packages(logger):
        raise TrackingError("\n".join(missing_package_message(name) for name in missing))


def with_loggers(
    primary: Tracker,
    logger: Sequence[str],
    *,
    run_dir: Path,
    project: str,
    run_name: str,
) -> Tracker:
    """``primary`` alone, or composed with the TensorBoard / W&B trackers ``logger`` selects.

    Raises :class:`TrackingError` if a selected backend's package is missing or cannot start;
    the caller owns ``primary`` (and finishes it) in that case.
    """
    require_packages(logger)
    extras: list[Tracker] = []
    try:
        if "tensorboard" in logger:
            extras.append(TensorBoardTracker.start(run_dir / TENSORBOARD_DIR))
        if "wandb" in logger:
            extras.append(
                WandbTracker.start(
                    run_dir, project=project, run_name=run_name, run_id=primary.run_id
                )
            )
    except BaseException:
        for tracker in extras:
            tracker.finish("FAILED")
        raise
    return MultiTracker(primary, extras) if extras else primary


def _import_error(logger: str, exc: ImportError) -> TrackingError:
    return TrackingError(f"{missing_package_message(logger)} ({exc})")


@dataclass
class _WarnOnce:
    """Mid-run failures of a backend warn once and training continues."""

    _warned: bool = field(default=False, init=False, repr=False)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message + " (further errors are not repeated)", stacklevel=3)


@dataclass
class TensorBoardTracker(_WarnOnce):
    """Scalars in TensorBoard event files under ``log_dir``; params as one text summary."""

    log_dir: Path
    _writer: Any = field(default=None, repr=False)
    run_id: str | None = None

    @classmethod
    def start(cls, log_dir: Path) -> TensorBoardTracker:
        """Open an event-file writer in ``log_dir`` (created); a resumed run appends a file."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise _import_error("tensorboard", exc) from exc
        log_dir.mkdir(parents=True, exist_ok=True)
        return cls(log_dir, SummaryWriter(log_dir=str(log_dir)))

    def describe(self) -> str:
        return f"TensorBoard event files in {self.log_dir}\n  view: tensorboard --logdir {self.log_dir}"

    def log_params(self, params: Mapping[str, str]) -> list[str]:
        table = "\n".join(["| param | value |", "|---|---|"])
        rows = "\n".join(f"| {k} | {v.replace('|', '/')} |" for k, v in params.items())
        self._guard(lambda: self._writer.add_text("params", f"{table}\n{rows}", 0), "params")
        return []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        def write() -> None:
            for key, value in metrics.items():
                self._writer.add_scalar(key, float(value), step)

        self._guard(write, f"step {step}")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass  # artifacts stay with MLflow

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def finish(self, status: RunStatus) -> None:
        """Flush and close the event file. Idempotent."""
        self._guard(self._writer.close if self._writer else None, "close")
        self._writer = None

    def _guard(self, action: Any, what: str) -> None:
        if action is None or self._writer is None:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a dashboard must not stop training
            self._warn_once(f"TensorBoard logging failed ({what}): {exc}")


@dataclass
class WandbTracker(_WarnOnce):
    """A W&B run in ``<run_dir>/wandb/``, offline unless ``$WANDB_MODE`` says otherwise."""

    where: Path  # the run's own directory, <run_dir>/wandb/<mode>-run-<time>-<id>
    mode: str
    _run: Any = field(default=None, repr=False)
    run_id: str | None = None

    @classmethod
    def start(
        cls, run_dir: Path, *, project: str, run_name: str, run_id: str | None
    ) -> WandbTracker:
        """Start the W&B run (id ``run_id`` when given, resumed if it exists)."""
        try:
            import wandb
        except ImportError as exc:
            raise _import_error("wandb", exc) from exc
        mode = wandb_mode()
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(
                project=project,
                name=run_name,
                id=run_id,
                resume="allow" if run_id else None,
                dir=str(run_dir),
                mode=mode,
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
            )
        except Exception as exc:  # noqa: BLE001 - W&B's errors vary; report them as one kind
            raise TrackingError(f"W&B could not start a run ({mode} mode): {exc}") from exc
        files = Path(run.dir)  # <run directory>/files
        return cls(files.parent if files.name == "files" else files, mode, run)

    def describe(self) -> str:
        if self.mode == "offline":
            return f"W&B offline run in {self.where}\n  upload: wandb sync {self.where}"
        return f"W&B {self.mode} run in {self.where}"

    def log_params(self, params: Mapping[str, str]) -> list[str]:
        self._guard(lambda: self._run.config.update(dict(params), allow_val_change=True), "params")
        return []

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        data = {k: float(v) for k, v in metrics.items()}
        self._guard(lambda: self._run.log(data, step=step), f"step {step}")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass  # artifacts stay with MLflow

    def log_text(self, text: str, artifact_file: str) -> None:
        pass

    def finish(self, status: RunStatus) -> None:
        """End the W&B run (exit code 0 when FINISHED, else 1). Idempotent."""
        if self._run is not None:
            run, self._run = self._run, None
            code = 0 if status == "FINISHED" else 1
            try:
                run.finish(exit_code=code)
            except Exception as exc:  # noqa: BLE001
                self._warn_once(f"W&B could not finish the run: {exc}")

    def _guard(self, action: Any, what: str) -> None:
        if self._run is None:
            return
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - a dashboard must not stop training
            self._warn_once(f"W&B logging failed ({what}): {exc}")


@dataclass
class MultiTracker:
    """The primary tracker and the extra loggers, fed the same params and metrics.

    The run id, the notes of :meth:`log_params`, artifacts and texts are the primary's.
    """

    primary: Tracker
    extras: list[Tracker]

    @property
    def run_id(self) -> str | None:
        return self.primary.run_id

    def describe(self) -> str:
        return "\n".join(t.describe() for t in (self.primary, *self.extras))

    def log_params(self, params: Mapping[str, str]) -> list[str]:
        notes = self.primary.log_params(params)
        for tracker in self.extras:
            tracker.log_params(params)
        return notes

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for tracker in (self.primary, *self.extras):
            tracker.log_metrics(metrics, step)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.primary.log_artifact(path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.primary.log_text(text, artifact_file)

    def finish(self, status: RunStatus) -> None:
        """Finish the extras, then the primary (each idempotent)."""
        for tracker in (*self.extras, self.primary):
            tracker.finish(status)

    def abandon(self, status: RunStatus = "FAILED") -> None:
        """Finish the extras with ``status``; the primary keeps a reopened run's status."""
        for tracker in self.extras:
            tracker.finish(status)
        abandon(self.primary, status)

    def last_logged_step(self, keys: Sequence[str]) -> int:
        """The primary's highest logged step (-1 without one that can tell)."""
        query = getattr(self.primary, "last_logged_step", None)
        return -1 if query is None else query(keys)


def open_trackers(
    logger: Sequence[str],
    *,
    project_name: str,
    experiment_name: str,
    tracking_uri: str | None,
    run_dir: Path,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Tracker:
    """The run's trackers: MLflow (or nothing) composed with the optional loggers of
    ``trainer.logger``. A missing logger package is an error before any run is opened; a logger
    that fails to start marks the MLflow run FAILED."""
    require_packages(logger)
    primary = open_tracker(
        logger=logger,
        project_name=project_name,
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
        resume_run_id=resume_run_id,
        parent_run_id=parent_run_id,
        tags=tags,
        local_copy=run_dir,
    )
    try:
        return with_loggers(
            primary, logger, run_dir=run_dir, project=project_name, run_name=experiment_name
        )
    except BaseException:
        abandon(primary)  # a reopened run keeps its status: this invocation never trained
        raise
