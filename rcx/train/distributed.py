"""Many processes, one run: the process group, each rank's share of a step, global views of its
tensors, FSDP2 sharding, and full weights gathered from shards.

The data-parallel contract (``W`` ranks, rank ``r``):

* The step's ``B`` prompts are dealt out interleaved: rank ``r`` gets prompts ``r, r + W, ...``,
  each with all of its ``n`` responses, so GRPO/RLOO groups stay whole on one rank.
* Every response-side tensor has the same width on every rank (padded to the global longest
  response right after generation), so per-token tensors can be gathered row-wise.
* Whatever is a batch quantity (the correction's weights, masks and metrics, advantages with batch
  statistics, loss denominators, every logged metric) is computed on the *global* view: the rows
  of every rank, gathered in rank order. Each rank then keeps its own rows.
* Gradients: the loss of a micro-batch is the loss of the global micro-batch (the union of every
  rank's micro-batch of that index) in which only the local rows carry gradient, times ``W``,
  because FSDP averages gradients over ranks. Summed over ranks, that is the gradient a single
  process computes on the global micro-batch.

With one process every function here is the identity and nothing is sharded: a single-process run
executes exactly what it did before this module existed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rcx.errors import RcxError

T = TypeVar("T")

#: Set in the environment of the processes ``rcx train`` starts itself.
LAUNCHED_BY_RCX = "RCX_LAUNCHED"
#: The file the processes ``rcx train`` starts meet through (instead of a TCP rendezvous).
FILE_STORE_ENV = "RCX_FILE_STORE"
#: How long a rank waits for the others in a collective before the run fails (seconds).
COLLECTIVE_TIMEOUT_S = 600


class DistributedError(RcxError, RuntimeError):
    """The process group cannot be set up as configured."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one voice (console, MLflow, plots, checkpoint metadata)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_world() -> World:
    """The world ``torchrun`` (or ``rcx train``'s own launch) describes in the environment;
    one process when it describes none."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    return World(
        rank=int(os.environ["RANK"]),
        size=size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_world(device: torch.device, requested: int) -> World:
    """Join the process group the environment describes (gloo on CPU, nccl on CUDA).

    ``requested`` is ``trainer.n_gpus_per_node * trainer.nnodes``; under a launcher it must be 1
    (take the launcher's count) or equal to the launched world size.
    """
    world = launched_world()
    if requested > 1 and world.size == 1:
        raise DistributedError(
            f"trainer.n_gpus_per_node x trainer.nnodes = {requested} processes, but this process "
            "was not started by torchrun: run `rcx train` directly (it starts the processes) or "
            "launch with torchrun"
        )
    if requested not in (1, world.size):
        raise DistributedError(
            f"trainer.n_gpus_per_node x trainer.nnodes = {requested}, but torchrun started "
            f"{world.size} processes; make them agree (or leave the keys at 1)"
        )
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(world.local_rank)
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        if store := os.environ.get(FILE_STORE_ENV):
            dist.init_process_group(
                backend,
                init_method=f"file://{store}",
                rank=world.rank,
                world_size=world.size,
                timeout=timeout,
            )
        else:  # torchrun's env:// rendezvous (MASTER_ADDR, MASTER_PORT)
            dist.init_process_group(backend, timeout=timeout)
    return world


def close_world(world: World) -> None:
    """Leave the process group (a no-op for one process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def local_share(items: Sequence[T], world: World) -> list[T]:
    """Rank ``r``'s share of a step's prompts: items ``r, r + W, r + 2W, ...``."""
    return list(items[world.rank :: world.size])


def global_positions(count: int, world: World) -> list[int]:
    """Where rank ``r``'s ``count`` local items sit in the step's global order."""
    return [world.rank + world.size * i for i in range(count)]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_max(value: int, world: World) -> int:
    """The largest ``value`` over the ranks."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Element-wise sum over the ranks (a new tensor; the input is left alone)."""
    if not world.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out)
    return out


def any_rank(flag: bool, world: World) -> bool:
    """True when ``flag`` is true on at least one rank."""
    return all_max(int(flag), world) > 0


def gather_rows(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on each) stacked along dim 0, in rank order; the
    input itself with one process. No gradient flows through the gathered copy."""
    if not world.distributed:
        return tensor
    local = tensor.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def local_rows(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's rows of a tensor gathered by :func:`gather_rows`."""
    if not world.distributed:
        return tensor
    size = tensor.shape[0] // world.size
    return tensor[world.rank * size : (world.rank + 1) * size]


def with_local_grad(local: torch.Tensor, world: World) -> torch.Tensor:
    """The global view of ``local`` in which this rank's rows are ``local`` itself (carrying
    its gradient) and the other ranks' rows are detached copies."""
    if not world.distributed:
        return local
    gathered = gather_rows(local, world)
    size = local.shape[0]
    before = gathered[: world.rank * size]
    after = gathered[(world.rank + 1) * size :]
    return torch.cat([before, local, after])


def gather_fields(obj: T, names: Sequence[str], world: World) -> T:
    """A copy of the dataclass ``obj`` whose fields ``names`` (those not None) are replaced by
    their global views (:func:`gather_rows`); the others stay local."""
    if not world.distributed:
        return obj
    gathered = {
        name: gather_rows(getattr(obj, name), world)
        for name in names
        if getattr(obj, name) is not None
    }
    return dataclasses.replace(obj, **gathered)  # type: ignore[type-var]


def pad_width(tensor: torch.Tensor, width: int, value: float = 0) -> torch.Tensor:
    """``tensor`` (B, T, ...) right-padded along dim 1 to ``width`` with ``value``."""
    missing = width - tensor.shape[1]
    if missing <= 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    pad = torch.full(shape, value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)


# ------------------------------------------------------------------------------ sharded models


def shard_model(model: torch.nn.Module, world: World, cpu_offload: bool = False) -> torch.nn.Module:
    """Wrap ``model`` with FSDP2 (``fully_shard``): each transformer block is one unit, the
    root holds the rest; bf16 compute with float32 gradient reduction on CUDA. One process:
    ``model`` unchanged."""
    if not world.distributed:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    if next(model.parameters()).is_cuda:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in transformer_blocks(model):
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes it lists in
    ``_no_split_modules``); empty when it lists none."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def as_local_scalar(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly replicated DTensor (e.g. the total norm FSDP's gradient
    clipping returns)."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def local_device(device: torch.device, world: World) -> torch.device:
    """This rank's device: ``cuda:<local_rank>`` on CUDA, else ``device``."""
    if device.type == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return device


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (``torch.utils.checkpoint`` per block, composable with FSDP2; unlike Hugging Face's own
    switch it also acts in ``eval()`` mode, which the policy stays in)."""
    from torch.distributed._composable import checkpoint

    blocks = transformer_blocks(model)
    if not blocks:
        raise DistributedError(
            "actor_rollout_ref.model.enable_gradient_checkpointing: this model lists no "
            "transformer block class (_no_split_modules) to checkpoint"
        )
    for block in blocks:
        checkpoint(block)
