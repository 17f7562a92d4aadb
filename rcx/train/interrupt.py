"""Ctrl-C during training (:class:`CtrlC`): the first press asks the loop to stop at the next step
boundary (:class:`StopRequested`), or abandons the step at once while it waits on something that
changes nothing (a custom reward function); a second press raises ``KeyboardInterrupt`` at once.
The handler is installed for the run and the caller's restored after it.

SIGTERM (what ``torchrun`` sends the other ranks when one fails, or a plain ``kill``) raises
:class:`Terminated` where the process is: the run ends FAILED, its MLflow run marked so, the last
checkpoint left as it was."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

#: A second Ctrl-C stops at once only this long after the first (see :meth:`CtrlC.handler`).
SECOND_PRESS_S = 1.0


class StopRequested(Exception):
    """Raised at a step boundary after the first Ctrl-C."""


class Terminated(Exception):
    """Raised by SIGTERM."""


class CtrlC:
    """A run's Ctrl-C state and its SIGINT handler.

    * first press: ``requested`` is set and the loop stops at the next step boundary; inside
      :meth:`abandonable` (a wait that changes no state, e.g. on a custom reward that hangs) it
      raises :class:`StopRequested` at once instead, so the step is abandoned within seconds and
      the checkpoint of the last completed step is what a resume starts from;
    * second press: ``KeyboardInterrupt`` at once, unless a checkpoint is being written
      (:meth:`saving`: it finishes first) or the press comes within :data:`SECOND_PRESS_S` of
      the first (under a launcher one Ctrl-C can arrive twice: from the terminal and forwarded).
    """

    def __init__(self, say: Any) -> None:
        self.say = say  # prints one console line (markup allowed)
        self.requested = False
        self.requested_at = 0.0
        self._saving = False
        self._abandonable = False

    def handler(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.requested:
            if self._saving or now - self.requested_at < SECOND_PRESS_S:
                return
            raise KeyboardInterrupt
        self.requested, self.requested_at = True, now
        if self._abandonable:
            self.say(
                "[yellow]Ctrl-C: abandoning this step (it was waiting on the reward function)[/]"
            )
            raise StopRequested
        self.say(
            "[yellow]Ctrl-C: finishing this step, then saving a checkpoint "
            "(press again to stop now)[/]"
        )

    @contextmanager
    def saving(self) -> Iterator[None]:
        """A checkpoint is being written meanwhile: a second press waits for it."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    @contextmanager
    def abandonable(self, allowed: bool = True) -> Iterator[None]:
        """Meanwhile (when ``allowed``: one process; several ranks must stop together at a step
        boundary) a first press abandons the step at once. Only for work that changes nothing
        the checkpoint keeps."""
        self._abandonable = allowed
        try:
            yield
        finally:
            self._abandonable = False


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
