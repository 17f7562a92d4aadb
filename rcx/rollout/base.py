"""What every rollout engine shares: sampling parameters, the batch they return, the interface,
and the log-prob helpers (engines import this module; the package imports the engines).

An engine owns its own copy of the policy weights (the *rollout copy*), separate from the
trainer's. `engine.sync_weights(model, version)` copies the weights in; when to call it is the
trainer's decision (every `weight_sync_interval` steps), and in between the engine samples from
stale weights. The copy is cast to `rollout.dtype` and optionally fake-quantised
(`rollout.quantization`), so every mismatch knob is a real mechanism.

`rollout_log_probs` are log-probs under the distribution the token was actually drawn from:
logits / temperature, then top-k and top-p truncation with renormalisation (greedy decoding:
the plain softmax). `token_log_probs` recomputes the same quantity teacher-forced, so the trainer
(and the tests) can score a batch under any weights with the same processing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import (
    LogitsProcessorList,
    PreTrainedModel,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

ENGINES = ("hf", "vllm")
QUANTIZATIONS = ("none", "int8", "fp8")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: verl's rollout fields (`top_k = -1` means no top-k truncation)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    do_sample: bool = True
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"actor_rollout_ref.rollout.n must be >= 1, got {self.n}")
        if self.do_sample and not self.temperature > 0:
            raise ValueError(
                f"actor_rollout_ref.rollout.temperature must be > 0 when sampling, got "
                f"{self.temperature} (use do_sample=false for greedy decoding)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"actor_rollout_ref.rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(
                f"actor_rollout_ref.rollout.top_k must be -1 (off) or >= 1, got {self.top_k}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"data.max_response_length must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_config(
        cls, rollout: Any, max_response_length: int, validation: bool = False
    ) -> SamplingParams:
        """Read `actor_rollout_ref.rollout` (or its `val_kwargs` when `validation`)."""
        source = rollout.val_kwargs if validation else rollout
        return cls(
            n=int(source.n),
            temperature=float(source.temperature),
            top_p=float(source.top_p),
            top_k=int(source.top_k),
            do_sample=bool(source.do_sample),
            max_new_tokens=int(max_response_length),
        )


@dataclass
class RolloutBatch:
    """What an engine returns for `len(prompts) * n` samples (prompt i's samples are adjacent).

    Prompts are left-padded, responses right-padded with the pad token. `response_mask` is 1 for
    every generated token up to and including the first EOS, 0 after it; a response that never
    emits EOS is masked through its last token. `rollout_log_probs` is 0 where the mask is 0.
    """

    prompt_ids: torch.Tensor  # (B, P) long, left-padded
    prompt_mask: torch.Tensor  # (B, P) long
    response_ids: torch.Tensor  # (B, R) long, right-padded
    response_mask: torch.Tensor  # (B, R) long
    rollout_log_probs: torch.Tensor  # (B, R) float32
    prompt_index: torch.Tensor  # (B,) long: which input prompt each sample answers
    weight_version: int  # the step of the sync that produced the rollout copy used
    # (B, R, V) bool, only when asked for: the tokens top-k/top-p kept at each position (the
    # support the sample was drawn from), for the trainer to score under the same truncation.
    sampling_mask: torch.Tensor | None = None

    @property
    def input_ids(self) -> torch.Tensor:
        """Prompt and response concatenated, for a teacher-forced forward pass."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, P+R)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Prompt mask and response mask concatenated."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)  # (B, P+R)

    @property
    def response_length(self) -> int:
        return self.response_ids.shape[1]

    def to(self, device: str | torch.device) -> RolloutBatch:
        """The same batch with every tensor on `device`."""
        fields = {
            name: getattr(self, name).to(device)
            for name in (
                "prompt_ids",
                "prompt_mask",
                "response_ids",
                "response_mask",
                "rollout_log_probs",
                "prompt_index",
            )
        }
        mask = None if self.sampling_mask is None else self.sampling_mask.to(device)
        return RolloutBatch(**fields, weight_version=self.weight_version, sampling_mask=mask)


class RolloutEngine(Protocol):
    """The interface both engines implement."""

    weight_version: int

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        seed: int | None = None,
        sampling_mask: bool = False,
    ) -> RolloutBatch: ...

    def sync_weights(self, model: PreTrainedModel, version: int) -> None: ...

    def state_dict(self, with_weights: bool = True) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack token-id lists into a left-padded `(ids, mask)` pair, each (B, P)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt must have at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def response_mask_through_eos(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for each token up to and including the first EOS, 0 after; (B, R) long."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # (B, R) EOS strictly before t
    return (eos_before == 0).long()


def sampling_processors(sampling: SamplingParams) -> LogitsProcessorList:
    """The logits processing that generation applies: temperature, then top-k, then top-p."""
    processors = LogitsProcessorList()
    if not sampling.do_sample:
        return processors
    if sampling.temperature != 1.0:
        processors.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k > 0:
        processors.append(TopKLogitsWarper(top_k=sampling.top_k))
    if sampling.top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=sampling.top_p))
    return processors


def processed_log_probs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    sampling: SamplingParams,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-prob of `token_ids` under the processed (temperature, top-k, top-p) distribution.

    `logits` (B, T, V), `token_ids` (B, T) → (B, T) float32. With `kept` (B, T, V) bool, a
    rollout's sampling mask, the distribution is also restricted to the kept tokens and
    renormalised over them (sampling-mask replay: `log softmax` over the kept set only).
    """
    batch, length, vocab = logits.shape
    flat = logits.reshape(batch * length, vocab).float()  # (B*T, V)
    flat = sampling_processors(sampling)(None, flat)
    if kept is not None:
        flat = flat.masked_fill(~kept.reshape(batch * length, vocab), -torch.inf)
    log_probs = torch.log_softmax(flat, dim=-1).reshape(batch, length, vocab)  # (B, T, V)
    return log_probs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions as generation assigns them under left padding (pads get 0); (B, L)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def token_log_probs(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    sampling: SamplingParams | None = None,
    kept: torch.Tensor | None = None,
) -> torch.Tensor:
    """Teacher-forced log-probs of the last `response_length` tokens of `input_ids`.

    `input_ids`, `attention_mask` (B, P+R) → (B, R) float32, under the distribution `sampling`
    describes (default: temperature 1, no truncation — the full distribution), restricted to
    `kept` (B, R, V) when given (:func:`processed_log_probs`). Gradients flow when called with
    grad enabled; masking of padded positions is the caller's job.
    """
    sampling = sampling or SamplingParams()
    logits = response_logits(model, input_ids, attention_mask, response_length)  # (B, R, V)
    return processed_log_probs(logits, input_ids[:, -response_length:], sampling, kept)


def response_logits(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
) -> torch.Tensor:
    """The raw logits that predict each of the last `response_length` tokens, (B, R, V).

    Position t-1 predicts token t: the R logits before each response token.
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).logits  # (B, P+R, V)
    return logits[:, -response_length - 1 : -1, :]
