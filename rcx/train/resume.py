"""What resuming a run may change, and how a resume finds its checkpoint and its MLflow run.

The contract (README, "Resume and the checkpoint folder"):

* **The config is diffed against the checkpoint's** (``config.yaml`` in the checkpoint). Keys in
  :data:`MUTABLE_KEYS` (or under :data:`MUTABLE_PREFIXES`) may change: they are applied and
  listed on the console. Any other change (model, task and data, batch shape, lengths, rollout
  sampling, correction, losses, seed, ...) would make the resumed run a different run than the
  one its checkpoint belongs to, and is refused with the diff (:class:`ResumeConfigError`).
* **Optimiser settings** that changed are written into the restored optimiser and scheduler
  (:func:`apply_optim_config`): the checkpoint's state would otherwise keep the old lr.
* **A finished run** asked for new work (a change that only acts while training, such as
  ``trainer.dump_log_probs=true``) is an error, not a silent "already complete".
* **A corrupt checkpoint** (unreadable ``state.pt``) is skipped with a warning for the newest
  intact one of the same folder (:func:`load_with_fallback`).
* **The MLflow run id** is written to ``<folder>/run.json`` as soon as the run is opened
  (:func:`write_run_file`), so a run killed before its first checkpoint resumes the same MLflow
  run; steps that run already logged are replayed without logging them again
  (:func:`last_logged_step`).
* **``resume_mode: disable``** in a folder that holds an earlier run moves that run's checkpoints
  aside into ``replaced-<time>/`` (:func:`set_aside_previous_run`), so that a later ``auto`` does
  not resume the older run.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rcx.config.loading import flatten_tree
from rcx.config.models import OptimConfig, RcxConfig
from rcx.config.yamlio import load_yaml
from rcx.errors import RcxError
from rcx.store.checkpoint import (
    CONFIG_FILE,
    Checkpoint,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    read_meta,
)
from rcx.store.lock import FolderLock
from rcx.store.loggers import open_trackers
from rcx.store.tracking import abandon
from rcx.train.setup import find_resume_checkpoint, warmup_lambda

RUN_FILE = "run.json"
#: Set-aside folders of ``resume_mode: disable`` start with this.
REPLACED_PREFIX = "replaced-"
#: Keys that may differ from the checkpoint's on resume and ask for no new work: a finished run
#: may be "resumed" with them changed.
NO_WORK_KEYS: frozenset[str] = frozenset(
    {
        "trainer.project_name",
        "trainer.experiment_name",
        "trainer.logger",
        "trainer.tracking_uri",
        "trainer.total_epochs",
        "trainer.total_training_steps",
        "trainer.default_local_dir",
        "trainer.max_actor_ckpt_to_keep",
        "trainer.resume_mode",
        "trainer.resume_from_path",
        "trainer.device",
        "trainer.num_threads",
        "trainer.n_gpus_per_node",  # a sharded checkpoint reshards (rcx.train.state)
        "trainer.nnodes",
        "actor_rollout_ref.rollout.gpu_memory_utilization",
    }
)
#: Keys whose value may differ from the checkpoint's on resume: those above, and these.
MUTABLE_KEYS: frozenset[str] = NO_WORK_KEYS | frozenset(
    {
        "trainer.test_freq",
        "trainer.save_freq",
        "trainer.val_before_train",
        "actor_rollout_ref.model.enable_gradient_checkpointing",
        "actor_rollout_ref.rollout.tensor_model_parallel_size",
        "trainer.dump_log_probs",
        "trainer.max_nonfinite_steps",
        "trainer.rollout_workers",  # fully_async's pool size: the stream state does not depend on it
        "custom_reward_function.timeout_s",
        "data.val_batch_size",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
        "critic.ppo_micro_batch_size_per_gpu",
    }
)
#: Whole sections that may change on resume (the optimiser schedules, validation sampling).
MUTABLE_PREFIXES: tuple[str, ...] = (
    "actor_rollout_ref.actor.optim.",
    "actor_rollout_ref.actor.fsdp_config.",
    "critic.optim.",
    "actor_rollout_ref.rollout.val_kwargs.",
)
#: Metrics logged at every training step (and, at step 0, by the first validation).
STEP_MARKER_KEYS: tuple[str, ...] = ("timing/step", "val/reward_mean")


class ResumeConfigError(RcxError, ValueError):
    """The config differs from the checkpoint's in keys a resume may not change."""


class AlreadyCompleteError(RcxError, RuntimeError):
    """The checkpoint is at the last step, but the config asks for work only steps would do."""


@dataclass(frozen=True)
class Change:
    """One config key whose value differs from the checkpoint's."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return json.dumps(value, default=str) if not isinstance(value, str) else value


def is_mutable(key: str) -> bool:
    """Whether ``key`` may change on resume (:data:`MUTABLE_KEYS`, :data:`MUTABLE_PREFIXES`)."""
    return key in MUTABLE_KEYS or key.startswith(MUTABLE_PREFIXES)


def config_changes(saved: dict[str, Any], cfg: RcxConfig) -> list[Change]:
    """Every leaf key whose value in ``cfg`` differs from the ``saved`` config tree, sorted.

    A key the saved config lacks (written by an older rcx) counts as its default value.
    """
    old = {**flatten_tree(RcxConfig().model_dump(mode="json")), **flatten_tree(saved)}
    new = flatten_tree(cfg.model_dump(mode="json"))
    keys = sorted(set(old) | set(new))
    return [Change(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The config tree saved in ``checkpoint`` (None when it holds no ``config.yaml``)."""
    path = Path(checkpoint) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        tree = load_yaml(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, Exception) as exc:  # noqa: BLE001 - any unreadable file
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    return tree if isinstance(tree, dict) else None


def check_resume_config(cfg: RcxConfig, checkpoint: Path) -> list[Change]:
    """The changes a resume from ``checkpoint`` applies; raise :class:`ResumeConfigError`
    listing every change of a key that may not change (see :func:`is_mutable`)."""
    saved = saved_config(checkpoint)
    if saved is None:
        return []
    changes = config_changes(saved, cfg)
    refused = [c for c in changes if not is_mutable(c.key)]
    if refused:
        raise ResumeConfigError(
            f"cannot resume from {checkpoint}: the config differs from the checkpoint's in keys "
            f"a resume may not change ({'; '.join(str(c) for c in refused)}). Put them back, or "
            f"start a new run (another trainer.experiment_name or trainer.default_local_dir, or "
            f"trainer.resume_mode=disable). May change on resume: the optimiser (optim.*), "
            f"logging, dumps, run length, test_freq, save_freq, validation sampling"
        )
    return changes


def refuse_new_work_when_complete(step: int, total: int, changes: Sequence[Change]) -> None:
    """Raise :class:`AlreadyCompleteError` when the run is at its last step and ``changes``
    include one that only training steps would act on (e.g. ``trainer.dump_log_probs``)."""
    if step < total:
        return
    work = [c for c in changes if c.key not in NO_WORK_KEYS]
    if work:
        raise AlreadyCompleteError(
            f"already complete: the checkpoint is at step {step} of {total}, so these changes "
            f"would do nothing ({'; '.join(str(c) for c in work)}). Raise "
            f"trainer.total_training_steps to train further with them, or start a new run "
            f"(another trainer.experiment_name)"
        )


def apply_optim_config(
    optimizer: torch.optim.Optimizer, scheduler: Any, optim: OptimConfig
) -> None:
    """Write ``optim`` (lr, warm-up, betas, weight decay) into a restored optimiser and its
    LambdaLR scheduler, keeping the scheduler's step count: the current lr becomes
    ``lr * warmup(step)``, as if the run had had these settings from the start."""
    groups = optimizer.param_groups
    factor = warmup_lambda(optim.lr_warmup_steps)
    scheduler.lr_lambdas = [factor] * len(groups)
    scheduler.base_lrs = [optim.lr] * len(groups)
    for group in groups:
        group["initial_lr"] = optim.lr
        group["lr"] = optim.lr * factor(scheduler.last_epoch)
        group["betas"] = tuple(optim.betas)
        group["weight_decay"] = optim.weight_decay
    scheduler._last_lr = [group["lr"] for group in groups]


def optim_changed(changes: Iterable[Change], prefix: str) -> bool:
    """Whether any of ``changes`` is under ``prefix`` (e.g. ``critic.optim.``)."""
    return any(c.key.startswith(prefix) for c in changes)


def load_with_fallback(
    path: Path, map_location: str | torch.device, warn: Callable[[str], None]
) -> Checkpoint:
    """Load ``path``; when it is unreadable, the newest older checkpoint of the same folder that
    loads (``warn`` is told about each one skipped). Raises the first error if none loads."""
    path = Path(path)
    older = [p for p in reversed(list_checkpoints(path.parent)) if _step_of(p) < _step_of(path)]
    first_error: CheckpointError | None = None
    for candidate in [path, *older]:
        try:
            checkpoint = load_checkpoint(candidate, map_location=map_location)
        except CheckpointError as exc:
            first_error = first_error or exc
            warn(f"skipping an unreadable checkpoint: {exc}")
            continue
        if candidate != path:
            warn(f"resuming from {candidate} instead (the newest intact checkpoint)")
        return checkpoint
    assert first_error is not None
    raise first_error


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("_", 1)[-1])
    except ValueError:
        return -1


# --------------------------------------------------------------------------- the MLflow run


def write_run_file(folder: Path, run_id: str | None) -> None:
    """Record the MLflow run id of the run training into ``folder`` (atomically)."""
    if not run_id:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{RUN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"mlflow_run_id": run_id, "written_at": _now()}))
    os.replace(tmp, folder / RUN_FILE)


def read_run_file(folder: Path) -> str | None:
    """The MLflow run id :func:`write_run_file` recorded in ``folder``, or None."""
    try:
        run_id = json.loads((Path(folder) / RUN_FILE).read_text()).get("mlflow_run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def resume_run_id(cfg: RcxConfig, folder: Path, checkpoint: Path | None) -> str | None:
    """The MLflow run to reopen: in ``auto`` mode the run recorded in ``folder`` (also when no
    checkpoint was saved yet), else the checkpoint's; None to start a new run."""
    if cfg.trainer.resume_mode == "disable":
        return None
    if cfg.trainer.resume_mode == "auto" and (run_id := read_run_file(folder)):
        return run_id
    if checkpoint is None:
        return None
    try:
        return read_meta(checkpoint).get("mlflow_run_id")
    except CheckpointError:
        return None  # load_with_fallback reports the broken checkpoint


def last_logged_step(tracker: Any) -> int:
    """The highest step the (reopened) run already logged, -1 if none: replayed steps up to it
    are not logged again (MLflow would append a second value for the same step)."""
    query = getattr(tracker, "last_logged_step", None)
    return -1 if query is None else int(query(STEP_MARKER_KEYS))


# --------------------------------------------------------------------------- resume_mode: disable


def set_aside_previous_run(folder: Path) -> Path | None:
    """Move an earlier run's checkpoints, run file and dumps in ``folder`` into
    ``folder/replaced-<time>/``; return that folder, or None when there was nothing."""
    folder = Path(folder)
    names = [p.name for p in list_checkpoints(folder)]
    names += [n for n in (RUN_FILE, "log_probs", "metrics.png") if (folder / n).exists()]
    if not list_checkpoints(folder) and RUN_FILE not in names:
        return None
    target = folder / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    target.mkdir(parents=True)
    for name in names:
        shutil.move(str(folder / name), str(target / name))
    return target


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# --------------------------------------------------------------------------- the plan


@dataclass
class ResumePlan:
    """What a run starts from: the folder's lock (held), the checkpoint to resume (None: fresh),
    the config changes it applies and the MLflow run to reopen."""

    lock: FolderLock
    checkpoint: Path | None
    changes: list[Change]
    run_id: str | None

    def notes(self) -> list[str]:
        """Console lines: each applied change."""
        return [f"changed on resume (applied): {c}" for c in self.changes]


def plan_resume(
    cfg: RcxConfig, folder: Path, warn: Callable[[str], None], own: bool = True
) -> ResumePlan:
    """Lock ``folder``, then decide how the run starts (see the module docstring). The lock is
    released again if anything here fails (a refused config change, an unreadable path).

    ``own=False`` (every rank but 0 of a multi-process run, after rank 0 has planned): the same
    decision without taking the lock or moving an earlier run aside."""
    lock = FolderLock(folder)
    if own:
        lock.acquire()
    try:
        disable = cfg.trainer.resume_mode == "disable"
        if own and disable and (moved := set_aside_previous_run(folder)):
            warn(f"resume_mode=disable: the earlier run in this folder was moved to {moved}")
        checkpoint = find_resume_checkpoint(cfg, folder)
        changes = [] if checkpoint is None else check_resume_config(cfg, checkpoint)
        run_id = resume_run_id(cfg, folder, checkpoint)
    except BaseException:
        lock.release()
        raise
    return ResumePlan(lock, checkpoint, changes, run_id)


def open_run_trackers(
    cfg: RcxConfig,
    plan: ResumePlan,
    folder: Path,
    parent_run_id: str | None,
    tags: Mapping[str, str] | None,
) -> Any:
    """The run's trackers (the plan's MLflow run reopened, or a new one) with its id recorded
    in ``folder/run.json`` at once, before any step or checkpoint."""
    t = cfg.trainer
    tracker = open_trackers(
        t.logger,
        project_name=t.project_name,
        experiment_name=t.experiment_name,
        tracking_uri=t.tracking_uri,
        run_dir=folder,
        resume_run_id=plan.run_id,
        parent_run_id=parent_run_id,
        tags=tags,
    )
    try:
        write_run_file(folder, tracker.run_id)
    except BaseException:
        abandon(tracker)
        raise
    return tracker


def apply_optim_changes(changes: Sequence[Change], actor: Any, critic: Any | None) -> None:
    """After a restore, apply the actor's and critic's optimiser settings that changed."""
    if optim_changed(changes, "actor_rollout_ref.actor.optim."):
        apply_optim_config(actor.optimizer, actor.scheduler, actor.cfg.optim)
    if critic is not None and optim_changed(changes, "critic.optim."):
        apply_optim_config(critic.optimizer, critic.scheduler, critic.cfg.optim)
