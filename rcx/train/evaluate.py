"""Scoring responses and validating the policy."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import torch

from rcx.data.rewards import score_responses
from rcx.rollout import RolloutBatch, SamplingParams
from rcx.train.distributed import SINGLE, World, all_sum, local_share
from rcx.train.setup import derive_seed


def decode_responses(tokenizer: Any, batch: RolloutBatch) -> list[str]:
    """Each response's text (masked tokens only, special tokens dropped)."""
    ids = batch.response_ids.cpu()
    mask = batch.response_mask.cpu().bool()
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(ids, mask, strict=True)
    ]


def score_rollout(
    scorer: Any, tokenizer: Any, batch: RolloutBatch, examples: Sequence[Any], device: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Outcome reward of each response, (B,) float32 on ``device``, from the decoded response
    text, and the reward hook's extra values (each (B,)), if any."""
    scores, extras = score_responses(scorer, decode_responses(tokenizer, batch), examples)
    return scores.to(device), extras


@torch.no_grad()
def validate(
    engine: Any,
    data: Any,
    scorer: Any,
    tokenizer: Any,
    *,
    val_sampling: SamplingParams,
    sampling: SamplingParams,
    batch_size: int | None,
    seed: int,
    device: Any,
    world: World = SINGLE,
) -> dict[str, float]:
    """``val/reward_mean`` and ``val/accuracy`` on ``data`` under ``val_sampling``; when that is
    greedy, also ``val/sampled_*`` with one sample per prompt at the rollout ``sampling``.

    ``engine`` must already hold the weights to validate. Each prompt has its own sampling seed
    (from its index in ``data``), so the result does not depend on ``batch_size``; with several
    processes each rank validates an interleaved share and the sums are reduced over ranks.
    """
    start = time.perf_counter()
    runs = [("val", val_sampling)]
    if not val_sampling.do_sample:
        runs.append(("val/sampled", dataclasses.replace(sampling, n=1)))
    metrics: dict[str, float] = {}
    mine = local_share(range(len(data)), world)
    size = batch_size or max(len(mine), 1)
    for name, params in runs:
        all_scores = [torch.zeros(0, device=device)]
        for s in range(0, len(mine), size):
            chunk = mine[s : s + size]
            prompts = [data.prompt_ids[i] for i in chunk]
            examples = [data.examples[i] for i in chunk]
            seeds = [derive_seed(seed, f"{name}/{i}", 0) for i in chunk]
            batch = engine.generate(prompts, params, seed=seeds)
            per_sample = [examples[i] for i in batch.prompt_index.tolist()]
            all_scores.append(score_rollout(scorer, tokenizer, batch, per_sample, device)[0])
        scores = torch.cat(all_scores).double()
        local = torch.stack([scores.sum(), (scores >= 1.0).sum(), torch.tensor(scores.numel())])
        total, correct, count = all_sum(local.double(), world).tolist()
        prefix = "val/" if name == "val" else "val/sampled_"
        metrics[f"{prefix}reward_mean"] = total / count
        metrics[f"{prefix}accuracy"] = correct / count
    metrics["timing/validation"] = time.perf_counter() - start
    return metrics
