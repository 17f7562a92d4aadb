"""Warm start: a short supervised phase that gives `builtin:tiny` a policy with signal for RL.

`ensure_warm_start(task, steps, seed)` returns a Hugging Face model directory: from the cache if
it is there, else trained now (with progress) and stored. The cache lives under
`$RCX_CACHE_DIR` (default `~/.cache/rcx`) in `warm_start/<task>-<hash>`, the hash covering the
model config, tokenizer, task settings, steps, seed, optimiser settings and the numeric platform
(torch, transformers and tokenizers versions, CPU architecture and torch's CPU kernel level: see
`rcx.store.provenance.numeric_key`), so any change trains a new one. The directory is written under a
temporary name and renamed into place, so an interrupted run never leaves a half-written entry.
It always trains on one torch thread (`WARM_START_THREADS`), whatever the caller set, so
`rcx pretrain`, `rcx train` and the mismatch study build the same model on one machine.

Recipe (SFT on the first 5000 problems of the task's training split, loss on the answer and
EOS only): batch 128, AdamW lr 1e-3 with 50 linear warm-up steps then constant, betas
(0.9, 0.98), weight decay 0.01, gradients clipped at norm 1. `steps` is a maximum: training stops
as soon as a probe of 128 training problems, sampled at temperature 1 every 50 steps, reaches
30 % exact match, so RL starts with signal and room to improve.

Why this recipe: the learning curve of 2-digit addition is a plateau followed by a sharp rise.
At lr 3e-3 (the earlier recipe) the model sat on the plateau for 500 to 1000+ steps and *where*
it left it depended on the floating-point path: the same code and seed reached 34 % at step 550
on one machine, 29 % after 1000 on another and 12 % after 1000 on a third. At lr 1e-3 with
clipping the rise starts at ~300 steps and the probe passes 30 % at 350-400 steps for every seed
and machine checked (see the README, "The embedded default"). A warm start that still ends below
its target is recorded as such (`reached_target: false` in `warm_start.json`); `rcx pretrain`
then fails and `rcx train` warns before training (`warm_start_shortfall`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rcx.cache import cache_root
from rcx.data.rewards import exact_match_score
from rcx.data.tasks import (
    BUILTIN_TASKS,
    BuiltinTask,
    Example,
    as_file_list,
    batch_indices,
    builtin_examples,
)
from rcx.models.loading import (
    BUILTIN_TINY,
    TINY_CHARS,
    ModelLoadError,
    build_char_tokenizer,
    build_tiny_model,
    save_model_dir,
    tiny_config,
)
from rcx.rollout import SamplingParams
from rcx.rollout.hf import HFRolloutEngine
from rcx.store.provenance import environment_record, numeric_key

CACHE_FORMAT = 3
# The warm start always trains on one thread, whatever the caller set: the thread count changes
# the floating-point reduction order, so `rcx pretrain` (2 threads) and `rcx train` (1) would
# otherwise build different models under one cache key.
WARM_START_THREADS = 1
DEFAULT_WARM_START_STEPS = 1000  # a maximum (as the config default): the probe stops it at 350-400
METADATA_FILE = "warm_start.json"


@dataclass(frozen=True)
class SFTSettings:
    """Optimiser settings of the warm start (part of the cache key)."""

    batch_size: int = 128
    lr: float = 1e-3
    warmup_steps: int = 50
    beta1: float = 0.9
    beta2: float = 0.98
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 = no clipping
    schedule: str = "constant"  # after warm-up: "constant", or "cosine" down to min_lr_ratio
    min_lr_ratio: float = 0.1
    pool_size: int = 5000  # SFT draws from the first pool_size training problems
    target_accuracy: float = 0.3  # stop once the probe's sampled accuracy reaches it (0: off)
    probe_every: int = 50
    probe_size: int = 128


def lr_factor(step: int, steps: int, settings: SFTSettings) -> float:
    """The learning-rate multiplier at `step` of `steps`: linear warm-up, then the schedule."""
    warmup = min(1.0, (step + 1) / max(1, settings.warmup_steps))
    if settings.schedule == "constant":
        return warmup
    if settings.schedule != "cosine":
        raise ValueError(f"unknown warm-start schedule {settings.schedule!r}")
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, steps))))
    return warmup * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


def warm_start_key(task: BuiltinTask, steps: int, seed: int, settings: SFTSettings) -> str:
    """A 16-hex-digit hash of everything that determines the warm-started weights, the numeric
    platform included (a model trained under another torch or on another CPU path is not the
    same model)."""
    config = tiny_config(build_char_tokenizer()).to_dict()
    config.pop("transformers_version", None)
    payload = {
        "format": CACHE_FORMAT,
        "model": config,
        "chars": TINY_CHARS,
        "task": sft_task_key(task),
        "steps": steps,
        "seed": seed,
        "sft": asdict(settings),
        "numeric": numeric_key(),
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def sft_task_key(task: BuiltinTask) -> dict:
    """The task fields the warm start depends on (not num_train / num_val: the SFT pool and
    probe have their own sizes)."""
    key = asdict(task)
    key.pop("num_train")
    key.pop("num_val")
    return key


def warm_start_dir(
    task: BuiltinTask,
    steps: int,
    seed: int,
    cache_dir: str | Path | None = None,
    settings: SFTSettings = SFTSettings(),
) -> Path:
    """Where the warm start for these settings is (or would be) cached."""
    slug = task.name.removeprefix("builtin:")
    key = warm_start_key(task, steps, seed, settings)
    size = f"d{task.digits}" if task.name == "builtin:arith" else f"l{task.length}"
    return cache_root(cache_dir) / "warm_start" / f"{slug}-{size}-{steps}-{key}"


def ensure_warm_start(
    task: BuiltinTask,
    steps: int,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    settings: SFTSettings = SFTSettings(),
) -> Path:
    """The HF model directory of `builtin:tiny` warm-started on `task` for at most `steps`
    SFT steps (see `supervised_finetune` for the early stop).

    Cached: a second call with the same arguments returns at once. `steps` must be >= 1 (with
    `warm_start_steps: 0` the trainer uses the untrained `builtin:tiny` instead).
    """
    if steps < 1:
        raise ValueError(f"actor_rollout_ref.model.warm_start_steps must be >= 1 here, got {steps}")
    target = warm_start_dir(task, steps, seed, cache_dir, settings)
    if (target / METADATA_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_tiny_model(seed)
    started, cpu_started = time.perf_counter(), time.process_time()
    with torch_threads(WARM_START_THREADS):
        result = supervised_finetune(model, tokenizer, task, steps, seed, settings, progress)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        val = builtin_examples(task, "val")
        val_sampled = sampled_accuracy(model, tokenizer, val, seed=seed)
        val_greedy = sampled_accuracy(model, tokenizer, val, seed=seed, greedy=True)
    metadata = {
        "model": BUILTIN_TINY,
        "task": asdict(task),
        "steps": steps,
        "steps_run": result.steps_run,
        "probes": result.probes,
        "target_accuracy": settings.target_accuracy,
        "reached_target": result.reached(settings.target_accuracy),
        "seed": seed,
        "sft": asdict(settings),
        "final_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds, 2),  # ~ wall time on an idle machine at 1 thread
        "threads": WARM_START_THREADS,
        "val_sampled_accuracy": val_sampled,
        "val_greedy_accuracy": val_greedy,
        "environment": environment_record(),
    }
    write_atomically(model, tokenizer, target, metadata)
    return target


def warm_start_metadata(path: str | Path) -> dict | None:
    """The `warm_start.json` of `path` when it is a warm-start directory, else None."""
    file = Path(path) / METADATA_FILE
    return json.loads(file.read_text()) if file.is_file() else None


def warm_start_params(metadata: dict | None) -> dict[str, str]:
    """MLflow params describing the warm start a run began from (empty for other models)."""
    if metadata is None:
        return {}
    keys = ("reached_target", "steps_run", "target_accuracy", "val_greedy_accuracy")
    return {f"warm_start.{key}": str(metadata.get(key)) for key in keys}


def warm_start_shortfall(metadata: dict) -> str | None:
    """A warning when a warm start ended below its target accuracy, else None.

    The message gives the accuracy reached, the steps run and what to do about it: RL from a
    policy that is almost never right has no signal, so a run would look like a failure of RL.
    """
    if metadata.get("reached_target", True):
        return None
    probes = metadata.get("probes") or [(metadata.get("steps_run", 0), 0.0)]
    best_step, best = max(probes, key=lambda probe: probe[1])
    return (
        f"the warm start ended BELOW its target: its probe reached {best:.1%} sampled accuracy "
        f"(best, at step {best_step}) after {metadata.get('steps_run')} of at most "
        f"{metadata.get('steps')} steps, target {metadata.get('target_accuracy', 0):.0%}; "
        f"validation {metadata.get('val_greedy_accuracy', 0):.1%} greedy. RL from it may not "
        "learn. Raise actor_rollout_ref.model.warm_start_steps (the maximum), or try another "
        "data.builtin.seed, and report the warm_start.json beside the model if it persists."
    )


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run a block with `threads` intra-op torch threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def resolve_model_path(
    model_path: str,
    warm_start_steps: int,
    train_files: str | list[str],
    builtin: BuiltinTask | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> str:
    """The model directory the trainer should load for `actor_rollout_ref.model.path`.

    `builtin:tiny` with `warm_start_steps > 0` becomes its warm-start directory (trained on the
    first built-in task of `data.train_files`, with `data.builtin.*` from `builtin`); anything
    else is returned unchanged (`builtin:tiny` with 0 steps is the untrained model).
    """
    if model_path != BUILTIN_TINY or warm_start_steps == 0:
        return model_path
    names = [f for f in as_file_list(train_files) if f in BUILTIN_TASKS]
    if not names:
        raise ModelLoadError(
            "actor_rollout_ref.model.path=builtin:tiny warm-starts on a built-in task, but "
            f"data.train_files={train_files!r} names none: set "
            "actor_rollout_ref.model.warm_start_steps=0, or name your own model directory"
        )
    settings = builtin or BuiltinTask()
    task = dataclasses.replace(settings, name=names[0])
    return str(ensure_warm_start(task, warm_start_steps, seed, cache_dir, progress))


def read_metadata(path: str | Path) -> dict:
    """The `warm_start.json` of a warm-start directory (time, loss, accuracies)."""
    return json.loads((Path(path) / METADATA_FILE).read_text())


def write_atomically(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, metadata: dict
) -> None:
    """Save into a temporary sibling directory, then rename it to `target`."""
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_model_dir(model, tokenizer, temp, builtin=True)
        (temp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        try:
            os.rename(temp, target)
        except OSError:
            # Another process finished the same warm start first: keep theirs.
            if not (target / METADATA_FILE).is_file():
                raise
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)


def sft_batch(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `(input_ids, attention_mask, labels)`, each (B, L).

    Each row is prompt + answer + EOS; labels are -100 except on the answer and EOS.
    """
    rows, targets = [], []
    for example in examples:
        prompt = tokenizer(example.prompt)["input_ids"]
        answer = tokenizer(example.ground_truth, add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, target) in enumerate(zip(rows, targets, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, : len(row)] = torch.tensor(target)
    return input_ids, attention_mask, labels


def answer_loss(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer and EOS) positions."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, L, V)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
    )


@dataclass
class SFTResult:
    """What a warm start did: losses per step, and the probe accuracies it stopped on."""

    losses: list[float]
    probes: list[tuple[int, float]]  # (steps done, sampled accuracy on the probe set)

    @property
    def steps_run(self) -> int:
        return len(self.losses)

    def reached(self, target: float) -> bool:
        """Whether a probe reached `target` (always true when the early stop is off)."""
        return target <= 0 or any(accuracy >= target for _, accuracy in self.probes)


def sft_pool(task: BuiltinTask, settings: SFTSettings) -> list[Example]:
    """The warm start's training examples: the first `pool_size` of the task's train stream
    (a subset of RL's training prompts, whatever `num_train` is)."""
    return builtin_examples(dataclasses.replace(task, num_train=settings.pool_size), "train")


def probe_set(task: BuiltinTask, settings: SFTSettings) -> list[Example]:
    """Training-split problems drawn with another seed: the early-stopping probe."""
    probe = dataclasses.replace(task, num_train=settings.probe_size, seed=task.seed + 7919)
    return builtin_examples(probe, "train")


def supervised_finetune(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: BuiltinTask,
    steps: int,
    seed: int = 0,
    settings: SFTSettings = SFTSettings(),
    progress: bool = False,
) -> SFTResult:
    """Train `model` in place on `task` for at most `steps` SFT steps.

    Every `settings.probe_every` steps the sampled (temperature 1) accuracy on a probe set of
    training problems is measured; training stops as soon as it reaches
    `settings.target_accuracy` (0 disables the early stop), so RL starts from a policy that is
    right part of the time, whatever the shape of the learning curve.
    """
    examples = sft_pool(task, settings)
    probe = probe_set(task, settings) if settings.target_accuracy > 0 else []
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        weight_decay=settings.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, settings))
    result = SFTResult([], [])
    with Progress(
        TextColumn("warm start {task.fields[name]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]} acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        disable=not progress,
        transient=False,
    ) as bar:
        bar_task = bar.add_task("sft", total=steps, name=task.name, loss="-", acc="-")
        for step in range(steps):
            model.train()
            indices = batch_indices(len(examples), step, settings.batch_size, seed)
            batch = sft_batch([examples[i] for i in indices], tokenizer)
            loss = answer_loss(model, *batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            result.losses.append(loss.item())
            bar.update(bar_task, advance=1, loss=f"{loss.item():.3f}")
            if probe and (step + 1) % settings.probe_every == 0:
                accuracy = sampled_accuracy(model, tokenizer, probe, seed=seed + step)
                result.probes.append((step + 1, accuracy))
                bar.update(bar_task, acc=f"{accuracy:.0%}")
                if progress and not bar.console.is_terminal:
                    # No live bar off a terminal (a pipe, CI): one plain line per probe instead.
                    bar.console.print(
                        f"warm start {task.name}: step {step + 1}/{steps} loss {loss.item():.3f} "
                        f"probe accuracy {accuracy:.1%} (target {settings.target_accuracy:.0%})",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                if accuracy >= settings.target_accuracy:
                    bar.update(bar_task, total=step + 1)
                    break
    model.eval()
    return result


def sampled_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    seed: int = 0,
    greedy: bool = False,
    max_new_tokens: int = 8,
) -> float:
    """Share of `examples` answered exactly, sampling at temperature 1 (or greedily)."""
    engine = HFRolloutEngine(model, tokenizer)
    sampling = SamplingParams(n=1, do_sample=not greedy, max_new_tokens=max_new_tokens)
    prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
    batch = engine.generate(prompts, sampling, seed=seed)
    texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    scores = [exact_match_score(t, e.ground_truth) for t, e in zip(texts, examples, strict=True)]
    return sum(scores) / len(scores)
