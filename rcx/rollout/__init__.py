"""Rollout engines: generate responses and report the log-prob of every sampled token.

:mod:`rcx.rollout.base` holds what every engine shares (``SamplingParams``, ``RolloutBatch``, the
``RolloutEngine`` interface, the teacher-forced ``token_log_probs``); :mod:`rcx.rollout.hf` and
:mod:`rcx.rollout.vllm` are the engines; this package builds one by name.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rcx.rollout.base import (
    ENGINES,
    QUANTIZATIONS,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    concat_rollouts,
    left_pad,
    position_ids_from_mask,
    processed_log_probs,
    response_logits,
    response_mask_through_eos,
    sampling_processors,
    token_log_probs,
)

__all__ = [
    "ENGINES",
    "QUANTIZATIONS",
    "RolloutBatch",
    "RolloutEngine",
    "SamplingParams",
    "concat_rollouts",
    "left_pad",
    "make_rollout_engine",
    "position_ids_from_mask",
    "processed_log_probs",
    "response_logits",
    "response_mask_through_eos",
    "sampling_processors",
    "token_log_probs",
]


def make_rollout_engine(
    name: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dtype: str = "float32",
    quantization: str = "none",
    device: str | torch.device = "cpu",
    model_path: str | None = None,
    gpu_memory_utilization: float = 0.5,
    seed: int = 0,
) -> RolloutEngine:
    """Build the engine named by `actor_rollout_ref.rollout.name`, holding a copy of `model`.

    The copy starts at `weight_version = 0`. `model_path` (a local HF directory) is needed by
    vllm only, which loads the architecture from it before weights are pushed from `model`.
    """
    if name not in ENGINES:
        raise ValueError(
            f"actor_rollout_ref.rollout.name={name!r} is not an engine: expected one of {ENGINES}"
        )
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"actor_rollout_ref.rollout.quantization={quantization!r}: expected one of "
            f"{QUANTIZATIONS}"
        )
    if name == "hf":
        from rcx.rollout.hf import HFRolloutEngine

        return HFRolloutEngine(
            model,
            tokenizer,
            dtype=dtype,
            quantization=quantization,
            device=device,
        )
    from rcx.rollout.vllm import VLLMRolloutEngine

    return VLLMRolloutEngine(
        model,
        tokenizer,
        model_path=model_path,
        dtype=dtype,
        quantization=quantization,
        gpu_memory_utilization=gpu_memory_utilization,
        seed=seed,
    )
