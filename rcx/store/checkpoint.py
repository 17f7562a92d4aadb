"""Atomic training checkpoints and latest-checkpoint discovery.

Layout under ``trainer.default_local_dir`` (default ``checkpoints/<project>/<experiment>``)::

    global_step_3/
        state.pt      torch.save of a dict (loadable with ``weights_only=True``):
                        model, optimizer, scheduler           state_dicts of the actor
                        critic, critic_optimizer, critic_scheduler   (None without a critic)
                        rollout                               the rollout engine's own state
                                                              (its stale weight copy, ...)
                        rng                                   see :func:`capture_rng_state`
                        extra                                 anything else the trainer keeps
                                                              (data order, metric history)
        config.yaml   the resolved config, as text
        meta.json     {"step", "mlflow_run_id", "format", "created_at", "files"}

Atomicity: everything is written into a hidden sibling ``.tmp-global_step_3-<pid>`` and then
renamed with ``os.replace``; a rename within one directory is atomic on POSIX, so a reader sees
either no ``global_step_3`` or a complete one. Discovery also requires ``meta.json``, and ignores
the hidden temporary directories a crash may leave behind (they are removed on the next save).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rcx.errors import RcxError

FORMAT_VERSION = 1
STEP_DIR_PREFIX = "global_step_"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
_STEP_DIR_RE = re.compile(rf"^{STEP_DIR_PREFIX}(\d+)$")


class CheckpointError(RcxError, RuntimeError):
    """A checkpoint is missing, incomplete or unreadable; the message names the path."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state`` is the dict given to :func:`save_checkpoint`."""

    path: Path
    step: int
    state: dict[str, Any]
    meta: dict[str, Any]
    config_yaml: str | None

    @property
    def mlflow_run_id(self) -> str | None:
        return self.meta.get("mlflow_run_id")


def step_dir(root: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives."""
    return Path(root) / f"{STEP_DIR_PREFIX}{step}"


def save_checkpoint(
    root: Path,
    step: int,
    state: Mapping[str, Any],
    *,
    config_yaml: str | None = None,
    mlflow_run_id: str | None = None,
    keep_last: int | None = None,
    shards: Path | None = None,
) -> Path:
    """Write ``state`` as the checkpoint of ``step`` under ``root``, atomically; return its path.

    An existing checkpoint of the same step is replaced (also atomically as seen by
    :func:`latest_checkpoint`: the old one is moved aside first, then removed). With ``keep_last``
    only the newest ``keep_last`` checkpoints are kept. ``shards``, a folder of sharded state
    already written by every rank (``torch.distributed.checkpoint``), is moved in as
    ``sharded/``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root, keep=shards)
    check_free_space(root, step, state)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_into(tmp, step, state, config_yaml, mlflow_run_id, shards)
    except BaseException as exc:
        full = _is_disk_full(exc, root)
        shutil.rmtree(tmp, ignore_errors=True)  # a failed save must not keep the disk full
        if full:
            raise CheckpointError(
                f"the disk filled up while saving step {step} in {root}; nothing was kept of "
                f"it (the earlier checkpoints are intact). Free space or point "
                f"trainer.default_local_dir elsewhere, then resume"
            ) from exc
        raise
    if final.exists():
        trash = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if keep_last is not None and keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_into(
    tmp: Path,
    step: int,
    state: Mapping[str, Any],
    config_yaml: str | None,
    mlflow_run_id: str | None,
    shards: Path | None,
) -> None:
    """The checkpoint's files, written and flushed into the temporary folder ``tmp``."""
    if shards is not None:
        os.replace(shards, tmp / "sharded")
    with open(tmp / STATE_FILE, "wb") as f:
        torch.save(dict(state), f)
        f.flush()
        os.fsync(f.fileno())
    if config_yaml is not None:
        (tmp / CONFIG_FILE).write_text(config_yaml)
    meta = {
        "format": FORMAT_VERSION,
        "step": step,
        "mlflow_run_id": mlflow_run_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": sorted(p.name for p in tmp.iterdir()) + [META_FILE],
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)


#: Room kept beyond a checkpoint's tensors (pickled structure, config, metadata), bytes.
SAVE_MARGIN_BYTES = 16 * 2**20


def state_nbytes(state: Any) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists and tuples), what ``torch.save``
    writes give or take the pickled structure."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_nbytes(v) for v in state)
    return 0


def check_free_space(root: Path, step: int, state: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` when ``root``'s filesystem has less free space than the
    checkpoint of ``step`` needs (its tensors plus :data:`SAVE_MARGIN_BYTES`): refused before
    a byte is written, so nothing is left behind."""
    need = state_nbytes(state) + SAVE_MARGIN_BYTES
    free = shutil.disk_usage(root).free
    if free < need:
        raise CheckpointError(
            f"not enough free disk space to save step {step} in {root}: it needs about "
            f"{need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free (the earlier "
            f"checkpoints are intact). Free space or point trainer.default_local_dir "
            f"elsewhere, then resume"
        )


def _is_disk_full(exc: BaseException, root: Path) -> bool:
    """Whether a failed write ran out of space: ``open``/``write`` say ENOSPC; torch's zip
    writer only says a write failed (a RuntimeError), so then the filesystem of ``root`` must
    also be (nearly) full."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    failed_write = isinstance(exc, RuntimeError) and "failed writing" in str(exc)
    return failed_write and shutil.disk_usage(root).free < SAVE_MARGIN_BYTES


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (those with ``meta.json``), oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and child.is_dir() and (child / META_FILE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root``, or None."""
    checkpoints = list_checkpoints(root)
    return checkpoints[-1] if checkpoints else None


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.json`` of the checkpoint directory ``path``, without loading its state (cheap:
    the trainer reads the MLflow run id to reopen before anything heavy loads)."""
    meta_file = Path(path) / META_FILE
    try:
        return json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {meta_file}: {exc}") from exc


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load the checkpoint directory ``path`` (as returned by :func:`latest_checkpoint`).

    Raises :class:`CheckpointError` with the path when it is incomplete or unreadable.
    Tensors are loaded with ``weights_only=True``: a checkpoint can hold no executable pickle.
    """
    path = Path(path)
    meta_file, state_file = path / META_FILE, path / STATE_FILE
    if not meta_file.is_file() or not state_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete rcx checkpoint (needs {META_FILE} and {STATE_FILE})"
        )
    try:
        meta = json.loads(meta_file.read_text())
        state = torch.load(state_file, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any corruption the same way
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')}, this rcx reads {FORMAT_VERSION}"
        )
    config_file = path / CONFIG_FILE
    config_yaml = config_file.read_text() if config_file.is_file() else None
    return Checkpoint(path, int(meta["step"]), state, meta, config_yaml)


# --------------------------------------------------------------------------- RNG


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state a training step can draw from, in a ``weights_only``-loadable form.

    Covers Python's ``random``, NumPy's global generator, torch's CPU generator, every CUDA
    device's generator (when CUDA is initialised) and the named ``generators`` the trainer owns.
    """
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    return state


def restore_rng_state(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Inverse of :func:`capture_rng_state` (named generators restored when both sides have them)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    saved = state.get("generators", {})
    for name, generator in (generators or {}).items():
        if name in saved:
            generator.set_state(saved[name].cpu())


# --------------------------------------------------------------------------- helpers


def _remove_stale_temporaries(root: Path, keep: Path | None = None) -> None:
    """Delete ``.tmp-*`` / ``.old-*`` / ``.shards-*`` directories left by a crash in an earlier
    save (all but ``keep``, the shards of the save in progress)."""
    for child in root.iterdir():
        if child == keep:
            continue
        if child.is_dir() and child.name.startswith((".tmp-", ".old-", ".shards-")):
            shutil.rmtree(child, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk (best effort; not every filesystem allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
