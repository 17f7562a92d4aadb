"""rcx.train.setup and rcx.train.batch: seeds, schedules, devices, step counts, batch slicing."""

from __future__ import annotations

import pytest
import torch

from rcx.train.batch import StepBatch
from rcx.train.setup import (
    DeviceError,
    batch_split,
    derive_seed,
    resolve_device,
    total_steps,
    warmup_lambda,
)


def test_seeds_warmup_steps_and_device() -> None:
    assert derive_seed(1, "gen", 3) == derive_seed(1, "gen", 3) != derive_seed(1, "gen", 4)
    assert [warmup_lambda(4)(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_lambda(0)(0) == 1.0
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
        with pytest.raises(DeviceError, match="trainer.device=cuda"):
            resolve_device("cuda")


def test_total_steps_from_epochs(tiny_config) -> None:
    cfg = tiny_config(
        "grpo-multi-rs", "trainer.total_training_steps=null", "trainer.total_epochs=3"
    )
    assert total_steps(cfg, num_train=64) == 3 * (64 // 4)


def test_batch_split_counts_prompts_times_n_then_micro_batches() -> None:
    assert batch_split(64, 4, 8, None) == (32, 32)
    assert batch_split(64, 4, 8, 12) == (32, 12)
    assert batch_split(16, 4, 8, None) == (16, 16)  # a mini-batch never exceeds the batch


def test_step_batch_rows_slices_every_tensor_and_keeps_none() -> None:
    ids = torch.arange(12).view(3, 4)
    batch = StepBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(3, 2),
        rollout_log_probs=torch.tensor([[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]),
        prompt_index=torch.tensor([0, 0, 1]),
        weight_version=torch.zeros(3, dtype=torch.long),
    )
    rows = batch.rows(torch.tensor([2, 0]))
    assert rows.size == 2 and rows.response_length == 2
    assert torch.equal(rows.input_ids, ids[[2, 0]])
    assert rows.rollout_log_probs.tolist() == [[-5.0, -6.0], [-1.0, -2.0]]
    assert rows.advantages is None and rows.values is None
