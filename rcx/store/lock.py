"""One run per checkpoint folder: a lock file ``<folder>/.rcx-lock``.

The file holds ``{"pid", "host", "started_at"}`` of the process that trains into the folder. It is
created with ``O_CREAT | O_EXCL`` (atomic: of two processes racing, exactly one creates it) when
training starts and removed when the run ends, however it ends (finished, failed, killed with
Ctrl-C). A ``kill -9`` leaves it behind; the next run takes such a *stale* lock over, with a
warning, when the holder ran on this host and its PID is gone. A lock held by a live process, or
by a process on another host (whose PID cannot be checked from here), refuses the run with
:class:`FolderLockedError` naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rcx.errors import RcxError

LOCK_FILE = ".rcx-lock"
#: A lock file that cannot be parsed is taken as being written by its creator for this long.
UNREADABLE_GRACE_S = 5.0


class FolderLockedError(RcxError, RuntimeError):
    """Another run holds the checkpoint folder; the message names its PID, host and start."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: what its file says."""

    pid: int
    host: str
    started_at: str

    def describe(self) -> str:
        return f"PID {self.pid} on host {self.host} (started {self.started_at})"


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: Path) -> LockHolder | None:
    """The holder recorded in the lock file ``path``, or None when it is absent or unreadable."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_stale(holder: LockHolder | None, path: Path) -> bool:
    """A lock is stale when its holder ran here and is gone, or its file stayed unreadable."""
    if holder is None:
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > UNREADABLE_GRACE_S
    return holder.host == socket.gethostname() and not pid_alive(holder.pid)


class FolderLock:
    """The lock on one checkpoint folder. :meth:`acquire` once, :meth:`release` (idempotent)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        """Create the lock file (and the folder); take a stale lock over with a warning.

        Raises :class:`FolderLockedError` when a live process (or one on another host) holds it.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )
        deadline = time.monotonic() + UNREADABLE_GRACE_S + 2.0
        while time.monotonic() < deadline:  # a stale lock removed by two at once: one wins
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
            self.held = True
            return
        raise FolderLockedError(
            f"could not lock the checkpoint folder {self.folder}: {self.path} keeps reappearing"
        )

    def release(self) -> None:
        """Remove the lock file if this process holds it."""
        if not self.held:
            return
        self.held = False
        holder = read_holder(self.path)
        if holder is None or holder.pid == os.getpid():
            self.path.unlink(missing_ok=True)

    def _take_over_if_stale(self) -> None:
        holder = read_holder(self.path)
        if holder is None and not _is_stale(holder, self.path):
            time.sleep(0.1)  # being written by its creator: read it again
            return
        if holder is not None and not _is_stale(holder, self.path):
            raise FolderLockedError(
                f"checkpoint folder {self.folder} is in use by another rcx run: "
                f"{holder.describe()}. Wait for it to end, stop it, or train into another folder "
                f"(trainer.default_local_dir or trainer.experiment_name); if that process is "
                f"gone, delete {self.path}"
            )
        who = holder.describe() if holder is not None else "an unreadable lock file"
        warnings.warn(
            f"taking over the stale lock of {self.folder}: {who} is no longer running",
            stacklevel=3,
        )
        self.path.unlink(missing_ok=True)
