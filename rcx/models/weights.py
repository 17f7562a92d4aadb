"""A model's weights as full tensors, whether its parameters are sharded (FSDP2 ``DTensor``) or
not: what rollout engines copy from the trainer."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def full_state_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model``'s state dict one full tensor at a time: a sharded tensor is gathered when its
    turn comes (every rank must iterate in step), so no rank ever holds the whole model twice."""
    from torch.distributed.tensor import DTensor

    for name, value in model.state_dict().items():
        yield name, value.full_tensor() if isinstance(value, DTensor) else value
