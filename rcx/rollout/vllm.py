"""The `vllm` rollout engine (GPU): vLLM in the same process, weights pushed at each sync.

vLLM is imported lazily, so rcx installs and runs without it. The engine loads the architecture
from a local HF directory (`model_path`, e.g. the warm-start directory of `builtin:tiny`) and then
receives the trainer's weights through the model's `load_weights` at every `sync_weights`.
Log-probs of the sampled tokens are requested with `logprobs_mode=
"processed_logprobs"` (temperature, top-k, top-p applied), matching the `hf` engine's contract.

Mismatch knobs: `rollout.dtype` is vLLM's `dtype`; `rollout.quantization: fp8` is vLLM's dynamic
fp8 weight quantisation; `int8` has no vLLM equivalent without a pre-quantised checkpoint and is
refused with a clear error.

Status: this module's pure logic (sampling arguments, output conversion) is unit-tested on CPU;
the engine itself has NOT yet run on a GPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rcx.errors import RcxError
from rcx.rollout.base import RolloutBatch, SamplingParams, left_pad

VLLM_QUANTIZATION = {"none": None, "fp8": "fp8"}


class VLLMUnavailableError(RcxError, RuntimeError):
    """vLLM or CUDA is missing, or the configuration cannot be served by vLLM."""


def vllm_request_params(
    vllm_module: Any, sampling: SamplingParams, seed: int | Sequence[int] | None, prompts: int
) -> Any:
    """What `LLM.generate` takes as its sampling parameters: one `SamplingParams` for the
    batch (`seed` an int or None), or one per prompt, each with its own seed (`seed` a
    sequence): then a prompt's samples do not depend on the batch it is in, as with the hf
    engine's per-prompt seeds."""
    if not isinstance(seed, Sequence):
        return vllm_module.SamplingParams(**vllm_sampling_kwargs(sampling, seed))
    if len(seed) != prompts:
        raise ValueError(f"{len(seed)} seeds for {prompts} prompts")
    return [vllm_module.SamplingParams(**vllm_sampling_kwargs(sampling, int(s))) for s in seed]


def vllm_sampling_kwargs(sampling: SamplingParams, seed: int | None) -> dict[str, Any]:
    """Keyword arguments of `vllm.SamplingParams` for `sampling` (logprob of the sampled token)."""
    kwargs: dict[str, Any] = {
        "n": sampling.n,
        "max_tokens": sampling.max_new_tokens,
        "logprobs": 0,  # the sampled token's log-prob only
        "seed": seed,
    }
    if sampling.do_sample:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
    else:
        kwargs.update(temperature=0.0, top_p=1.0, top_k=-1)
    return kwargs


def vllm_engine_kwargs(
    model_path: str, dtype: str, quantization: str, gpu_memory_utilization: float, seed: int
) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for the rollout settings."""
    if quantization not in VLLM_QUANTIZATION:
        raise VLLMUnavailableError(
            f"actor_rollout_ref.rollout.quantization={quantization!r} is not available with "
            "rollout.name=vllm (use none or fp8, or the hf engine for int8)"
        )
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": dtype,
        "gpu_memory_utilization": gpu_memory_utilization,
        "seed": seed,
        "enforce_eager": True,
        "logprobs_mode": "processed_logprobs",
        "skip_tokenizer_init": True,
    }
    if VLLM_QUANTIZATION[quantization]:
        kwargs["quantization"] = VLLM_QUANTIZATION[quantization]
    return kwargs


def sampled_log_probs(token_ids: list[int], logprobs: list[dict[int, Any]] | None) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position `{token_id: Logprob}` dicts."""
    if logprobs is None:
        raise VLLMUnavailableError("vLLM returned no logprobs (was logprobs=0 requested?)")
    values = []
    for token, entry in zip(token_ids, logprobs, strict=True):
        item = entry[token]
        values.append(float(getattr(item, "logprob", item)))
    return values


def outputs_to_batch(
    request_outputs: list[Any],
    prompts: list[list[int]],
    sampling: SamplingParams,
    pad_token_id: int,
    eos_token_ids: list[int],
    weight_version: int,
) -> RolloutBatch:
    """Convert vLLM `RequestOutput`s (one per prompt, `n` completions each) to a RolloutBatch.

    vLLM stops at EOS and includes it in `token_ids` (unless it hit max_tokens), so the mask is
    1 over each completion's tokens, through the first EOS.
    """
    responses: list[list[int]] = []
    log_probs: list[list[float]] = []
    for request in request_outputs:
        completions = list(request.outputs)
        if len(completions) != sampling.n:
            raise VLLMUnavailableError(f"vLLM returned {len(completions)} completions, not n")
        for completion in completions:
            ids = list(completion.token_ids)
            values = sampled_log_probs(ids, completion.logprobs)
            cut = next((i + 1 for i, t in enumerate(ids) if t in eos_token_ids), len(ids))
            responses.append(ids[:cut])
            log_probs.append(values[:cut])
    width = max(1, max(len(r) for r in responses))
    response_ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long)  # (B, R)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)  # (B, R)
    rollout_log_probs = torch.zeros((len(responses), width), dtype=torch.float32)  # (B, R)
    for row, (ids, values) in enumerate(zip(responses, log_probs, strict=True)):
        response_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        response_mask[row, : len(ids)] = 1
        rollout_log_probs[row, : len(values)] = torch.tensor(values, dtype=torch.float32)
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    return RolloutBatch(
        prompt_ids=prompt_ids.repeat_interleave(sampling.n, dim=0),
        prompt_mask=prompt_mask.repeat_interleave(sampling.n, dim=0),
        response_ids=response_ids,
        response_mask=response_mask,
        rollout_log_probs=rollout_log_probs,
        prompt_index=torch.arange(len(prompts)).repeat_interleave(sampling.n),
        weight_version=weight_version,
    )


def inner_model(llm: Any) -> Any:
    """The torch model inside an in-process vLLM `LLM` (V1 and older layouts)."""
    executor = llm.llm_engine.model_executor
    worker = getattr(executor, "driver_worker", None)
    for path in (("worker", "model_runner", "model"), ("model_runner", "model")):
        node = worker
        for attr in path:
            node = getattr(node, attr, None)
        if node is not None:
            return node
    raise VLLMUnavailableError(
        "cannot reach the model inside this vLLM version for weight pushes; "
        "VLLM_ENABLE_V1_MULTIPROCESSING=0 is required"
    )


def load_weights_into(
    llm: Any, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Push `weights` (HF parameter names) into vLLM's model: `LLM.apply_model` when the
    version has it, else the in-process model object. An iterable of pairs is streamed, one
    tensor at a time (the in-process engine consumes it once)."""
    items = list(weights.items()) if isinstance(weights, Mapping) else weights
    if hasattr(llm, "apply_model"):
        llm.apply_model(lambda model: model.load_weights(weights=items))
    else:
        inner_model(llm).load_weights(weights=items)


class VLLMRolloutEngine:
    """Generate with vLLM from weights pushed from the trainer at each refreshing sync."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        model_path: str | None,
        dtype: str = "bfloat16",
        quantization: str = "none",
        gpu_memory_utilization: float = 0.5,
        seed: int = 0,
    ) -> None:
        if not torch.cuda.is_available():
            raise VLLMUnavailableError(
                "actor_rollout_ref.rollout.name=vllm needs a CUDA GPU; use rollout.name=hf"
            )
        if model_path is None:
            # No directory (builtin:tiny built in memory): give vLLM one to read the
            # architecture from; the weights are pushed right after anyway.
            from rcx.models.loading import save_model_dir

            self._tempdir = tempfile.TemporaryDirectory(prefix="rcx-vllm-")
            model_path = str(save_model_dir(model, tokenizer, self._tempdir.name, builtin=True))
        if not os.path.isdir(model_path):
            raise VLLMUnavailableError(
                "actor_rollout_ref.rollout.name=vllm needs a local HF model directory "
                f"(got model_path={model_path!r})"
            )
        try:
            import vllm
        except ImportError as err:
            raise VLLMUnavailableError(
                "actor_rollout_ref.rollout.name=vllm needs vllm: pip install 'rcx[vllm]'"
            ) from err
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights pushed in-process
        self._vllm = vllm
        self.llm = vllm.LLM(
            **vllm_engine_kwargs(model_path, dtype, quantization, gpu_memory_utilization, seed)
        )
        self.pad_token_id = int(
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        from rcx.rollout.hf import eos_token_ids

        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.weight_version = 0
        self._last_weights: dict[str, torch.Tensor] | None = None
        self.push_weights(model)

    def push_weights(self, model: PreTrainedModel) -> None:
        """Load `model`'s current weights into the vLLM model."""
        from rcx.models.weights import full_state_items

        kept: dict[str, torch.Tensor] = {}

        def gathered() -> Iterator[tuple[str, torch.Tensor]]:
            # One tensor at a time (gathered when sharded): never the whole model twice.
            for name, value in full_state_items(model):
                kept[name] = value.detach().cpu().clone()
                yield name, value.detach()

        load_weights_into(self.llm, gathered())
        self._last_weights = kept

    def sync_weights(self, model: PreTrainedModel, version: int) -> None:
        """Push `model`'s weights; `weight_version` becomes `version`."""
        self.push_weights(model)
        self.weight_version = version

    def state_dict(self, with_weights: bool = True) -> dict[str, Any]:
        """The last pushed weights (trainer precision) and their version (weights left out
        without `with_weights`: the next sync pushes anyway)."""
        weights = self._last_weights if with_weights else None
        return {"weight_version": self.weight_version, "weights": weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Push the checkpointed weights back into vLLM."""
        if state["weights"] is not None:  # None: the next sync pushes anyway
            load_weights_into(self.llm, state["weights"])
            self._last_weights = state["weights"]
        self.weight_version = int(state["weight_version"])

    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        seed: int | Sequence[int] | None = None,
        sampling_mask: bool = False,
    ) -> RolloutBatch:
        """Sample `sampling.n` responses per prompt with vLLM (no sampling masks: RCX-E015);
        `seed` as for the hf engine (:func:`vllm_request_params`)."""
        if sampling_mask:
            raise ValueError(
                "the vllm engine does not report sampling masks; sampling_mask_replay needs "
                "actor_rollout_ref.rollout.name=hf"
            )
        params = vllm_request_params(self._vllm, sampling, seed, len(prompts))
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return outputs_to_batch(
            outputs, prompts, sampling, self.pad_token_id, self.eos_token_ids, self.weight_version
        )
