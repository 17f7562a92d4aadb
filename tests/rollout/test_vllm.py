"""The vllm engine: pure conversion logic on CPU; the engine itself only with CUDA and vllm."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from rcx.rollout import SamplingParams
from rcx.rollout.vllm import (
    VLLMUnavailableError,
    outputs_to_batch,
    vllm_engine_kwargs,
    vllm_request_params,
    vllm_sampling_kwargs,
)

HAS_VLLM_GPU = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


def completion(token_ids, log_probs):
    logprobs = [
        {t: SimpleNamespace(logprob=lp)} for t, lp in zip(token_ids, log_probs, strict=True)
    ]
    return SimpleNamespace(token_ids=token_ids, logprobs=logprobs)


def test_outputs_to_batch_pads_masks_and_cuts_at_eos():
    eos, pad = 2, 0
    outputs = [
        SimpleNamespace(
            outputs=[completion([5, 6, eos], [-0.1, -0.2, -0.3]), completion([7], [-0.4])]
        ),
        SimpleNamespace(
            outputs=[
                completion([8, eos, 9], [-0.5, -0.6, -0.7]),
                completion([5, 5, 5, 5], [-1.0] * 4),
            ]
        ),
    ]
    batch = outputs_to_batch(outputs, [[10, 11], [12]], SamplingParams(n=2), pad, [eos], 3)
    assert batch.response_ids.tolist() == [[5, 6, 2, 0], [7, 0, 0, 0], [8, 2, 0, 0], [5, 5, 5, 5]]
    assert batch.response_mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert torch.allclose(batch.rollout_log_probs[2], torch.tensor([-0.5, -0.6, 0.0, 0.0]))
    assert batch.prompt_ids.tolist() == [[10, 11], [10, 11], [0, 12], [0, 12]]
    assert batch.prompt_index.tolist() == [0, 0, 1, 1] and batch.weight_version == 3


def test_outputs_to_batch_rejects_missing_logprobs_and_wrong_n():
    no_logprobs = [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[1], logprobs=None)])]
    with pytest.raises(VLLMUnavailableError, match="no logprobs"):
        outputs_to_batch(no_logprobs, [[1]], SamplingParams(n=1), 0, [2], 0)
    one = [SimpleNamespace(outputs=[completion([1], [-0.1])])]
    with pytest.raises(VLLMUnavailableError, match="completions"):
        outputs_to_batch(one, [[1]], SamplingParams(n=2), 0, [2], 0)


def test_sampling_kwargs():
    sampled = vllm_sampling_kwargs(
        SamplingParams(n=4, temperature=0.7, top_k=5, top_p=0.9, max_new_tokens=32), seed=1
    )
    assert sampled == {
        "n": 4,
        "max_tokens": 32,
        "logprobs": 0,
        "seed": 1,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
    }
    greedy = vllm_sampling_kwargs(SamplingParams(do_sample=False), seed=None)
    assert greedy["temperature"] == 0.0 and greedy["top_k"] == -1


def test_per_prompt_seeds_give_one_request_params_per_prompt():
    """A seed per prompt: one SamplingParams per request, each with its prompt's seed."""

    class FakeVllm:
        @staticmethod
        def SamplingParams(**kwargs):  # noqa: N802 - vLLM's name
            return kwargs

    sampling = SamplingParams(n=2, max_new_tokens=4)
    batch_params = vllm_request_params(FakeVllm, sampling, 7, prompts=3)
    assert batch_params["seed"] == 7
    per_prompt = vllm_request_params(FakeVllm, sampling, [4, 5, 6], prompts=3)
    assert [p["seed"] for p in per_prompt] == [4, 5, 6]
    assert all(p["n"] == 2 for p in per_prompt)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        vllm_request_params(FakeVllm, sampling, [1, 2], prompts=3)


def test_engine_kwargs_map_knobs_and_refuse_int8():
    kwargs = vllm_engine_kwargs("/m", "bfloat16", "fp8", 0.4, 0)
    assert kwargs["quantization"] == "fp8" and kwargs["dtype"] == "bfloat16"
    assert kwargs["logprobs_mode"] == "processed_logprobs"
    assert "quantization" not in vllm_engine_kwargs("/m", "float32", "none", 0.4, 0)
    with pytest.raises(VLLMUnavailableError, match="int8"):
        vllm_engine_kwargs("/m", "bfloat16", "int8", 0.4, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_vllm_engine_without_cuda_is_a_clear_error():
    from rcx.models.loading import build_tiny_model
    from rcx.rollout import make_rollout_engine

    model, tokenizer = build_tiny_model(0)
    with pytest.raises(VLLMUnavailableError, match="CUDA"):
        make_rollout_engine("vllm", model, tokenizer, model_path="/nowhere")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM_GPU, reason="needs CUDA and vllm")
def test_vllm_log_probs_match_teacher_forcing_and_weight_push(tmp_path):
    from rcx.models.loading import build_tiny_model, save_model_dir
    from rcx.rollout import make_rollout_engine, token_log_probs

    model, tokenizer = build_tiny_model(0)
    path = save_model_dir(model, tokenizer, tmp_path / "tiny", builtin=True)
    engine = make_rollout_engine(
        "vllm", model, tokenizer, model_path=str(path), dtype="float32", gpu_memory_utilization=0.2
    )
    prompts = [tokenizer(s)["input_ids"] for s in ["12+34=", "1+2="]]
    sampling = SamplingParams(n=4, temperature=0.8, top_k=10, max_new_tokens=8)
    batch = engine.generate(prompts, sampling, seed=0)
    with torch.no_grad():
        recomputed = token_log_probs(
            model, batch.input_ids, batch.attention_mask, batch.response_length, sampling
        )
    error = ((recomputed - batch.rollout_log_probs).abs() * batch.response_mask).max()
    assert error < 1e-3
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    engine.sync_weights(model, version=1)
    pushed = engine.generate(prompts, sampling, seed=0)
    with torch.no_grad():
        recomputed = token_log_probs(
            model, pushed.input_ids, pushed.attention_mask, pushed.response_length, sampling
        )
    assert ((recomputed - pushed.rollout_log_probs).abs() * pushed.response_mask).max() < 1e-3


class FakeModel:
    def __init__(self):
        self.loaded = None

    def load_weights(self, weights):
        self.loaded = dict(weights)


def test_weight_push_uses_apply_model_or_the_inner_model():
    from rcx.rollout.vllm import load_weights_into

    weights = {"w": torch.ones(2)}
    model = FakeModel()
    with_apply = SimpleNamespace(apply_model=lambda fn: fn(model))
    load_weights_into(with_apply, weights)
    assert model.loaded.keys() == {"w"}
    older = FakeModel()
    worker = SimpleNamespace(model_runner=SimpleNamespace(model=older))
    legacy = SimpleNamespace(
        llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=worker))
    )
    load_weights_into(legacy, weights)
    assert torch.equal(older.loaded["w"], torch.ones(2))
    unreachable = SimpleNamespace(
        llm_engine=SimpleNamespace(model_executor=SimpleNamespace(driver_worker=None))
    )
    with pytest.raises(VLLMUnavailableError, match="weight pushes"):
        load_weights_into(unreachable, weights)
