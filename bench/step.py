"""Step-time benchmark: the share spent in rollout correction, and decoupled vs bypass.

    python bench/step.py                       # default preset (grpo-multi-rs), 20 timed steps
    python bench/step.py --steps 40 --json out.json
    python bench/step.py --preset gae-seq-is-rs KEY=VALUE ...

For each mode (the preset's own, then the other one: ``bypass_mode`` flipped, everything else
equal) it builds the real trainer, runs ``--warmup`` untimed steps, then ``--steps`` timed
steps through ``Trainer.train_step`` (no validation, no checkpoints, no tracking), and reports:

* ``step_s``: mean wall time of a training step;
* ``correction_s`` / ``correction_share``: time inside ``compute_correction`` (every
  call: once per batch in decoupled mode, once per micro-batch in bypass mode) and its share of
  the step (target <= 1 %);
* ``old_log_prob_s``: the decoupled mode's extra forward.

The seed README claims decoupled costs 20-30 % more than bypass; ``decoupled_vs_bypass`` is the
measured ratio of mean step times. Numbers depend on the machine: run it where you train.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402


@contextmanager
def timed_correction() -> Iterator[list[float]]:
    """Patch the trainer's calls of the correction with a timer; yields the list of call times."""
    import rcx.train.actor as actor
    import rcx.train.step as step

    calls: list[float] = []
    original: Callable[..., Any] = step.compute_correction

    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    step.compute_correction = actor.compute_correction = timed
    try:
        yield calls
    finally:
        step.compute_correction = actor.compute_correction = original


def bench_mode(preset: str, overrides: list[str], warmup: int, steps: int) -> dict[str, float]:
    """Mean timings of ``steps`` training steps of one configuration."""
    from rcx.config import load_config
    from rcx.train.trainer import Trainer

    cfg = load_config(
        preset=preset,
        overrides=[
            'trainer.logger=["console"]',
            "trainer.resume_mode=disable",
            f"trainer.total_training_steps={warmup + steps}",
            "trainer.default_local_dir=/tmp/rcx-bench-step",
            *overrides,
        ],
    )
    trainer = Trainer(cfg, console=Console(quiet=True))
    for step in range(1, warmup + 1):
        trainer.train_step(step)
    step_times, corr_times, old_lp = [], [], []
    with timed_correction() as calls:
        for step in range(warmup + 1, warmup + steps + 1):
            before = len(calls)
            metrics = trainer.train_step(step)
            step_times.append(metrics["timing/step"])
            corr_times.append(sum(calls[before:]))
            old_lp.append(metrics.get("timing/old_log_prob", 0.0))
    step_s = statistics.mean(step_times)
    return {
        "bypass_mode": float(cfg.algorithm.rollout_correction.bypass_mode),
        "step_s": step_s,
        "step_s_median": statistics.median(step_times),
        "correction_s": statistics.mean(corr_times),
        "correction_share": statistics.mean(corr_times) / step_s,
        "old_log_prob_s": statistics.mean(old_lp),
        "threads": float(trainer.threads),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="grpo-multi-rs")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args()

    from rcx.config import load_config

    own = load_config(preset=args.preset, overrides=args.overrides)
    own_bypass = own.algorithm.rollout_correction.bypass_mode
    results = {}
    for bypass in (own_bypass, not own_bypass):
        mode = "bypass" if bypass else "decoupled"
        flip = [f"algorithm.rollout_correction.bypass_mode={str(bypass).lower()}"]
        results[mode] = bench_mode(args.preset, [*args.overrides, *flip], args.warmup, args.steps)
    results["decoupled_vs_bypass"] = results["decoupled"]["step_s"] / results["bypass"]["step_s"]

    table = Table(title=f"bench/step.py: {args.preset}, {args.steps} timed steps per mode")
    for column in ("mode", "step s", "corr ms", "corr share", "old_lp s"):
        table.add_column(column, justify="right", no_wrap=True)
    for mode in ("bypass", "decoupled"):
        r = results[mode]
        table.add_row(
            mode + ("*" if (mode == "bypass") == own_bypass else ""),
            f"{r['step_s']:.3f}",
            f"{1000 * r['correction_s']:.2f}",
            f"{100 * r['correction_share']:.2f} %",
            f"{r['old_log_prob_s']:.3f}",
        )
    table.caption = (
        f"* the preset's mode. decoupled / bypass step time: {results['decoupled_vs_bypass']:.2f}x"
        "; corr = compute_correction, old_lp = decoupled's extra forward"
    )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
