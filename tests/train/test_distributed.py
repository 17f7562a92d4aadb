"""Several processes (gloo on CPU): shares, global views, the launcher, and 2 ranks = 1 process.

Multi-process cases start real ranks; they meet through a file store (no TCP rendezvous), and
gloo's connections stay on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from rcx.algos.correction import compute_correction
from rcx.algos.criteria import correction_spec
from rcx.train.distributed import (
    SINGLE,
    World,
    global_positions,
    local_rows,
    local_share,
    pad_width,
    with_local_grad,
)
from rcx.train.launch import rank_environment
from tests.conftest import LENGTH_REWARD, TINY_OVERRIDES

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def run_ranks(case: str, tmp_path: Path, size: int = 2) -> list[dict]:
    """Run ``dist_worker.py CASE`` as ``size`` ranks; their results, in rank order."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                case,
                str(r),
                str(size),
                str(store),
                str(tmp_path / f"{r}.pt"),
            ],
            env=env,
        )
        for r in range(size)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0] * size
    return [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(size)]


# ------------------------------------------------------------------------------ shares and views


def test_prompts_are_dealt_interleaved_whole_and_once():
    prompts = list(range(12))
    worlds = [World(rank=r, size=3) for r in range(3)]
    shares = [local_share(prompts, w) for w in worlds]
    assert sorted(p for share in shares for p in share) == prompts
    for w, share in zip(worlds, shares, strict=True):
        assert [prompts[i] for i in global_positions(len(share), w)] == share
    assert local_share(prompts, SINGLE) == prompts


def test_one_process_views_are_the_tensors_themselves():
    t = torch.randn(4, 3, requires_grad=True)
    assert with_local_grad(t, SINGLE) is t and local_rows(t, SINGLE) is t
    padded = pad_width(torch.ones(2, 3), 5, value=7)
    assert padded.shape == (2, 5) and padded[:, 3:].eq(7).all() and padded[:, :3].eq(1).all()


def test_the_ranks_the_launcher_stopped_are_not_blamed():
    from rcx.train.launch import failed_on_their_own

    assert failed_on_their_own({0: -15, 1: 1}) == [1]  # rank 0 was stopped by SIGTERM
    assert failed_on_their_own({0: 1, 1: 1}) == [0, 1]  # a dead peer fails the other's collective
    assert failed_on_their_own({0: -9, 1: -15}) == [0, 1]  # nobody failed on its own: all


def test_rank_environment_is_torchruns_plus_the_file_store():
    env = rank_environment(1, 2, "/tmp/x/store")
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert env["RCX_FILE_STORE"] == "/tmp/x/store" and env["RCX_LAUNCHED"] == "1"
    assert "MASTER_ADDR" not in env  # no TCP rendezvous


def test_batch_normalisation_and_metrics_are_global(tmp_path):
    """Rank 1's log-ratios are 10x rank 0's: the batch-normalised weights average 1 over all
    valid tokens (not per rank), and both ranks log the metrics of one process on the whole
    batch."""
    import tests.train.dist_worker as worker

    train, rollout, full_mask = worker.shard_inputs(SINGLE)
    results = run_ranks("correction", tmp_path)
    weights = torch.cat([r["weights"] for r in results])
    mask = torch.cat([r["mask"] for r in results])
    valid = full_mask.bool()  # normalisation is over the valid tokens (before rejection)
    assert weights[valid].mean().item() == pytest.approx(1.0, abs=1e-6)
    means = [weights[:4][valid[:4]].mean().item(), weights[4:][valid[4:]].mean().item()]
    assert abs(means[0] - means[1]) > 1e-2  # normalising per rank would make each 1

    spec = correction_spec(
        rollout_is="token",
        rollout_is_threshold=5.0,
        rollout_is_batch_normalize=True,
        rollout_rs="token_k1",
        rollout_rs_threshold="0.5_2.0",
    )
    single = compute_correction(spec, train, rollout, full_mask)
    assert results[0]["metrics"] == results[1]["metrics"]
    for key, value in single.metrics.items():
        assert results[0]["metrics"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    torch.testing.assert_close(weights, single.weights, rtol=1e-6, atol=1e-7)
    assert torch.equal(mask, single.mask)


def test_global_loss_times_world_averaged_is_the_one_process_gradient(tmp_path):
    results = run_ranks("gradient", tmp_path)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=generator)
    target = torch.randn(8, generator=generator)
    w = torch.zeros(3, requires_grad=True)
    loss = ((x @ w - target) ** 2).sum() / (target.abs() > 0.5).sum()
    loss.backward()
    for r in results:
        torch.testing.assert_close(r["grad"], w.grad, rtol=1e-6, atol=1e-7)
    assert w.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ end to end


def tiny_args(tmp_path: Path, name: str) -> list[str]:
    """The overrides :func:`train_cli` runs with, for the run ``name`` in ``tmp_path``."""
    reward = tmp_path / "length_reward.py"
    reward.write_text(LENGTH_REWARD)
    return [
        *(o for o in TINY_OVERRIDES if "micro_batch" not in o),
        "trainer.total_training_steps=3",
        "trainer.save_freq=1",
        f"trainer.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"trainer.default_local_dir={tmp_path / name}",
        f"trainer.experiment_name={name}",
        f"custom_reward_function.path={reward}",
        "actor_rollout_ref.rollout.weight_sync_interval=2",
    ]


def train_cli(tmp_path: Path, name: str, preset: str, *extra: str) -> subprocess.CompletedProcess:
    """``python -m rcx train`` on the tiny overrides (whole mini-batches per micro-batch, so that
    the global micro-batch of 2 ranks is the one process's), the rollout copy refreshed every 2
    steps: a real mismatch (one update stale), so the correction metrics are not noise. The
    copy stays float32: bfloat16 rounding would turn the runs' last-bit weight differences into
    whole-ulp flips of some weights, noise that has nothing to do with the ranks."""
    args = [*tiny_args(tmp_path, name), *extra]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "rcx", "train", "--preset", preset, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def final_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metric history, actor weights) of the newest checkpoint, sharded or not."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from rcx.store.checkpoint import latest_checkpoint

    path = latest_checkpoint(folder)
    state = torch.load(path / "state.pt", weights_only=False)
    if state.get("sharded"):
        dcp_to_torch_save(path / "sharded", path.parent / "full.pt")
        weights = torch.load(path.parent / "full.pt", weights_only=False)["actor"]["model"]
    else:
        weights = state["model"]
    return state["extra"]["history"], weights


def assert_same_run(one: tuple, two: tuple) -> None:
    """Every logged metric within 1e-5 relative (timings aside) or 1e-6 absolute, and weights
    within 1e-5 of their scale. Why not exact: the ranks' forwards run on other batch shapes
    (rows, prompt padding), so float32 sums differ in their last bits; a log-prob of size ~4
    then carries ~5e-7 of rounding, which its differences (log-ratios, KL, a PPO loss of 1e-4)
    inherit as an absolute error, hence the absolute floor."""
    (history_1, weights_1), (history_2, weights_2) = one, two
    assert set(history_1) == set(history_2)
    compared = 0
    for key, points in history_1.items():
        if key.startswith(("timing/", "perf/")):
            continue
        assert [s for s, _ in points] == [s for s, _ in history_2[key]], key
        for (step, a), (_, b) in zip(points, history_2[key], strict=True):
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (key, step, a, b)
            compared += 1
    assert compared > 100
    # Weights: 1e-5 of each tensor's scale, with a floor of 1e-6 for tensors near zero, where
    # Adam's step lr * m / sqrt(v) turns last-bit gradient differences into ~1e-7 after a few
    # dozen updates (gae: 4 epochs x 2 mini-batches x 3 steps); 1e-6 is a tenth of one
    # warm-up step at lr 1e-5.
    for name, value in weights_1.items():
        bound = 1e-5 * value.abs().max().item() + 1e-6
        assert (value - weights_2[name]).abs().max().item() < bound, name


@pytest.mark.parametrize(
    "preset", ["grpo-multi-rs", "grpo-rs-only", "rloo-seq-is", "gae-seq-is-rs"]
)
def test_two_processes_equal_one_on_the_same_global_batch(tmp_path, preset):
    two = train_cli(tmp_path, "two", preset, "trainer.n_gpus_per_node=2")
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = train_cli(tmp_path, "one", preset)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_run(final_state(tmp_path / "one"), final_state(tmp_path / "two"))
    # One voice: a single MLflow run for the two ranks, FINISHED.
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(
        search_all_experiments=True, filter_string="tags.mlflow.runName = 'two'"
    )
    assert runs["status"].tolist() == ["FINISHED"]
    assert two.stdout.count("rcx train: 3 steps") == 1  # rank 1 prints nothing


def test_resume_gives_the_uninterrupted_run_under_any_process_count(tmp_path):
    """2 processes stopped after step 2 and resumed give the uninterrupted 2-process run
    exactly; see :func:`resume_in_one_process` for the other process counts."""
    whole = train_cli(tmp_path, "whole", "grpo-multi-rs", "trainer.n_gpus_per_node=2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = train_cli(
        tmp_path,
        "split",
        "grpo-multi-rs",
        "trainer.n_gpus_per_node=2",
        "trainer.total_training_steps=2",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = train_cli(tmp_path, "split", "grpo-multi-rs", "trainer.n_gpus_per_node=2")
    assert second.returncode == 0 and "resumed from step 2" in second.stdout, second.stderr[-3000:]
    history_whole, weights_whole = final_state(tmp_path / "whole")
    history_split, weights_split = final_state(tmp_path / "split")
    for key in ("reward/mean", "actor/pg_loss", "rollout_corr/kl", "val/accuracy"):
        assert history_split[key][-1] == history_whole[key][-1], key
    for name, value in weights_whole.items():
        assert torch.equal(value, weights_split[name]), name
    resume_in_one_process(tmp_path)


def resume_in_one_process(tmp_path: Path) -> None:
    """A sharded (2-process) checkpoint resumes in one process (DCP reshards) and continues as
    the 2-process run ``whole`` did; a 1-process checkpoint is refused under 2 with a clear
    error."""
    first = train_cli(
        tmp_path,
        "down",
        "grpo-multi-rs",
        "trainer.n_gpus_per_node=2",
        "trainer.total_training_steps=2",
    )
    assert first.returncode == 0, first.stderr[-3000:]
    second = train_cli(tmp_path, "down", "grpo-multi-rs")  # 1 process
    assert second.returncode == 0 and "resumed from step 2" in second.stdout, second.stderr[-3000:]
    (history_whole, weights_whole), (history_down, weights_down) = (
        final_state(tmp_path / "whole"),
        final_state(tmp_path / "down"),
    )
    last = [k for k in history_whole if not k.startswith(("timing/", "perf/"))]
    for key in last:  # step 3, run by one process after two steps by two
        assert history_down[key][-1][0] == 3, key
        assert history_down[key][-1][1] == pytest.approx(
            history_whole[key][-1][1], rel=1e-5, abs=1e-6
        ), key
    for name, value in weights_whole.items():
        bound = 1e-5 * value.abs().max().item() + 1e-6
        assert (value - weights_down[name]).abs().max().item() < bound, name

    single = train_cli(tmp_path, "up", "grpo-multi-rs", "trainer.total_training_steps=2")
    assert single.returncode == 0, single.stderr[-3000:]
    refused = train_cli(tmp_path, "up", "grpo-multi-rs", "trainer.n_gpus_per_node=2")
    assert refused.returncode == 1
    assert "was written by one process" in refused.stdout + refused.stderr


@pytest.mark.slow
def test_two_nodes_of_one_process_each(tmp_path):
    """2 "nodes" x 1 process on this machine, each started on its own as a node's launcher
    would (node rank in GROUP_RANK, LOCAL_RANK 0 on both), meeting through a shared file store:
    the run equals one process on the same global batch. (torchrun's own multi-node rendezvous
    is not used here: its store listens on every network interface.)"""
    one = train_cli(tmp_path, "one", "grpo-multi-rs")
    assert one.returncode == 0, one.stderr[-3000:]
    store = tmp_path / "store"
    procs = []
    for node in range(2):
        env = {
            **os.environ,
            "OMP_WAIT_POLICY": "PASSIVE",
            "PYTHONPATH": str(ROOT),
            **rank_environment(0, 1, str(store)),
            "RANK": str(node),
            "GROUP_RANK": str(node),
            "WORLD_SIZE": "2",
        }
        env.pop("RCX_LAUNCHED")  # node 0 prints its findings, as under torchrun
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "rcx",
                    "train",
                    "--preset",
                    "grpo-multi-rs",
                    *tiny_args(tmp_path, "nodes"),
                    "trainer.nnodes=2",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "rcx train: 3 steps" in outputs[0][0] and "rcx train" not in outputs[1][0]
    assert_same_run(final_state(tmp_path / "one"), final_state(tmp_path / "nodes"))


FAILING_REWARD = """
import os
calls = 0
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    global calls
    calls += 1
    if os.environ.get("RANK") == "1" and calls > 8 * 2:  # rank 1 fails in step 3
        raise RuntimeError("reward server gone")
    return len(solution_str) / 8.0
"""


def test_a_failing_rank_stops_every_rank_and_marks_the_run_failed(tmp_path):
    reward = tmp_path / "failing.py"
    reward.write_text(FAILING_REWARD)
    result = train_cli(
        tmp_path,
        "crash",
        "grpo-multi-rs",
        "trainer.n_gpus_per_node=2",
        "trainer.val_before_train=false",
        f"custom_reward_function.path={reward}",
    )
    assert result.returncode == 1
    assert re.search(r"ranks? (0, )?1 failed", result.stdout), result.stdout[-2000:]
    assert "reward server gone" in result.stdout + result.stderr  # the failing rank's error
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert runs["status"].tolist() == ["FAILED"]
    from rcx.store.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "crash").name == "global_step_2"  # intact
    leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "crash")], capture_output=True)
    assert leftover.stdout == b""
