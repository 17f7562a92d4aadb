"""Figures as PNG files, on the Agg backend (no display needed). matplotlib loads on first use."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rcx.errors import RcxError


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


#: Image formats ``--plot`` may name (matplotlib writes each from the file's suffix).
FIGURE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


class FigurePathError(RcxError, ValueError):
    """A figure path whose format matplotlib cannot write."""


def check_figure_path(path: Path, option: str = "--plot") -> None:
    """Raise :class:`FigurePathError` unless ``path`` ends in one of :data:`FIGURE_SUFFIXES`
    and is not a folder (checked before any work, so that a long run does not end in it)."""
    if Path(path).suffix.lower() not in FIGURE_SUFFIXES:
        raise FigurePathError(
            f"{option} {path}: cannot write a figure as {Path(path).suffix or 'a file without a suffix'}; "
            f"accepted: a path ending in {', '.join(FIGURE_SUFFIXES)}"
        )
    if Path(path).is_dir():
        raise FigurePathError(
            f"{option} {path} is a folder; give a file name such as {path}/plot.png"
        )
