"""rcx.train.step: which sequences count in the group baselines after rejection."""

from __future__ import annotations

import torch

from rcx.train.batch import StepBatch
from rcx.train.step import baseline_members


def rejected_batch() -> StepBatch:
    """3 responses x 2 tokens; RS kept both tokens of row 0, one of row 1, none of row 2."""
    ids = torch.zeros(3, 4, dtype=torch.long)
    return StepBatch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        response_mask=torch.ones(3, 2),
        rollout_log_probs=torch.zeros(3, 2),
        prompt_index=torch.zeros(3, dtype=torch.long),
        weight_version=torch.zeros(3, dtype=torch.long),
        train_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]),
    )


def test_only_fully_rejected_sequences_leave_the_baseline_in_decoupled_mode():
    batch = rejected_batch()
    assert baseline_members(False, False, batch).tolist() == [True, True, False]
    assert baseline_members(True, False, batch) is None  # the default: everyone counts
    assert baseline_members(False, True, batch) is None  # bypass: RS runs after the advantages
