"""The checkpoint folder's lock: one run per folder, stale locks taken over, holders named."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rcx.errors import RcxError
from rcx.store.lock import LOCK_FILE, FolderLock, FolderLockedError, read_holder


def _write_lock(folder: Path, pid: int, host: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    record = {"pid": pid, "host": host or socket.gethostname(), "started_at": "2026-01-01T00:00"}
    path.write_text(json.dumps(record))
    return path


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_acquire_records_the_holder_and_release_removes_it(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path / "run")
    lock.acquire()
    holder = read_holder(lock.path)
    assert holder is not None and holder.pid == os.getpid()
    assert holder.host == socket.gethostname()
    lock.release()
    assert not lock.path.exists()
    lock.release()  # idempotent


def test_a_live_holder_refuses_with_its_pid_host_and_the_folder(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path, sleeper.pid)
        with pytest.raises(FolderLockedError) as info:
            FolderLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    message = str(info.value)
    assert f"PID {sleeper.pid}" in message and socket.gethostname() in message
    assert str(tmp_path) in message and "\n" not in message
    assert isinstance(info.value, RcxError)
    assert read_holder(tmp_path / LOCK_FILE).pid == sleeper.pid  # the holder's lock is kept


def test_a_second_lock_in_the_same_process_is_refused(tmp_path: Path) -> None:
    first = FolderLock(tmp_path)
    first.acquire()
    with pytest.raises(FolderLockedError, match=f"PID {os.getpid()}"):
        FolderLock(tmp_path).acquire()
    first.release()
    FolderLock(tmp_path).acquire()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path, dead)
    lock = FolderLock(tmp_path)
    with pytest.warns(UserWarning, match=f"stale lock .*PID {dead}"):
        lock.acquire()
    assert read_holder(lock.path).pid == os.getpid()


def test_a_lock_from_another_host_is_not_taken_over(tmp_path: Path) -> None:
    _write_lock(tmp_path, _dead_pid(), host="elsewhere.example")
    with pytest.raises(FolderLockedError, match="elsewhere.example"):
        FolderLock(tmp_path).acquire()


def test_an_unreadable_lock_is_taken_over_after_its_grace_period(tmp_path: Path) -> None:
    path = tmp_path / LOCK_FILE
    path.write_text("{not json")
    old = time.time() - 60
    os.utime(path, (old, old))
    with pytest.warns(UserWarning, match="unreadable lock file"):
        FolderLock(tmp_path).acquire()
