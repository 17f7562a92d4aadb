"""The built-in tiny model and the loader: tokenizer round trip, save/load, clear errors."""

from __future__ import annotations

import pytest
import torch

from rcx.models.loading import (
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    count_parameters,
    load_model_and_tokenizer,
    save_model_dir,
)


def test_char_tokenizer_round_trips_spaces_digits_and_letters():
    tokenizer = build_char_tokenizer()
    text = "rev ab c=12 + 34\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no BOS added
    assert tokenizer.decode(ids) == text


def test_char_tokenizer_has_distinct_special_tokens():
    tokenizer = build_char_tokenizer()
    specials = {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    assert None not in specials and len(specials) == 3
    assert tokenizer.decode([5, tokenizer.eos_token_id], skip_special_tokens=True) == "1"


def test_tiny_model_size_and_seeded_init():
    model, _ = build_tiny_model(seed=3)
    assert 1.0e6 < count_parameters(model) < 1.1e6
    again, _ = build_tiny_model(seed=3)
    other, _ = build_tiny_model(seed=4)
    first = next(iter(model.state_dict().values()))
    assert torch.equal(first, next(iter(again.state_dict().values())))
    assert not torch.equal(first, next(iter(other.state_dict().values())))


def test_save_and_load_round_trip_keeps_weights_and_tokenizer(tmp_path):
    model, tokenizer = build_tiny_model(seed=0)
    save_model_dir(model, tokenizer, tmp_path / "tiny", builtin=True)
    loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path / "tiny"))
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    text = "12 + 34=46"  # the space survives the reload (the qwen2 tokenizer pitfall)
    assert loaded_tok.decode(loaded_tok(text)["input_ids"]) == text
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = torch.tensor([tokenizer("1+2=")["input_ids"]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits)


def test_load_in_bfloat16():
    model, _ = load_model_and_tokenizer("builtin:tiny", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_hub_name_is_refused_without_download():
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_model_and_tokenizer("Qwen/Qwen2.5-0.5B")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model_and_tokenizer("builtin:tiny", dtype="float8")


def test_broken_model_directory_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model_and_tokenizer(str(tmp_path))


def test_plain_hf_directory_loads_through_auto_classes(tmp_path):
    model, tokenizer = build_tiny_model(seed=0)
    save_model_dir(model, tokenizer, tmp_path / "plain", builtin=False)
    loaded, loaded_tok = load_model_and_tokenizer(str(tmp_path / "plain"))
    assert loaded.config.model_type == "qwen2" and loaded_tok.pad_token_id is not None
