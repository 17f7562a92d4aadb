"""The asynchronous-rollout study: is async + correction faster in wall-clock, and as good?

    make async-study                                   # 3 seeds x 7 conditions, one at a time
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/async_study.py --quick   # 1 seed, in /tmp
    .venv/bin/python bench/async_study.py --smoke --out /tmp/s    # seconds: the test's path
    .venv/bin/python bench/async_study.py --report     # rewrite table/CSV from the runs file

The mismatch study's setting (``bench/mismatch_study.py``: GRPO on 2-digit addition from the
warm-started ``builtin:tiny``, 32 prompts x 8 samples, lr 1e-4, 100 steps, validation every 10
steps), with the staleness coming from real asynchronous rollout instead of a simulated weight
sync interval:

* ``sync``: generation and training take turns (on-policy, the reference);
* ``one_step_off``: a rollout process generates batch k+1 while the trainer updates on batch k
  (staleness exactly 1);
* ``fully_async4``: a rollout process streams prompt groups as it finishes them, the trainer
  takes them as they come, ``trainer.max_off_policy_threshold=4`` (groups staler than 4 are
  dropped).

The async modes run under three arms of the mismatch study: no correction, bypass PPO-clip, and
the best IS arm of its stale-weights source (token IcePop). Every run records, besides the
mismatch study's metrics, **the training time to reach a target greedy accuracy**: the summed
``timing/step`` (everything a step waits for, generation included; validation excluded, since
it is the same in every mode) up to the first validation at or above the target. Runs go one at
a time on the machine (``--jobs`` is not offered): an async run uses both cores, and wall-clock
comparisons need the same machine for every run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mismatch_study as ms  # noqa: E402

STEM = "async_study"
SCRATCH = ms.SCRATCH.parent / "rcx-async-study"  # --quick / --smoke outputs
TARGETS = (0.5, 0.6, 0.7)  # greedy validation accuracy


Mode = ms.Source  # a name, a label, its overrides

MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("sync", "sync: generate, then train (on-policy)", ("trainer.async_mode=sync",)),
        Mode(
            "one_step_off",
            "one_step_off: batch k+1 generated during the update on batch k",
            ("trainer.async_mode=one_step_off",),
        ),
        Mode(
            "fully_async4",
            "fully_async: groups streamed as generated, staleness cap 4 (drop)",
            (
                "trainer.async_mode=fully_async",
                "trainer.max_off_policy_threshold=4",
                "trainer.max_off_policy_strategy=drop",
            ),
        ),
    )
}
ASYNC_ARMS = ("uncorrected", "bypass_ppo_clip", "icepop_token")
#: Sync runs: the on-policy reference, and bypass mode (no pi_old forward: a faster step on its
#: own), so that each async row has a sync row of the same arm to compare its speed with.
SYNC_ARMS = ("uncorrected", "bypass_ppo_clip")


def conditions(seeds: Sequence[int], modes: Sequence[str], extra: Sequence[str]) -> list[ms.Job]:
    """The runs, as the mismatch study's jobs with a mode as their source; seed-major: every
    condition of seed 1 before seed 2 (partial results cover all rows)."""
    return [
        ms.Job(mode, arm, seed, tuple(extra))
        for seed in seeds
        for mode in modes
        for arm in (SYNC_ARMS if mode == "sync" else ASYNC_ARMS)
    ]


# --------------------------------------------------------------------------- one run


def training_clock(history: dict[str, list]) -> dict[int, float]:
    """Step -> the summed ``timing/step`` of steps 1..step (seconds of training so far)."""
    clock, total = {}, 0.0
    for step, seconds in sorted(ms.series(history, "timing/step")):
        total += seconds
        clock[step] = total
    return clock


def time_to_target(
    val_curve: Sequence[tuple[int, float]], clock: dict[int, float], target: float
) -> float | None:
    """Training seconds up to the first validation (after step 0) at or above ``target``;
    None if no validation reaches it."""
    for step, accuracy in val_curve:
        if step > 0 and accuracy >= target and step in clock:
            return clock[step]
    return None


def add_async_fields(result: Any, record: dict[str, Any]) -> None:
    """The async study's fields of a run's record: its mode, the training clock (also in the
    curves, where :func:`run_time_to` reads it) and the staleness it saw."""
    history = result.history
    clock = training_clock(history)
    staleness = "training/off_policy/trajectory_staleness"
    record.update(
        mode=record["source"],
        train_s=max(clock.values()) if clock else float("nan"),
        steps=len(clock),
        staleness_mean=ms.mean_of(history, f"{staleness}/mean"),
        staleness_max=max((v for _, v in ms.series(history, f"{staleness}/max")), default=math.nan),
        dropped=sum(v for _, v in ms.series(history, "training/off_policy/dropped_samples")),
    )
    record["curves"]["clock"] = sorted(clock.items())


def run_condition(job: ms.Job) -> dict[str, Any]:
    """Train one condition in this process: the mismatch study's record plus
    :func:`add_async_fields`."""
    return ms.run_job(job, MODES, add_async_fields)


# --------------------------------------------------------------------------- aggregation


def run_time_to(record: dict, target: float) -> float | None:
    """A recorded run's training time to ``target``, from its curves (so that ``--report`` can
    add targets without training again)."""
    clock = {int(step): float(s) for step, s in record["curves"]["clock"]}
    curve = [(int(step), float(acc)) for step, acc in record["curves"]["val_acc"]]
    return time_to_target(curve, clock, target)


def aggregate(records: list[dict]) -> list[dict[str, Any]]:
    """One row per (mode, arm): means and stds over seeds; training time per 100 steps and its
    ratio to sync's of the same arm (else sync uncorrected's); time to each target (mean over
    the seeds that reached it, and how many)."""
    rows = []

    def sync_per_100(arm: str) -> float:
        runs = [r for r in records if r["mode"] == "sync" and r["arm"] == arm]
        return ms.mean_std([100 * r["train_s"] / r["steps"] for r in runs])[0] if runs else math.nan

    for mode in MODES:
        for arm in ms.ARMS:
            runs = [r for r in records if r["mode"] == mode and r["arm"] == arm]
            if not runs:
                continue
            acc, acc_sd = ms.mean_std([r["final_val_acc"] for r in runs])
            late, late_sd = ms.mean_std([ms.late_accuracy(r) for r in runs])
            per_100, per_100_sd = ms.mean_std([100 * r["train_s"] / r["steps"] for r in runs])
            sync_100 = sync_per_100(arm)
            if math.isnan(sync_100):
                sync_100 = sync_per_100("uncorrected")
            row = {
                "mode": mode,
                "arm": arm,
                "seeds": len(runs),
                "final_val_acc": acc,
                "final_val_acc_std": acc_sd,
                "late_val_acc": late,
                "late_val_acc_std": late_sd,
                "train_s_per_100": per_100,
                "train_s_per_100_std": per_100_sd,
                "speedup_vs_sync": sync_100 / per_100 if per_100 > 0 else math.nan,
                "staleness_mean": ms.mean_std([r["staleness_mean"] for r in runs])[0],
                "staleness_max": max((r["staleness_max"] for r in runs), default=math.nan),
                "dropped": sum(r["dropped"] for r in runs),
                "kl_mean": ms.mean_std([r["kl_mean"] for r in runs])[0],
            }
            for target in TARGETS:
                name = f"time_to_{round(100 * target)}"
                reached = [t for r in runs if (t := run_time_to(r, target)) is not None]
                row[name] = ms.mean_std(reached)[0] if reached else math.nan
                row[f"{name}_std"] = ms.mean_std(reached)[1] if reached else math.nan
                row[f"{name}_reached"] = len(reached)
            rows.append(row)
    return rows


CSV_COLUMNS = (
    "mode", "arm", "seeds", "final_val_acc", "final_val_acc_std", "late_val_acc",
    "late_val_acc_std", "train_s_per_100", "train_s_per_100_std", "speedup_vs_sync",
    *(f"time_to_{round(100 * t)}{s}" for t in TARGETS for s in ("", "_std", "_reached")),
    "staleness_mean", "staleness_max", "dropped", "kl_mean",
)  # fmt: skip


def results_table(rows: list[dict]) -> list[str]:
    targets = " | ".join(f"time to {round(100 * t)} % (s)" for t in TARGETS)
    lines = [
        f"| mode | arm | seeds | final val acc % | last-3 val acc % | {targets} "
        "| training s / 100 steps | speed-up vs sync | staleness mean / max | dropped | mean kl |",
        "|---|---|---|---|---|" + "---|" * len(TARGETS) + "---|---|---|---|---|",
    ]
    for r in rows:
        times = []
        for target in TARGETS:
            name = f"time_to_{round(100 * target)}"
            shown = ms.num(r[name], ".1f")
            if r[f"{name}_reached"] > 1:
                shown += f" ± {ms.num(r[f'{name}_std'], '.1f')}"
            if r[f"{name}_reached"] < r["seeds"]:
                shown += f" ({r[f'{name}_reached']} of {r['seeds']} reached)"
            times.append(shown)
        per_100 = ms.num(r["train_s_per_100"], ".1f")
        if r["seeds"] > 1:
            per_100 += f" ± {ms.num(r['train_s_per_100_std'], '.1f')}"
        lines.append(
            f"| {r['mode']} | {r['arm']} | {r['seeds']} "
            f"| {ms.pct(r['final_val_acc'], ms.sd(r, 'final_val_acc_std'))} "
            f"| {ms.pct(r['late_val_acc'], ms.sd(r, 'late_val_acc_std'))} "
            f"| {' | '.join(times)} | {per_100} | {ms.num(r['speedup_vs_sync'], '.2f')}× "
            f"| {ms.num(r['staleness_mean'], '.2f')} / {ms.num(r['staleness_max'], '.0f')} "
            f"| {r['dropped']:.0f} | {ms.num(r['kl_mean'], '.1e')} |"
        )
    return lines


def write_outputs(records: list[dict], out: Path, meta: dict[str, Any]) -> None:
    rows = aggregate(records)
    with (out / f"{STEM}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ms._csv_value(row[k]) for k in CSV_COLUMNS})
    lines = [
        "# Async study: asynchronous rollout with and without correction",
        "",
        f"Status: **{meta['status']}** — {meta['done']} of {meta['planned']} runs "
        f"({meta['mode']} mode), one at a time.",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']}.  ",
        f"Wall time: {meta['wall_min']:.1f} min.  ",
        ms.SETTINGS[meta["mode"] == "smoke"] + "; seeds " + ", ".join(map(str, meta["seeds"])),
        "",
        "Time to X %: the training time (summed `timing/step`, generation and waiting "
        "included, validation excluded) up to the first validation (every 10 steps) whose "
        "greedy accuracy is at least X %, mean ± std over the seeds that reached it. Training "
        "s / 100 steps: the summed `timing/step` per 100 steps; speed-up: sync's of the same "
        "arm (sync uncorrected's where sync did not run the arm) divided by the row's. Staleness: `training/off_policy/trajectory_staleness/{mean,max}` over the "
        "run; dropped: `training/off_policy/dropped_samples`, summed over steps and seeds.",
        "",
        *results_table(rows),
        "",
        "| mode | what it is | overrides |",
        "|---|---|---|",
        *(
            f"| {m.name} | {m.label} | {' '.join(f'`{o}`' for o in m.overrides)} |"
            for m in MODES.values()
        ),
        "",
        "Arms: as in the mismatch study (`bench/results/mismatch_study.md`).",
        "",
    ]
    (out / f"{STEM}.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--quick", action="store_true", help="1 seed, in /tmp")
    kind.add_argument("--smoke", action="store_true", help="2 steps, tiny batches (the test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"outputs (full study: {ms.RESULTS}; --quick/--smoke: {SCRATCH})",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already recorded")
    parser.add_argument("--report", action="store_true", help="only rewrite the outputs")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = SCRATCH if (args.quick or args.smoke) else ms.RESULTS
    runs_path = args.out / f"{STEM}_runs.jsonl"
    if args.report:
        meta, records = ms.load_records(runs_path)
        if meta is None or not records:
            print(f"no recorded study in {args.out}", file=sys.stderr)
            return 1
        meta.update(done=len(records), wall_min=ms.elapsed_minutes(records))
        meta["status"] = "complete" if len(records) >= meta["planned"] else "partial"
        write_outputs(records, args.out, meta)
        print(f"rewrote {args.out / STEM}.md/.csv from {len(records)} runs")
        return 0
    extra = ms.SMOKE if args.smoke else ()
    seeds = args.seeds[:1] if (args.quick or args.smoke) else args.seeds
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        runs_path.unlink(missing_ok=True)
    _, records = ms.load_records(runs_path)
    ms.prepare_warm_start(extra)
    plan = conditions(seeds, args.modes, extra)
    meta = {
        "mode": mode,
        "status": "partial",
        "planned": len(plan),
        "done": len(records),
        "command": " ".join(["python", "bench/async_study.py", *(argv or sys.argv[1:])]),
        "hardware": ms.hardware(),
        "environment": ms._environment_record(),
        "seeds": seeds,
        "wall_min": 0.0,
    }
    with runs_path.open("a") as handle:
        handle.write(json.dumps({"meta": meta}) + "\n")
    session, done = time.time(), {r["key"] for r in records}
    for condition in plan:
        if condition.key in done:
            continue
        record = run_condition(condition)
        record["session"] = session
        records.append(record)
        with runs_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        meta.update(done=len(records), wall_min=ms.elapsed_minutes(records))
        print(
            f"[{len(records)}/{len(plan)}] {condition.key}: final val acc "
            f"{record['final_val_acc']:.3f}, training {record['train_s']:.1f} s, "
            f"time to 50 % {run_time_to(record, 0.5)}",
            flush=True,
        )
        write_outputs(records, args.out, meta)
    meta.update(status="complete", done=len(records), wall_min=ms.elapsed_minutes(records))
    write_outputs(records, args.out, meta)
    print(f"wrote {args.out / STEM}.md/.csv in {meta['wall_min']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
