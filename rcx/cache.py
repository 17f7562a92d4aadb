"""Where rcx keeps what it can rebuild: warm starts, the empty MLflow store it copies."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$RCX_CACHE_DIR`, else `~/.cache/rcx`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("RCX_CACHE_DIR") or "~/.cache/rcx").expanduser()
