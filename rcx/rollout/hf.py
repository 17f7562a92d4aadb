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
import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rcx.models.loading import resolve_dtype
from rcx.rollout.base import (
    RolloutBatch,
    SamplingParams,
    left_pad,
    response_mask_through_eos,
    sampling_processors,
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


def sample_seeds(prompt_seeds: Sequence[int], n: int) -> list[int]:
    """One seed per sample: sample j of the prompt seeded ``s`` gets ``crc32("s|j")`` (31 bits)."""
    return [zlib.crc32(f"{s}|{j}".encode()) & 0x7FFFFFFF for s in prompt_seeds for j in range(n)]


class RowSeededSampler(LogitsProcessor):
    """Draws every row's next token with that row's own generator, so that a sample depends on
    its seed and its scores only, never on the other rows of the batch (or on how prompts were
    split into batches or across ranks).

    Gumbel-max: ``argmax(s + G)`` with ``G = -log(-log U)`` and ``U ~ Uniform(0, 1)^V`` per row
    is a draw from ``softmax(s)``; ``-inf`` scores (top-k/top-p) are never drawn. Each call
    records the processed scores ``s`` (B, V) in :attr:`scores` and returns scores that are
    ``-inf`` except at the drawn token, so that greedy decoding emits the draw.
    """

    def __init__(
        self, seeds: Sequence[int], processors: LogitsProcessorList, device: torch.device
    ) -> None:
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        self.processors = processors
        self.scores: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        processed = self.processors(input_ids, scores.float())  # (B, V)
        self.scores.append(processed)
        vocab = processed.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, device=processed.device) for g in self.generators]
        )  # (B, V)
        tiny = torch.finfo(uniform.dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp_min(tiny)))
        drawn = (processed + gumbel).argmax(-1, keepdim=True)  # (B, 1)
        forced = torch.full_like(processed, -torch.inf)
        return forced.scatter_(-1, drawn, 0.0)


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
        becomes `version`. `model` may be FSDP-sharded: every rank must then call this."""
        from rcx.models.weights import full_state_items

        own = self.model.state_dict()
        with torch.no_grad():
            for name, value in full_state_items(model):  # one tensor at a time (sharded: gathered)
                own[name].copy_(value)  # casts to self.dtype
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
        seed: int | Sequence[int] | None = None,
        sampling_mask: bool = False,
    ) -> RolloutBatch:
        """Sample `sampling.n` responses per prompt (token-id lists) from the rollout copy.

        `seed` is one of:

        - a sequence, one seed per prompt: every sample is drawn with its own generator
          (:class:`RowSeededSampler`, seeds from :func:`sample_seeds`), so a prompt's responses
          are the same whichever batch, or rank, it is generated in. The trainer's way.
        - an int: Hugging Face's own sampling, seeded once for the batch (one sample's draw then
          depends on the batch it is in).
        - None: Hugging Face's sampling from the global torch RNG.

        With a seed the global RNG is left untouched. With `sampling_mask`, the batch carries
        each position's kept token set (B, R, V): the tokens whose processed score is finite
        (top-k and top-p set the others to -inf).
        """
        if isinstance(seed, Sequence) and sampling.do_sample:
            return self._generate_row_seeded(prompts, sampling, seed, sampling_mask)
        if isinstance(seed, Sequence):
            seed = seed[0] if seed else None  # greedy: nothing is drawn
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
        return self._to_batch(
            prompts, prompt_ids, prompt_mask, response_ids, scores, sampling, sampling_mask
        )

    def _generate_row_seeded(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        prompt_seeds: Sequence[int],
        sampling_mask: bool,
    ) -> RolloutBatch:
        """:meth:`generate` with one generator per sample: greedy decoding over the scores that
        :class:`RowSeededSampler` forces, the true processed scores taken from the sampler."""
        if len(prompt_seeds) != len(prompts):
            raise ValueError(f"{len(prompt_seeds)} seeds for {len(prompts)} prompts")
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)  # (N, P)
        n = sampling.n
        sampler = RowSeededSampler(
            sample_seeds(prompt_seeds, n), sampling_processors(sampling), self.device
        )
        greedy = dataclasses.replace(sampling, do_sample=False, n=1)
        out = self.model.generate(
            input_ids=prompt_ids.repeat_interleave(n, dim=0).to(self.device),
            attention_mask=prompt_mask.repeat_interleave(n, dim=0).to(self.device),
            generation_config=self.generation_config(greedy),
            logits_processor=LogitsProcessorList([sampler]),
        )
        width = prompt_ids.shape[1]
        response_ids = out.sequences[:, width:].cpu()  # (B, R)
        scores = torch.stack(sampler.scores, dim=1).float().cpu()  # (B, R, V) processed scores
        return self._to_batch(
            prompts, prompt_ids, prompt_mask, response_ids, scores, sampling, sampling_mask
        )

    def _to_batch(
        self,
        prompts: list[list[int]],
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        response_ids: torch.Tensor,
        scores: torch.Tensor,
        sampling: SamplingParams,
        sampling_mask: bool,
    ) -> RolloutBatch:
        """The :class:`RolloutBatch` of generated ids (B, R) and their processed scores
        (B, R, V); greedy decodes (one per prompt) are repeated ``n`` times."""
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
