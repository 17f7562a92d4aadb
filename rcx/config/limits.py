"""Checks of a config against the machine it is validated on (no torch): the checkpoint folder
and a memory estimate. ``rcx validate`` reports them as findings (RCX-E012, RCX-E013); training
checks the checkpoint folder again before it starts.

The memory estimate is rough on purpose: it counts the few tensors whose size is set by the
config (a step's KV cache, logits and activations; the built-in prompts) and compares them with
the memory available on this machine (``MemAvailable``), so that a config that cannot fit fails
here, in milliseconds, instead of in a MemoryError minutes into training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

#: Bytes of one built-in prompt held in memory (the example, its text, its token ids); measured
#: at ~514 B for builtin:arith.
BYTES_PER_BUILTIN_PROMPT = 600
#: When a filesystem does not say (``os.pathconf``): Linux's NAME_MAX and PATH_MAX.
DEFAULT_NAME_MAX = 255
DEFAULT_PATH_MAX = 4096


# --------------------------------------------------------------------- checkpoint folder ---


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def checkpoint_dir_problem(folder: str) -> str | None:
    """Why checkpoints cannot be written to ``folder`` here (one line), or None when they can:
    a path or name too long for the filesystem, a parent that is a file, no write permission."""
    if "\0" in folder:
        return f"{folder!r} contains a NUL character"
    path = Path(folder).absolute()
    existing = _nearest_existing(path)
    probe = existing if existing.is_dir() else existing.parent
    name_max = _pathconf(probe, "PC_NAME_MAX", DEFAULT_NAME_MAX)
    path_max = _pathconf(probe, "PC_PATH_MAX", DEFAULT_PATH_MAX)
    if len(os.fsencode(path)) >= path_max:
        return f"{folder!r} is {len(os.fsencode(path))} bytes long; paths here are < {path_max}"
    for part in path.parts:
        if len(os.fsencode(part)) > name_max:
            return (
                f"a folder name of {len(os.fsencode(part))} bytes ({part[:20]}...); names here "
                f"are at most {name_max} bytes"
            )
    if existing == path:
        if not path.is_dir():
            return f"{folder!r} exists and is not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{folder!r} is not writable"
        return None
    if not existing.is_dir():
        return f"cannot create {folder!r}: {str(existing)!r} is not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create {folder!r}: {str(existing)!r} is not writable"
    return None


# --------------------------------------------------------------------------------- memory ---


@dataclass(frozen=True)
class ModelShape:
    vocab: int
    hidden: int
    layers: int


#: ``builtin:tiny`` (rcx.models.loading.tiny_config with the 50-token character tokenizer).
TINY = ModelShape(vocab=50, hidden=128, layers=4)


def model_shape(path: str) -> ModelShape | None:
    """The sizes that set a step's memory: built in, or from a local model's config.json."""
    if path == "builtin:tiny":
        return TINY
    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        return ModelShape(
            int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass(frozen=True)
class StepMemory:
    """The float32 tensors of one training step whose size the config sets."""

    responses: int  # train_batch_size x rollout.n
    tokens: int  # max_prompt_length + max_response_length
    kv_cache: int  # hf rollout: 2 x layers x hidden per token, every response at once
    scores: int  # hf rollout: the processed scores of every generated token (vocab each)
    forward: int  # a scoring forward: logits 3x (logits, float copy, log-softmax) + 8 x hidden

    @property
    def total(self) -> int:
        return self.kv_cache + self.scores + self.forward


def step_memory(
    shape: ModelShape,
    prompts: int,
    n: int,
    prompt_length: int,
    response_length: int,
    micro_batch: int | None,
    engine: str,
) -> StepMemory:
    """The estimate: vllm manages its own KV cache (gpu_memory_utilization), so only the
    trainer's forward counts for it; a forward runs ``micro_batch`` responses at a time when set,
    else all of them."""
    responses = prompts * n
    tokens = prompt_length + response_length
    hf = engine == "hf"
    kv = 4 * 2 * shape.layers * shape.hidden * responses * tokens if hf else 0
    scores = 4 * shape.vocab * responses * response_length if hf else 0
    chunk = min(micro_batch or responses, responses)
    forward = 4 * (3 * shape.vocab + 8 * shape.hidden) * chunk * tokens
    return StepMemory(responses, tokens, kv, scores, forward)


def available_memory() -> int | None:
    """Bytes of memory available to a new process here (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover
