"""Figures as PNG files, on the Agg backend (no display needed). matplotlib loads on first use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def panel_grid(
    count: int, max_cols: int = 2, panel_size: tuple[float, float] = (5.0, 3.0)
) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels, at most ``max_cols`` per row; returns (figure, axes list)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(count, max_cols))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False
    )
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_curve(ax: Any, points: Sequence[tuple[int, float]], label: str) -> None:
    """One (step, value) curve, sorted by step; markers only when there are few points."""
    steps, values = zip(*sorted(points), strict=True)
    ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)


def save_figure(fig: Any, path: Path) -> Path:
    """Lay out, write ``path`` (creating its folder) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
