"""Run by tests/train/test_distributed.py, once per rank: ``python dist_worker.py CASE RANK
WORLD STORE OUT``. Joins a gloo group through a file store (no TCP rendezvous), runs CASE, and
writes its result with torch.save to OUT (one file per rank)."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from rcx.algos.criteria import correction_spec
from rcx.train.distributed import World, local_rows, with_local_grad
from rcx.train.step import global_correction


def shard_inputs(world: World) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch every rank can rebuild (8 x 6), and this rank's rows of it: rank 1's
    log-ratios are 10x rank 0's, so per-rank IS means differ."""
    generator = torch.Generator().manual_seed(0)
    rollout = -torch.rand(8, 6, generator=generator) - 0.1
    scale = torch.tensor([0.05] * 4 + [0.5] * 4)[:, None]
    train = rollout + scale * torch.randn(8, 6, generator=generator)
    mask = torch.ones(8, 6)
    mask[1, 4:] = 0
    mask[6, 3:] = 0
    return train, rollout, mask


def case_correction(world: World) -> dict:
    train, rollout, mask = shard_inputs(world)
    rows = slice(world.rank * 4, world.rank * 4 + 4)
    spec = correction_spec(
        rollout_is="token",
        rollout_is_threshold=5.0,
        rollout_is_batch_normalize=True,
        rollout_rs="token_k1",
        rollout_rs_threshold="0.5_2.0",
    )
    weights, kept, metrics = global_correction(spec, train[rows], rollout[rows], mask[rows], world)
    return {"weights": weights, "mask": kept, "metrics": metrics, "rows": (rows.start, rows.stop)}


def case_gradient(world: World) -> dict:
    """d(global loss)/dw with only local rows carrying gradient, times W, averaged over ranks
    (what FSDP does) = the gradient of one process on the whole batch."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=generator)
    target = torch.randn(8, generator=generator)
    w = torch.zeros(3, requires_grad=True)
    local = x[world.rank * 4 : world.rank * 4 + 4] @ w  # (4,)
    full = with_local_grad(local, world)  # (8,) ours with gradient, the others' detached
    loss = ((full - target) ** 2).sum() / (target.abs() > 0.5).sum()  # a global denominator
    (loss * world.size).backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)
    grad /= world.size  # FSDP's average
    return {"grad": grad, "local": local_rows(full.detach(), world)}


def main() -> None:
    case, rank, size, store, out = sys.argv[1:6]
    world = World(rank=int(rank), size=int(size), local_rank=int(rank))
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=world.rank, world_size=world.size
    )
    try:
        result = {"correction": case_correction, "gradient": case_gradient}[case](world)
        torch.save(result, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
