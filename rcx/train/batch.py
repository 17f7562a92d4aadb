"""The step batch: one training step's tensors, one row per response.

Filled stage by stage (generation, old/ref log-probs, values, advantages, correction) and then
sliced, once per mini-batch and micro-batch, with :meth:`StepBatch.rows`. It is the unit that a
distributed trainer shards and an asynchronous one queues.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rcx.rollout import RolloutBatch

#: The per-token fields the losses read, gathered across ranks for the global micro-batch (the
#: forwards' inputs, ``input_ids`` and the masks of whole sequences, stay with their rank).
LOSS_FIELDS = (
    "response_mask",
    "rollout_log_probs",
    "old_log_probs",
    "ref_log_probs",
    "values",
    "advantages",
    "returns",
    "is_weights",
    "train_mask",
)


@dataclass
class StepBatch:
    """A step's tensors. ``B`` responses, prompt width ``P``, response width ``T``.

    Fields left None are not computed in this configuration (no KL loss, no critic, IS off) or
    not yet (before their stage of the step).
    """

    input_ids: torch.Tensor  # (B, P+T) prompt and response, for teacher-forced forwards
    attention_mask: torch.Tensor  # (B, P+T)
    response_mask: torch.Tensor  # (B, T) float, 1 at response tokens (before rejection)
    rollout_log_probs: torch.Tensor  # (B, T) float32, log pi_rollout of the sampled tokens
    prompt_index: torch.Tensor  # (B,) which prompt of the step each response answers
    weight_version: torch.Tensor  # (B,) long, the policy version that generated each response
    old_log_probs: torch.Tensor | None = None  # (B, T) the anchor: pi_old or pi_rollout
    ref_log_probs: torch.Tensor | None = None  # (B, T) frozen reference (KL loss only)
    values: torch.Tensor | None = None  # (B, T) critic values before the update (gae only)
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T) value targets (gae); else the advantages
    is_weights: torch.Tensor | None = None  # (B, T) decoupled IS weights, once per batch
    train_mask: torch.Tensor | None = None  # (B, T) decoupled: RS applied; bypass: response_mask
    sampling_mask: torch.Tensor | None = None  # (B, T, V) bool: the rollout's kept tokens (replay)

    @classmethod
    def from_rollout(cls, batch: RolloutBatch) -> StepBatch:
        """The generation stage's tensors (masks and log-probs as float)."""
        return cls(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            response_mask=batch.response_mask.float(),
            rollout_log_probs=batch.rollout_log_probs.float(),
            prompt_index=batch.prompt_index,
            weight_version=batch.sample_versions,
            sampling_mask=batch.sampling_mask,
        )

    @property
    def size(self) -> int:
        """The number of responses B."""
        return self.input_ids.shape[0]

    @property
    def response_length(self) -> int:
        """The response width T."""
        return self.response_mask.shape[1]

    def rows(self, index: torch.Tensor) -> StepBatch:
        """The same fields for the responses ``index`` (a mini- or micro-batch)."""
        sliced = {
            f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
            for f in dataclasses.fields(self)
        }
        return StepBatch(**sliced)
