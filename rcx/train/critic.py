"""The critic (gae): a value model, its forward, and its clipped-regression update."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from rcx.algos import losses
from rcx.config.models import CriticConfig
from rcx.rollout import position_ids_from_mask
from rcx.train.batch import LOSS_FIELDS, StepBatch
from rcx.train.distributed import SINGLE, World, as_local_scalar, gather_fields, with_local_grad
from rcx.train.metrics import MetricBag
from rcx.train.setup import autocast, batch_split


class ValueModel(torch.nn.Module):
    """The policy's transformer body (a copy) with a scalar head.

    ``forward`` returns one value per position, (B, L). The head starts at zero, so the first
    values are 0 and the first GAE advantages are the discounted returns.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.body = copy.deepcopy(policy.base_model)
        self.body.requires_grad_(True)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(next(self.body.parameters()).device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        return self.head(hidden.float()).squeeze(-1)  # (B, L)


@dataclass
class Critic:
    """The value model, its optimiser, and the settings its update shares with the actor's."""

    model: ValueModel
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cfg: CriticConfig
    ppo_epochs: int  # the actor's: the critic makes as many passes
    mini_batch_prompts: int  # the actor's ppo_mini_batch_size
    n: int  # responses per prompt
    loss_agg_mode: str  # the actor's
    device: torch.device
    world: World = SINGLE  # several processes: the loss of the global micro-batch

    def values(self, batch: StepBatch, grad: bool = False) -> torch.Tensor:
        """Values before each response token, (b, T) float32."""
        length = batch.response_length
        am = batch.attention_mask
        with torch.set_grad_enabled(grad), autocast(self.device):
            values = self.model(batch.input_ids, am, position_ids_from_mask(am))
        return values[:, -length - 1 : -1].float()  # (b, T)

    def update(self, batch: StepBatch) -> dict[str, float]:
        """Value regression to ``batch.returns`` with clipping around ``batch.values``: ppo_epochs
        passes over mini-batches in order (``critic/vf_loss``, ``critic/vf_clipfrac``, ...)."""
        size = batch.size
        mini, micro = batch_split(
            size,
            self.mini_batch_prompts // self.world.size,  # verl: a global count of prompts
            self.n,
            self.cfg.ppo_micro_batch_size_per_gpu,
        )
        bag = MetricBag()
        for _epoch in range(self.ppo_epochs):
            for start in range(0, size, mini):
                mini_rows = torch.arange(start, min(size, start + mini))
                self.optimizer.zero_grad(set_to_none=True)
                for mstart in range(0, len(mini_rows), micro):
                    rows = mini_rows[mstart : mstart + micro].to(self.device)
                    mb = batch.rows(rows)
                    values = with_local_grad(self.values(mb, grad=True), self.world)  # (b, T)
                    mb = gather_fields(mb, LOSS_FIELDS, self.world)
                    loss, loss_metrics = losses.value_loss(
                        values,
                        mb.returns,
                        mb.values,
                        mb.response_mask,
                        cliprange_value=self.cfg.cliprange_value,
                        loss_agg_mode=self.loss_agg_mode,
                    )
                    bag.add(loss_metrics)
                    (loss * (self.world.size * len(rows) / len(mini_rows))).backward()
                grad_norm = as_local_scalar(
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                )
                bag.add({"critic/grad_norm": grad_norm})
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = bag.means()
        metrics["critic/lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics
