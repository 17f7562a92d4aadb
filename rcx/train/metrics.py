"""Step metrics and the console: timers, per-micro-batch means, reward/length/advantage metrics,
the progress line and the end-of-run table."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

#: Metrics shown in the progress bar and the summary table, when present.
KEY_METRICS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "acc"),
    ("rollout_corr/rollout_rs_masked_fraction", "masked"),
    ("rollout_corr/rollout_is_eff_sample_size", "ess"),
    ("rollout_corr/kl", "kl"),
    ("actor/pg_clipfrac", "clipfrac"),
)
#: The mismatch line of the end-of-run summary: (metric, label, format), averaged over steps.
MISMATCH_SUMMARY = (
    ("rollout_corr/kl", "kl", "{:.2e}"),
    ("rollout_corr/rollout_rs_masked_fraction", "RS-masked tokens", "{:.2%}"),
    ("rollout_corr/rollout_rs_seq_masked_fraction", "RS-masked sequences", "{:.2%}"),
    ("rollout_corr/rollout_is_eff_sample_size", "IS ESS", "{:.3f}"),
    ("rollout/staleness", "staleness", "{:.2f}"),
)
#: Further metrics of the summary table.
SUMMARY_EXTRA = (
    "val/accuracy",
    "val/reward_mean",
    "val/sampled_accuracy",
    "timing/step",
    "perf/tokens_per_s",
)


class StageTimer:
    """``with timer("gen"):`` accumulates wall time into ``timing/gen`` (seconds)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


class MetricBag:
    """Collects per-micro-batch values; ``means()`` averages each key."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        for key, value in metrics.items():
            value = float(value.item() if torch.is_tensor(value) else value)
            self.values[prefix + key].append(value)

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.values.items() if v}


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """``sum(values * mask) / sum(mask)`` on the host (0 for an empty mask)."""
    total = float(mask.sum())
    return float((values * mask).sum()) / total if total > 0 else 0.0


def reward_metrics(scores: torch.Tensor, prefix: str) -> dict[str, float]:
    """``<prefix>/mean``, ``/std`` and ``/accuracy`` (share with full credit, score >= 1)."""
    return {
        f"{prefix}/mean": float(scores.mean()),
        f"{prefix}/std": float(scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/accuracy": float((scores >= 1.0).float().mean()),
    }


def length_metrics(
    response_ids: torch.Tensor, response_mask: torch.Tensor, eos_ids: torch.Tensor, max_length: int
) -> dict[str, float]:
    """response_length/{mean,max,min,clip_ratio}; clipped = hit max length without EOS."""
    lengths = response_mask.sum(-1).float().cpu()  # (B,)
    last = (lengths.long() - 1).clamp(min=0)  # (B,)
    last_token = response_ids.cpu()[torch.arange(len(lengths)), last]  # (B,)
    ended = torch.isin(last_token, eos_ids)
    clipped = (lengths >= max_length) & ~ended
    return {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float(clipped.float().mean()),
    }


def advantage_metrics(
    advantages: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
) -> dict[str, float]:
    """Masked means of the advantages, returns and (gae) values."""
    out = {
        "critic/advantages/mean": masked_mean(advantages, mask),
        "critic/returns/mean": masked_mean(returns, mask),
    }
    if values is not None:
        out["critic/values/mean"] = masked_mean(values, mask)
    return out


def throughput_metrics(
    step_seconds: float, tokens: float, device: torch.device
) -> dict[str, float]:
    """``timing/step``, ``perf/tokens_per_s`` (prompt + response) and, on CUDA, peak memory."""
    out = {
        "timing/step": step_seconds,
        "perf/tokens_per_s": tokens / max(step_seconds, 1e-9),
    }
    if device.type == "cuda":
        out["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def progress_info(metrics: Mapping[str, float]) -> str:
    """The short ``reward 0.412  acc 0.381 ... kl 0.0017`` part of the progress bar and of the
    plain progress lines (3 significant digits)."""
    return "  ".join(f"{short} {metrics[k]:.3g}" for k, short in KEY_METRICS if k in metrics)


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: a duration a person reads at a glance."""
    total = max(0, round(seconds))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


@dataclass
class PlainProgress:
    """Progress as plain lines, for output that is not a terminal (a pipe, a log file, CI),
    where the live bar draws nothing until the end.

    :meth:`update` prints ``step 10/100  reward 0.412  acc 0.381 ... kl 0.0017  0.33 s/step
    ETA 29s`` after the first step, the last, and otherwise once ``every_steps`` steps or
    ``every_s`` seconds have passed since the previous line. s/step is the mean over the steps
    of this session (from ``first_step``); ETA is that times the steps left.
    """

    console: Console
    total: int
    first_step: int = 1  # the first step this session runs (later than 1 on resume)
    every_steps: int = 10
    every_s: float = 10.0
    clock: Callable[[], float] = time.monotonic
    _started: float = field(init=False)
    _last_time: float = field(init=False)
    _last_step: int = field(init=False)

    def __post_init__(self) -> None:
        self._started = self._last_time = self.clock()
        self._last_step = self.first_step - 1

    def update(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record that ``step`` finished with ``metrics``; print a line when one is due."""
        now = self.clock()
        due = (
            step == self.first_step
            or step >= self.total
            or step - self._last_step >= self.every_steps
            or now - self._last_time >= self.every_s
        )
        if not due:
            return
        per_step = (now - self._started) / max(step - self.first_step + 1, 1)
        parts = [f"step {step}/{self.total}", progress_info(metrics)]
        parts.append(
            f"{per_step:.2f} s/step  ETA {format_duration(per_step * (self.total - step))}"
        )
        self.console.print(
            "  ".join(p for p in parts if p), markup=False, highlight=False, soft_wrap=True
        )
        self._last_time, self._last_step = now, step


def progress_bar(console: Console, show: bool) -> Progress:
    """The step progress bar, with elapsed time and ETA (disabled when the console logger is
    off). Off a terminal the trainer shows :class:`PlainProgress` instead."""
    return Progress(
        TextColumn("step"),
        MofNCompleteColumn(),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not show,
        transient=False,
    )


def run_summary(
    history: Mapping[str, list[tuple[int, float]]],
    *,
    steps_run: int,
    wall_s: float,
    tracking: str,
    plot: Path | None,
    checkpoint: Path | None,
) -> list[str]:
    """The lines a person reads at the end of ``rcx train``: validation accuracy before → after,
    the mean mismatch over the steps (kl, RS masked fraction, IS ESS, staleness), speed, and
    where the MLflow run, the plot and the checkpoint are. Lines whose metrics were not logged
    are left out."""
    lines = []
    greedy, sampled = history.get("val/accuracy"), history.get("val/sampled_accuracy")
    if greedy and len(greedy) > 1:
        (_, first), (_, last) = greedy[0], greedy[-1]
        line = f"validation accuracy  {first:.1%} -> {last:.1%} greedy ({100 * (last - first):+.1f} points)"
        if sampled and len(sampled) > 1:
            line += f", {sampled[0][1]:.1%} -> {sampled[-1][1]:.1%} sampled"
        lines.append(line)
    parts = [
        f"{label} {fmt.format(_mean(history[key]))}"
        for key, label, fmt in MISMATCH_SUMMARY
        if history.get(key)
    ]
    if parts:
        steps = len(history.get("rollout_corr/kl") or next(iter(history.values())))
        lines.append(f"mismatch, mean of {steps} steps  " + " | ".join(parts))
    step_times = [value for _, value in history.get("timing/step", [])]
    if steps_run and step_times:
        lines.append(
            f"speed  {steps_run} steps in {wall_s:.0f} s, set-up included "
            f"({steps_run / wall_s:.2f} steps/s); median step {float(np.median(step_times)):.2f} s"
        )
    lines.append(tracking.replace("\n", "\n  "))
    if plot is not None:
        lines.append(f"plots  {plot}")
    if checkpoint is not None:
        lines.append(f"checkpoint  {checkpoint}")
    return lines


def _mean(points: list[tuple[int, float]]) -> float:
    return float(np.mean([value for _, value in points]))


def summary_table(
    title: str, history: Mapping[str, list[tuple[int, float]]], run_id: str | None
) -> Table:
    """Start (first logged) vs end (last logged) values of the key metrics."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    for key in [k for k, _ in KEY_METRICS] + list(SUMMARY_EXTRA):
        points = history.get(key)
        if points:
            table.add_row(key, f"{points[0][1]:.4g}", f"{points[-1][1]:.4g}")
    if run_id:
        table.caption = f"MLflow run {run_id}"
    return table
