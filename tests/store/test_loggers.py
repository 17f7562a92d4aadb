"""The optional loggers: TensorBoard and W&B beside MLflow, and the error when one is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from rcx.config import validate_sources
from rcx.store import loggers
from rcx.store.loggers import (
    MultiTracker,
    TensorBoardTracker,
    WandbTracker,
    missing_packages,
    wandb_mode,
    with_loggers,
)
from rcx.store.tracking import NullTracker, TrackingError

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
needs_tensorboard = pytest.mark.skipif(
    not HAS_TENSORBOARD, reason="tensorboard not installed (pip install 'rcx[tensorboard]')"
)
needs_wandb = pytest.mark.skipif(
    not HAS_WANDB, reason="wandb not installed (pip install 'rcx[wandb]')"
)
SEED_LINES = (
    'trainer.logger=["console","wandb"]',
    'trainer.logger=["console","wandb","tensorboard"]',
)


@pytest.fixture
def without(monkeypatch: pytest.MonkeyPatch):
    """``without("wandb")``: the package looks absent to find_spec and fails to import."""

    def hide(*modules: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(
            loggers.importlib.util,
            "find_spec",
            lambda name, *a: None if name in modules else real(name, *a),
        )
        for name in modules:
            monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError

    return hide


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# ----------------------------------------------------------------------------- validate


@pytest.mark.skipif(not (HAS_WANDB and HAS_TENSORBOARD), reason="needs both extras installed")
@pytest.mark.parametrize("line", SEED_LINES)
def test_the_seed_logger_lines_validate(line: str) -> None:
    report = validate_sources(overrides=[line])
    assert report.valid, report.findings
    assert report.config is not None
    assert "wandb" in report.config.trainer.logger


def test_unknown_logger_is_still_refused() -> None:
    report = validate_sources(overrides=['trainer.logger=["console","neptune"]'])
    assert [f.code for f in report.errors] == ["RCX-E009"]


@pytest.mark.parametrize(("hidden", "extra"), [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_package_is_one_validate_error_naming_the_extra(without, hidden, extra) -> None:
    without(hidden)
    report = validate_sources(overrides=[SEED_LINES[1]])
    errors = [f for f in report.errors if f.code == "RCX-E014"]
    assert len(errors) == 1, report.findings
    assert errors[0].path == "trainer.logger"
    assert f"pip install 'rcx[{extra}]'" in errors[0].message
    assert "\n" not in errors[0].message


def test_missing_packages_looks_only_at_selected_loggers(without) -> None:
    without("wandb", "tensorboard")
    assert missing_packages(["console", "mlflow"]) == []
    assert missing_packages(["tensorboard", "wandb"]) == ["tensorboard", "wandb"]


def test_wandb_is_offline_unless_the_environment_says_otherwise(monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


# ----------------------------------------------------------------------------- at start


def test_with_loggers_refuses_a_missing_package(without, tmp_path: Path) -> None:
    without("tensorboard")
    with pytest.raises(TrackingError, match=r"pip install 'rcx\[tensorboard\]'"):
        with_loggers(NullTracker(), ["tensorboard"], run_dir=tmp_path, project="p", run_name="r")
    assert not (tmp_path / "tensorboard").exists()


def test_a_failing_import_names_the_extra_too(tmp_path: Path, monkeypatch) -> None:
    """find_spec finds the package but importing it fails (a broken install)."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingError, match=r"pip install 'rcx\[wandb\]'"):
        WandbTracker.start(tmp_path, project="p", run_name="r", run_id=None)


def test_trainer_refuses_to_start_before_any_run_is_opened(
    without, tiny_config, mlflow_uri: str, run_name: str
) -> None:
    from rich.console import Console

    from rcx.train.trainer import Trainer

    cfg = tiny_config("grpo-multi-rs", 'trainer.logger=["mlflow","wandb"]')
    without("wandb")
    with pytest.raises(TrackingError, match=r"pip install 'rcx\[wandb\]'"):
        Trainer(cfg, console=Console(quiet=True))
    client = MlflowClient(tracking_uri=mlflow_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"attributes.run_name = '{run_name}'")
    assert runs == []


# ----------------------------------------------------------------------------- composition


class Recorder:
    """A tracker that records every call."""

    def __init__(self, name: str, run_id: str | None = None) -> None:
        self.name, self.run_id, self.calls = name, run_id, []

    def describe(self) -> str:
        return f"{self.name} here"

    def log_params(self, params):
        self.calls.append(("params", dict(params)))
        return [f"{self.name} note"]

    def log_metrics(self, metrics, step):
        self.calls.append(("metrics", dict(metrics), step))

    def log_artifact(self, path, artifact_path=None):
        self.calls.append(("artifact", path))

    def log_text(self, text, artifact_file):
        self.calls.append(("text", artifact_file))

    def finish(self, status):
        self.calls.append(("finish", status))


def test_multi_tracker_feeds_params_and_metrics_to_all_artifacts_to_the_primary() -> None:
    primary, extra = Recorder("mlflow", run_id="abc"), Recorder("tb")
    multi = MultiTracker(primary, [extra])
    assert multi.run_id == "abc"
    assert multi.log_params({"a": "1"}) == ["mlflow note"]  # the primary's notes only
    multi.log_metrics({"m": 0.5}, step=3)
    multi.log_text("x", "config.yaml")
    multi.log_artifact(Path("p.png"))
    multi.finish("FINISHED")
    assert extra.calls == [
        ("params", {"a": "1"}),
        ("metrics", {"m": 0.5}, 3),
        ("finish", "FINISHED"),
    ]
    assert [c[0] for c in primary.calls] == ["params", "metrics", "text", "artifact", "finish"]
    assert multi.describe() == "mlflow here\ntb here"


def test_without_optional_loggers_the_primary_is_returned_as_is(tmp_path: Path) -> None:
    primary = NullTracker()
    assert (
        with_loggers(primary, ["console", "mlflow"], run_dir=tmp_path, project="p", run_name="r")
        is primary
    )


# ----------------------------------------------------------------------------- real backends


@needs_tensorboard
def test_tensorboard_tracker_writes_scalars_that_read_back(tmp_path: Path) -> None:
    tracker = TensorBoardTracker.start(tmp_path / "tb")
    tracker.log_params({"trainer.seed": "1"})
    tracker.log_metrics({"reward/mean": 0.25}, step=1)
    tracker.log_metrics({"reward/mean": 0.5}, step=2)
    tracker.finish("FINISHED")
    tracker.finish("FINISHED")  # idempotent
    assert scalars(tmp_path / "tb", "reward/mean") == [(1, 0.25), (2, 0.5)]
    assert "tensorboard --logdir" in tracker.describe()


@needs_tensorboard
@needs_wandb
def test_tiny_run_writes_tensorboard_events_and_an_offline_wandb_run(
    tiny_config, tmp_path: Path, monkeypatch
) -> None:
    from rcx.train.trainer import train

    monkeypatch.setenv("WANDB_MODE", "offline")  # conftest sets it too: never a server here
    cfg = tiny_config("grpo-multi-rs", 'trainer.logger=["mlflow","tensorboard","wandb"]')
    result = train(cfg)
    assert result.status == "FINISHED"
    run_dir = tmp_path / "ckpt"
    steps = [s for s, _ in scalars(run_dir / "tensorboard", "reward/mean")]
    assert steps == [1, 2]
    assert [s for s, _ in scalars(run_dir / "tensorboard", "val/accuracy")] == [0, 2]
    offline = list((run_dir / "wandb").glob(f"offline-run-*-{result.run_id}"))
    assert len(offline) == 1, list((run_dir / "wandb").iterdir())
    assert list(offline[0].glob("*.wandb")), "no W&B data file in the offline run"
    assert not list((run_dir / "wandb").glob("run-*")), "an online run directory was created"
