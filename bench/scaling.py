"""Scaling benchmark: one process with 2 threads against 2 processes with 1 thread each (FSDP2,
gloo), the same global batch of the default preset.

    python bench/scaling.py                       # 20 steps each, repeated twice, alternated
    python bench/scaling.py --steps 40 --repeats 3 --json out.json
    python bench/scaling.py KEY=VALUE ...         # extra overrides for both runs

Each run is ``rcx train --preset grpo-multi-rs`` (the embedded default; ``val_before_train=false``,
no intermediate validation, console only, fresh checkpoint folder) started as its own process;
the two set-ups alternate so that machine load hits both alike. From the run's final checkpoint
(its metric history) it reports, as medians over the steps after the first and then over the
repeats: ``step_s`` (``timing/step``), ``steps_per_s`` and ``tokens_per_s`` (prompt + response
tokens of the global batch per second of step), and the ratio of 2 processes to 1 (> 1: faster).

What to expect on CPU: the two processes split the batch, but every FSDP2 forward and backward
all-gathers the parameters and reduce-scatters the gradients through gloo, and each process
runs its own generation; on a 2-core machine the ratio says what that communication costs
against two threads in one process. On GPUs with NCCL the same code shards memory, which is
what makes models that do not fit one GPU trainable at all.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SETUPS = {
    "1 process x 2 threads": ["trainer.n_gpus_per_node=1", "trainer.num_threads=2"],
    "2 processes x 1 thread": ["trainer.n_gpus_per_node=2", "trainer.num_threads=1"],
}


def run_once(steps: int, setup: list[str], extra: list[str], folder: Path) -> dict[str, float]:
    """Train ``steps`` steps in ``folder``; medians of the step timings from its history."""
    args = [
        sys.executable,
        "-m",
        "rcx",
        "train",
        "--preset",
        "grpo-multi-rs",
        f"trainer.total_training_steps={steps}",
        "trainer.val_before_train=false",
        "trainer.test_freq=0",
        "trainer.save_freq=0",
        'trainer.logger=["console"]',
        f"trainer.default_local_dir={folder / 'ckpt'}",
        *setup,
        *extra,
    ]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"run failed ({' '.join(setup)}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    state = torch.load(folder / "ckpt" / f"global_step_{steps}" / "state.pt", weights_only=False)
    history = state["extra"]["history"]
    step_s = statistics.median(v for s, v in history["timing/step"] if s > 1)
    tokens = statistics.median(v for s, v in history["perf/tokens_per_s"] if s > 1)
    return {"step_s": step_s, "steps_per_s": 1.0 / step_s, "tokens_per_s": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    for repeat in range(args.repeats):
        for name, setup in SETUPS.items():
            with tempfile.TemporaryDirectory(prefix="rcx-scaling-") as tmp:
                results[name].append(run_once(args.steps, setup, args.overrides, Path(tmp)))
            print(f"repeat {repeat + 1}/{args.repeats} {name}: {results[name][-1]}", flush=True)
    summary = {
        name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for name, runs in results.items()
    }
    one, two = (summary[name] for name in SETUPS)
    summary["ratio 2 processes / 1"] = {
        "steps_per_s": two["steps_per_s"] / one["steps_per_s"],
        "tokens_per_s": two["tokens_per_s"] / one["tokens_per_s"],
    }
    print(f"{'':26} {'step s':>8} {'steps/s':>8} {'tokens/s':>9}")
    for name in SETUPS:
        row = summary[name]
        print(
            f"{name:26} {row['step_s']:8.3f} {row['steps_per_s']:8.2f} {row['tokens_per_s']:9.0f}"
        )
    ratio = summary["ratio 2 processes / 1"]
    print(
        f"{'ratio 2 processes / 1':26} {'':8} {ratio['steps_per_s']:8.2f} "
        f"{ratio['tokens_per_s']:9.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
