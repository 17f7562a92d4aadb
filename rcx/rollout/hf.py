"""The `hf` rollout engine: Hugging Face `generate` on a separate, explicitly synced weight copy.

Generation runs with the KV cache on left-padded prompts. Behaviour log-probs come from the
*processed* scores generate returns (`output_scores`: temperature, top-k, top-p applied), not from
the raw logits, so they are the log-probs of the distribution each token was drawn from. Every
sampling field of the `GenerationConfig` is set explicitly, and the rollout copy's own
`generation_config` is replaced by a neutral one, so a model directory's `generation_config.json`
(Qwen ships top_k=20, repetition_penalty=1.05, ...) cannot silently change the distribution.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rcx.models.loading import resolve_dtype
from rcx.rollout.base import (
    RolloutBatch,
    SamplingParams,
    left_pad,
    response_mask_through_eos,
)
from rcx.rollout.quant import fake_quantize_model_


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id that ends a response: the tokenizer's EOS plus those of the model config
    and of its generation config (chat models list several, e.g. `<|im_end|>` and
    `<|endoftext|>`)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    generation = getattr(model, "generation_config", None)
    for configured in (
        getattr(model.config, "eos_token_id", None),
        getattr(generation, "eos_token_id", None),
    ):
        if isinstance(configured, int):
            ids.add(configured)
        elif configured:
            ids.update(int(i) for i in configured)
    if not ids:
        raise ValueError("the tokenizer and the model config define no EOS token")
    return sorted(ids)


class HFRolloutEngine:
    """Generate with `transformers` from a rollout copy of the trainer's weights.

    The copy lives on `device` in `dtype`, fake-quantised per `quantization`, and is refreshed by
    `sync_weights(model, version)`.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        dtype: str = "float32",
        quantization: str = "none",
        device: str | torch.device = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.dtype = resolve_dtype(dtype)
        self.quantization = quantization
        self.device = torch.device(device)
        self.pad_token_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        self.model.requires_grad_(False)
        self.model.eval()
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_token_ids, pad_token_id=self.pad_token_id
        )
        fake_quantize_model_(self.model, quantization)
        self.weight_version = 0

    def sync_weights(self, model: PreTrainedModel, version: int) -> None:
        """Copy `model`'s weights into the rollout copy (cast and quantised); `weight_version`
        becomes `version`."""
        with torch.no_grad():
            self.model.load_state_dict(model.state_dict())  # copies and casts to self.dtype
        fake_quantize_model_(self.model, self.quantization)
        self.weight_version = version

    def state_dict(self, with_weights: bool = True) -> dict[str, Any]:
        """The rollout copy (as used for sampling) and its version, for exact resume.

        Without `with_weights` only the version is kept (`"weights": None`): for a trainer that
        refreshes the copy before every step, the weights are not needed to resume.
        """
        weights = None
        if with_weights:
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {
            "weight_version": self.weight_version,
            "weights": weights,
            "dtype": str(self.dtype),
            "quantization": self.quantization,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a copy saved by `state_dict` (already cast and quantised: loaded as is;
        without weights, only the version: the next `sync_weights` refreshes the copy)."""
        if state.get("dtype") != str(self.dtype) or state.get("quantization") != self.quantization:
            raise ValueError(
                "the checkpointed rollout copy was made with "
                f"dtype={state.get('dtype')}, quantization={state.get('quantization')}; this run "
                f"uses dtype={self.dtype}, quantization={self.quantization}"
            )
        if state["weights"] is not None:
            with torch.no_grad():
                self.model.load_state_dict(state["weights"])
        self.weight_version = int(state["weight_version"])

    def generation_config(self, sampling: SamplingParams) -> GenerationConfig:
        """A GenerationConfig with every field that shapes the distribution set explicitly."""
        common = dict(
            max_new_tokens=sampling.max_new_tokens,
            min_new_tokens=0,
            num_beams=1,
            repetition_penalty=1.0,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
            use_cache=True,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
        )
        if not sampling.do_sample:
            # Greedy: one decode per prompt, repeated n times by the caller; no warpers apply.
            return GenerationConfig(do_sample=False, num_return_sequences=1, **common)
        return GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,  # 0 disables HF's top-k
            top_p=sampling.top_p,
            num_return_sequences=sampling.n,
            **common,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        seed: int | None = None,
        sampling_mask: bool = False,
    ) -> RolloutBatch:
        """Sample `sampling.n` responses per prompt (token-id lists) from the rollout copy.

        With `seed`, sampling is a pure function of (weights, prompts, sampling, seed) and the
        global RNG is left untouched; without it, the global torch RNG is used. With
        `sampling_mask`, the batch carries each position's kept token set (B, R, V): the tokens
        whose processed score is finite (top-k and top-p set the others to -inf).
        """
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)  # (N, P)
        with torch.random.fork_rng(devices=self._rng_devices(), enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=prompt_ids.to(self.device),
                attention_mask=prompt_mask.to(self.device),
                generation_config=self.generation_config(sampling),
            )
        width = prompt_ids.shape[1]
        response_ids = out.sequences[:, width:].cpu()  # (B, R), R = longest response in batch
        scores = torch.stack(out.scores, dim=1).float().cpu()  # (B, R, V) processed scores
        if not sampling.do_sample and sampling.n > 1:
            response_ids = response_ids.repeat_interleave(sampling.n, dim=0)
            scores = scores.repeat_interleave(sampling.n, dim=0)
        log_probs = torch.log_softmax(scores, dim=-1)
        sampled = log_probs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)  # (B, R)
        response_mask = response_mask_through_eos(response_ids, self.eos_token_ids)  # (B, R)
        response_ids = response_ids.masked_fill(response_mask == 0, self.pad_token_id)
        return RolloutBatch(
            prompt_ids=prompt_ids.repeat_interleave(sampling.n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(sampling.n, dim=0),
            response_ids=response_ids,
            response_mask=response_mask,
            rollout_log_probs=sampled.masked_fill(response_mask == 0, 0.0),
            prompt_index=torch.arange(len(prompts)).repeat_interleave(sampling.n),
            weight_version=self.weight_version,
            sampling_mask=torch.isfinite(scores) if sampling_mask else None,
        )

    def _rng_devices(self) -> list[int]:
        return [self.device.index or 0] if self.device.type == "cuda" else []
