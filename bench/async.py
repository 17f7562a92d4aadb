"""Asynchronous-rollout benchmark: steps/s of sync, one_step_off and fully_async, same batch, this machine.

    python bench/async.py                      # grpo-multi-rs, 2 warm-up + 20 timed steps per mode
    python bench/async.py --steps 40 --json out.json
    python bench/async.py --preset grpo-rs-only KEY=VALUE ...

For each ``trainer.async_mode`` (sync, one_step_off, fully_async with its defaults or the
``trainer.max_off_policy_*``/``rollout_workers`` overrides given; everything else equal) it
builds the real trainer, runs ``--warmup`` untimed steps (the workers start in the first one), then
``--steps`` timed steps through ``Trainer.train_step`` (no validation, checkpoints or tracking),
modes alternating ``--repeats`` times. It reports per mode the medians over repeats of:

* ``steps_per_s``: timed steps / their wall-clock time;
* ``s_per_100_steps``: 100 / steps_per_s (the wall-clock of 100 steps, scaled);
* ``step_s_median``: the median step time; ``gen_s_median``: the median time a step spends
  generating (sync) or waiting for the workers' batch (one_step_off, fully_async);

and ``one_step_off_vs_sync``, ``fully_async_vs_sync``: the ratios of their steps/s (the
one-step-off issue's goal: >= 1.3 on 2 cores).
Run with ``OMP_WAIT_POLICY=PASSIVE`` (set here unless already set): spinning OpenMP threads of
one process would take the other process's core.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

MODES = ("sync", "one_step_off", "fully_async")


def bench_mode(
    preset: str, overrides: list[str], mode: str, warmup: int, steps: int
) -> dict[str, float]:
    """Wall-clock and step timings of ``steps`` training steps in ``trainer.async_mode=mode``."""
    from rcx.config import load_config
    from rcx.train.trainer import Trainer

    cfg = load_config(
        preset=preset,
        overrides=[
            'trainer.logger=["console"]',
            "trainer.resume_mode=disable",
            f"trainer.total_training_steps={warmup + steps}",
            f"trainer.default_local_dir=/tmp/rcx-bench-async-{mode}",
            f"trainer.async_mode={mode}",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, console=Console(quiet=True))
    try:
        for step in range(1, warmup + 1):
            trainer.train_step(step)
        step_times, gen_times = [], []
        start = time.perf_counter()
        for step in range(warmup + 1, warmup + steps + 1):
            metrics = trainer.train_step(step)
            step_times.append(metrics["timing/step"])
            gen_times.append(metrics.get("timing/gen", 0.0))
        wall = time.perf_counter() - start
    finally:
        if trainer.async_rollout is not None:
            trainer.async_rollout.close()
        trainer.plan.lock.release()
    return {
        "steps_per_s": steps / wall,
        "s_per_100_steps": 100 * wall / steps,
        "step_s_median": statistics.median(step_times),
        "gen_s_median": statistics.median(gen_times),
        "threads": float(trainer.threads),
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """The per-key median over repeated runs of one mode."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="grpo-multi-rs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode and repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternating")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args()

    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            runs[mode].append(
                bench_mode(args.preset, args.overrides, mode, args.warmup, args.steps)
            )
    results: dict[str, object] = {mode: medians(runs[mode]) for mode in MODES}
    ratio = results["one_step_off"]["steps_per_s"] / results["sync"]["steps_per_s"]
    results["one_step_off_vs_sync"] = ratio
    fully = results["fully_async"]["steps_per_s"] / results["sync"]["steps_per_s"]
    results["fully_async_vs_sync"] = fully
    results["cpu_count"] = os.cpu_count()

    table = Table(
        title=f"bench/async.py: {args.preset}, {args.steps} timed steps x {args.repeats} per mode"
    )
    for column in ("async_mode", "steps/s", "s / 100 steps", "step s (median)", "gen s (median)"):
        table.add_column(column, justify="right", no_wrap=True)
    for mode in MODES:
        r = results[mode]
        table.add_row(
            mode,
            f"{r['steps_per_s']:.3f}",
            f"{r['s_per_100_steps']:.1f}",
            f"{r['step_s_median']:.3f}",
            f"{r['gen_s_median']:.3f}",
        )
    table.caption = (
        f"steps/s over sync: one_step_off {ratio:.2f}x, fully_async {fully:.2f}x (medians over "
        f"repeats; "
        f"{os.cpu_count()} cores; gen = generating, or waiting for the worker's batch)"
    )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**results, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
