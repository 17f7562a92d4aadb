"""Fully-async rollout (trainer.async_mode=fully_async): the drop/wait scheduler and the wait
gate as pure logic, the log-probs a group carries, 3-step runs, a straggler dropped, a worker
that fails, Ctrl-C, resume."""

from __future__ import annotations

import copy
import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path

import pytest
import torch

from rcx.models.loading import build_tiny_model
from rcx.rollout import RolloutBatch, SamplingParams, concat_rollouts
from rcx.rollout.base import token_log_probs
from rcx.rollout.hf import HFRolloutEngine
from rcx.store.checkpoint import latest_checkpoint
from rcx.store.dumps import read_dump
from rcx.train import trainer as trainer_mod
from rcx.train.async_rollout import FAIL_AT_ENV, RolloutWorkerError, WeightBoard
from rcx.train.fully_async import (
    DROPPED,
    DROPPED_STALENESS,
    HOLD_ENV,
    FullyAsyncRollout,
    GroupPlan,
    GroupScheduler,
    serve_groups,
    wait_gate,
)
from rcx.train.trainer import train

STALENESS = "training/off_policy/trajectory_staleness"
SAMPLING = SamplingParams(n=2, temperature=1.0, max_new_tokens=6)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def _no_worker_left() -> bool:
    return not [p for p in mp.active_children() if p.name == "rcx-rollout"]


# ------------------------------------------------------------------- the scheduler, pure ---


def test_the_window_holds_cap_plus_one_batches_and_stops_at_the_run_s_need() -> None:
    s = GroupScheduler(batch_size=2, cap=1, strategy="wait", total_steps=3)
    assert s.requests() == [0, 1, 2, 3]  # (cap + 1) * B outstanding
    assert s.requests() == []
    for p in (0, 1):
        s.arrive(p, version=0)
    assert s.take(1).positions == [0, 1]
    assert s.requests() == [4, 5]
    for p in (2, 3, 4, 5):
        s.arrive(p, version=0)
    assert s.take(2).positions == [2, 3]
    assert s.requests() == []  # 3 steps x 2 groups: nothing past position 5


def test_wait_takes_in_stream_order_and_never_drops() -> None:
    s = GroupScheduler(batch_size=2, cap=1, strategy="wait", total_steps=5)
    s.requests()
    s.arrive(1, 0)
    s.arrive(2, 0)
    s.arrive(3, 0)
    assert s.take(1) is None  # position 0 has not arrived: later ones do not replace it
    s.arrive(0, 0)
    taken = s.take(1)
    assert taken.positions == [0, 1] and taken.dropped_staleness == []
    taken = s.take(5)  # even far behind (staleness 4 > cap): wait mode drops nothing
    assert taken.positions == [2, 3] and taken.versions == [0, 0] and s.dropped == 0


def test_drop_takes_the_oldest_arrived_and_drops_groups_older_than_the_cap() -> None:
    s = GroupScheduler(batch_size=2, cap=1, strategy="drop", total_steps=3)
    assert s.requests() == [0, 1, 2, 3]
    s.arrive(0, 0)
    s.arrive(2, 0)
    s.arrive(3, 0)
    taken = s.take(1)
    assert taken.positions == [0, 2]  # 1 is still in flight: 2 takes its place
    assert s.requests() == [4, 5]
    s.arrive(4, 1)
    # Step 3 trains version 2: 1 and 3 (version 0) are 2 versions old, over the cap of 1.
    s.arrive(1, 0)
    assert s.take(3) is None  # both dropped, only 4 is left
    assert s.dropped == 2
    assert s.requests() == [6, 7]  # the run needs 3 x 2 groups plus one per drop
    s.arrive(6, 2)
    taken = s.take(3)
    assert taken.positions == [4, 6] and taken.versions == [1, 2]
    assert taken.dropped_staleness == [2, 2]  # reported with the batch that follows the drops
    assert s.take(3) is None and s.state_dict()["consumed"] == 6


def test_a_resumed_scheduler_skips_consumed_groups_and_requests_the_ones_in_flight() -> None:
    s = GroupScheduler(batch_size=2, cap=1, strategy="drop", total_steps=4)
    s.requests()
    for p in (0, 2, 3):
        s.arrive(p, 0)
    s.take(1)  # 0 and 2 consumed; 1 in flight, 3 arrived untaken
    state = s.state_dict()
    assert state["frontier"] == 1 and state["consumed_above"] == [2]
    resumed = GroupScheduler(batch_size=2, cap=1, strategy="drop", total_steps=4, state=state)
    assert resumed.requests() == [1, 3, 4, 5]  # 2 is skipped; 1 and 3 are generated again


def test_the_wait_gate_keeps_a_group_within_the_cap() -> None:
    # Group p is consumed at step p // B + 1, whose trainer holds version p // B.
    assert [wait_gate(p, batch_size=4, cap=2) for p in (0, 3, 4, 11, 12, 17)] == [
        -2,
        -2,
        -1,
        0,
        1,
        2,
    ]
    for p in range(40):
        assert p // 4 - wait_gate(p, 4, 2) == 2  # staleness at the gate's version = cap
    wait = GroupPlan(SAMPLING, batch_size=4, cap=2, wait=True, chunk=2)
    drop = GroupPlan(SAMPLING, batch_size=4, cap=2, wait=False, chunk=2)
    assert [wait.gate(p) for p in (0, 12, 17)] == [0, 1, 2]
    assert drop.gate(17) == 0


# ------------------------------------------------------------ the worker loop, in a thread ---


class _RecordingEngine:
    """A stand-in engine: a two-weight model, and a generate that records which version made
    which prompts (one token per response)."""

    def __init__(self) -> None:
        self.model = torch.nn.Linear(2, 1)
        self.weight_version = -1
        self.made: list[tuple[int, list[int]]] = []

    def generate(self, prompts, sampling, seed=None, **_):
        self.made.append((self.weight_version, [p[0] for p in prompts]))
        rows = len(prompts) * sampling.n
        return RolloutBatch(
            prompt_ids=torch.tensor(prompts).repeat_interleave(sampling.n, 0),
            prompt_mask=torch.ones(rows, 1, dtype=torch.long),
            response_ids=torch.zeros(rows, 1, dtype=torch.long),
            response_mask=torch.ones(rows, 1, dtype=torch.long),
            rollout_log_probs=torch.zeros(rows, 1),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(sampling.n),
            weight_version=self.weight_version,
        )


def _serve_in_thread(plan: GroupPlan, positions: list[int]):
    engine = _RecordingEngine()
    board = WeightBoard.like(engine.model.state_dict(), mp.get_context("spawn"))
    requests, replies = queue.Queue(), queue.Queue()
    for p in positions:
        requests.put((p, [p], p))
    import os

    thread = threading.Thread(
        target=serve_groups, args=(engine, board, requests, replies, plan, os.getppid())
    )
    return engine, board, requests, replies, thread


def _replies_until(replies: queue.Queue, count: int, timeout: float = 10.0) -> dict[int, int]:
    got: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            kind, positions, batch = replies.get(timeout=0.05)
        except queue.Empty:
            continue
        assert kind == "chunk", batch
        for p in positions:  # one version per chunk
            got[p] = int(batch.weight_version)
    return got


def test_in_wait_mode_a_worker_does_not_start_a_group_before_its_gate() -> None:
    plan = GroupPlan(SAMPLING, batch_size=2, cap=1, wait=True, chunk=2)  # gates 0 0 0 0 1 1 2
    engine, board, requests, replies, thread = _serve_in_thread(plan, [0, 1, 2, 3, 4, 5, 6])
    board.publish(engine.model.state_dict(), 0)
    thread.start()
    try:
        assert _replies_until(replies, 4) == {0: 0, 1: 0, 2: 0, 3: 0}
        assert _replies_until(replies, 1, timeout=0.5) == {}  # 4 needs version 1
        board.publish(engine.model.state_dict(), 1)
        assert _replies_until(replies, 2) == {4: 1, 5: 1}
        assert _replies_until(replies, 1, timeout=0.5) == {}  # 6 needs version 2
        board.publish(engine.model.state_dict(), 2)
        assert _replies_until(replies, 1) == {6: 2}
        # Chunks of at most 2 groups, each on one version, a late group never with earlier ones.
        assert engine.made == [(0, [0, 1]), (0, [2, 3]), (1, [4, 5]), (2, [6])]
    finally:
        requests.put(None)
        thread.join(10)
    assert not thread.is_alive()


def test_in_drop_mode_a_worker_starts_every_group_on_the_newest_weights() -> None:
    plan = GroupPlan(SAMPLING, batch_size=2, cap=1, wait=False, chunk=4)
    engine, board, requests, replies, thread = _serve_in_thread(plan, [0, 1, 6, 7])
    board.publish(engine.model.state_dict(), 0)
    thread.start()
    try:
        assert _replies_until(replies, 4) == {0: 0, 1: 0, 6: 0, 7: 0}
    finally:
        requests.put(None)
        thread.join(10)


def test_groups_concatenate_into_one_batch_with_a_version_per_sample() -> None:
    model, tokenizer = build_tiny_model(seed=3)
    engine = HFRolloutEngine(model, tokenizer)
    whole = engine.generate(PROMPTS, SAMPLING, seed=[1, 2, 3])
    groups = [whole.groups(i, 1, SAMPLING.n) for i in range(3)]
    for i, g in enumerate(groups):
        g.weight_version = i
    joined = concat_rollouts(groups, engine.pad_token_id)
    assert joined.sample_versions.tolist() == [0, 0, 1, 1, 2, 2]
    assert joined.prompt_index.tolist() == whole.prompt_index.tolist()
    for name in ("response_mask", "rollout_log_probs"):
        width = getattr(joined, name).shape[1]
        assert torch.equal(getattr(joined, name), getattr(whole, name)[:, :width])
    assert torch.equal(joined.prompt_mask, whole.prompt_mask)
    ids = joined.input_ids.masked_fill(joined.attention_mask == 0, -1)
    assert torch.equal(
        ids,
        whole.input_ids[:, : ids.shape[1]].masked_fill(
            whole.attention_mask[:, : ids.shape[1]] == 0, -1
        ),
    )


# ------------------------------------------------------------------ the driver, one worker ---


def _perturb_(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))


def _rescored(model: torch.nn.Module, rollout) -> torch.Tensor:
    lp = token_log_probs(
        model, rollout.input_ids, rollout.attention_mask, rollout.response_length, SAMPLING
    )
    return lp.masked_fill(rollout.response_mask == 0, 0.0)


def test_each_group_carries_the_log_probs_of_the_weights_that_generated_it() -> None:
    """Groups of step 2 were generated during step 1 (version 0) and trained at version 1;
    their rollout log-probs are version 0's re-scored, not the trainer's."""
    model, tokenizer = build_tiny_model(seed=3)
    engine = HFRolloutEngine(model, tokenizer)
    driver = FullyAsyncRollout(
        engine,
        SAMPLING,
        lambda p: (p % 3, PROMPTS[p % 3], 100 + p),
        total_steps=3,
        batch_size=3,
        cap=1,
        strategy="wait",
    )
    driver.bind(model)
    versions = [copy.deepcopy(model)]
    stale = 0
    try:
        for step in (1, 2, 3):
            batch = driver.rollout(step)
            assert driver.prompt_indices([]) == [0, 1, 2]
            staleness = (step - 1) - batch.sample_versions
            assert int(staleness.min()) >= 0 and int(staleness.max()) <= 1
            for v in batch.sample_versions.unique().tolist():
                rows = batch.sample_versions == v
                torch.testing.assert_close(
                    batch.rollout_log_probs[rows],
                    _rescored(versions[v], batch)[rows],
                    atol=1e-4,
                    rtol=0,
                )
                if v < step - 1:
                    stale += 1
                    current = _rescored(model, batch)[rows]
                    assert (current - batch.rollout_log_probs[rows]).abs().max() > 1e-2
            if step == 1:  # let step 2's groups arrive on version 0 before the update
                while not all(p in driver.scheduler.arrived for p in (3, 4, 5)):
                    driver._arrive(driver.pool.receive(driver._what))
            _perturb_(model, seed=step)
            versions.append(copy.deepcopy(model))
        assert stale >= 1  # at least one stale group was checked
    finally:
        driver.close()
    assert _no_worker_left()


# --------------------------------------------------------------------------- the trainer ---


def test_a_three_step_fully_async_run_logs_staleness_within_the_cap_and_drops(
    tiny_config,
) -> None:
    cfg = tiny_config(
        "grpo-multi-rs",
        "trainer.async_mode=fully_async",
        "trainer.max_off_policy_threshold=1",
        "trainer.total_training_steps=3",
        "trainer.dump_log_probs=true",
    )
    result = train(cfg)
    assert result.status == "FINISHED"
    for name in ("mean", "max", "min"):
        points = result.history[f"{STALENESS}/{name}"]
        assert [s for s, _ in points] == [1, 2, 3]
        assert all(0 <= v <= 1 for _, v in points)
    assert result.history[f"{STALENESS}/max"][0] == (1, 0.0)  # step 1: the initial weights
    assert result.history[DROPPED] == [(1, 0.0), (2, 0.0), (3, 0.0)]  # one worker: in order
    assert _no_worker_left()
    folder = Path(cfg.trainer.default_local_dir)
    for step in (1, 2, 3):
        dump = read_dump(folder / "log_probs" / f"step_{step:06d}.pt")
        assert (dump["staleness"] == step - 1 - dump["weight_version"]).all()
        assert dump["staleness"].max() <= 1 and dump["staleness"].numel() == 16
    state = torch.load(latest_checkpoint(folder) / "state.pt", weights_only=False)
    assert state["extra"]["async_rollout"]["consumed"] == 12  # 3 steps x 4 groups


def test_wait_mode_keeps_a_slow_trainer_within_the_cap(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer sleeps after each step, so the worker runs as far ahead as it may: the
    samples are as stale as the cap allows, and never more."""
    original = trainer_mod.Trainer.train_step

    def slow_step(self, step):
        metrics = original(self, step)
        time.sleep(0.5)
        return metrics

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", slow_step)
    result = train(
        tiny_config(
            "grpo-rs-only",
            "trainer.async_mode=fully_async",
            "trainer.max_off_policy_strategy=wait",
            "trainer.max_off_policy_threshold=1",
            "trainer.total_training_steps=4",
        )
    )
    assert result.status == "FINISHED"
    assert [v for _, v in result.history[f"{STALENESS}/max"]] == [0.0, 1.0, 1.0, 1.0]
    assert all(v == 0.0 for _, v in result.history[DROPPED])


def test_a_straggler_older_than_the_cap_is_dropped(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers; the one holding group 0 waits until version 3 is out before generating it
    (on version 0's weights): the other keeps the trainer fed, and group 0, 3 versions old
    when it arrives, is dropped."""
    monkeypatch.setenv(HOLD_ENV, "0:3")
    result = train(
        tiny_config(
            "grpo-rs-only",
            "trainer.async_mode=fully_async",
            "trainer.max_off_policy_threshold=1",
            "trainer.rollout_workers=2",
            "trainer.total_training_steps=7",
        )
    )
    assert result.status == "FINISHED"
    dropped = [v for _, v in result.history[DROPPED]]
    assert len(dropped) == 7 and sum(dropped) >= 4  # group 0's 4 samples at least
    assert all(v % 4 == 0 for v in dropped)  # whole groups of n = 4
    assert all(v > 1 for _, v in result.history[f"{DROPPED_STALENESS}/min"])
    assert all(v <= 1 for _, v in result.history[f"{STALENESS}/max"])
    assert _no_worker_left()


def test_a_worker_that_fails_fails_the_run_with_its_error(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, runs_named
) -> None:
    monkeypatch.setenv(FAIL_AT_ENV, "2")  # the spawned workers inherit it
    cfg = tiny_config(
        "grpo-rs-only",
        "trainer.async_mode=fully_async",
        "trainer.rollout_workers=2",
        "trainer.total_training_steps=3",
    )
    with pytest.raises(RolloutWorkerError, match="injected rollout worker failure at step 2"):
        train(cfg)
    assert _no_worker_left()
    (run,) = runs_named(cfg.trainer.experiment_name)
    assert run.info.status == "FAILED"


def test_ctrl_c_stops_the_pool_and_the_trainer(
    tiny_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = trainer_mod.Trainer.train_step

    def hard_stop_in_step_2(self, step):
        if step == 2:
            assert not _no_worker_left()  # the pool is generating meanwhile
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", hard_stop_in_step_2)
    result = train(
        tiny_config(
            "grpo-rs-only",
            "trainer.async_mode=fully_async",
            "trainer.rollout_workers=2",
            "trainer.total_training_steps=3",
        )
    )
    assert result.status == "KILLED" and result.step == 1
    assert _no_worker_left()


@pytest.mark.slow
def test_resume_continues_the_stream_from_the_checkpoint(tiny_config) -> None:
    """In-flight groups are discarded: the first resumed step trains only on groups generated
    from the checkpoint's weights (staleness 0), and the stream goes on after the groups the
    checkpoint consumed."""
    common = (
        "trainer.async_mode=fully_async",
        "trainer.save_freq=1",
        "trainer.max_off_policy_threshold=2",
    )
    first = train(tiny_config("grpo-multi-rs", *common, "trainer.total_training_steps=2"))
    assert first.status == "FINISHED"
    resumed = train(tiny_config("grpo-multi-rs", *common, "trainer.total_training_steps=4"))
    assert resumed.status == "FINISHED" and resumed.resumed_from == 2
    assert resumed.history[f"{STALENESS}/max"][2] == (3, 0.0)
    state = torch.load(resumed.checkpoint / "state.pt", weights_only=False)
    assert state["extra"]["async_rollout"]["consumed"] == 16  # 4 steps x 4 groups, no drops
