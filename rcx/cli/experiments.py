"""The experiment commands: ``rcx sweep``, ``rcx whatif``, ``rcx calibrate``, ``rcx runs compare``.

:func:`register` adds them to the ``rcx`` Typer app. Heavy imports (torch, mlflow, matplotlib)
happen inside the command bodies, so ``rcx --help`` stays fast.

Exit codes: 0 success; 1 bad input (every problem listed, no traceback), a trial that failed, or a
calibration target that cannot be met; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from rcx.cli.common import (
    OutputFormat,
    console,
    esc,
    fail,
    print_findings,
    split_args,
    with_override_hint,
)


class Executor(str, Enum):
    local = "local"
    ray = "ray"


class Mode(str, Enum):
    max = "max"
    min = "min"


class IsLevelOpt(str, Enum):
    token = "token"
    sequence = "sequence"
    none = "none"


GridOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--grid",
        "-g",
        help="KEY=V1,V2,... (repeatable; the trials are the cartesian product). Values that "
        'contain commas go in a YAML list: KEY=["0.6_1.6,2.5","0.5_2.0,3.0"].',
        show_default=False,
    ),
]
DumpArg = Annotated[
    list[Path],
    typer.Argument(
        help="Log-prob dumps (trainer.dump_log_probs=true): step_*.pt files, their log_probs/ "
        "folder, or the run's checkpoint folder.",
        show_default=False,
    ),
]
FormatOpt = Annotated[
    OutputFormat, typer.Option("--format", help="text (tables) or json (one document).")
]


def register(app: typer.Typer) -> None:
    """Add ``sweep``, ``whatif``, ``calibrate`` and the ``runs`` group to ``app``."""
    app.command("sweep", help=help_text(sweep_command))(sweep_command)
    app.command("whatif", help=help_text(whatif_command))(whatif_command)
    app.command("calibrate", help=help_text(calibrate_command))(calibrate_command)
    runs_app = typer.Typer(help="Compare MLflow runs and sweeps.", no_args_is_help=True)
    runs_app.command("compare", help=help_text(runs_compare_command))(runs_compare_command)
    app.add_typer(runs_app, name="runs")


def help_text(command: Any) -> str:
    """A command's docstring with each paragraph on one line (the terminal wraps it)."""
    import inspect

    paragraphs = inspect.cleandoc(command.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


# ------------------------------------------------------------------------------------ sweep ---


def sweep_command(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="An optional base config FILE, then KEY=VALUE overrides applied to every trial.",
            show_default=False,
        ),
    ] = None,
    grid: GridOpt = None,
    preset: Annotated[
        str | None, typer.Option("--preset", "-p", help="Base preset (`rcx presets list`).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Base YAML config file.")
    ] = None,
    sweep_file: Annotated[
        Path | None,
        typer.Option(
            "--sweep",
            help="A sweep YAML: name, preset, config, base, overrides, grid, metric, mode.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Sweep name (MLflow parent run; trials are NAME-t00, ...)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the sweep's state, table and plot.")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(help="Metric to rank by (its last value). [default: val/reward_mean]"),
    ] = None,
    mode: Annotated[Mode | None, typer.Option(help="max or min. [default: max]")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List the trials (validated) and stop.")
    ] = False,
    parallel: Annotated[
        int, typer.Option(min=1, help="Trials at a time, each in its own process.")
    ] = 1,
    executor: Annotated[
        Executor,
        typer.Option(
            help="local, or ray: each trial a Ray task (pip install 'rcx[ray]'; joins a running "
            "local instance or starts one unless --ray-address is given)."
        ),
    ] = Executor.local,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address, e.g. ray://head:10001 or auto.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue a sweep of this name; finished trials are kept."),
    ] = False,
) -> None:
    """Train every combination of the grid: one MLflow parent run, a child run per trial.

    Every trial is validated before any starts. At the end: a table ranked by --metric and a PNG
    of its curve per trial, saved in the sweep folder and logged to the parent run.
    Exit 0 when every trial finished, 1 when any failed or was invalid, 130 on Ctrl-C.
    """
    from rcx.config import ConfigError
    from rcx.experiments.sweep import (
        DEFAULT_METRIC,
        SweepError,
        base_from_sources,
        invalid_trials,
        name_clash,
        parse_grid,
        plan_sweep,
        read_sweep_file,
        run_sweep,
    )

    config_file = None
    try:
        config_file, overrides = split_args(args, config)
        sf = read_sweep_file(sweep_file) if sweep_file else None
        axes = (sf.axes if sf else []) + [parse_grid(g) for g in grid or []]
        base = base_from_sources(preset, config_file, overrides, sf)
    except (SweepError, typer.BadParameter) as e:
        raise fail(str(e)) from None
    except ConfigError as e:
        print_findings(with_override_hint(e.findings, config_file))
        raise typer.Exit(1) from None
    run_name = (base.get("trainer") or {}).get("experiment_name") or "default"
    sweep_name = name or (sf.name if sf else None) or f"{run_name}-sweep"
    out_dir = out or Path("sweeps") / sweep_name
    try:
        plan = plan_sweep(
            base,
            axes,
            name=sweep_name,
            out_dir=out_dir,
            metric=metric or (sf.metric if sf else None) or DEFAULT_METRIC,
            mode=(mode.value if mode else None) or (sf.mode if sf else None) or "max",
        )
    except SweepError as e:
        raise fail(str(e)) from None

    console.print(trials_table(plan))
    bad = invalid_trials(plan)
    if bad:
        for trial in bad:
            console.print(f"[bold red]{esc(trial.name)} is invalid[/] ({esc(trial.label)}):")
            print_findings(trial.report.errors if trial.report else [])
        raise fail(f"{len(bad)} of {len(plan.trials)} trials are invalid; nothing was started")
    warn_inert_axes(plan)
    try:
        clash = name_clash(plan, resume)
    except SweepError as e:
        raise fail(str(e)) from None
    if dry_run:
        if clash:
            raise fail(f"{clash} (dry run: nothing started)")
        console.print(f"dry run: {len(plan.trials)} valid trials, nothing started")
        raise typer.Exit(0)

    try:
        outcome = run_sweep(
            plan,
            parallel=parallel,
            executor=executor.value,
            ray_address=ray_address,
            resume=resume,
            on_event=lambda line: console.print(f"[bold]sweep[/] {esc(line)}", markup=True),
        )
    except SweepError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/]: finished trials are kept in {esc(plan.out_dir)}; continue with "
            f"the same command and --resume"
        )
        raise typer.Exit(130) from None
    print_ranking(outcome)
    failed = [r for r in outcome.results.values() if r.status != "FINISHED"]
    raise typer.Exit(1 if failed else 0)


def warn_inert_axes(plan: Any) -> None:
    """One warning per grid key that cannot change training in any trial (the trials would
    train identically on it; :func:`rcx.experiments.sweep.inert_axes`), and a note when the
    swept correction keys have no mismatch to act on (:func:`unmatched_correction_axes`)."""
    from rcx.experiments.sweep import inert_axes, unmatched_correction_axes

    for key, why in inert_axes(plan).items():
        console.print(
            f"[yellow]warning[/] --grid {esc(key)} cannot change training here: {esc(why)}; "
            f"the trials differ in metrics only, not in what they train",
            markup=True,
        )
    unmatched = unmatched_correction_axes(plan)
    if unmatched:
        console.print(
            f"[yellow]note[/] no mismatch source in any trial (float32 rollout in sync, no "
            f"truncation, one update per step): pi_rollout equals pi_theta up to rounding, so the "
            f"swept correction keys ({esc(', '.join(k.rsplit('.', 1)[-1] for k in unmatched))}) "
            f"see ratios of 1 and the trials would likely train alike; add a source, e.g. "
            f"actor_rollout_ref.rollout.weight_sync_interval=4",
            markup=True,
        )


def trials_table(plan: Any) -> Table:
    """The planned trials with their grid values and validity."""
    table = Table(title=f"sweep {esc(plan.name)}: {len(plan.trials)} trials")
    table.add_column("trial", style="bold")
    for axis in plan.axes:
        table.add_column(esc(axis.key.rsplit(".", 1)[-1]))
    table.add_column("config")
    from rcx.experiments.sweep import format_value

    for trial in plan.trials:
        report = trial.report
        state = "valid" if report is not None and report.valid else "[red]invalid[/]"
        if report is not None and report.valid and report.warnings:
            state += f" ({len(report.warnings)} warning{'s' * (len(report.warnings) != 1)})"
        table.add_row(
            esc(trial.name), *(esc(format_value(trial.params[a.key])) for a in plan.axes), state
        )
    return table


def print_ranking(outcome: Any) -> None:
    """The ranked table, where the plot and the parent run are."""
    from rcx.experiments.sweep import rank_trials

    plan = outcome.plan
    ranked = rank_trials(plan.trials, outcome.results, plan.metric, plan.mode)
    table = Table(title=esc(f"sweep {plan.name}: ranked by {plan.metric} ({plan.mode})"))
    for col in ("rank", "trial", "status", plan.metric):
        table.add_column(esc(col))
    for axis in plan.axes:
        table.add_column(esc(axis.key.rsplit(".", 1)[-1]))
    table.add_column("run id")
    from rcx.experiments.sweep import format_value

    for r in ranked:
        status = r.result.status if r.result else "NOT RUN"
        style = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow"}.get(status, "")
        table.add_row(
            "-" if r.rank is None else str(r.rank),
            esc(r.trial.name),
            f"[{style}]{status}[/]" if style else esc(status),
            "-" if r.value is None else f"{r.value:.4g}",
            *(esc(format_value(r.trial.params[a.key])) for a in plan.axes),
            ((r.result.run_id or "-") if r.result else "-")[:8],
        )
    console.print(table)
    for r in ranked:
        if r.result and r.result.error:
            first_line = r.result.error.splitlines()[0]
            console.print(f"[red]{esc(r.trial.name)}[/]: {esc(first_line)}")
    if outcome.plot is not None:
        console.print(f"plot: {outcome.plot}", markup=False)
    if outcome.parent_run_id:
        console.print(
            f"parent run: {outcome.parent_run_id} (rcx runs compare {outcome.parent_run_id})",
            markup=False,
        )


# ----------------------------------------------------------------------------------- whatif ---


def whatif_command(
    dumps: DumpArg,
    grid: GridOpt = None,
    per_step: Annotated[
        bool, typer.Option("--per-step", help="Also print every step of every config.")
    ] = False,
    by_staleness: Annotated[
        bool,
        typer.Option(
            "--by-staleness", help="Also replay every config on each staleness level alone."
        ),
    ] = False,
    output: FormatOpt = OutputFormat.text,
    adv_estimator: Annotated[
        str | None,
        typer.Option(
            "--adv-estimator",
            help="OPSM replay of dumps that do not record the run's estimator: the run's "
            "algorithm.adv_estimator (grpo, rloo or reinforce_plus_plus).",
        ),
    ] = None,
) -> None:
    """Replay correction configs over log-prob dumps offline, with no model.

    Prints, per config, per criterion, per step and overall: masked fractions, ESS, IS weight
    mean/max, the truncated share and, with OPSM, the sequences and tokens it masks.
    The base is the correction config recorded in the dump; each --grid key (rollout_is,
    rollout_is_threshold, rollout_is_batch_normalize, rollout_rs, rollout_rs_threshold,
    off_policy_mask_threshold, baseline_includes_rejected, with or without the
    algorithm.rollout_correction. prefix) varies it. OPSM recomputes the advantages from the
    dumped scores (grpo, rloo, reinforce_plus_plus; not gae, which needs the critic).
    """
    from rcx.experiments.sweep import SweepError, parse_grid
    from rcx.experiments.whatif import (
        CORRECTION_KEYS,
        WhatifError,
        build_settings,
        replay,
        replay_by_staleness,
        results_json,
    )
    from rcx.store.dumps import DumpError, load_dumps

    try:
        axes = [parse_grid(g) for g in grid or []]
        pairs = [(a.key, list(a.values)) for a in axes]
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise SweepError("a --grid key is given twice; give all its values once")
        stack = load_dumps(dumps)
        base = {k: v for k, v in stack.rollout_correction.items() if k in CORRECTION_KEYS}
        configs, invalid = build_settings(base, pairs)
    except (SweepError, DumpError, ValueError) as e:
        raise fail(str(e)) from None
    if invalid:
        for params, findings in invalid:
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            console.print(f"[bold red]invalid config[/] {esc(shown)}:")
            print_findings(findings)
        raise fail(f"{len(invalid)} invalid config(s); nothing was replayed")
    try:
        results = replay(stack, configs, adv_estimator)
        levels = replay_by_staleness(stack, configs, adv_estimator) if by_staleness else {}
    except WhatifError as e:
        raise fail(str(e)) from None
    if output is OutputFormat.json:
        out: dict[str, Any] = {"steps": stack.steps, "configs": results_json(results)}
        if levels:
            out["by_staleness"] = {str(k): results_json(r) for k, r in levels.items()}
        print(json.dumps(out, indent=1))
        return
    console.print(
        f"{len(stack.sources)} dump file(s), steps {stack.steps[0]}..{stack.steps[-1]}, "
        f"{int(stack.response_mask.sum())} response tokens",
        markup=False,
    )
    for part in whatif_tables(results):
        console.print(part)
    if levels:
        console.print(whatif_staleness_table(levels))
    if per_step:
        for r in results:
            console.print(whatif_steps_table(r))


#: Short column headers of the what-if tables.
WHATIF_HEADERS = {
    "masked_fraction": "masked",
    "seq_masked_fraction": "seq masked",
    "masked_fraction_max": "masked worst",
    "ess": "ESS",
    "ess_min": "ESS worst",
    "weight_mean": "w mean",
    "weight_max": "w max",
    "truncated_fraction": "truncated",
    "oob_fraction": "zeroed (band)",
    "norm_factor": "norm factor",
    "opsm_seq_masked_fraction": "OPSM seq masked",
    "opsm_masked_fraction": "OPSM masked",
}


def whatif_staleness_table(levels: dict[int, list[Any]]) -> Table:
    """Each config (#) on each staleness level's samples alone, the overall columns."""
    from rcx.experiments.whatif import format_stat, stat_columns

    results = [r for rs in levels.values() for r in rs]
    cols = [c for c in stat_columns(results) if "/" not in c]
    table = Table(title="what-if by staleness (each level's samples alone)")
    for header in ("stale", "#"):
        table.add_column(header, justify="right")
    for c in cols:
        table.add_column(esc(WHATIF_HEADERS.get(c, c)), justify="right")
    for level, rs in levels.items():
        for i, r in enumerate(rs):
            table.add_row(str(level), f"#{i}", *(format_stat(r.overall.get(c)) for c in cols))
    return table


def whatif_tables(results: list[Any]) -> list[Any]:
    """The legend of configs, the overall table, and the per-criterion table (if any RS)."""
    from rich.text import Text

    from rcx.experiments.whatif import format_stat, stat_columns

    legend = Text("\n".join(f"#{i}: {r.settings.label}" for i, r in enumerate(results)))
    cols = [c for c in stat_columns(results) if "/" not in c]
    overall = Table(title="what-if, overall (fractions pooled over steps; ESS: mean over steps)")
    overall.add_column("#")
    for c in cols:
        overall.add_column(esc(WHATIF_HEADERS.get(c, c)), justify="right")
    for i, r in enumerate(results):
        overall.add_row(f"#{i}", *(format_stat(r.overall.get(c)) for c in cols))
    out: list[Any] = [legend, overall]
    criteria = sorted({k.split("/")[0] for r in results for k in r.overall if "/" in k})
    if criteria:
        per = Table(title="per criterion alone (masked / seq masked)")
        per.add_column("#")
        for name in criteria:
            per.add_column(esc(name), justify="right")
        for i, r in enumerate(results):
            cells = []
            for name in criteria:
                tok = r.overall.get(f"{name}/masked_fraction")
                seq = r.overall.get(f"{name}/seq_masked_fraction")
                cells.append("-" if tok is None else f"{format_stat(tok)} / {format_stat(seq)}")
            per.add_row(f"#{i}", *cells)
        out.append(per)
    return out


def whatif_steps_table(result: Any) -> Table:
    from rcx.experiments.whatif import STAT_KEYS, format_stat

    main = [c for c in (*STAT_KEYS, "norm_factor") if c in result.per_step]
    # Per criterion, only the token share fits a terminal (--format json has everything).
    cols = main + sorted(c for c in result.per_step if c.endswith("/masked_fraction"))
    table = Table(title=f"per step: {esc(result.settings.label)}")
    table.add_column("step")
    for c in cols:
        name, _, stat = c.rpartition("/")
        header = WHATIF_HEADERS.get(stat, stat)
        table.add_column(esc(f"{name}\n{header}" if name else header), justify="right")
    for k, step in enumerate(result.steps):
        table.add_row(str(step), *(format_stat(result.per_step[c][k]) for c in cols))
    return table


# -------------------------------------------------------------------------------- calibrate ---


def calibrate_command(
    dumps: DumpArg,
    max_masked: Annotated[
        float, typer.Option(help="Most valid tokens RS may reject (all criteria together).")
    ] = 0.05,
    min_ess: Annotated[float, typer.Option(help="Least IS effective sample size.")] = 0.9,
    criteria: Annotated[
        str | None,
        typer.Option(
            help="RS criteria to calibrate, comma-separated (e.g. token_k1,seq_max_k2). "
            "[default: the dump's rollout_rs, else token_k1]"
        ),
    ] = None,
    is_level: Annotated[
        IsLevelOpt | None,
        typer.Option(
            "--is",
            help="IS level to calibrate: token, sequence or none. [default: the dump's, else token]",
        ),
    ] = None,
    worst_step: Annotated[
        bool,
        typer.Option("--worst-step", help="Meet the targets at every step, not just overall."),
    ] = False,
    band: Annotated[
        bool,
        typer.Option(
            "--band",
            help="Propose an IcePop band 1/C_C (weights outside zeroed) instead of a cap C.",
        ),
    ] = False,
    by_staleness: Annotated[
        bool,
        typer.Option(
            "--by-staleness",
            help="Also calibrate each staleness level of the samples on its own, and show what "
            "the overall proposal does at each level.",
        ),
    ] = False,
    plot: Annotated[Path, typer.Option(help="Where to save the trade-off PNG.")] = Path(
        "calibration.png"
    ),
    output: FormatOpt = OutputFormat.text,
) -> None:
    """Propose an IS cap and RS bounds that meet targets on dumped mismatch.

    Prints the trade-off tables (masked fraction and ESS against the thresholds), saves them as a
    PNG, and prints the KEY=VALUE overrides to use.

    Exit 0 when every target is met on the dump, 1 otherwise (the closest proposal is printed).
    """
    from rcx.experiments.calibrate import (
        CalibrationError,
        Targets,
        calibrate,
        calibrate_by_staleness,
        plot_calibration,
    )
    from rcx.store.dumps import DumpError, load_dumps
    from rcx.store.plots import FigurePathError, check_figure_path

    try:
        check_figure_path(plot)
        stack = load_dumps(dumps)
        rc = stack.rollout_correction
        names = criteria if criteria is not None else (rc.get("rollout_rs") or "token_k1")
        level = is_level.value if is_level is not None else (rc.get("rollout_is") or "token")
        options: dict[str, Any] = {
            "criteria": [names] if isinstance(names, str) else list(names),
            "targets": Targets(max_masked, min_ess, worst_step),
            "is_level": None if level == "none" else level,
            "band": band,
        }
        cal = calibrate(stack, **options)
        levels = calibrate_by_staleness(stack, **options) if by_staleness else {}
    except (CalibrationError, DumpError, FigurePathError, ValueError) as e:
        raise fail(str(e)) from None
    png = plot_calibration(cal, plot)
    met = cal.met
    pooled_at = {k: pooled_at_level(stack, cal, k) for k in levels}
    if output is OutputFormat.json:
        out = calibration_json(cal, png)
        if levels:
            out["by_staleness"] = {
                str(k): {**calibration_json(c, None), "overall_proposal_measured": pooled_at[k]}
                for k, c in levels.items()
            }
        print(json.dumps(out, indent=1))
        raise typer.Exit(0 if all(met.values()) else 1)
    for name in cal.criteria:
        console.print(rs_table(cal, name))
    if cal.is_curve:
        console.print(is_table(cal))
    if cal.measured is not None:
        o = cal.measured.overall
        scope = "worst step" if cal.targets.worst_step else "overall"
        parts = []
        if "masked_fraction" in o:
            parts.append(
                f"masked {o[cal.targets.masked_key]:.2%} (target <= {cal.targets.max_masked:.2%})"
            )
        if "ess" in o:
            parts.append(f"ESS {o[cal.targets.ess_key]:.4f} (target >= {cal.targets.min_ess})")
        console.print(f"measured with the proposal ({scope}): " + ", ".join(parts), markup=False)
    for note in cal.notes:
        console.print(f"[yellow]note[/] {esc(note)}")
    if levels:
        console.print(staleness_table(stack, cal, levels, pooled_at))
    if png is not None:
        console.print(f"trade-off plot: {png}", markup=False)
    verdict = "meets every target" if all(met.values()) else "does NOT meet every target"
    console.print(f"proposal {verdict} on this dump; overrides:", markup=False)
    for line in cal.overrides():
        print(line)
    raise typer.Exit(0 if all(met.values()) else 1)


def rs_table(cal: Any, name: str) -> Table:
    budget = cal.targets.max_masked / max(len(cal.criteria), 1)
    table = Table(title=f"{esc(name)}: masked fraction against the bound (budget {budget:.2%})")
    for col in ("threshold", "masked", "worst step", "seq masked", ""):
        table.add_column(col, justify="right")
    chosen = cal.rs_chosen.get(name)
    for p in cal.rs_curves[name]:
        mark = "<- proposed" if chosen is p else ("too tight (W007)" if p.too_tight else "")
        table.add_row(
            esc(p.entry),
            f"{p.masked_fraction:.3%}",
            f"{p.masked_fraction_max:.3%}",
            f"{p.seq_masked_fraction:.3%}",
            mark,
        )
    return table


def is_table(cal: Any) -> Table:
    band = any(p.band for p in cal.is_curve)
    what = "the band" if band else "the cap"
    table = Table(
        title=esc(f"{cal.is_level} IS: ESS against {what} (target {cal.targets.min_ess})")
    )
    for col in ("band lo_hi" if band else "cap C", "ESS", "ESS worst step",
                "zeroed" if band else "truncated", ""):  # fmt: skip
        table.add_column(col, justify="right")
    for p in cal.is_curve:
        mark = "<- proposed" if cal.is_chosen is p else ""
        bound = str(p.threshold) if band else f"{p.cap:g}"
        table.add_row(
            bound, f"{p.ess:.4f}", f"{p.ess_min:.4f}", f"{p.truncated_fraction:.3%}", mark
        )
    return table


def pooled_at_level(stack: Any, cal: Any, level: int) -> dict[str, float] | None:
    """The overall proposal replayed on the samples of one staleness level alone."""
    from rcx.experiments.whatif import Replayer

    if cal.measured is None:
        return None
    assert stack.staleness is not None
    return Replayer(stack.subset(stack.staleness == level)).replay(cal.proposal).overall


def staleness_table(
    stack: Any, cal: Any, levels: dict[int, Any], pooled_at: dict[int, Any]
) -> Table:
    """Per staleness level: its own proposal and what it measures, beside what the overall
    proposal measures on that level's samples."""
    masked, ess = cal.targets.masked_key, cal.targets.ess_key
    table = Table(title="by staleness: each level's own proposal, and the overall one there")
    for col in ("stale", "steps", "tokens", "IS", "RS", "masked", "ESS",
                "all: masked", "all: ESS"):  # fmt: skip
        table.add_column(col, justify="right")
    table.caption = "IS, RS: the level's own proposal; all: the overall proposal on its samples"

    def pct(o: dict[str, float] | None, key: str) -> str:
        return f"{o[key]:.2%}" if o and key in o else "-"

    def num(o: dict[str, float] | None, key: str) -> str:
        return f"{o[key]:.4f}" if o and key in o else "-"

    for k, c in levels.items():
        own = c.measured.overall if c.measured else None
        rows = stack.staleness == k
        table.add_row(
            str(k),
            str(len(set(stack.row_step[rows].tolist()))),
            str(int(stack.response_mask[rows].sum())),
            esc(str(c.proposal.rollout_is_threshold) if c.is_level else "-"),
            esc(c.proposal.rollout_rs_threshold or "-"),
            pct(own, masked),
            num(own, ess),
            pct(pooled_at[k], masked),
            num(pooled_at[k], ess),
        )
    return table


def calibration_json(cal: Any, png: Path | None) -> dict[str, Any]:
    from dataclasses import asdict

    return {
        "targets": asdict(cal.targets),
        "met": cal.met,
        "overrides": cal.overrides(),
        "measured": cal.measured.overall if cal.measured else None,
        "rs_curves": {k: [asdict(p) for p in v] for k, v in cal.rs_curves.items()},
        "is_curve": [asdict(p) for p in cal.is_curve],
        "notes": cal.notes,
        "plot": str(png) if png else None,
    }


# ------------------------------------------------------------------------------------- runs ---


def runs_compare_command(
    run_ids: Annotated[
        list[str],
        typer.Argument(
            help="MLflow run ids; a sweep's parent id stands for its trials.", show_default=False
        ),
    ],
    metric: Annotated[
        list[str] | None,
        typer.Option(
            "--metric",
            "-m",
            help="Metric to compare (repeatable). [default: validation reward, reward, "
            "masked fraction, ESS, KL where logged]",
            show_default=False,
        ),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(help="MLflow store. [default: $MLFLOW_TRACKING_URI, else ./mlflow.db]"),
    ] = None,
    plot: Annotated[Path, typer.Option(help="Where to save the curves PNG.")] = Path(
        "runs_compare.png"
    ),
) -> None:
    """Final metrics (and the params that differ) and metric curves across MLflow runs."""
    from mlflow.exceptions import MlflowException

    from rcx.experiments.runs import RunsError, compare_runs, plot_comparison

    try:
        comparison = compare_runs(run_ids, metric or [], tracking_uri)
    except (RunsError, MlflowException) as e:
        raise fail(str(e)) from None
    table = comparison_table(comparison)
    console.print(table)
    missing = [m for m in comparison.metrics if not any(r.history.get(m) for r in comparison.runs)]
    for m in missing:
        console.print(f"[yellow]note[/] no run logged {esc(repr(m))}")
    png = plot_comparison(comparison, plot)
    if png is not None:
        console.print(f"plot: {png}", markup=False)


def short_names(names: list[str]) -> list[str]:
    """Run names without their common prefix (``sweep-t00``, ``sweep-t01`` -> ``t00``, ``t01``)."""
    import os

    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    prefix = prefix[: prefix.rfind("-") + 1] if "-" in prefix else ""
    return [n[len(prefix) :] or n for n in names]


def comparison_table(comparison: Any) -> Table:
    """Final values: one column per run when there are few (fits a terminal), else one row each."""
    from rcx.experiments.runs import final_value, format_metric

    runs = comparison.runs
    names = short_names([r.name for r in runs])
    fields = [("param", k) for k in comparison.differing_params] + [
        ("metric", m) for m in comparison.metrics
    ]

    def cell(run: Any, kind: str, key: str) -> str:
        if kind == "param":
            return esc(run.params.get(key, "-"))
        return esc(format_metric(final_value(run, key)))

    def label(key: str) -> str:
        return esc(key.replace("algorithm.rollout_correction.", "").replace("rollout_corr/", ""))

    if len(runs) <= 6:
        table = Table(title=f"{len(runs)} runs (final values)")
        table.add_column("")
        for name in names:
            table.add_column(esc(name), justify="right")
        table.add_row("status", *(esc(r.status) for r in runs))
        for kind, key in fields:
            table.add_row(label(key), *(cell(r, kind, key) for r in runs))
        table.add_row("run id", *(esc(r.run_id[:8]) for r in runs))
        return table
    table = Table(title=f"{len(runs)} runs (final values)")
    for col in ("run", "status", *(label(k) for _, k in fields), "run id"):
        table.add_column(col)
    for run, name in zip(runs, names, strict=True):
        table.add_row(
            esc(name),
            esc(run.status),
            *(cell(run, kind, key) for kind, key in fields),
            esc(run.run_id[:8]),
        )
    return table
