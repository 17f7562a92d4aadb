"""Atomic checkpoints: round trip, discovery, crash safety, RNG state."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from rcx.store import checkpoint as ckpt
from rcx.store.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_rng_state()}


def test_round_trip_keeps_tensors_meta_and_config(tmp_path: Path) -> None:
    state = _state()
    path = save_checkpoint(tmp_path, 3, state, config_yaml="a: 1\n", mlflow_run_id="abc")
    assert path == tmp_path / "global_step_3"
    loaded = load_checkpoint(path)
    assert loaded.step == 3 and loaded.mlflow_run_id == "abc" and loaded.config_yaml == "a: 1\n"
    for key, value in state["model"].items():
        assert torch.equal(loaded.state["model"][key], value)
    assert loaded.state["optimizer"]["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert loaded.meta["files"] == ["config.yaml", "state.pt", "meta.json"]


def test_latest_is_highest_complete_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 9):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)})
    (tmp_path / "global_step_99").mkdir()  # no meta.json: incomplete, ignored
    (tmp_path / ".tmp-global_step_50-1").mkdir()  # a crashed save, ignored
    (tmp_path / "notes").mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "global_step_2",
        "global_step_9",
        "global_step_10",
    ]
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step_10"


def test_crash_during_save_never_exposes_a_partial_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)})

    def torn_write(obj, f, *a, **kw):
        f.write(b"half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, {"x": torch.tensor(2)})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step_1"
    assert not (tmp_path / "global_step_2").exists()
    # The next save sweeps the debris away.
    save_checkpoint(tmp_path, 3, {"x": torch.tensor(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1", "global_step_3"]


def test_too_little_free_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    save_checkpoint(tmp_path, 1, {"x": torch.zeros(10)})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(2**30, 2**30 - 2**20, 2**20))
    with pytest.raises(CheckpointError, match=r"not enough free disk space to save step 2"):
        save_checkpoint(tmp_path, 2, {"x": torch.zeros(10)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1"]
    monkeypatch.setattr(ckpt.shutil, "disk_usage", shutil.disk_usage)
    assert ckpt.state_nbytes({"a": torch.zeros(3), "b": [torch.zeros(2, dtype=torch.int64)]}) == 28


def test_a_disk_that_fills_up_during_the_save_leaves_no_temporary_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    save_checkpoint(tmp_path, 1, {"x": torch.tensor(1)})
    usage = namedtuple("usage", "total used free")
    free = [2**40]  # plenty before the write, nothing after it failed

    def fills_the_disk(obj, f, *a, **kw):
        f.write(b"part of a pickle")
        free[0] = 0
        raise RuntimeError("[enforce fail] PytorchStreamWriter failed writing file data/0")

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: usage(2**40, 2**40 - free[0], free[0]))
    monkeypatch.setattr(ckpt.torch, "save", fills_the_disk)
    with pytest.raises(CheckpointError, match=r"disk filled up while saving step 2"):
        save_checkpoint(tmp_path, 2, {"x": torch.tensor(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step_1"]  # no .tmp-* left


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 4, {"x": torch.tensor(1)}, mlflow_run_id="a")
    save_checkpoint(tmp_path, 4, {"x": torch.tensor(2)}, mlflow_run_id="b")
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded.state["x"].item() == 2 and loaded.mlflow_run_id == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["global_step_4"]


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, {"x": torch.tensor(step)}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["global_step_3", "global_step_4"]


def test_incomplete_or_foreign_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "global_step_1").mkdir()
    with pytest.raises(CheckpointError, match="not a complete rcx checkpoint"):
        load_checkpoint(tmp_path / "global_step_1")
    path = save_checkpoint(tmp_path, 2, {"x": torch.tensor(1)})
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_rng_state_round_trip_replays_every_generator() -> None:
    gen = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state({"data": gen})

    def draw() -> tuple:
        return (
            random.random(),
            np.random.rand(),
            torch.rand(1).item(),
            torch.rand(1, generator=gen).item(),
        )

    first = draw()
    restore_rng_state(state, {"data": gen})
    assert draw() == first


def test_rng_state_survives_save_and_weights_only_load(tmp_path: Path) -> None:
    np.random.seed(5)
    path = save_checkpoint(tmp_path, 1, {"rng": capture_rng_state()})
    expected = np.random.rand(3)
    restore_rng_state(load_checkpoint(path).state["rng"])
    assert np.array_equal(np.random.rand(3), expected)
