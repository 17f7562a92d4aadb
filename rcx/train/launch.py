"""``rcx train`` with ``trainer.n_gpus_per_node > 1``: start the processes through
``torch.distributed.run`` (torchrun's own launcher, in-process), one per GPU (on CPU, one per
``n_gpus_per_node``), rendezvous on 127.0.0.1. Each process runs ``python -m rcx train`` with the
same arguments and finds its rank in the environment torchrun sets.

Several nodes are launched by the user, one torchrun per node (see the README); this module
only starts the processes of one node.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

from rich.console import Console

from rcx.config.models import RcxConfig
from rcx.errors import RcxError
from rcx.markup import esc
from rcx.train.distributed import LAUNCHED_BY_RCX


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rendezvous's)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_args(nproc: int, port: int, argv: Sequence[str]) -> list[str]:
    """torchrun's arguments for ``nproc`` processes of ``python -m rcx <argv>`` on this node."""
    return [
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        "--max_restarts",
        "0",
        "-m",
        "rcx",
        *argv,
    ]


def launch_processes(cfg: RcxConfig, argv: Sequence[str], console: Console) -> int:
    """Start ``trainer.n_gpus_per_node`` training processes running ``rcx <argv>`` and wait for
    them; return the exit code for ``rcx train`` (rank 0's: 0, 1, or 130 when interrupted).

    The warm start of ``builtin:tiny`` runs here first, so the ranks find it cached.
    """
    t = cfg.trainer
    if t.nnodes > 1:
        raise RcxError(
            f"trainer.nnodes={t.nnodes}: start each node with torchrun (see the README, "
            "'Several processes'); rcx train starts the processes of one node only"
        )
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from rcx.train.setup import ensure_policy_files

    ensure_policy_files(cfg, show="console" in t.logger)
    nproc = t.n_gpus_per_node
    console.print(f"rcx train: starting {nproc} processes (torch.distributed.run, 127.0.0.1)")
    args = get_args_parser().parse_args(torchrun_args(nproc, free_port(), argv))
    os.environ[LAUNCHED_BY_RCX] = "1"  # the ranks do not print the findings again
    # Each rank sets its own thread count (trainer.num_threads, or cores shared per process).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        run(args)
    except SignalException as err:  # Ctrl-C (forwarded to the ranks, which save and stop)
        console.print(f"[yellow]rcx train: stopped by signal {err.sigval}[/]")
        return 130
    except ChildFailedError as err:
        codes = {failure.local_rank: failure.exitcode for failure in err.failures.values()}
        first = min(codes)
        console.print(
            f"[red]rcx train: rank {first} ended with exit code {codes[first]}; "
            f"every rank stopped[/] ({esc(', '.join(f'rank {r}: {c}' for r, c in sorted(codes.items())))})"
        )
        return 130 if codes.get(0) == 130 else 1
    return 0
