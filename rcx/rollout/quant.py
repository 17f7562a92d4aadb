"""Fake weight quantisation of the rollout copy: the INT8 / FP8 rollout setting.

Each linear weight matrix inside the transformer blocks is rounded to the quantised grid and
stored back dequantised (weight-only, per output channel, symmetric), so the rollout policy is
what an int8 / fp8 weight-only engine would compute, while running in ordinary kernels.
Embeddings and the output head stay in full precision, as weight-only engines usually keep them.
"""

from __future__ import annotations

import torch

INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def per_channel_scale(weight: torch.Tensor, grid_max: float) -> torch.Tensor:
    """absmax(row) / grid_max for each output channel; (out, 1), never 0."""
    absmax = weight.abs().amax(dim=1, keepdim=True)  # (out, 1)
    return (absmax / grid_max).clamp(min=torch.finfo(torch.float32).tiny)


def fake_quantize_int8(weight: torch.Tensor) -> torch.Tensor:
    """Round `weight` (out, in) to symmetric per-channel int8 and dequantise; same dtype."""
    w = weight.float()
    scale = per_channel_scale(w, INT8_MAX)
    quantised = torch.clamp(torch.round(w / scale), -INT8_MAX, INT8_MAX)
    return (quantised * scale).to(weight.dtype)


def fake_quantize_fp8(weight: torch.Tensor) -> torch.Tensor:
    """Round `weight` (out, in) to per-channel-scaled FP8 E4M3 and dequantise; same dtype."""
    w = weight.float()
    scale = per_channel_scale(w, FP8_E4M3_MAX)
    quantised = (w / scale).to(torch.float8_e4m3fn).float()
    return (quantised * scale).to(weight.dtype)


QUANTIZERS = {"int8": fake_quantize_int8, "fp8": fake_quantize_fp8}


def quantizable_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The linear layers that a weight-only quantised engine quantises (not the output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head
    ]


@torch.no_grad()
def fake_quantize_model_(model: torch.nn.Module, method: str) -> int:
    """Quantise-dequantise `model`'s linear weights in place; returns how many were changed.

    `method` is `"none"` (no-op), `"int8"` or `"fp8"`.
    """
    if method == "none":
        return 0
    if method not in QUANTIZERS:
        raise ValueError(
            f"actor_rollout_ref.rollout.quantization={method!r}: expected none, int8 or fp8"
        )
    quantize = QUANTIZERS[method]
    linears = quantizable_linears(model)
    for _, module in linears:
        module.weight.copy_(quantize(module.weight))
    return len(linears)
