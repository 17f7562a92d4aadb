"""The built-in tiny model and the one loader that serves it and local Hugging Face directories.

`builtin:tiny` is an ordinary transformers Qwen2 causal LM (hidden 128, 4 layers, 4 heads,
~1.06 M parameters) with a character-level tokenizer built locally with `tokenizers`. Saved, it
is a normal Hugging Face model directory plus a marker file, `rcx_model.json`, that tells the
loader to reload the tokenizer as `PreTrainedTokenizerFast` (AutoTokenizer would pick the qwen2
tokenizer class from `config.json` and lose the space token). Nothing is ever downloaded: every
`from_pretrained` call passes `local_files_only=True`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from rcx.errors import RcxError

BUILTIN_TINY = "builtin:tiny"
MARKER_FILE = "rcx_model.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
# Every character the built-in tasks use; anything else becomes <unk>.
TINY_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*=?:,.\n"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RcxError, ValueError):
    """A model path that cannot be served (not built in, not a local HF directory, broken)."""


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer of `builtin:tiny`: one token per character, 4 specials.

    Ids: <pad>=0, <bos>=1, <eos>=2, <unk>=3, then the characters of `TINY_CHARS` in order.
    Decoding concatenates characters (no spaces inserted); the space is a token of its own.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *TINY_CHARS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def tiny_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The Qwen2 config of `builtin:tiny` (~1.06 M parameters with the char tokenizer)."""
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_model(seed: int = 0) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised `builtin:tiny` model (float32, CPU) and its tokenizer.

    The initialisation is a pure function of `seed`; the global torch RNG is left untouched.
    """
    tokenizer = build_char_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_config(tokenizer))
    model.eval()
    return model, tokenizer


def save_model_dir(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, builtin: bool
) -> Path:
    """Write `model` and `tokenizer` as a Hugging Face directory (plus the rcx marker if built in)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    if builtin:
        (path / MARKER_FILE).write_text(json.dumps({"builtin": BUILTIN_TINY}) + "\n")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (char tokenizer for rcx's own directories)."""
    path = Path(path)
    if (path / MARKER_FILE).is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        # Many causal LMs ship without a pad token; padding is masked out everywhere in rcx.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from `builtin:tiny` or a local Hugging Face directory.

    `builtin:tiny` builds a fresh (untrained) model from `seed`; the warm-started one is a
    directory returned by `rcx.train.pretrain.ensure_warm_start`. Anything else must be an existing
    local directory with a `config.json`: no hub download is attempted. Raises `ModelLoadError`
    with a message naming `actor_rollout_ref.model.path` for anything that cannot be served.
    """
    torch_dtype = resolve_dtype(dtype)
    if path == BUILTIN_TINY:
        model, tokenizer = build_tiny_model(seed)
    else:
        directory = Path(path).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(
                f"actor_rollout_ref.model.path={path!r} is neither {BUILTIN_TINY!r} nor a local "
                "directory. rcx never downloads from the Hugging Face hub: download the model "
                "first (e.g. `huggingface-cli download <repo> --local-dir DIR`) and pass DIR."
            )
        if not (directory / "config.json").is_file():
            raise ModelLoadError(
                f"actor_rollout_ref.model.path={path!r} has no config.json: not a Hugging Face "
                "model directory."
            )
        try:
            tokenizer = load_tokenizer(directory)
            with quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(
                    directory, local_files_only=True, dtype=torch.float32
                )
        except (OSError, ValueError, KeyError) as err:
            raise ModelLoadError(
                f"could not load actor_rollout_ref.model.path={path!r}: {err}"
            ) from err
        model.eval()
    return model.to(device=device, dtype=torch_dtype), tokenizer


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars (shard writing, weight loading) for a block."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"bfloat16"` → `torch.bfloat16` (and so on); a torch dtype passes through."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
