"""What every ``rcx`` command shares: the console, output formats, argument splitting, findings.

No torch here: commands that train import their machinery lazily.

The console renders Rich markup, so any text that did not come from rcx itself (keys, values,
paths, names, error messages that quote them) goes through :func:`esc` before it meets the
console, a table cell or a table title: ``[/bold]`` is then printed as typed, never parsed (a
``MarkupError``) or swallowed (``ray[default]`` shown as ``ray``).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from rcx.config.findings import Finding

console = Console(highlight=False, soft_wrap=True)


def esc(text: object) -> str:
    """``str(text)`` as Rich markup that prints exactly as typed, wherever it is embedded.

    ``rich.markup.escape`` escapes tag-like brackets, but trailing backslashes then escape
    whatever tag follows (``esc("a\\") + "[/]"``). Here trailing backslashes are doubled and
    closed by an empty ``[none][/none]`` span, so they print as typed before a tag or at the end.
    """
    raw = str(text)
    body = raw.rstrip("\\")
    trailing = len(raw) - len(body)
    return escape(body) + ("\\" * (2 * trailing) + "[none][/none]" if trailing else "")


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
