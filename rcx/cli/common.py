"""What every ``rcx`` command shares: the console, output formats, argument splitting, findings.

No torch here: commands that train import their machinery lazily.

The console renders Rich markup, so any text that did not come from rcx itself (keys, values,
paths, names, error messages that quote them) goes through :func:`esc` before it meets the
console, a table cell or a table title: ``[/bold]`` is then printed as typed, never parsed (a
``MarkupError``) or swallowed (``ray[default]`` shown as ``ray``).
"""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from rcx.config.findings import Finding

console = Console(highlight=False, soft_wrap=True)


#: An empty span: a complete tag pair that renders nothing and ends whatever text precedes it.
_BREAK = "[none][/none]"
_OPENING = re.compile(r"(\\*)(\[|\Z)|:")


def _neutralise(match: re.Match[str]) -> str:
    if match.group(0) == ":":  # ":x:" would print as an emoji
        return ":" + _BREAK
    slashes, bracket = len(match.group(1)), match.group(2)
    # Backslashes right before a tag are halved by Rich: double them, then a tag (the break).
    out = "\\" * (2 * slashes) + (_BREAK if slashes else "")
    return out + ("[" + _BREAK if bracket else "")


def esc(text: object) -> str:
    """``str(text)`` as Rich markup that prints exactly as typed, wherever it is embedded.

    ``rich.markup.escape`` is not enough: escaped pieces can still combine into a tag (``"a[b"``
    then ``"c]"``), a trailing backslash escapes the tag that follows, and ``\\[`` loses its
    backslash, and ``:x:`` becomes an emoji. Here every ``[`` and ``:`` is followed by an empty
    span, so it never opens a tag or an emoji code, and a run of backslashes before a ``[`` or at
    the end is doubled and closed by one, so it prints as typed.
    """
    return _OPENING.sub(_neutralise, str(text))


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
