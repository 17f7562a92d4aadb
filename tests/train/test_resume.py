"""Resume that never lies: the folder lock, config changes on resume, finished runs, corrupt
checkpoints, the MLflow run of a run killed before its first checkpoint, resume_mode=disable."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from rcx.config.yamlio import dump_yaml
from rcx.store.checkpoint import CONFIG_FILE, list_checkpoints
from rcx.store.lock import LOCK_FILE, FolderLock, FolderLockedError
from rcx.train import trainer as trainer_mod
from rcx.train.resume import (
    RUN_FILE,
    AlreadyCompleteError,
    ResumeConfigError,
    apply_optim_config,
    check_resume_config,
    read_run_file,
)
from rcx.train.setup import make_optimizer
from rcx.train.trainer import train


def _steps(client: MlflowClient, run_id: str, key: str = "timing/step") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _status(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


# ----------------------------------------------------------------------------- fast: no training


def test_a_second_trainer_on_a_locked_folder_is_refused_before_any_run_opens(
    tiny_config, mlflow_uri: str, runs_named
) -> None:
    cfg = tiny_config("grpo-rs-only")
    held = FolderLock(Path(cfg.trainer.default_local_dir))
    held.acquire()  # a live holder: this process
    try:
        with pytest.raises(FolderLockedError) as info:
            train(cfg, console=Console(quiet=True))
    finally:
        held.release()
    assert f"PID {os.getpid()}" in str(info.value)
    assert cfg.trainer.default_local_dir in str(info.value)
    assert runs_named(cfg.trainer.experiment_name) == []


def _fake_checkpoint(tmp_path: Path, cfg) -> Path:
    path = tmp_path / "global_step_3"
    path.mkdir()
    (path / CONFIG_FILE).write_text(dump_yaml(cfg.model_dump(mode="json")))
    return path


def test_resume_may_change_the_optimiser_logging_and_length(tiny_config, tmp_path: Path) -> None:
    saved = _fake_checkpoint(tmp_path, tiny_config("grpo-multi-rs"))
    cfg = tiny_config(
        "grpo-multi-rs",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "trainer.total_training_steps=9",
        "trainer.dump_log_probs=true",
        'trainer.logger=["console"]',
    )
    changes = {c.key: (c.old, c.new) for c in check_resume_config(cfg, saved)}
    assert changes == {
        "actor_rollout_ref.actor.optim.lr": (0.0001, 0.001),
        "trainer.total_training_steps": (2, 9),
        "trainer.dump_log_probs": (False, True),
        "trainer.logger": (["mlflow"], ["console"]),
    }


@pytest.mark.parametrize(
    "override",
    [
        "actor_rollout_ref.rollout.n=2",
        "data.train_batch_size=8",
        "data.max_response_length=4",
        "trainer.seed=7",
        "algorithm.adv_estimator=rloo",
        "algorithm.rollout_correction.rollout_is=sequence",
        "actor_rollout_ref.model.path=builtin:other",
    ],
)
def test_resume_refuses_a_change_of_model_task_batch_or_correction(
    override: str, tiny_config, tmp_path: Path
) -> None:
    saved = _fake_checkpoint(tmp_path, tiny_config("grpo-multi-rs"))
    key = override.split("=")[0]
    with pytest.raises(ResumeConfigError, match=rf"{key}: .* -> ") as info:
        check_resume_config(tiny_config("grpo-multi-rs", override), saved)
    assert "\n" not in str(info.value) and str(saved) in str(info.value)


def test_a_changed_lr_is_applied_after_the_optimizer_state_is_restored() -> None:
    from rcx.config.models import OptimConfig

    params = [torch.nn.Parameter(torch.ones(2))]
    optimizer, scheduler = make_optimizer(params, OptimConfig(lr=3e-4, lr_warmup_steps=4))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    state = (optimizer.state_dict(), scheduler.state_dict())
    restored, restored_scheduler = make_optimizer(params, OptimConfig(lr=1e-3, lr_warmup_steps=4))
    restored.load_state_dict(state[0])
    restored_scheduler.load_state_dict(state[1])
    assert restored.param_groups[0]["lr"] == pytest.approx(3e-4 * 3 / 4)  # the old lr wins
    apply_optim_config(restored, restored_scheduler, OptimConfig(lr=1e-3, lr_warmup_steps=4))
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)
    restored_scheduler.step()
    assert restored.param_groups[0]["lr"] == pytest.approx(1e-3)


# ----------------------------------------------------------------------------- slow: training


@pytest.mark.slow
def test_a_changed_lr_is_applied_and_listed_on_resume(tiny_config) -> None:
    train(tiny_config("grpo-rs-only", "trainer.total_training_steps=1"))
    out = io.StringIO()
    resumed = train(
        tiny_config("grpo-rs-only", "actor_rollout_ref.actor.optim.lr=1e-3"),
        console=Console(file=out, width=300),
    )
    assert resumed.resumed_from == 1 and resumed.status == "FINISHED"
    assert dict(resumed.history["actor/lr"]) == {
        1: pytest.approx(1e-5),
        2: pytest.approx(2e-4),
    }  # warm-up: 1/10, 2/10
    assert "changed on resume (applied): actor_rollout_ref.actor.optim.lr: 0.0001 -> 0.001" in (
        out.getvalue()
    )
    assert not (Path(tiny_config("grpo-rs-only").trainer.default_local_dir) / LOCK_FILE).exists()


@pytest.mark.slow
def test_finished_run_asked_for_new_work_fails_and_keeps_its_status(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, runs_named
) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    done = train(tiny_config("grpo-rs-only", "trainer.total_training_steps=1"))
    ended = client.get_run(done.run_id).info.end_time
    with pytest.raises(AlreadyCompleteError, match="already complete.*dump_log_probs"):
        train(
            tiny_config(
                "grpo-rs-only", "trainer.total_training_steps=1", "trainer.dump_log_probs=true"
            )
        )
    with pytest.raises(ResumeConfigError, match="rollout.n"):
        train(tiny_config("grpo-rs-only", "actor_rollout_ref.rollout.n=2"))

    def broken_data(*args, **kwargs):
        raise RuntimeError("data went away")

    monkeypatch.setattr(trainer_mod, "load_data", broken_data)
    with pytest.raises(RuntimeError, match="data went away"):
        train(tiny_config("grpo-rs-only", "trainer.total_training_steps=2"))
    run = client.get_run(done.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.end_time == ended
    assert len(runs_named(tiny_config("grpo-rs-only").trainer.experiment_name)) == 1


@pytest.mark.slow
def test_a_corrupt_latest_checkpoint_falls_back_and_replayed_steps_are_logged_once(
    tiny_config, mlflow_uri: str
) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    first = train(tiny_config("grpo-rs-only", "trainer.save_freq=1"))
    folder = Path(tiny_config("grpo-rs-only").trainer.default_local_dir)
    latest = list_checkpoints(folder)[-1]
    assert latest.name == "global_step_2"
    (latest / "state.pt").write_bytes(b"not a checkpoint")
    out = io.StringIO()
    resumed = train(
        tiny_config("grpo-rs-only", "trainer.save_freq=1", "trainer.total_training_steps=3"),
        console=Console(file=out, width=300),
    )
    assert "skipping an unreadable checkpoint" in out.getvalue()
    assert resumed.resumed_from == 1 and resumed.step == 3 and resumed.status == "FINISHED"
    assert resumed.run_id == first.run_id
    assert _steps(client, first.run_id) == [1, 2, 3]  # step 2 was replayed, not logged twice


@pytest.mark.slow
def test_a_run_that_dies_before_its_first_checkpoint_resumes_the_same_mlflow_run(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, runs_named
) -> None:
    original = trainer_mod.Trainer.train_step

    def die_at_step_2(self, step):
        if step == 2:
            raise RuntimeError("killed")
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", die_at_step_2)
    cfg = tiny_config("grpo-rs-only")
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg)
    folder = Path(cfg.trainer.default_local_dir)
    assert list_checkpoints(folder) == [] and read_run_file(folder) is not None
    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    resumed = train(cfg)
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert resumed.run_id == read_run_file(folder) and resumed.status == "FINISHED"
    assert _steps(client, resumed.run_id) == [1, 2]
    assert _steps(client, resumed.run_id, "val/reward_mean") == [0, 2]
    assert len(runs_named(cfg.trainer.experiment_name)) == 1


@pytest.mark.slow
def test_disable_sets_the_earlier_run_aside_so_auto_resumes_the_new_one(tiny_config) -> None:
    older = train(tiny_config("grpo-rs-only", "trainer.total_training_steps=1"))
    fresh = train(
        tiny_config("grpo-rs-only", "trainer.total_training_steps=1", "trainer.resume_mode=disable")
    )
    assert fresh.run_id != older.run_id and fresh.resumed_from == 0
    folder = Path(tiny_config("grpo-rs-only").trainer.default_local_dir)
    (aside,) = folder.glob("replaced-*")
    assert (aside / "global_step_1").is_dir() and (aside / RUN_FILE).is_file()
    resumed = train(tiny_config("grpo-rs-only"))
    assert resumed.run_id == fresh.run_id and resumed.resumed_from == 1


@pytest.mark.slow
def test_a_second_ctrl_c_while_saving_waits_for_the_checkpoint(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from rcx.train import state as state_mod

    original_step, original_save = trainer_mod.Trainer.train_step, state_mod.save_checkpoint

    def first_press_in_step_2(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original_step(self, step)

    def second_press_while_saving(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original_save(*args, **kwargs)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", first_press_in_step_2)
    monkeypatch.setattr(state_mod, "save_checkpoint", second_press_while_saving)
    killed = train(tiny_config("grpo-rs-only", "trainer.total_training_steps=3"))
    assert killed.status == "KILLED" and killed.step == 2
    assert killed.checkpoint is not None and killed.checkpoint.name == "global_step_2"
