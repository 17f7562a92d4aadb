"""The ``rcx`` command line: validate, presets, keys, train.

Kept light on purpose: ``rcx --help``, ``rcx validate`` and ``rcx presets`` never import torch.
Commands that train import their machinery lazily.
"""

from __future__ import annotations

import os

# libgomp's active spin stalls 2-thread torch calls for seconds on small machines; this must be
# set before torch is first imported (users may override it in their environment).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.table import Table  # noqa: E402

from rcx.cli.common import (  # noqa: E402
    OutputFormat,
    console,
    esc,
    fail,
    print_findings,
    split_args,
    with_override_hint,
)
from rcx.cli.experiments import register as register_experiments  # noqa: E402
from rcx.config import ValidationReport, validate_sources  # noqa: E402
from rcx.config.explain import explain, explain_lines  # noqa: E402
from rcx.config.loading import (  # noqa: E402
    field_descriptions,
    flatten_tree,
    list_presets,
    preset_description,
    presets_dir,
)
from rcx.config.yamlio import dump_commented_yaml  # noqa: E402
from rcx.errors import RcxError  # noqa: E402

app = typer.Typer(
    name="rcx",
    help="Rollout correction (importance and rejection sampling) for LLM RL: validate, train, sweep.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
presets_app = typer.Typer(
    help="List the built-in presets or show one resolved.", no_args_is_help=True
)
app.add_typer(presets_app, name="presets")

ArgsArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="An optional config FILE, then KEY=VALUE overrides (dotted verl keys, YAML values; "
        "threshold strings taken as typed). See `rcx keys`.",
        show_default=False,
    ),
]
PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Start from a built-in preset (`rcx presets list`)."),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="A YAML config file (same as a positional FILE)."),
]


def gather(preset: str | None, config: Path | None, args: list[str] | None) -> ValidationReport:
    config_file, overrides = split_args(args, config)
    report = validate_sources(preset, config_file, overrides)
    report.findings = with_override_hint(report.findings, config_file)
    return report


def summary_line(report: ValidationReport) -> str:
    e, w = len(report.errors), len(report.warnings)
    counts = f"{e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)}"
    return f"{'valid' if report.valid else 'invalid'} ({counts})"


@app.command()
def validate(
    args: ArgsArg = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    explain_: Annotated[
        bool, typer.Option("--explain", help="Say in words what the config really does.")
    ] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 on warnings too.")] = False,
    output: Annotated[
        OutputFormat, typer.Option("--format", help="text or json (one object).")
    ] = OutputFormat.text,
) -> None:
    """Check a correction config: exit 0 when valid (warnings shown), 1 when invalid."""
    report = gather(preset, config, args)
    failed = not report.valid or (strict and bool(report.warnings))
    if output is OutputFormat.json:
        print(json.dumps(report_json(report), indent=2))
        raise typer.Exit(1 if failed else 0)
    print_findings(report.findings)
    if explain_ and report.config is not None and report.valid:
        for line in explain_lines(report.config):
            console.print(line, markup=False)
    style = "green" if not failed else "bold red"
    console.print(f"[{style}]{summary_line(report)}[/]")
    raise typer.Exit(1 if failed else 0)


def report_json(report: ValidationReport) -> dict[str, Any]:
    cfg = report.config
    return {
        "valid": report.valid,
        "config": cfg.model_dump(mode="json") if cfg is not None else None,
        "findings": [f.as_dict() for f in report.findings],
        "explain": explain(cfg) if cfg is not None and report.valid else None,
    }


def quiet_rank() -> bool:
    """A training process that should not repeat what another already printed: every rank but
    0, and rank 0 too when ``rcx train`` launched it (the launcher printed the findings)."""
    # The environment torchrun sets (read here without importing torch: see the module doc);
    # RCX_LAUNCHED is rcx.train.distributed.LAUNCHED_BY_RCX.
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    return os.environ.get("RANK", "0") != "0" or os.environ.get("RCX_LAUNCHED") == "1"


def tracking_rank(world_size: int) -> bool:
    """This process will track the run: rank 0 of a launched world, or a process that trains
    alone (not the launcher of ``world_size`` processes)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return os.environ.get("RANK", "0") == "0"
    return world_size <= 1


def validated_config(preset: str | None, config: Path | None, args: list[str] | None) -> Any:
    """Validate first and print the findings; exit 1 before anything loads if invalid."""
    report = gather(preset, config, args)
    if not quiet_rank():
        print_findings(report.findings)
    if not report.valid:
        console.print(f"[bold red]{summary_line(report)}: nothing was started[/]")
        raise typer.Exit(1)
    return report


@app.command()
def train(
    args: ArgsArg = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train: validate, then run the config (tracked in MLflow, checkpointed, resumable).

    Exit 0 when finished, 1 on failure, 130 when interrupted (Ctrl-C saves a checkpoint first).
    """
    report = validated_config(preset, config, args)
    t = report.config.trainer
    if "mlflow" in t.logger and tracking_rank(report.config.world_size):
        from rcx.store.tracking import prestart_tracking

        prestart_tracking(t.tracking_uri, t.project_name)  # MLflow loads beside torch
    from rcx.train.distributed import launched_world

    if report.config.world_size > 1 and not launched_world().distributed:
        from rcx.train.launch import launch_processes

        argv = ["train", *(["--preset", preset] if preset else [])]
        argv += [*(["--config", str(config)] if config else []), *(args or [])]
        try:
            code = launch_processes(report.config, argv, console)
        except RcxError as e:
            raise fail(str(e)) from None
        raise typer.Exit(code)
    from rcx.train.trainer import train as run_training

    try:
        result = run_training(report.config, findings=report.findings, console=console)
    except RcxError as e:
        raise fail(str(e)) from None
    raise typer.Exit(result.exit_code)


@app.command()
def pretrain(
    args: ArgsArg = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Warm-start builtin:tiny on the config's built-in task (cached; training does it too)."""
    report = validated_config(preset, config, args)
    cfg = report.config
    steps = cfg.actor_rollout_ref.model.warm_start_steps
    if cfg.actor_rollout_ref.model.path != "builtin:tiny" or steps == 0:
        console.print(
            "nothing to do: warm start applies to actor_rollout_ref.model.path=builtin:tiny "
            "with actor_rollout_ref.model.warm_start_steps > 0"
        )
        raise typer.Exit(0)
    from rcx.train.pretrain import ensure_warm_start, read_metadata, warm_start_shortfall
    from rcx.train.setup import builtin_task

    path = ensure_warm_start(builtin_task(cfg), steps, seed=cfg.data.builtin.seed)
    meta = read_metadata(path)
    console.print(f"warm start: {path}", markup=False, highlight=False)
    for key in (
        "steps",
        "steps_run",
        "target_accuracy",
        "reached_target",
        "seconds",
        "final_loss",
        "val_sampled_accuracy",
        "val_greedy_accuracy",
    ):
        if key in meta:
            console.print(f"  {key}: {meta[key]}", markup=False, highlight=False)
    shortfall = warm_start_shortfall(meta)
    if shortfall:
        raise fail(shortfall)


@presets_app.command("list")
def presets_list() -> None:
    """The built-in presets, one line each."""
    table = Table(title=f"presets ({esc(presets_dir())})")
    table.add_column("name", style="bold")
    table.add_column("what it is for")
    for name in list_presets():
        table.add_row(esc(name), esc(preset_description(name)))
    console.print(table)


@presets_app.command("show")
def presets_show(
    name: Annotated[str, typer.Argument(help="Preset name (`rcx presets list`).")],
) -> None:
    """The preset's header and its fully resolved config, each key with its description."""
    report = validate_sources(preset=name)
    if report.config is None:
        print_findings(report.findings)
        raise typer.Exit(1)
    header = [
        ln for ln in (presets_dir() / f"{name}.yaml").read_text().splitlines() if ln.startswith("#")
    ]
    print("\n".join(header))
    print(dump_commented_yaml(report.config.model_dump(mode="json"), field_descriptions()), end="")


@app.command()
def keys(
    prefix: Annotated[
        str, typer.Argument(help="Only keys starting with this, e.g. algorithm.")
    ] = "",
) -> None:
    """Every config key with its default and description."""
    from rcx.config.models import RcxConfig

    defaults = flatten_tree(RcxConfig().model_dump(mode="json"))
    for key, desc in field_descriptions().items():
        if key.startswith(prefix) and key in defaults:
            print(f"{key} = {json.dumps(defaults[key])}  # {desc}")


def main() -> None:
    app()


register_experiments(app)


if __name__ == "__main__":
    main()
