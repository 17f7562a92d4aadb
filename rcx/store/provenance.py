"""Where a result came from: the package versions, rcx's own revision and the numeric platform.

Every run records `environment_record()` (MLflow params under `env.*` plus a `versions.json`
artifact), and every warm start stores it in its `warm_start.json`, so two results can be
compared and a difference traced to a package, a commit or a processor. `numeric_key()` is the
part of it that can change a trained model's weights; the warm-start cache key includes it, so a
model trained under another torch build or on another CPU kernel path is not reused blindly.

Nothing here imports the packages it reports on: versions come from the installed metadata.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from functools import cache
from pathlib import Path

# The packages whose versions every run records, in this order.
RECORDED_PACKAGES = (
    "torch",
    "transformers",
    "tokenizers",
    "numpy",
    "safetensors",
    "mlflow",
    "pydantic",
    "typer",
    "rich",
    "PyYAML",
)
# The packages whose code computes a warm start's weights (model init, kernels, tokenizer).
NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers")
NOT_INSTALLED = "not installed"


def package_version(name: str) -> str:
    """The installed version of distribution `name`, or ``"not installed"``."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


def package_versions(names: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str]:
    """`{package: version}` for `names`, in order."""
    return {name: package_version(name) for name in names}


@cache
def rcx_revision() -> str:
    """rcx's git commit (``"<sha>"``, ``"<sha>-dirty"`` with uncommitted changes), or its
    package version when rcx does not run from a git checkout (an installed wheel)."""
    source = Path(__file__).resolve().parents[2]  # the checkout holding rcx/
    try:
        sha = _git(source, "rev-parse", "HEAD")
        dirty = _git(source, "status", "--porcelain", "--untracked-files=no", "--", "rcx")
    except (OSError, subprocess.SubprocessError):
        return f"rcx {package_version('rcx')} (no git checkout)"
    return f"{sha}-dirty" if dirty else sha


def _git(cwd: Path, *args: str) -> str:
    """`git -C cwd args...`'s output, stripped; raises when git fails or is missing."""
    done = subprocess.run(
        ["git", "-C", str(cwd), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


@cache
def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``), else `platform.processor()`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The SIMD level torch dispatches its CPU kernels to (``"AVX512"``, ``"AVX2"``, …)."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def numeric_key() -> dict[str, str]:
    """What can change the weights a fixed recipe trains: the numeric packages' versions, the
    architecture and torch's CPU kernel level. Part of the warm-start cache key."""
    return {
        **package_versions(NUMERIC_PACKAGES),
        "machine": platform.machine(),
        "cpu_capability": cpu_capability(),
    }


def environment_record() -> dict[str, object]:
    """Everything a run records about where it ran (JSON-serialisable)."""
    import torch

    return {
        "packages": package_versions(),
        "rcx_revision": rcx_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_capability": cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda or "none",
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }


def environment_params(record: dict[str, object]) -> dict[str, str]:
    """`environment_record()` flattened to MLflow params: ``env.torch``, ``env.rcx_revision``…"""
    params = {f"env.{name}": version for name, version in record["packages"].items()}  # type: ignore[union-attr]
    params.update({f"env.{key}": str(value) for key, value in record.items() if key != "packages"})
    return params
