"""Warm-start robustness: where each SFT recipe leaves the plateau, per seed and CPU kernel path.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/warm_start.py            # every row, ~15 min
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/warm_start.py --rows now-avx512 old

The learning curve of 2-digit addition on ``builtin:tiny`` is a plateau followed by a sharp rise.
A recipe is robust when the rise comes at about the same step whatever the floating-point path;
the earlier recipe (lr 3e-3, no clipping) left the plateau anywhere between step 550 and never,
depending on the machine. Each row trains from scratch with the early stop off (so the whole
curve is probed) and reports the probe's sampled accuracy at steps 300/350/400 and the first
probe at or above the 30 % target. The CPU kernel path is forced with ``ATEN_CPU_CAPABILITY``
(``avx512``, ``avx2``, ``default`` = no SIMD), which changes the reduction order the way another
processor would; each row runs in its own process, since torch reads it at import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

TARGET = 0.3
REPORTED_STEPS = (300, 350, 400)


@dataclass(frozen=True)
class Row:
    label: str
    settings: dict[str, float]  # SFTSettings overrides
    seed: int
    capability: str  # ATEN_CPU_CAPABILITY
    threads: int
    steps: int


ROWS = {
    row.label: row
    for row in (
        Row("old", {"lr": 3e-3, "max_grad_norm": 0.0}, 0, "avx512", 2, 1000),
        Row("old-clip", {"lr": 3e-3, "max_grad_norm": 1.0}, 0, "avx512", 1, 1000),
        Row("lr1e-3-noclip", {"lr": 1e-3, "max_grad_norm": 0.0}, 0, "avx512", 1, 500),
        Row("now-avx512", {}, 0, "avx512", 1, 450),
        Row("now-avx2", {}, 0, "avx2", 1, 450),
        Row("now-seed1", {}, 1, "avx512", 1, 450),
        Row("now-seed2-nosimd", {}, 2, "default", 2, 450),
    )
}


def run_row(row: Row) -> dict:
    """Train one row in a fresh process (so the kernel path applies) and return its probes."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": row.capability, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(row.__dict__)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_one(spec: dict) -> dict:
    """The child process: SFT from scratch with the early stop off, probing every 50 steps."""
    import torch

    from rcx.data.tasks import BuiltinTask
    from rcx.models.loading import build_tiny_model
    from rcx.train.pretrain import SFTSettings, supervised_finetune

    torch.set_num_threads(spec["threads"])
    settings = dataclasses.replace(SFTSettings(target_accuracy=0.99), **spec["settings"])
    model, tokenizer = build_tiny_model(spec["seed"])
    result = supervised_finetune(
        model, tokenizer, BuiltinTask(), spec["steps"], spec["seed"], settings
    )
    return {
        "capability": str(torch.backends.cpu.get_cpu_capability()),
        "probes": result.probes,
    }


def first_at_target(probes: list[list[float]]) -> str:
    hits = [int(step) for step, accuracy in probes if accuracy >= TARGET]
    return str(hits[0]) if hits else "none"


def markdown(rows: list[Row], results: list[dict]) -> str:
    lines = [
        "| row | lr, clip | seed, kernel path, threads | probe accuracy at steps 300 / 350 / 400 "
        f"| first step ≥ {TARGET:.0%} |",
        "|---|---|---|---|---|",
    ]
    for row, result in zip(rows, results, strict=True):
        at = dict((int(step), accuracy) for step, accuracy in result["probes"])
        accuracies = " / ".join(f"{100 * at[s]:.1f}" if s in at else "–" for s in REPORTED_STEPS)
        settings = {"lr": 1e-3, "max_grad_norm": 1.0, **row.settings}
        lines.append(
            f"| {row.label} | {settings['lr']:g}, {settings['max_grad_norm']:g} | {row.seed}, "
            f"{result['capability']}, {row.threads} | {accuracies} % | "
            f"{first_at_target(result['probes'])} (of {row.steps}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--jobs", type=int, default=2, help="rows in parallel (one per core)")
    parser.add_argument("--max-steps", type=int, help="cap every row's steps (a quick check)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(train_one(json.loads(args.one))))
        return 0
    rows = [ROWS[label] for label in args.rows]
    if args.max_steps:
        rows = [dataclasses.replace(row, steps=min(row.steps, args.max_steps)) for row in rows]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_row, rows))
    print(markdown(rows, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
