"""The ``rcx`` command line, one module per command group.

``app`` (validate, train, pretrain, presets, keys) in :mod:`rcx.cli.app`, the experiment
commands (sweep, whatif, calibrate, runs) in :mod:`rcx.cli.experiments`, and what they share in
:mod:`rcx.cli.common`. ``rcx.cli:main`` is the console script's entry point.
"""

from rcx.cli.app import app, main

__all__ = ["app", "main"]
