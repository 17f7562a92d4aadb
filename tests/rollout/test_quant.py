"""Fake int8 / fp8 weight quantisation of the rollout copy."""

from __future__ import annotations

import pytest
import torch

from rcx.models.loading import build_tiny_model
from rcx.rollout.quant import (
    fake_quantize_fp8,
    fake_quantize_int8,
    fake_quantize_model_,
    quantizable_linears,
)


def test_int8_hand_case():
    # Row absmax 1.27 → scale 0.01: 0.004 rounds to 0, 0.006 to 0.01, -1.27 stays.
    weight = torch.tensor([[0.004, 0.006, -1.27], [2.54, 0.0, 1.0]])
    expected = torch.tensor([[0.0, 0.01, -1.27], [2.54, 0.0, 1.0]])
    assert torch.allclose(fake_quantize_int8(weight), expected, atol=1e-6)


def test_int8_error_is_at_most_half_a_step_and_grid_has_255_levels():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    quantised = fake_quantize_int8(weight)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((quantised - weight).abs() <= step / 2 + 1e-6).all()
    assert (quantised - weight).abs().max() > 0
    assert all(row.unique().numel() <= 255 for row in quantised)


def test_fp8_relative_error_is_bounded_and_nonzero():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    quantised = fake_quantize_fp8(weight)
    scale = weight.abs().amax(dim=1, keepdim=True)
    # E4M3 has 3 mantissa bits: relative rounding error <= 2**-4 for normal values.
    big = weight.abs() > scale / 64
    relative = ((quantised - weight).abs() / weight.abs())[big]
    assert relative.max() <= 2**-4 + 1e-6 and relative.max() > 0
    assert torch.equal(quantised.abs().amax(dim=1), weight.abs().amax(dim=1))  # absmax exact


def test_quantisation_keeps_dtype_and_zero_rows():
    weight = torch.zeros(2, 4, dtype=torch.bfloat16)
    assert fake_quantize_int8(weight).dtype == torch.bfloat16
    assert not fake_quantize_fp8(weight).isnan().any()


def test_model_quantisation_skips_embeddings_and_head():
    model, _ = build_tiny_model(seed=0)
    embeddings = model.model.embed_tokens.weight.clone()
    q_proj = model.model.layers[0].self_attn.q_proj.weight.clone()
    count = fake_quantize_model_(model, "int8")
    assert count == len(quantizable_linears(model)) == 4 * 7  # q k v o gate up down per layer
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, q_proj)
    assert fake_quantize_model_(model, "none") == 0


def test_unknown_quantisation_is_refused():
    model, _ = build_tiny_model(seed=0)
    with pytest.raises(ValueError, match="int4"):
        fake_quantize_model_(model, "int4")
