"""``rcx train`` with ``trainer.n_gpus_per_node > 1``: start one training process per GPU (on CPU,
per ``n_gpus_per_node``) with PyTorch's own process launcher
(``torch.distributed.elastic.multiprocessing.start_processes``, what ``torchrun`` runs underneath),
and wait for them. Each process runs ``python -m rcx train`` with the same arguments and finds its
rank in the environment set here (torchrun's variables).

The ranks meet through a file store in a private temporary folder rather than torchrun's TCP
rendezvous, whose store listens on every network interface: nothing here opens a port beyond
the gloo/nccl connections between the ranks themselves (gloo on 127.0.0.1). ``torchrun ... -m rcx
train`` works too (for several nodes it is the way; see the README).

Faults: when a rank fails, the others get SIGTERM (they mark the MLflow run FAILED and exit)
and, after a grace period, SIGKILL; no process is left behind. Ctrl-C is forwarded once to every
rank (each finishes its step, saves, stops); a second Ctrl-C is forwarded again (stop now).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence

from rich.console import Console

from rcx.config.models import RcxConfig
from rcx.errors import RcxError
from rcx.markup import esc
from rcx.train.distributed import FILE_STORE_ENV, LAUNCHED_BY_RCX

#: Seconds the surviving ranks get to finish after SIGTERM before SIGKILL.
GRACE_S = 15


def rank_environment(rank: int, nproc: int, store: str) -> dict[str, str]:
    """The variables torchrun would set for local rank ``rank`` of ``nproc`` on one node, plus
    the file store the ranks meet through."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        FILE_STORE_ENV: store,
        LAUNCHED_BY_RCX: "1",  # the ranks do not print the validate findings again
        # Each rank sets its own thread count (trainer.num_threads, or the cores shared).
        "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc))
        ),
    }


def launch_processes(cfg: RcxConfig, argv: Sequence[str], console: Console) -> int:
    """Start ``trainer.n_gpus_per_node`` processes running ``rcx <argv>``, wait for them, and
    return the exit code for ``rcx train``: 0, 130 when interrupted, else 1.

    The warm start of ``builtin:tiny`` runs here first, so the ranks find it cached.
    """
    t = cfg.trainer
    if t.nnodes > 1:
        raise RcxError(
            f"trainer.nnodes={t.nnodes}: start each node with torchrun (see the README, "
            "'Several processes'); rcx train starts the processes of one node only"
        )
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, start_processes

    from rcx.train.setup import ensure_policy_files

    ensure_policy_files(cfg, show="console" in t.logger)
    nproc = t.n_gpus_per_node
    console.print(f"rcx train: starting {nproc} processes")
    with tempfile.TemporaryDirectory(prefix="rcx-ranks-") as folder:
        store = os.path.join(folder, "store")
        context = start_processes(
            name="rcx-train",
            entrypoint=sys.executable,
            args={r: ("-m", "rcx", *argv) for r in range(nproc)},
            envs={r: rank_environment(r, nproc, store) for r in range(nproc)},
            logs_specs=DefaultLogsSpecs(log_dir=os.path.join(folder, "logs")),
        )
        return _wait(context, console)


def _wait(context: object, console: Console) -> int:
    """Poll the ranks until all end or one fails; forward Ctrl-C; return the exit code."""
    interrupted = False
    while True:
        try:
            result = context.wait(timeout=0, period=0)  # type: ignore[attr-defined]
            if result is not None:
                break
            time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            for pid in context.pids().values():  # type: ignore[attr-defined]
                _signal(pid, signal.SIGINT)
    if not result.is_failed():
        return 130 if interrupted else 0
    context.close(death_sig=signal.SIGTERM, timeout=GRACE_S)  # type: ignore[attr-defined]
    codes = {rank: failure.exitcode for rank, failure in result.failures.items()}
    detail = ", ".join(f"rank {r}: {c}" for r, c in sorted(codes.items()))
    if interrupted or 130 in codes.values():
        console.print(f"[yellow]rcx train: interrupted ({esc(detail)})[/]")
        return 130
    failed = ", ".join(str(r) for r in failed_on_their_own(codes))
    plural = "s" if "," in failed else ""
    console.print(
        f"[red]rcx train: rank{plural} {failed} failed (exit codes {esc(detail)}); "
        "every rank stopped[/]"
    )
    return 1


def failed_on_their_own(codes: dict[int, int]) -> list[int]:
    """The ranks that failed by themselves, not those the launcher stopped (killed by SIGTERM
    or SIGKILL); all of them when none is left. One rank failing makes its peers' collectives
    fail within moments, and the failures are noticed in the same poll, so which was first
    cannot be told apart here: its error is printed above the summary."""
    stopped = {-int(signal.SIGTERM), -int(signal.SIGKILL)}
    own = sorted(rank for rank, code in codes.items() if code not in stopped)
    return own or sorted(codes)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.kill(pid, sig)
