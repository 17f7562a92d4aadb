"""What every ``rcx`` command shares: the console, output formats, argument splitting, findings.

No torch here: commands that train import their machinery lazily.

Any text that did not come from rcx itself goes through :func:`rcx.markup.esc` before it meets
the console (re-exported here for the commands).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from rcx.config.findings import Finding
from rcx.markup import esc

console = Console(highlight=False, soft_wrap=True)


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


def split_args(args: list[str] | None, config: Path | None) -> tuple[Path | None, list[str]]:
    """Positional arguments: those with '=' are overrides; one without is the config FILE."""
    overrides = [a for a in args or [] if "=" in a]
    files = [a for a in args or [] if "=" not in a]
    if len(files) + (config is not None) > 1:
        given = [*([str(config)] if config else []), *files]
        raise typer.BadParameter(
            f"one config file at most, got {', '.join(given)}; overrides need KEY=VALUE"
        )
    return (config or (Path(files[0]) if files else None)), overrides


def with_override_hint(findings: list[Finding], config_file: Path | None) -> list[Finding]:
    """``findings`` with a "did you mean KEY=VALUE" hint on the RCX-E011 of a missing config file
    whose name reads as a dotted key (``trainer.seed``: no folder, not ``.yaml``/``.yml``/``.json``).
    Other findings are returned unchanged."""
    if config_file is None or config_file.exists():
        return findings
    name = str(config_file)
    looks_like_key = (
        "/" not in name and "." in name and config_file.suffix not in (".yaml", ".yml", ".json")
    )
    if not looks_like_key:
        return findings
    hint = f"; {name!r} reads as a config key: an override is written KEY=VALUE, e.g. {name}=1"
    return [
        dataclasses.replace(f, message=f.message + hint)
        if f.code == "RCX-E011" and f.path == name
        else f
        for f in findings
    ]


def print_findings(findings: list[Finding]) -> None:
    """One line per finding: level, code, dotted key, message."""
    for f in findings:
        style = "bold red" if f.level == "error" else "yellow"
        console.print(
            f"[{style}]{f.level:<7}[/] [bold]{f.code}[/] {esc(f.path)}: {esc(f.message)}",
            markup=True,
        )


def fail(message: str) -> typer.Exit:
    """Print an error line and return the exit to raise (code 1); ``message`` is escaped."""
    console.print(f"[bold red]error[/] {esc(message)}", markup=True)
    return typer.Exit(1)
