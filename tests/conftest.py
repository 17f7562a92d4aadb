"""Shared fixtures: one MLflow store per test session, and real configs shrunk to seconds.

The SQLite store is created once per session (each new database costs ~2 s of migrations);
tests keep apart by run name. ``tiny_config`` loads a real preset through the same loader as
``rcx train`` and overrides only what makes it small: 2 steps on CPU, tiny batches, no warm
start, no periodic validation/checkpoint, everything written under ``tmp_path``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere
# W&B never reaches a server from the tests, whatever the caller's environment says.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

import importlib.util
import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

_run_counter = itertools.count()

#: Overrides that shrink any preset to a few seconds on one CPU core.
TINY_OVERRIDES: tuple[str, ...] = (
    "trainer.total_training_steps=2",
    "trainer.device=cpu",
    "trainer.num_threads=1",
    "trainer.test_freq=0",
    "trainer.save_freq=0",
    "trainer.val_before_train=true",
    'trainer.logger=["mlflow"]',
    "trainer.project_name=rcx-tests",
    "actor_rollout_ref.model.warm_start_steps=0",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
    "data.train_batch_size=4",
    "data.val_batch_size=8",
    "data.builtin.num_train=64",
    "data.builtin.num_val=8",
)


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``sqlite:///…/mlflow.db``: one store for the whole session (artifacts in ``mlruns/`` beside it)."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    return f"sqlite:///{db}"


@pytest.fixture
def runs_named(mlflow_uri: str) -> Callable[[str], list]:
    """``runs_named(name)``: the MLflow runs called ``name`` in the tests' experiment
    (``trainer.project_name=rcx-tests`` of :func:`tiny_config`), [] when it has none yet."""
    from mlflow.tracking import MlflowClient

    def find(name: str) -> list:
        client = MlflowClient(tracking_uri=mlflow_uri)
        experiment = client.get_experiment_by_name("rcx-tests")
        if experiment is None:
            return []
        return client.search_runs(
            [experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'"
        )

    return find


@pytest.fixture
def run_name(request: pytest.FixtureRequest) -> str:
    """A run name unique within the session, readable in ``mlflow ui``."""
    return f"{request.node.name[:60]}-{next(_run_counter)}"


#: A reward that varies within every group even for an untrained model (the response length),
#: so that advantages, gradients and parameter updates are non-zero from the first step.
LENGTH_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    return len(solution_str) / 8.0
"""


@pytest.fixture
def tiny_config(
    tmp_path: Path, mlflow_uri: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> Callable[..., object]:
    """``make(preset, *overrides)`` -> a validated ``RcxConfig`` that trains in seconds.

    The working directory is ``tmp_path`` (so nothing lands in the repository); checkpoints go
    to ``tmp_path/ckpt``; the run logs to the session store under a unique run name. The reward
    is :data:`LENGTH_REWARD` (an untrained model never solves the task, so the task's own reward
    would give zero advantages). Extra ``KEY=VALUE`` overrides win over the shrinking ones.
    """
    from rcx.config import load_config

    monkeypatch.chdir(tmp_path)
    reward = tmp_path / "length_reward.py"
    reward.write_text(LENGTH_REWARD)

    def make(preset: str | None = "grpo-multi-rs", *overrides: str) -> object:
        base = (
            *TINY_OVERRIDES,
            f"trainer.experiment_name={run_name}",
            f"trainer.tracking_uri={mlflow_uri}",
            f"trainer.default_local_dir={tmp_path / 'ckpt'}",
            f"custom_reward_function.path={reward}",
        )
        return load_config(preset=preset, overrides=[*base, *overrides])

    return make


BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench_script(name: str) -> Iterator[ModuleType]:
    """Import ``bench/<name>.py`` as module ``name`` for the duration of a fixture."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="session")
def bench_script() -> Callable[[str], Iterator[ModuleType]]:
    """``yield from bench_script("name")`` in a fixture imports ``bench/name.py`` for its scope."""
    return load_bench_script
