"""The one base class for errors a user must fix (a bad path, a server that is down, unusable
data). The CLI prints their message on one line and exits 1, without a traceback; anything else
is a bug and keeps its traceback."""


class RcxError(Exception):
    """An error in the user's input or environment; its message says what and how to fix it."""
