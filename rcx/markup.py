"""Rich markup that prints user text exactly as typed.

The console renders Rich markup, so any text that did not come from rcx itself (keys, values,
paths, names, error messages that quote them) goes through :func:`esc` before it meets a console,
a table cell or a table title: ``[/bold]`` is then printed as typed, never parsed (a
``MarkupError``) or swallowed (``ray[default]`` shown as ``ray``). A base-layer module, so that
the trainer and the experiments escape with the same helper as the CLI.
"""

from __future__ import annotations

import re

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
