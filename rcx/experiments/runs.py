"""Comparing MLflow runs (``rcx runs compare``): a final-metrics table and metric curves.

Each id given may be a run or a sweep's parent run; a run with child runs stands for its children
(a sweep's trials, in name order). The table shows, per run, its name, status, the config params
that differ between the runs compared, and the last logged value of each chosen metric; the plot
draws each chosen metric's curve, one line per run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcx.errors import RcxError

#: Metrics compared when none is named (those present in at least one run).
DEFAULT_METRICS = (
    "val/reward_mean",
    "val/accuracy",
    "reward/mean",
    "rollout_corr/rollout_rs_masked_fraction",
    "rollout_corr/rollout_is_eff_sample_size",
    "rollout_corr/kl",
)
#: Params that differ between any two runs by construction; never shown as a difference.
IGNORED_PARAMS = (
    "trainer.experiment_name",
    "trainer.default_local_dir",
    "trainer.resume_from_path",
)


class RunsError(RcxError, ValueError):
    """A run or store cannot be used; the message names it."""


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    final: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class Comparison:
    runs: list[RunSummary]
    metrics: list[str]
    differing_params: list[str]


def open_client(tracking_uri: str | None) -> Any:
    """An MLflow client for the store; a missing local SQLite database is an error, not created,
    and an http server that does not answer within seconds is one too."""
    from mlflow.tracking import MlflowClient

    from rcx.store.tracking import (
        TrackingError,
        check_reachable,
        is_http,
        resolve_tracking_uri,
        sqlite_path,
        sqlite_store_problem,
    )

    uri = resolve_tracking_uri(tracking_uri)
    if is_http(uri):  # MLflow's own retries take minutes before they give up
        try:
            check_reachable(uri)
        except TrackingError as exc:
            reason = str(exc).splitlines()[0]
            raise RunsError(f"{reason}; start it or pass another --tracking-uri") from exc
    db = sqlite_path(uri)
    if db is not None and (problem := sqlite_store_problem(db)):
        raise RunsError(f"{problem}; move it aside or pass another --tracking-uri")
    if db is not None and not db.is_file():
        raise RunsError(
            f"no MLflow store at {db}; run from the folder holding mlflow.db or pass "
            f"--tracking-uri (e.g. sqlite:///path/to/mlflow.db or http://host:5000)"
        )
    return MlflowClient(tracking_uri=uri)


def expand_run_ids(client: Any, run_ids: Sequence[str]) -> list[Any]:
    """The runs to compare: each id itself, or its child runs when it has any (in name order)."""
    from mlflow.exceptions import MlflowException

    runs: list[Any] = []
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise RunsError(
                f"no run {run_id!r} in the MLflow store {client.tracking_uri}"
            ) from None
        children = client.search_runs(
            [run.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
            max_results=10_000,
        )
        if children:
            runs += sorted(children, key=lambda r: r.info.run_name or r.info.run_id)
        else:
            runs.append(run)
    seen: set[str] = set()
    return [r for r in runs if not (r.info.run_id in seen or seen.add(r.info.run_id))]


def differing_params(runs: Sequence[RunSummary]) -> list[str]:
    """Param keys whose value is not the same in every run (missing counts as a value)."""
    keys = sorted({k for r in runs for k in r.params} - set(IGNORED_PARAMS))
    return [k for k in keys if len({r.params.get(k) for r in runs}) > 1]


def compare_runs(
    run_ids: Sequence[str], metrics: Sequence[str] = (), tracking_uri: str | None = None
) -> Comparison:
    """Summaries of the runs (see module docstring) with the curves of ``metrics``.

    With no ``metrics``, those of :data:`DEFAULT_METRICS` that any run logged.
    """
    if not run_ids:
        raise RunsError("give at least one run id (or a sweep's parent run id)")
    client = open_client(tracking_uri)
    runs = expand_run_ids(client, run_ids)
    if not metrics:
        logged = {k for r in runs for k in r.data.metrics}
        metrics = [m for m in DEFAULT_METRICS if m in logged]
    summaries = []
    for run in runs:
        history = {}
        for key in metrics:
            points = client.get_metric_history(run.info.run_id, key)
            if points:
                history[key] = sorted((int(p.step), float(p.value)) for p in points)
        summaries.append(
            RunSummary(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                status=run.info.status,
                params=dict(run.data.params),
                final={k: float(v) for k, v in run.data.metrics.items()},
                history=history,
            )
        )
    return Comparison(summaries, list(metrics), differing_params(summaries))


def final_value(run: RunSummary | Any, metric: str) -> float | None:
    """The value at the highest logged step of ``run.history``, else ``run.final[metric]``
    (MLflow's latest value when no history was read), else None. ``run``: a RunSummary or a
    sweep's TrialResult (anything with ``history`` and ``final``)."""
    points = run.history.get(metric)
    if points:
        return max(points)[1]
    value = run.final.get(metric)
    return None if value is None else float(value)


def format_metric(value: float | None) -> str:
    """A metric value for a table: 4 significant digits, "-" when missing."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4g}"


def plot_comparison(comparison: Comparison, path: Path) -> Path | None:
    """One panel per metric, one line per run. None when no run logged any chosen metric."""
    keys = [m for m in comparison.metrics if any(r.history.get(m) for r in comparison.runs)]
    if not keys:
        return None
    from rcx.store.plots import panel_grid, plot_curve, save_figure

    fig, axes = panel_grid(len(keys), panel_size=(6.0, 3.6))
    for ax, key in zip(axes, keys, strict=True):
        for run in comparison.runs:
            points = run.history.get(key)
            if points:
                plot_curve(ax, points, run.name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)
