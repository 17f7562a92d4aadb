"""Ctrl-C during training: the first press asks the loop to stop at the next step boundary
(:class:`StopRequested`), a second press raises ``KeyboardInterrupt`` at once. The handler is
installed for the run and the caller's restored after it.

SIGTERM (what ``torchrun`` sends the other ranks when one fails, or a plain ``kill``) raises
:class:`Terminated` where the process is: the run ends FAILED, its MLflow run marked so, the last
checkpoint left as it was."""

from __future__ import annotations

import signal
from contextlib import suppress
from typing import Any


class StopRequested(Exception):
    """Raised at a step boundary after the first Ctrl-C."""


class Terminated(Exception):
    """Raised by SIGTERM."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated("terminated by SIGTERM (another rank failed, or the process was killed)")


def install_sigint(handler: Any) -> Any:
    """Install `handler` for SIGINT and :class:`Terminated` for SIGTERM; return the previous
    handlers (None off the main thread, where signals cannot be handled)."""
    try:
        return signal.signal(signal.SIGINT, handler), signal.signal(
            signal.SIGTERM, _raise_terminated
        )
    except ValueError:  # not the main thread: leave the default KeyboardInterrupt behaviour
        return None


def restore_sigint(previous: Any) -> None:
    """Put back the handlers `install_sigint` replaced."""
    if previous is not None:
        with suppress(ValueError):
            signal.signal(signal.SIGINT, previous[0])
            signal.signal(signal.SIGTERM, previous[1])


def ignore_sigterm() -> None:
    """Ignore SIGTERM until :func:`restore_sigint` (while the run's final status is written)."""
    with suppress(ValueError):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def hard_stop_message(step: int, saved: Any, latest: Any) -> str:
    """The line after a second Ctrl-C: what was kept and where a resume starts.

    ``step`` is the last completed step, ``saved`` the checkpoint just written (None when the
    interrupted step had already changed the weights), ``latest`` the newest checkpoint."""
    if saved is not None:
        return f"stopped during step {step + 1}: checkpoint of step {step} saved in {saved}"
    if latest is None:
        return (
            f"stopped during step {step + 1}, whose update was incomplete: nothing saved; "
            f"a resume starts from step 1 (steps 1-{step} are run again)"
        )
    return (
        f"stopped during step {step + 1}, whose update was incomplete: not saved; a resume "
        f"starts from {latest} (the steps after it are run again, and not logged twice)"
    )
