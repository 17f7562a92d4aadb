"""One-step-off rollout (trainer.async_mode=one_step_off): the schedule and its staleness, the
log-probs a sample carries, a worker that fails or dies, Ctrl-C, resume."""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import signal
from pathlib import Path

import pytest
import torch

from rcx.models.loading import build_tiny_model
from rcx.rollout import SamplingParams
from rcx.rollout.base import token_log_probs
from rcx.rollout.hf import HFRolloutEngine
from rcx.store.checkpoint import latest_checkpoint
from rcx.store.dumps import load_dumps, read_dump
from rcx.train import trainer as trainer_mod
from rcx.train.async_rollout import (
    FAIL_AT_ENV,
    OneStepOffRollout,
    RolloutWorkerError,
    next_request,
    staleness_metrics,
)
from rcx.train.trainer import train

STALENESS_MAX = "training/off_policy/trajectory_staleness/max"
STALENESS_MIN = "training/off_policy/trajectory_staleness/min"
SAMPLING = SamplingParams(n=2, temperature=1.0, max_new_tokens=6)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def _no_worker_left() -> bool:
    return not [p for p in mp.active_children() if p.name == "rcx-rollout"]


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for an update: every weight moves by a seeded 5 % of noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _rescored(model: torch.nn.Module, rollout) -> torch.Tensor:
    """The rollout's tokens re-scored teacher-forced on ``model``, 0 off the response mask."""
    lp = token_log_probs(
        model, rollout.input_ids, rollout.attention_mask, rollout.response_length, SAMPLING
    )
    return lp.masked_fill(rollout.response_mask == 0, 0.0)


@pytest.fixture
def driver():
    model, tokenizer = build_tiny_model(seed=3)
    engine = HFRolloutEngine(model, tokenizer)
    seeds = [11, 12, 13]
    rollout = OneStepOffRollout(engine, SAMPLING, lambda step: (PROMPTS, seeds), total_steps=3)
    rollout.bind(model)
    yield rollout, model
    rollout.close()
    assert _no_worker_left()


def test_the_staleness_histogram_has_the_same_keys_every_step() -> None:
    fresh = staleness_metrics(torch.tensor([4, 4]), trainer_version=4, bound=2)
    assert [fresh[f"rollout/staleness_share/{k}"] for k in range(3)] == [1.0, 0.0, 0.0]
    beyond = staleness_metrics(torch.tensor([0]), trainer_version=4, bound=2)  # never expected
    assert beyond["rollout/staleness_share/4"] == 1.0 and beyond["rollout/staleness_share/2"] == 0.0


def test_staleness_metrics_use_verl_names() -> None:
    metrics = staleness_metrics(torch.tensor([3, 3, 2, 4, 4]), trainer_version=4)  # 1 1 2 0 0
    assert metrics == {
        "rollout/staleness": 0.8,
        "training/off_policy/trajectory_staleness/mean": 0.8,
        "training/off_policy/trajectory_staleness/max": 2.0,
        "training/off_policy/trajectory_staleness/min": 0.0,
        "rollout/staleness_share/0": 0.4,
        "rollout/staleness_share/1": 0.4,
        "rollout/staleness_share/2": 0.2,
    }


def test_each_batch_carries_the_log_probs_of_the_weights_that_generated_it(driver) -> None:
    """Batch s comes from version max(0, s - 2) (staleness 1 after step 1), and its rollout
    log-probs are what those weights give re-scored, not what the trainer's weights give."""
    rollout, model = driver
    versions = [copy.deepcopy(model)]  # versions[v]: the weights after v updates
    for step in (1, 2, 3):
        batch = rollout.rollout(step)
        assert batch.weight_version == max(0, step - 2)
        assert (step - 1) - batch.weight_version == (0 if step == 1 else 1)
        generating = _rescored(versions[batch.weight_version], batch)
        torch.testing.assert_close(batch.rollout_log_probs, generating, atol=1e-4, rtol=0)
        if step > 1:  # the trainer's weights (one update newer) give other log-probs
            current = _rescored(model, batch)
            assert (current - batch.rollout_log_probs).abs().max() > 1e-2
        _perturb_(model, seed=step)  # the update on batch `step`, while batch step+1 generates
        versions.append(copy.deepcopy(model))


def test_the_worker_ignores_ctrl_c_and_a_dead_worker_is_reported(driver) -> None:
    rollout, _ = driver
    rollout.rollout(1)
    os.kill(rollout.process.pid, signal.SIGINT)  # ignored: the trainer stops the worker
    assert rollout.rollout(2).weight_version == 0
    os.kill(rollout.process.pid, signal.SIGKILL)
    rollout.process.join(10)
    with pytest.raises(RolloutWorkerError, match="died with exit code -9"):
        rollout.rollout(3)


def test_a_three_step_one_step_off_run_has_staleness_exactly_one_after_step_1(
    tiny_config,
) -> None:
    cfg = tiny_config(
        "grpo-multi-rs",
        "trainer.async_mode=one_step_off",
        "trainer.total_training_steps=3",
        "trainer.dump_log_probs=true",
    )
    result = train(cfg)
    assert result.status == "FINISHED"
    assert result.history[STALENESS_MAX] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert result.history[STALENESS_MIN] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert result.history["rollout/staleness"] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert _no_worker_left()
    # The whatif/calibrate dumps carry each sample's staleness, and still load.
    folder = Path(cfg.trainer.default_local_dir) / "log_probs"
    stack = load_dumps([folder])
    assert stack.num_steps == 3
    for step in (1, 2, 3):
        staleness = read_dump(folder / f"step_{step:06d}.pt")["staleness"]
        assert staleness.tolist() == [min(step - 1, 1)] * 16  # 4 prompts x n = 4


def test_a_worker_that_fails_fails_the_run_with_its_error(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, runs_named
) -> None:
    monkeypatch.setenv(FAIL_AT_ENV, "2")  # the spawned worker inherits it
    cfg = tiny_config(
        "grpo-rs-only",
        "trainer.async_mode=one_step_off",
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
    )
    with pytest.raises(RolloutWorkerError, match="injected rollout worker failure at step 2"):
        train(cfg)
    assert _no_worker_left()
    folder = Path(cfg.trainer.default_local_dir)
    assert latest_checkpoint(folder).name.endswith("_1")  # the last checkpoint is intact
    (run,) = runs_named(cfg.trainer.experiment_name)
    assert run.info.status == "FAILED"


def test_ctrl_c_stops_the_worker_and_the_trainer(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = trainer_mod.Trainer.train_step

    def hard_stop_in_step_2(self, step):
        if step == 2:
            assert not _no_worker_left()  # the worker is generating batch 2 meanwhile
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", hard_stop_in_step_2)
    result = train(
        tiny_config(
            "grpo-rs-only", "trainer.async_mode=one_step_off", "trainer.total_training_steps=3"
        )
    )
    assert result.status == "KILLED" and result.step == 1
    assert _no_worker_left()


@pytest.mark.slow
def test_resume_replays_what_an_uninterrupted_one_step_off_run_does(tiny_config) -> None:
    """One-step-off resume is exact: the checkpoint keeps the weights of the batch in flight and
    sampling is seeded per prompt, so a batch depends only on (seed, step, its weights)."""
    common = ("trainer.async_mode=one_step_off", "trainer.save_freq=1")
    whole = train(
        tiny_config(
            "grpo-multi-rs",
            *common,
            "trainer.total_training_steps=4",
            "trainer.default_local_dir=whole",
        )
    )
    train(tiny_config("grpo-multi-rs", *common, "trainer.total_training_steps=2"))
    resumed = train(tiny_config("grpo-multi-rs", *common, "trainer.total_training_steps=4"))
    assert resumed.resumed_from == 2
    for key in ("reward/mean", "actor/pg_loss", "rollout_corr/kl", STALENESS_MAX):
        assert resumed.history[key] == whole.history[key], key


def test_a_worker_whose_trainer_is_gone_stops_waiting_for_requests() -> None:
    requests = mp.get_context("spawn").Queue()
    requests.put("work")
    assert next_request(requests, parent=os.getppid()) == "work"
    assert next_request(requests, parent=-1) is None  # no request, and the parent is not ours


def _fail_and_linger(requests, replies) -> None:  # runs in a spawned process
    from rcx.train import async_rollout

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        async_rollout.report_and_linger(replies, requests, os.getppid(), 7)


def test_a_failed_worker_stays_alive_until_stopped_so_its_queued_batches_arrive() -> None:
    import time

    from rcx.train.async_rollout import report_and_linger  # noqa: F401 - the target's import

    ctx = mp.get_context("spawn")
    requests, replies = ctx.Queue(), ctx.Queue()
    worker = ctx.Process(target=_fail_and_linger, args=(requests, replies), daemon=True)
    worker.start()
    kind, key, text = replies.get(timeout=60)
    assert (kind, key) == ("error", 7) and "RuntimeError: boom" in text
    time.sleep(1.0)
    assert worker.is_alive()  # lingering: what it sent before can still be received
    requests.put(None)
    worker.join(10)
    assert not worker.is_alive() and worker.exitcode == 0


def test_a_reply_whose_sender_died_is_a_worker_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from rcx.train.async_rollout import RolloutProcesses

    pool = RolloutProcesses.__new__(RolloutProcesses)  # no processes: only receive() is tested

    class Gone:
        def get(self, timeout=None):
            raise FileNotFoundError(2, "No such file or directory")

    pool.replies, pool.processes = Gone(), []
    with pytest.raises(RolloutWorkerError, match="could not be received.*a worker died"):
        pool.receive(str)


def test_the_staleness_bound_of_each_mode() -> None:
    from rcx.config import load_config
    from rcx.train.async_rollout import staleness_bound

    def bound(*overrides: str) -> int:
        return staleness_bound(load_config(preset="grpo-rs-only", overrides=list(overrides)))

    assert bound() == 0
    assert bound("actor_rollout_ref.rollout.weight_sync_interval=4") == 3
    assert bound("trainer.async_mode=one_step_off") == 1
    assert bound("trainer.async_mode=fully_async", "trainer.max_off_policy_threshold=3") == 3
