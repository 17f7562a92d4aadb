"""What a run is built from: device, threads, seeds, step count, model, data, sampling,
optimisers, and the checkpoint to resume from. Plain functions of the config."""

from __future__ import annotations

import os
import random
import re
import warnings
import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcx.config.models import OptimConfig, RcxConfig
from rcx.errors import RcxError
from rcx.store.checkpoint import CheckpointError, latest_checkpoint


class DeviceError(RcxError, RuntimeError):
    """The requested device is not available."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("trainer.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def configure_threads(num_threads: int | None) -> int:
    """Set torch's CPU threads: ``num_threads``, else 1 on <= 2 cores, else cores // 2 shared
    by this node's training processes (``LOCAL_WORLD_SIZE``, set by torchrun)."""
    cores = os.cpu_count() or 1
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    threads = num_threads or (1 if cores <= 2 else max(1, cores // 2 // local_processes))
    torch.set_num_threads(threads)
    return threads


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing on CPU; a fresh context per use."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, purpose: str, step: int) -> int:
    """A 31-bit seed that is a pure function of (run seed, purpose, step)."""
    return zlib.crc32(f"{seed}|{purpose}|{step}".encode()) & 0x7FFFFFFF


def total_steps(cfg: RcxConfig, num_train: int) -> int:
    """``total_training_steps``, else ``total_epochs`` passes over the training prompts."""
    if cfg.trainer.total_training_steps is not None:
        return cfg.trainer.total_training_steps
    per_epoch = max(1, num_train // cfg.data.train_batch_size)
    return per_epoch * cfg.trainer.total_epochs


def warmup_lambda(warmup_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the full lr over ``warmup_steps`` scheduler steps, then constant."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


def make_optimizer(params: Any, optim: OptimConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a linear warm-up then constant lr (one scheduler step per training step)."""
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(optim.lr_warmup_steps))
    return optimizer, scheduler


def step_scheduler(scheduler: Any) -> None:
    """One lr-schedule step per training step, also after a step whose update was skipped
    (torch warns about that order; here it is intended: the schedule counts training steps)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler"))
        scheduler.step()


def find_resume_checkpoint(cfg: RcxConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from per ``trainer.resume_mode``, or None to start fresh."""
    t = cfg.trainer
    if t.resume_mode == "disable":
        return None
    if t.resume_mode == "resume_path":
        if not t.resume_from_path:
            raise CheckpointError("trainer.resume_mode=resume_path needs trainer.resume_from_path")
        path = Path(t.resume_from_path)
        found = path if (path / "meta.json").is_file() else latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"trainer.resume_from_path={t.resume_from_path!r} holds no complete checkpoint"
            )
        return found
    return latest_checkpoint(ckpt_dir)


def ensure_policy_files(cfg: RcxConfig, show: bool = True) -> str:
    """The policy's directory (or ``builtin:tiny`` spec): builtin:tiny is warm-started, or
    taken from the cache, here."""
    from rcx.train.pretrain import resolve_model_path

    model_cfg = cfg.actor_rollout_ref.model
    return resolve_model_path(
        model_cfg.path,
        model_cfg.warm_start_steps,
        cfg.data.train_files,
        builtin=builtin_task(cfg),
        seed=cfg.data.builtin.seed,
        progress=show,
    )


def load_policy(cfg: RcxConfig, device: torch.device, show: bool = True) -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved path): the policy in float32 and eval mode; builtin:tiny is
    warm-started (or taken from the cache) first, and the path is then its directory."""
    from rcx.models.loading import load_model_and_tokenizer

    path = ensure_policy_files(cfg, show)
    model, tokenizer = load_model_and_tokenizer(
        path, dtype="float32", device=device, seed=cfg.trainer.seed
    )
    model.eval()
    return model, tokenizer, path


def builtin_task(cfg: RcxConfig) -> Any:
    """The built-in task named by ``data.train_files`` (default arith) with ``data.builtin.*``."""
    from rcx.data.tasks import BUILTIN_TASKS, BuiltinTask, as_file_list

    names = [f for f in as_file_list(cfg.data.train_files) if f in BUILTIN_TASKS]
    return BuiltinTask.from_config(names[0] if names else BUILTIN_TASKS[0], cfg.data.builtin)


def load_data(cfg: RcxConfig, tokenizer: Any) -> tuple[Any, Any, Any]:
    """Training and validation prompts, and the reward scorer."""
    from rcx.data.rewards import RewardScorer
    from rcx.data.tasks import load_prompts

    reward = cfg.custom_reward_function
    scorer = RewardScorer(reward.path, reward.name, timeout_s=reward.timeout_s)
    common = dict(
        max_prompt_length=cfg.data.max_prompt_length,
        prompt_key=cfg.data.prompt_key,
        builtin=builtin_task(cfg),
        scorer=scorer,
    )
    train_data = load_prompts(cfg.data.train_files, "train", tokenizer, **common)
    val_data = load_prompts(cfg.data.val_files, "val", tokenizer, **common)
    return train_data, val_data, scorer


def sampling_params(cfg: RcxConfig) -> tuple[Any, Any, Any]:
    """(rollout sampling, validation sampling, training-side scoring: temperature only).

    The trainer scores at ``actor.temperature`` when set, else at the rollout's temperature.
    """
    from rcx.rollout import SamplingParams

    rollout, length = cfg.actor_rollout_ref.rollout, cfg.data.max_response_length
    sampling = SamplingParams.from_config(rollout, length)
    val = SamplingParams.from_config(rollout, length, validation=True)
    temperature = cfg.actor_rollout_ref.actor.temperature or rollout.temperature
    scoring = SamplingParams(temperature=temperature, max_new_tokens=length)
    return sampling, val, scoring


def batch_split(size: int, mini_prompts: int, n: int, micro: int | None) -> tuple[int, int]:
    """(mini-batch, micro-batch) sizes in responses: ``mini_prompts`` prompts x ``n``, then
    ``micro`` responses per forward (None: the whole mini-batch)."""
    mini = min(size, mini_prompts * n)
    return mini, min(mini, micro or mini)


def rollout_engines(
    cfg: RcxConfig, model: Any, tokenizer: Any, model_path: str, device: torch.device
) -> tuple[Any, Any]:
    """The rollout engine (its own weight copy, per ``rollout.*``) and the float32 hf engine
    that validation generates from."""
    from rcx.rollout import make_rollout_engine

    rollout = cfg.actor_rollout_ref.rollout
    engine = make_rollout_engine(
        rollout.name,
        model,
        tokenizer,
        dtype=rollout.dtype,
        quantization=rollout.quantization,
        device=device,
        model_path=None if model_path.startswith("builtin:") else model_path,
        gpu_memory_utilization=rollout.gpu_memory_utilization,
        seed=cfg.trainer.seed,
    )
    val_engine = make_rollout_engine("hf", model, tokenizer, device=device)
    return engine, val_engine
