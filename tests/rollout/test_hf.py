"""The hf engine: log-probs equal a teacher-forced recomputation, masks, sync and staleness."""

from __future__ import annotations

import copy

import pytest
import torch

from rcx.models.loading import build_tiny_model
from rcx.rollout import (
    RolloutBatch,
    SamplingParams,
    left_pad,
    make_rollout_engine,
    processed_log_probs,
    response_mask_through_eos,
    token_log_probs,
)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return build_tiny_model(seed=0)


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tokenizer = tiny
    return [tokenizer(s)["input_ids"] for s in ["12+34=", "1+2=", "99+99=", "rev abc="]]


def masked_max_abs(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return ((a - b).abs() * mask).max().item()


def test_left_pad_and_eos_mask():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    response = torch.tensor([[4, 2, 0, 0], [4, 4, 4, 4], [2, 4, 2, 0]])
    assert response_mask_through_eos(response, [2]).tolist() == [
        [1, 1, 0, 0],  # through the first EOS, inclusive
        [1, 1, 1, 1],  # no EOS: the whole response
        [1, 0, 0, 0],  # a later EOS does not re-open the mask
    ]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(n=3, max_new_tokens=10),
        SamplingParams(n=3, temperature=0.7, top_k=5, max_new_tokens=10),
        SamplingParams(n=3, temperature=1.3, top_p=0.8, max_new_tokens=10),
        SamplingParams(n=2, do_sample=False, max_new_tokens=10),
    ],
    ids=["plain", "temp-topk", "temp-topp", "greedy"],
)
def test_rollout_log_probs_match_teacher_forcing(tiny, prompts, sampling):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    batch = engine.generate(prompts, sampling, seed=1)
    assert batch.response_ids.shape[0] == len(prompts) * sampling.n
    assert batch.prompt_index.tolist() == [
        i for i in range(len(prompts)) for _ in range(sampling.n)
    ]
    with torch.no_grad():
        recomputed = token_log_probs(
            engine.model, batch.input_ids, batch.attention_mask, batch.response_length, sampling
        )
    assert masked_max_abs(recomputed, batch.rollout_log_probs, batch.response_mask) < 1e-4
    assert (batch.rollout_log_probs <= 0).all()
    if sampling.top_k > 0:
        # Truncation renormalises: the sampled tokens carry more mass than under the full softmax.
        with torch.no_grad():
            full = token_log_probs(
                engine.model,
                batch.input_ids,
                batch.attention_mask,
                batch.response_length,
                SamplingParams(temperature=0.7),
            )
        assert ((batch.rollout_log_probs - full) * batch.response_mask).sum() > 0


def test_masks_and_padding_at_eos(tiny, prompts):
    model, tokenizer = tiny
    batch = make_rollout_engine("hf", model, tokenizer).generate(
        prompts, SamplingParams(n=4, max_new_tokens=12), seed=3
    )
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for ids, mask, log_probs in zip(
        batch.response_ids, batch.response_mask, batch.rollout_log_probs, strict=True
    ):
        length = int(mask.sum())
        assert mask[:length].all() and not mask[length:].any()  # contiguous from the start
        assert (ids[length:] == pad).all() and (log_probs[length:] == 0).all()
        if eos in ids[:length].tolist():
            assert ids[length - 1] == eos and ids[: length - 1].tolist().count(eos) == 0
    assert batch.prompt_mask.sum(1).tolist() == [len(p) for p in prompts for _ in range(4)]


def test_seeded_generation_is_reproducible_and_leaves_global_rng(tiny, prompts):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    sampling = SamplingParams(n=2, max_new_tokens=8)
    state = torch.random.get_rng_state()
    a = engine.generate(prompts, sampling, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = engine.generate(prompts, sampling, seed=5)
    c = engine.generate(prompts, sampling, seed=6)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)


def perturbed(model, scale: float, seed: int):
    """A copy of `model` after a small random update (a stand-in for an optimiser step)."""
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return moved


def mismatch(engine, trainer_model, prompts) -> tuple[float, float]:
    """(mean, max) |log r| between the trainer model and the engine's rollout log-probs."""
    batch = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=10), seed=0)
    with torch.no_grad():
        train = token_log_probs(
            trainer_model, batch.input_ids, batch.attention_mask, batch.response_length
        )
    log_ratio = (train - batch.rollout_log_probs).abs() * batch.response_mask
    return (log_ratio.sum() / batch.response_mask.sum()).item(), log_ratio.max().item()


def test_float32_sync_every_step_has_no_mismatch(tiny, prompts):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    updated = perturbed(model, 0.01, seed=1)
    engine.sync_weights(updated, version=1)
    assert engine.weight_version == 1
    mean, largest = mismatch(engine, updated, prompts)
    assert largest < 1e-4


@pytest.mark.parametrize(
    ("knob", "low", "high"),
    [
        ({"dtype": "bfloat16"}, 1e-4, 1.0),
        ({"dtype": "float16"}, 1e-6, 0.1),
        ({"quantization": "int8"}, 1e-5, 0.5),
        ({"quantization": "fp8"}, 1e-4, 1.0),
    ],
)
def test_every_precision_knob_gives_nonzero_bounded_mismatch(tiny, prompts, knob, low, high):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer, **knob)
    mean, largest = mismatch(engine, model, prompts)
    assert low < mean < high and largest < 5.0


def test_the_copy_stays_stale_until_synced(tiny, prompts):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    trainer = model
    for step in range(1, 5):
        trainer = perturbed(trainer, 0.01, seed=step)  # one "update" per step
    engine.sync_weights(trainer, version=4)
    trainer = perturbed(trainer, 0.01, seed=5)
    assert engine.weight_version == 4
    mean, largest = mismatch(engine, trainer, prompts)  # one update behind
    assert 1e-4 < mean < 1.0
    engine.sync_weights(trainer, version=5)
    assert mismatch(engine, trainer, prompts)[1] < 1e-4


def test_state_dict_round_trip_restores_stale_copy(tiny, prompts):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer, dtype="bfloat16")
    engine.sync_weights(perturbed(model, 0.01, seed=2), version=3)
    state = engine.state_dict()
    restored = make_rollout_engine("hf", model, tokenizer, dtype="bfloat16")
    restored.load_state_dict(state)
    assert restored.weight_version == 3
    sampling = SamplingParams(n=2, max_new_tokens=8)
    a = engine.generate(prompts, sampling, seed=9)
    b = restored.generate(prompts, sampling, seed=9)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.rollout_log_probs, b.rollout_log_probs)
    float32 = make_rollout_engine("hf", model, tokenizer)
    with pytest.raises(ValueError, match="dtype"):
        float32.load_state_dict(state)
    assert engine.state_dict(with_weights=False)["weights"] is None  # version only


def test_rollout_copy_is_separate_from_trainer(tiny):
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    before = engine.model.model.embed_tokens.weight.clone()
    trainer = perturbed(model, 0.1, seed=0)
    assert torch.equal(engine.model.model.embed_tokens.weight, before)
    engine.sync_weights(trainer, version=1)
    assert not torch.equal(engine.model.model.embed_tokens.weight, before)
    assert all(not p.requires_grad for p in engine.model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "sglang"}, "not an engine"),
        ({"quantization": "int4"}, "quantization"),
    ],
)
def test_engine_config_errors(tiny, kwargs, message):
    model, tokenizer = tiny
    args = {"name": "hf", **kwargs}
    with pytest.raises(ValueError, match=message):
        make_rollout_engine(args.pop("name"), model, tokenizer, **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"n": 0}, "rollout.n"),
    ],
)
def test_sampling_params_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_sampling_params_from_config_reads_val_kwargs():
    from types import SimpleNamespace

    val = SimpleNamespace(n=1, temperature=0.5, top_p=1.0, top_k=-1, do_sample=False)
    rollout = SimpleNamespace(
        n=4, temperature=1.0, top_p=0.9, top_k=10, do_sample=True, val_kwargs=val
    )
    train = SamplingParams.from_config(rollout, 12)
    assert (train.n, train.top_p, train.top_k, train.max_new_tokens) == (4, 0.9, 10, 12)
    assert SamplingParams.from_config(rollout, 12, validation=True).do_sample is False


def test_batch_to_device_keeps_fields(tiny, prompts):
    model, tokenizer = tiny
    batch = make_rollout_engine("hf", model, tokenizer).generate(
        prompts, SamplingParams(max_new_tokens=4), seed=0
    )
    moved = batch.to("cpu")
    assert isinstance(moved, RolloutBatch) and torch.equal(moved.input_ids, batch.input_ids)


def test_eos_ids_include_generation_config_ones(tiny):
    from transformers import GenerationConfig

    from rcx.rollout.hf import eos_token_ids

    model, tokenizer = tiny
    chat_model = copy.deepcopy(model)
    chat_model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, 7])
    assert eos_token_ids(chat_model, tokenizer) == sorted({tokenizer.eos_token_id, 7})


def test_kept_set_renormalises_the_distribution():
    # probs [0.1, 0.2, 0.3, 0.4]; kept set {2, 3}: token 3 gets 0.4 / 0.7, token 2 0.3 / 0.7.
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.3, 0.4]] * 2]))  # (1, 2, 4)
    kept = torch.tensor([[[False, False, True, True]] * 2])
    got = processed_log_probs(logits, torch.tensor([[3, 2]]), SamplingParams(), kept)
    assert got.exp().tolist()[0] == pytest.approx([0.4 / 0.7, 0.3 / 0.7])


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(n=3, top_p=0.8, max_new_tokens=10),
        SamplingParams(n=3, temperature=0.7, top_k=3, max_new_tokens=10),
    ],
    ids=["topp", "topk"],
)
def test_sampling_mask_replay_matches_the_rollout_log_probs(tiny, prompts, sampling):
    # The trainer scores at temperature only, over the rollout's kept sets: the same numbers as
    # the rollout reported; over the full vocabulary they differ (the truncation mismatch).
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    batch = engine.generate(prompts, sampling, seed=1, sampling_mask=True)
    assert batch.sampling_mask.shape == (*batch.response_ids.shape, model.config.vocab_size)
    scoring = SamplingParams(temperature=sampling.temperature)
    args = (engine.model, batch.input_ids, batch.attention_mask, batch.response_length, scoring)
    with torch.no_grad():
        replayed = token_log_probs(*args, batch.sampling_mask)
        full = token_log_probs(*args)
    mask = batch.response_mask
    assert masked_max_abs(replayed, batch.rollout_log_probs, mask) < 1e-5
    assert masked_max_abs(full, batch.rollout_log_probs, mask) > 1e-3
    assert engine.generate(prompts, sampling, seed=1).sampling_mask is None


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(n=3, max_new_tokens=10), SamplingParams(n=2, top_k=5, top_p=0.9)],
    ids=["plain", "topk-topp"],
)
def test_per_prompt_seeds_make_samples_independent_of_the_batch(tiny, prompts, sampling):
    """One seed per prompt: a prompt's responses and log-probs are the same whether it is
    generated with every other prompt or alone in a batch of different padding (what makes a
    2-rank run sample what a 1-process run samples)."""
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    seeds = [11, 12, 13, 14]
    whole = engine.generate(prompts, sampling, seed=seeds)
    n = sampling.n
    for i, prompt in enumerate(prompts):
        alone = engine.generate([prompt], sampling, seed=[seeds[i]])
        rows = slice(i * n, (i + 1) * n)
        width = alone.response_length
        assert torch.equal(whole.response_ids[rows, :width], alone.response_ids)
        assert (whole.response_mask[rows, width:] == 0).all()
        torch.testing.assert_close(
            whole.rollout_log_probs[rows, :width], alone.rollout_log_probs, rtol=0, atol=1e-5
        )
    # The draw depends on the seed, and the samples of one prompt differ from one another.
    other = engine.generate(prompts, sampling, seed=[21, 22, 23, 24])
    assert not torch.equal(other.response_ids, whole.response_ids[:, : other.response_length])
    assert len({tuple(r.tolist()) for r in whole.response_ids[:n]}) > 1


def test_per_prompt_seeded_log_probs_match_a_teacher_forced_recomputation(tiny, prompts):
    """The recorded processed scores are those the draw was made from."""
    model, tokenizer = tiny
    engine = make_rollout_engine("hf", model, tokenizer)
    sampling = SamplingParams(n=2, temperature=0.8, top_k=6, max_new_tokens=8)
    batch = engine.generate(prompts, sampling, seed=[1, 2, 3, 4])
    recomputed = token_log_probs(
        model, batch.input_ids, batch.attention_mask, batch.response_length, sampling
    )
    mask = batch.response_mask.float()
    assert masked_max_abs(recomputed, batch.rollout_log_probs, mask) < 1e-4
    assert torch.isfinite(batch.rollout_log_probs[mask.bool()]).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_row_seeded_draws_follow_the_processed_distribution(temperature):
    """Gumbel-max with one generator per row draws from softmax(processed scores): 4000 rows
    over a peaked distribution pass a chi-square test (statistic within 5 sigma of its degrees
    of freedom). Scored against the distribution at the other temperature, they fail it."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    from rcx.rollout.hf import RowSeededSampler

    rows = 4000
    logits = torch.linspace(-3.0, 3.0, 12)  # a peaked distribution over 12 tokens
    processors = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    sampler = RowSeededSampler(range(rows), processors, torch.device("cpu"))
    forced = sampler(torch.zeros(rows, 1, dtype=torch.long), logits.repeat(rows, 1))
    drawn = forced.argmax(-1)
    assert torch.isfinite(forced).sum(-1).eq(1).all()  # exactly the drawn token is left
    assert torch.allclose(sampler.scores[0][0], logits / temperature)

    def chi2(probs: torch.Tensor) -> tuple[float, int]:
        expected = probs.double() * rows
        observed = torch.bincount(drawn, minlength=12).double()
        cells = expected >= 5
        stat = ((observed - expected)[cells] ** 2 / expected[cells]).sum().item()
        return stat, int(cells.sum()) - 1

    stat, df = chi2(torch.softmax(logits / temperature, -1))
    assert stat < df + 5 * (2 * df) ** 0.5, (stat, df)
    other = 0.5 if temperature == 1.0 else 1.0
    wrong, df_wrong = chi2(torch.softmax(logits / other, -1))
    assert wrong > df_wrong + 5 * (2 * df_wrong) ** 0.5
