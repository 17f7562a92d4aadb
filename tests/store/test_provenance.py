"""Provenance: the versions, revision and platform every run and warm start records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch

from rcx.store import provenance
from rcx.store.provenance import (
    NOT_INSTALLED,
    environment_params,
    environment_record,
    numeric_key,
    package_version,
    rcx_revision,
)

REPO = Path(__file__).resolve().parents[2]


def test_package_version_reads_installed_metadata():
    assert package_version("torch").split("+")[0] == torch.__version__.split("+")[0]
    assert package_version("no-such-package-rcx-test") == NOT_INSTALLED


def test_rcx_revision_is_this_checkouts_commit():
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert rcx_revision().removesuffix("-dirty") == head


def test_rcx_revision_without_git_names_the_package_version(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(provenance.subprocess, "run", no_git)
    provenance.rcx_revision.cache_clear()
    try:
        assert "no git checkout" in rcx_revision()
    finally:
        provenance.rcx_revision.cache_clear()


def test_environment_record_is_json_and_names_the_required_packages():
    record = environment_record()
    json.dumps(record)  # must be serialisable as is
    for name in ("torch", "transformers", "tokenizers", "numpy", "mlflow"):
        assert record["packages"][name] != NOT_INSTALLED
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    params = environment_params(record)
    assert params["env.torch"] == record["packages"]["torch"]
    assert params["env.rcx_revision"] == record["rcx_revision"]
    assert all(isinstance(value, str) for value in params.values())


def test_numeric_key_holds_what_changes_trained_weights():
    key = numeric_key()
    assert set(key) == {"torch", "transformers", "tokenizers", "machine", "cpu_capability"}
    assert "mlflow" not in key  # tracking cannot change weights: no retraining for it


def test_rcx_revision_marks_uncommitted_changes_to_rcx(monkeypatch, tmp_path):
    calls = []

    def fake_git(cwd, *args):
        calls.append((cwd, args))
        return " M rcx/store/provenance.py" if args[0] == "status" else "abc123"

    monkeypatch.setattr(provenance, "_git", fake_git)
    provenance.rcx_revision.cache_clear()
    try:
        assert rcx_revision() == "abc123-dirty"
    finally:
        provenance.rcx_revision.cache_clear()
    assert all(cwd == REPO for cwd, _ in calls)  # asks the checkout that holds rcx/
