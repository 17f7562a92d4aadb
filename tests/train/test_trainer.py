"""The trainer end to end on shrunk real presets: updates, metrics, checkpoints, resume, Ctrl-C."""

from __future__ import annotations

import io
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from rich.console import Console

from rcx.errors import RcxError
from rcx.models.loading import build_tiny_model
from rcx.store.checkpoint import latest_checkpoint, load_checkpoint
from rcx.store.provenance import package_version, rcx_revision
from rcx.store.tracking import TrackingError
from rcx.train import actor as actor_mod
from rcx.train import trainer as trainer_mod
from rcx.train.trainer import train

PRESETS = ["rloo-seq-is", "grpo-multi-rs", "gae-seq-is-rs", "grpo-rs-only"]
#: Logged by every preset at every step.
COMMON_METRICS = {
    "reward/mean",
    "reward/accuracy",
    "response_length/mean",
    "actor/pg_loss",
    "actor/entropy",
    "actor/grad_norm",
    "actor/lr",
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/chi2_token",
    "rollout_corr/skipped_update",
    "timing/gen",
    "timing/reward",
    "timing/update_actor",
    "timing/step",
    "perf/tokens_per_s",
    "val/reward_mean",
    "val/accuracy",
    "val/sampled_accuracy",
}
#: What each preset adds: IS, RS, critic, decoupled forward, PPO-clip statistics.
PRESET_METRICS = {
    "rloo-seq-is": {"rollout_corr/rollout_is_seq_mean", "rollout_corr/rollout_is_eff_sample_size"},
    "grpo-multi-rs": {
        "rollout_corr/rollout_is_mean",
        "rollout_corr/rollout_rs_masked_fraction",
        "rollout_corr/rollout_rs_token_k1_mean",
        "rollout_corr/rollout_rs_seq_max_k2_max",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
    },
    "gae-seq-is-rs": {
        "critic/vf_loss",
        "critic/vf_clipfrac",
        "critic/grad_norm",
        "critic/values/mean",
        "timing/old_log_prob",
        "timing/correction",
        "timing/values",
        "rollout_corr/rollout_is_batch_norm_factor",
        "rollout_corr/rollout_rs_token_k1_masked_fraction",
    },
    "grpo-rs-only": {"rollout_corr/rollout_rs_seq_masked_fraction", "actor/pg_clipfrac"},
}


def _metric_keys(client: MlflowClient, run_id: str) -> set[str]:
    return set(client.get_run(run_id).data.metrics)


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_logs_and_checkpoints(preset: str, tiny_config, mlflow_uri: str) -> None:
    cfg = tiny_config(preset)
    result = train(cfg)
    assert result.status == "FINISHED" and result.exit_code == 0 and result.step == 2

    # Every parameter tensor moved away from its initialisation.
    initial, _ = build_tiny_model(cfg.trainer.seed)
    ckpt = load_checkpoint(latest_checkpoint(Path(cfg.trainer.default_local_dir)))
    assert ckpt.step == 2 and ckpt.mlflow_run_id == result.run_id
    unchanged = [
        name
        for name, value in initial.state_dict().items()
        if torch.equal(value, ckpt.state["model"][name])
    ]
    assert unchanged == []
    assert (ckpt.state["critic"] is not None) == (preset == "gae-seq-is-rs")
    assert ckpt.state["rollout"]["weight_version"] == 1  # synced before step 2's generation

    client = MlflowClient(tracking_uri=mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.adv_estimator"] == cfg.algorithm.adv_estimator
    missing = (COMMON_METRICS | PRESET_METRICS[preset]) - _metric_keys(client, result.run_id)
    assert missing == set()
    assert set(_history(client, result.run_id, "reward/mean")) == {1, 2}
    assert set(_history(client, result.run_id, "val/accuracy")) == {0, 2}  # before and at end
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "plots", "versions.json"} <= artifacts
    # Where it ran: package versions and rcx's revision, as params and as an artifact.
    assert run.data.params["env.torch"] == package_version("torch")
    assert run.data.params["env.rcx_revision"] == rcx_revision()


# ----------------------------------------------------------------------------- resume


def _comparable(client: MlflowClient, run_id: str, steps: set[int]) -> dict:
    """Every non-timing metric at ``steps``: what must replay exactly after a resume."""
    out = {}
    for key in _metric_keys(client, run_id):
        if key.startswith(("timing/", "perf/")):
            continue
        for step, value in _history(client, run_id, key).items():
            if step in steps:
                out[(key, step)] = value
    return out


@pytest.mark.parametrize("preset", ["grpo-multi-rs", "gae-seq-is-rs"])
def test_resumed_run_logs_what_an_uninterrupted_run_logs(
    preset: str, tiny_config, mlflow_uri: str, tmp_path: Path
) -> None:
    client = MlflowClient(tracking_uri=mlflow_uri)
    full = train(
        tiny_config(
            preset,
            "trainer.total_training_steps=4",
            f"trainer.default_local_dir={tmp_path / 'full'}",
            "trainer.experiment_name=full",
        )
    )
    first = train(tiny_config(preset, "trainer.total_training_steps=2"))
    second = train(tiny_config(preset, "trainer.total_training_steps=4"))
    assert second.resumed_from == 2 and second.step == 4 and second.status == "FINISHED"
    assert second.run_id == first.run_id  # the same MLflow run, continued
    expected = _comparable(client, full.run_id, {3, 4})
    assert len(expected) > 50
    assert _comparable(client, second.run_id, {3, 4}) == expected
    assert client.get_run(second.run_id).info.status == "FINISHED"


def test_resume_of_a_finished_run_does_nothing(tiny_config) -> None:
    cfg = tiny_config("grpo-rs-only", "trainer.total_training_steps=1")
    train(cfg)
    again = train(cfg)
    assert again.status == "FINISHED" and again.step == 1 and again.resumed_from == 1


# ----------------------------------------------------------------------------- edge cases


def test_rejecting_everything_skips_updates_and_completes(tiny_config, mlflow_uri: str) -> None:
    # Ratios are ~1 (same weights, float32), so a keep interval of [1.5, 2] rejects every token.
    cfg = tiny_config(
        "grpo-multi-rs",
        "algorithm.rollout_correction.rollout_rs=token_k1",
        "algorithm.rollout_correction.rollout_rs_threshold=1.5_2.0",
    )
    with pytest.warns(UserWarning, match="masked every token"):
        result = train(cfg)
    assert result.status == "FINISHED"
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert _history(client, result.run_id, "rollout_corr/skipped_update") == {1: 1.0, 2: 1.0}
    assert _history(client, result.run_id, "rollout_corr/rollout_rs_masked_fraction") == {
        1: 1.0,
        2: 1.0,
    }
    initial, _ = build_tiny_model(cfg.trainer.seed)
    final = load_checkpoint(latest_checkpoint(Path(cfg.trainer.default_local_dir))).state["model"]
    assert all(torch.equal(v, final[k]) for k, v in initial.state_dict().items())


def test_ctrl_c_while_a_custom_reward_hangs_abandons_the_step_at_once(
    tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    hang = tmp_path / "hang"  # the hook waits while this file exists
    hook = tmp_path / "hook.py"
    hook.write_text(
        "import os, time\n"
        "def f(data_source, solution_str, ground_truth, extra_info=None):\n"
        f"    while os.path.exists({str(hang)!r}):\n"
        "        time.sleep(0.05)\n"
        "    return 0.0\n"
    )
    original = trainer_mod.Trainer.train_step
    pressed: list[float] = []

    def hang_in_step_2(self, step):
        if step == 2:
            hang.touch()
            pressed.append(time.monotonic())
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", hang_in_step_2)
    cfg = tiny_config(
        "grpo-rs-only",
        "trainer.total_training_steps=3",
        f"custom_reward_function.path={hook}",
        "custom_reward_function.name=f",
        "custom_reward_function.timeout_s=600",
    )
    try:
        killed = train(cfg)
        stopped_after = time.monotonic() - pressed[0]
    finally:
        hang.unlink(missing_ok=True)  # releases the hook's thread
    assert killed.status == "KILLED" and killed.exit_code == 130
    assert killed.step == 1 and killed.checkpoint.name == "global_step_1"  # step 2 abandoned
    assert stopped_after < 60  # not the reward's 600 s timeout


def test_ctrl_c_finishes_the_step_saves_and_marks_killed(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = trainer_mod.Trainer.train_step

    def press_ctrl_c_during_step_2(self, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the trainer's handler
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", press_ctrl_c_during_step_2)
    cfg = tiny_config("grpo-multi-rs", "trainer.total_training_steps=3")
    killed = train(cfg)
    assert killed.status == "KILLED" and killed.exit_code == 130 and killed.step == 2
    assert killed.checkpoint is not None and killed.checkpoint.name == "global_step_2"
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", original)
    resumed = train(cfg)
    assert resumed.status == "FINISHED" and resumed.resumed_from == 2 and resumed.step == 3
    assert resumed.run_id == killed.run_id
    assert client.get_run(killed.run_id).info.status == "FINISHED"


def test_hard_interrupt_mid_update_never_checkpoints_a_half_update(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = actor_mod.actor_loss

    def interrupt_in_second_minibatch_of_step_2(*args, **kwargs):
        calls["n"] += 1
        # 2 mini-batches x 2 micro-batches per step: call 7 is in step 2's second mini-batch,
        # after its first optimiser step.
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(actor_mod, "actor_loss", interrupt_in_second_minibatch_of_step_2)
    cfg = tiny_config("grpo-multi-rs", "trainer.save_freq=1", "trainer.total_training_steps=3")
    result = train(cfg)
    assert result.status == "KILLED" and result.step == 1
    assert result.checkpoint is not None and result.checkpoint.name == "global_step_1"
    client = MlflowClient(tracking_uri=mlflow_uri)
    assert client.get_run(result.run_id).info.status == "KILLED"


def test_hard_interrupt_in_validation_after_an_update_keeps_the_last_checkpoint(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = trainer_mod.Trainer.validate

    def interrupt_at_step_2(self, step):
        if step == 2:  # step 2's update is applied but the step is not logged yet
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "validate", interrupt_at_step_2)
    cfg = tiny_config(
        "grpo-rs-only",
        "trainer.save_freq=1",
        "trainer.test_freq=2",
        "trainer.total_training_steps=3",
    )
    result = train(cfg)
    assert result.status == "KILLED" and result.step == 1
    assert result.checkpoint is not None and result.checkpoint.name == "global_step_1"


def test_crash_marks_the_run_failed_and_keeps_earlier_checkpoints(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, runs_named
) -> None:
    original = trainer_mod.Trainer.train_step

    def crash_at_step_2(self, step):
        if step == 2:
            raise RuntimeError("boom")
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", crash_at_step_2)
    cfg = tiny_config("grpo-rs-only", "trainer.save_freq=1", "trainer.total_training_steps=3")
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    assert latest_checkpoint(Path(cfg.trainer.default_local_dir)).name == "global_step_1"
    client = MlflowClient(tracking_uri=mlflow_uri)
    runs = runs_named(cfg.trainer.experiment_name)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert set(_history(client, runs[0].info.run_id, "reward/mean")) == {1}


def test_unreachable_tracking_server_fails_before_loading(tiny_config) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config("grpo-multi-rs", f"trainer.tracking_uri=http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(TrackingError, match="not reachable") as info:
        train(cfg)
    assert time.monotonic() - start < 10
    assert isinstance(info.value, RcxError)  # the CLI prints it without a traceback
    assert latest_checkpoint(Path(cfg.trainer.default_local_dir)) is None


def test_log_prob_dumps_and_console_without_mlflow(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(
        "gae-seq-is-rs",
        "trainer.dump_log_probs=true",
        'trainer.logger=["console"]',
        "trainer.total_training_steps=1",
    )
    out = io.StringIO()
    result = train(cfg, console=Console(file=out, width=120))
    assert result.run_id is None and result.status == "FINISHED"
    text = out.getvalue()
    assert "MLflow tracking off" in text and "FINISHED after 1 steps" in text
    # Not a terminal: a plain progress line, with the step's figures, its speed and an ETA.
    line = next(ln for ln in text.splitlines() if ln.startswith("step 1/1 "))
    assert "reward " in line and " s/step  ETA 0s" in line

    dump = torch.load(tmp_path / "ckpt" / "log_probs" / "step_000001.pt", weights_only=True)
    assert dump["format"] == 1 and dump["step"] == 1 and dump["mode"] == "decoupled"
    batch = cfg.data.train_batch_size * cfg.actor_rollout_ref.rollout.n
    mask = dump["response_mask"]
    assert mask.dtype == torch.bool and mask.shape[0] == batch and mask.any()
    assert dump["rollout_log_probs"].dtype == dump["train_log_probs"].dtype == torch.float32
    assert dump["prompt_index"].shape == dump["scores"].shape == (batch,)
    # Same float32 weights on both sides: pi_old and pi_rollout agree to rounding.
    diff = (dump["train_log_probs"] - dump["rollout_log_probs"])[mask].abs().max()
    assert diff < 1e-4
    assert dump["rollout_correction"]["rollout_is"] == "sequence"


def test_resume_path_mode_picks_the_named_checkpoint(tiny_config, tmp_path: Path) -> None:
    from rcx.store.checkpoint import CheckpointError, save_checkpoint
    from rcx.train.setup import find_resume_checkpoint

    elsewhere = tmp_path / "other"
    for step in (1, 2):
        save_checkpoint(elsewhere, step, {"x": torch.tensor(step)})
    own_dir = tmp_path / "ckpt"
    save_checkpoint(own_dir, 5, {"x": torch.tensor(5)})

    auto = tiny_config("grpo-rs-only")
    assert find_resume_checkpoint(auto, own_dir).name == "global_step_5"
    assert (
        find_resume_checkpoint(tiny_config("grpo-rs-only", "trainer.resume_mode=disable"), own_dir)
        is None
    )
    by_root = tiny_config(
        "grpo-rs-only", "trainer.resume_mode=resume_path", f"trainer.resume_from_path={elsewhere}"
    )
    assert find_resume_checkpoint(by_root, own_dir) == elsewhere / "global_step_2"
    exact = tiny_config(
        "grpo-rs-only",
        "trainer.resume_mode=resume_path",
        f"trainer.resume_from_path={elsewhere / 'global_step_1'}",
    )
    assert find_resume_checkpoint(exact, own_dir) == elsewhere / "global_step_1"
    missing = tiny_config(
        "grpo-rs-only", "trainer.resume_mode=resume_path", f"trainer.resume_from_path={tmp_path}/x"
    )
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        find_resume_checkpoint(missing, own_dir)


@pytest.mark.slow
def test_default_preset_learns_on_the_embedded_task(tiny_config) -> None:
    """The product run (`rcx train --preset grpo-multi-rs`): warm start + 100 GRPO steps on CPU.

    Measured here: greedy validation accuracy 0.41 -> 0.64, sampled 0.29 -> 0.47, ~2.5 min on
    2 cores including the warm start (cached in ~/.cache/rcx afterwards).
    """
    cfg = tiny_config(
        "grpo-multi-rs",
        *[f"{k}=null" for k in ("custom_reward_function.path",)],
        "trainer.total_training_steps=100",
        "actor_rollout_ref.model.warm_start_steps=1000",
        "actor_rollout_ref.rollout.n=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=32",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null",
        "data.train_batch_size=32",
        "data.val_batch_size=null",
        "data.builtin.num_train=20000",
        "data.builtin.num_val=256",
        "trainer.test_freq=10",
    )
    result = train(cfg)
    assert result.status == "FINISHED"
    assert result.val_end["val/accuracy"] >= result.val_start["val/accuracy"] + 0.1
    assert result.val_end["val/sampled_accuracy"] > result.val_start["val/sampled_accuracy"]


def test_trainer_temperature_differing_from_the_rollout_is_a_mismatch(tiny_config) -> None:
    # Same weights, float32, synced: the only difference is the temperature the trainer scores at.
    def step1_kl(*overrides: str) -> float:
        cfg = tiny_config("gae-seq-is-rs", "trainer.total_training_steps=1", *overrides)
        (point,) = train(cfg).history["rollout_corr/kl"]
        return abs(point[1])

    on_policy = step1_kl()
    mismatched = step1_kl("actor_rollout_ref.actor.temperature=0.25", "trainer.resume_mode=disable")
    assert on_policy < 1e-6
    assert mismatched > 100 * max(on_policy, 1e-7)


def test_summary_and_warm_start_warning_at_the_end(tiny_config, monkeypatch) -> None:
    missed = {
        "reached_target": False,
        "steps": 1000,
        "steps_run": 1000,
        "probes": [[1000, 0.117]],
        "target_accuracy": 0.3,
        "val_greedy_accuracy": 0.227,
    }
    monkeypatch.setattr(trainer_mod, "warm_start_metadata", lambda path: missed)
    out = io.StringIO()
    cfg = tiny_config("grpo-multi-rs", 'trainer.logger=["console","mlflow"]')
    result = train(cfg, console=Console(file=out, width=200, highlight=False))
    text = out.getvalue()
    assert result.status == "FINISHED"
    # Loud at the start and again at the end, with the accuracy reached and what to do.
    assert text.count("BELOW its target") == 2 and "11.7%" in text and "warm_start_steps" in text
    assert "validation accuracy" in text and "greedy (" in text
    assert "mismatch, mean of 2 steps" in text and "kl " in text
    assert "checkpoint  " in text and "plots  " in text and "MLflow run" in text
