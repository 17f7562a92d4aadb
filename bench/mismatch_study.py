"""The mismatch study: on a CPU, when does rollout correction help, and by how much?

    make study                                        # the full study: 65 runs, 22 min on 2 cores
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/mismatch_study.py --quick   # 2 runs, ~1 min, in /tmp
    .venv/bin/python bench/mismatch_study.py --smoke --out /tmp/s  # seconds: the test's path
    .venv/bin/python bench/mismatch_study.py --report  # rewrite table/CSV/plot from the runs file

(Add ~1.5 min the first time, to build the cached warm start.)

What it measures. GRPO on the embedded task (2-digit addition, ``builtin:tiny`` warm-started by
SFT until ~30 % sampled accuracy; 32 prompts x 8 samples, lr 1e-4 after 10 warm-up steps,
100 steps), trained with a
rollout policy that differs from the trained one by a real mechanism of ``rcx.rollout``
(SOURCES: stale rollout weights, int8 / fp8 fake-quantised weights, bfloat16 weights, top-p
truncated sampling), under each correction arm (ARMS). For every run: final validation accuracy
(greedy, 256 held-out prompts; also one sample per prompt at temperature 1), the area under the
validation accuracy curve (normalised by the step budget: the mean accuracy over training),
gradient-norm spikes (optimiser steps whose pre-clip ``actor/grad_norm`` exceeds 10x the run's
median), mean ESS of the IS weights and mean RS masked fraction, and the mean measured mismatch
``rollout_corr/kl``. Aggregated over seeds: mean +- sample std, the difference to the uncorrected
arm, and the share of the reference-uncorrected gap each corrected arm recovers.

Design: all seven arms x 5 seeds on the strongest source (stale weights, k = 8); on each other
source only the uncorrected arm and the best corrected arm of the strongest source, 3 seeds.
The 2026 arms (issue 14: token IcePop, OPSM with bypass PPO-clip, CISPO, GSPO) also run on the
strongest source x 5 seeds and on the temperature source x 3 seeds, and sampling-mask replay on
the top-p source x 3 seeds; ``--arms`` runs a subset (e.g. only the 2026 arms).
The on-policy reference (k = 1, float32 rollout) has no mismatch source, so it is run once per
seed and shared by every source's table. One validation point is noisy (a policy that learns
fluctuates by several points between evaluations), so the table also gives the mean of the last
three evaluations (steps 80-100) and the area under the whole curve.

Simplifications, each deliberate:

* Sampling-side sources: the rollout samples at temperature 0.8 while the trainer scores at 1.0
  (``actor_rollout_ref.actor.temperature``), the classic temperature mismatch; and top-p
  truncation (``top_p = 0.8``), which the trainer does not apply: one-sided, r <= 1 on every
  token.
* One PPO epoch, one mini-batch per step (the preset defaults): pi_theta = pi_old at the update,
  so "uncorrected" is exactly policy gradient that ignores the behaviour policy.
* MLflow is off (``trainer.logger=["console"]`` with a silent console) and checkpoints go to a
  temporary folder that is deleted: only the numbers this script writes are kept.
* Runs are independent processes (``--jobs``, one torch thread each), so two cores run two runs.
* Every finished run is appended to ``mismatch_study_runs.jsonl`` and the table, CSV and plot
  are rewritten after each, so an interrupted study leaves labelled partial results; ``--resume``
  skips the runs already in that file.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported anywhere

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from multiprocessing import get_context  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

RC = "algorithm.rollout_correction"
ROLLOUT = "actor_rollout_ref.rollout"
ACTOR = "actor_rollout_ref.actor"
RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(tempfile.gettempdir()) / "rcx-mismatch-study"  # --quick / --smoke outputs
STEM = "mismatch_study"
SPIKE_FACTOR = 10.0

# --------------------------------------------------------------------------- the arms


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: tuple[str, ...]  # on top of DECOUPLED_NONE
    corrected: bool = True
    # The 2026 arms name the sources they run on (every seed of the strongest source, the other
    # sources' seeds elsewhere); () = the original design (strongest source, and as "best").
    sources: tuple[str, ...] = ()


#: No correction at all, decoupled mode: the starting point every arm modifies.
DECOUPLED_NONE = (
    f"{RC}.bypass_mode=false",
    f"{RC}.rollout_is=null",
    f"{RC}.rollout_rs=null",
    f"{RC}.rollout_is_batch_normalize=false",
)

ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("reference", "on-policy reference (k=1, float32 rollout)", (), corrected=False),
        Arm("uncorrected", "no correction, decoupled (PPO at pi_old)", (), corrected=False),
        Arm("bypass_ppo_clip", "bypass PPO-clip (ratio pi_theta/pi_rollout)", (
            f"{RC}.bypass_mode=true", f"{RC}.loss_type=ppo_clip",
        )),
        Arm("token_tis", "token TIS, C=2", (
            f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold=2.0",
        )),
        Arm("seq_tis", "sequence TIS, C=2", (
            f"{RC}.rollout_is=sequence", f"{RC}.rollout_is_threshold=2.0",
        )),
        Arm("seq_mis", "sequence masked IS (seq_sum_k1 0.5_2.0 + seq IS)", (
            f"{RC}.rollout_is=sequence", f"{RC}.rollout_is_threshold=2.0",
            f"{RC}.rollout_rs=seq_sum_k1", f"{RC}.rollout_rs_threshold=0.5_2.0",
        )),
        Arm("geo_rs", "geometric RS (seq_mean_k1 0.8_1.25)", (
            f"{RC}.rollout_rs=seq_mean_k1", f"{RC}.rollout_rs_threshold=0.8_1.25",
        )),
        # The 2026 frontier (issue 14): on the stale and the temperature source.
        Arm("icepop_token", "token IcePop, band 0.5_5.0 (decoupled)", (
            f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold=0.5_5.0",
        ), sources=("stale8", "temp")),
        Arm("opsm_bypass_ppo_clip", "OPSM (delta 0.5) + bypass PPO-clip", (
            f"{RC}.bypass_mode=true", f"{RC}.loss_type=ppo_clip",
            f"{RC}.off_policy_mask_threshold=0.5",
        ), sources=("stale8", "temp")),
        Arm("cispo_bypass", "CISPO, bypass (eps_low 1, eps_high 0.28)", (
            f"{RC}.bypass_mode=true", f"{RC}.loss_type=cispo",
            f"{ACTOR}.clip_ratio_low=1.0", f"{ACTOR}.clip_ratio_high=0.28",
        ), sources=("stale8", "temp")),
        Arm("gspo_bypass", "GSPO, bypass (eps 3e-4 / 4e-4, seq-mean-token-mean)", (
            f"{RC}.bypass_mode=true", f"{RC}.loss_type=gspo",
            f"{ACTOR}.clip_ratio_low=0.0003", f"{ACTOR}.clip_ratio_high=0.0004",
            f"{ACTOR}.loss_agg_mode=seq-mean-token-mean",
        ), sources=("stale8", "temp")),
        Arm("sampling_mask_replay", "sampling-mask replay (trainer scores the kept set)", (
            f"{ACTOR}.sampling_mask_replay=true",
        ), sources=("top_p",)),
    )
}  # fmt: skip

# --------------------------------------------------------------------------- the sources


@dataclass(frozen=True)
class Source:
    name: str
    label: str
    overrides: tuple[str, ...]


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source("stale8", "stale weights, k=8", (f"{ROLLOUT}.weight_sync_interval=8",)),
        Source("stale4", "stale weights, k=4", (f"{ROLLOUT}.weight_sync_interval=4",)),
        Source("fp8", "fp8 rollout weights", (f"{ROLLOUT}.quantization=fp8",)),
        Source("int8", "int8 rollout weights", (f"{ROLLOUT}.quantization=int8",)),
        Source("bf16", "bfloat16 rollout", (f"{ROLLOUT}.dtype=bfloat16",)),
        Source("top_p", "top-p 0.8 rollout", (f"{ROLLOUT}.top_p=0.8",)),
        Source(
            "temp",
            "rollout at T=0.8, trainer scores at T=1.0",
            (f"{ROLLOUT}.temperature=0.8", "actor_rollout_ref.actor.temperature=1.0"),
        ),
    )
}
STRONGEST = "stale8"

#: The experiment every run shares (the issue's prototype setting).
BASE = (
    "actor_rollout_ref.model.warm_start_steps=1000",  # stops at ~30 % sampled accuracy
    "actor_rollout_ref.actor.optim.lr=1e-4",  # the presets' RL recipe
    "actor_rollout_ref.actor.optim.lr_warmup_steps=10",
    "data.train_batch_size=32",
    f"{ROLLOUT}.n=8",
    "trainer.total_training_steps=100",
    "trainer.test_freq=10",
    "trainer.val_before_train=true",
    "trainer.device=cpu",
    "trainer.num_threads=1",
    'trainer.logger=["console"]',
    "trainer.save_freq=-1",
    "trainer.resume_mode=disable",
)

#: --smoke: the same code path shrunk to seconds (untrained model, 2 steps, tiny batches).
SMOKE = (
    "actor_rollout_ref.model.warm_start_steps=0",
    "trainer.total_training_steps=2",
    "trainer.test_freq=1",
    "data.train_batch_size=4",
    f"{ROLLOUT}.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=4",
    "data.builtin.num_train=64",
    "data.builtin.num_val=8",
)

# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Job:
    source: str  # "none" for the reference
    arm: str
    seed: int
    extra: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.source}/{self.arm}/{self.seed}"

    def overrides(self, ckpt_dir: str, sources: dict[str, Source] = SOURCES) -> list[str]:
        """The run's overrides; ``sources`` names the mismatch sources (another study's,
        e.g. ``bench/async_study.py``'s modes)."""
        source = () if self.source == "none" else sources[self.source].overrides
        return [
            *BASE,
            *DECOUPLED_NONE,
            *source,
            *ARMS[self.arm].overrides,
            f"trainer.seed={self.seed}",
            f"trainer.default_local_dir={ckpt_dir}",
            *self.extra,
        ]


def series(history: dict[str, list], key: str) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in history.get(key, [])]


def mean_of(history: dict[str, list], key: str) -> float | None:
    values = [v for _, v in series(history, key) if math.isfinite(v)]
    return statistics.fmean(values) if values else None


def normalised_auc(curve: list[tuple[int, float]]) -> float:
    """Trapezoid area under (step, value) divided by the step span: a mean over training."""
    if len(curve) < 2:
        return curve[0][1] if curve else float("nan")
    area = sum(
        (s1 - s0) * (v0 + v1) / 2 for (s0, v0), (s1, v1) in zip(curve, curve[1:], strict=False)
    )
    return area / (curve[-1][0] - curve[0][0])


def grad_spikes(history: dict[str, list]) -> int:
    """Steps whose grad norm exceeds SPIKE_FACTOR x the run's median grad norm."""
    norms = [v for _, v in series(history, "actor/grad_norm") if math.isfinite(v)]
    if not norms:
        return 0
    median = statistics.median(norms)
    return sum(v > SPIKE_FACTOR * median for v in norms)


def summarise(job: Job, result: Any, wall_s: float, cpu_s: float) -> dict[str, Any]:
    """One run's record: the study's metrics and the curves the plot needs."""
    h = result.history
    val_curve = series(h, "val/accuracy")
    return {
        "key": job.key,
        "source": job.source,
        "arm": job.arm,
        "seed": job.seed,
        "status": result.status,
        "final_val_acc": result.val_end.get("val/accuracy", float("nan")),
        "final_sampled_acc": result.val_end.get("val/sampled_accuracy", float("nan")),
        "start_val_acc": result.val_start.get("val/accuracy", float("nan")),
        "val_auc": normalised_auc(val_curve),
        "train_reward_mean": mean_of(h, "reward/mean"),
        "grad_spikes": grad_spikes(h),
        "ess_mean": mean_of(h, "rollout_corr/rollout_is_eff_sample_size"),
        "masked_mean": mean_of(h, "rollout_corr/rollout_rs_masked_fraction"),
        "kl_mean": mean_of(h, "rollout_corr/kl"),
        "clipfrac_mean": mean_of(h, "actor/pg_clipfrac"),
        "skipped_updates": sum(v >= 1 for _, v in series(h, "rollout_corr/skipped_update")),
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "curves": {
            "val_acc": val_curve,
            "val_sampled_acc": series(h, "val/sampled_accuracy"),
            "train_reward": series(h, "reward/mean"),
        },
    }


def run_job(
    job: Job,
    sources: dict[str, Source] = SOURCES,
    more: Callable[[Any, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one (source, arm, seed) in this process and summarise it; ``more(result,
    record)``, when given, adds another study's fields to the record."""
    from rich.console import Console

    from rcx.config import load_config
    from rcx.train.trainer import train

    ckpt_dir = tempfile.mkdtemp(prefix="rcx-study-")
    try:
        cfg = load_config(overrides=job.overrides(ckpt_dir, sources))
        started_at, wall, cpu = time.time(), time.perf_counter(), time.process_time()
        result = train(cfg, console=Console(quiet=True))
        record = summarise(job, result, time.perf_counter() - wall, time.process_time() - cpu)
        if more is not None:
            more(result, record)
        return {**record, "started_at": started_at, "finished_at": time.time()}
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)


def prepare_warm_start(extra: Sequence[str]) -> None:
    """Build (or find) the cached warm start once, before workers would race to build it."""
    from rcx.config import load_config
    from rcx.train.pretrain import resolve_model_path
    from rcx.train.setup import builtin_task

    cfg = load_config(overrides=[*BASE, *extra])
    model = cfg.actor_rollout_ref.model
    resolve_model_path(
        model.path,
        model.warm_start_steps,
        cfg.data.train_files,
        builtin=builtin_task(cfg),
        seed=cfg.data.builtin.seed,
    )


# --------------------------------------------------------------------------- the plan


def jobs_for(sources: Sequence[str], arms: Sequence[str], seeds: Sequence[int], extra) -> list[Job]:
    """Seed-major order (every arm of seed 1 before seed 2), so partial results cover all arms."""
    jobs = []
    for seed in seeds:
        for source in sources:
            for arm in arms:
                src = "none" if arm == "reference" else source
                job = Job(src, arm, seed, tuple(extra))
                if job not in jobs:
                    jobs.append(job)
    return jobs


def runs_on(arm: str, source: str, strongest: str) -> bool:
    """Whether ``arm`` belongs on ``source`` by design (the "best" arm is added separately)."""
    own = ARMS[arm].sources
    return source in own if own else source == strongest


def best_corrected(records: list[dict], source: str, arms: Sequence[str]) -> str | None:
    """The corrected arm of the original design (no ``sources`` of its own) with the highest
    mean final validation accuracy on ``source``."""
    scores = {
        arm: statistics.fmean(r["final_val_acc"] for r in runs)
        for arm in arms
        if ARMS[arm].corrected and not ARMS[arm].sources and (runs := select(records, source, arm))
    }
    return max(scores, key=scores.get) if scores else None


def select(records: list[dict], source: str, arm: str) -> list[dict]:
    src = "none" if arm == "reference" else source
    return [r for r in records if r["source"] == src and r["arm"] == arm]


# --------------------------------------------------------------------------- aggregation


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def late_accuracy(record: dict, last: int = 3) -> float:
    """Mean validation accuracy over the run's last ``last`` evaluations."""
    curve = record["curves"]["val_acc"][-last:]
    return statistics.fmean(v for _, v in curve) if curve else float("nan")


def aggregate(records: list[dict], sources: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (source, arm) that has runs: means, stds and the gap recovered."""
    rows = []
    for source in sources:
        ref = select(records, source, "reference")
        unc = select(records, source, "uncorrected")
        ref_acc = mean_std([r["final_val_acc"] for r in ref])[0] if ref else float("nan")
        unc_acc, unc_sd = mean_std([r["final_val_acc"] for r in unc]) if unc else (math.nan,) * 2
        gap = ref_acc - unc_acc
        for arm in ARMS:
            runs = select(records, source, arm)
            if not runs:
                continue
            acc, acc_sd = mean_std([r["final_val_acc"] for r in runs])
            late, late_sd = mean_std([late_accuracy(r) for r in runs])
            sampled, sampled_sd = mean_std([r["final_sampled_acc"] for r in runs])
            auc, auc_sd = mean_std([r["val_auc"] for r in runs])
            recovered = (acc - unc_acc) / gap if ARMS[arm].corrected and gap > 0 else float("nan")
            rows.append(
                {
                    "source": source,
                    "arm": arm,
                    "seeds": len(runs),
                    "final_val_acc": acc,
                    "final_val_acc_std": acc_sd,
                    "late_val_acc": late,
                    "late_val_acc_std": late_sd,
                    "final_sampled_acc": sampled,
                    "final_sampled_acc_std": sampled_sd,
                    "val_auc": auc,
                    "val_auc_std": auc_sd,
                    "delta_vs_uncorrected": acc - unc_acc if arm != "uncorrected" else 0.0,
                    # standard error of that difference of means (seed noise)
                    "delta_se": math.sqrt(acc_sd**2 / len(runs) + unc_sd**2 / max(1, len(unc)))
                    if arm != "uncorrected"
                    else float("nan"),
                    "gap_recovered": recovered,
                    "grad_spikes": sum(r["grad_spikes"] for r in runs),
                    "ess_mean": mean_std([r["ess_mean"] for r in runs])[0],
                    "masked_mean": mean_std([r["masked_mean"] for r in runs])[0],
                    "kl_mean": mean_std([r["kl_mean"] for r in runs])[0],
                    "wall_s_mean": mean_std([r["wall_s"] for r in runs])[0],
                }
            )
    return rows


# --------------------------------------------------------------------------- outputs

CSV_COLUMNS = (
    "source",
    "arm",
    "seeds",
    "final_val_acc",
    "final_val_acc_std",
    "late_val_acc",
    "late_val_acc_std",
    "final_sampled_acc",
    "final_sampled_acc_std",
    "val_auc",
    "val_auc_std",
    "delta_vs_uncorrected",
    "delta_se",
    "gap_recovered",
    "grad_spikes",
    "ess_mean",
    "masked_mean",
    "kl_mean",
    "wall_s_mean",
)


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row[k]) for k in CSV_COLUMNS})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.4f}"
    return value


def pct(value: float, std: float | None = None) -> str:
    if not math.isfinite(value):
        return "—"
    return f"{100 * value:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")


def num(value: float | None, fmt: str = ".2f") -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, fmt)


def sd(row: dict, key: str) -> float | None:
    """The std to print: none for a single seed."""
    return row[key] if row["seeds"] > 1 else None


def results_table(rows: list[dict]) -> list[str]:
    lines = [
        "| source | arm | seeds | final val acc % | last-3 val acc % | sampled acc % | val AUC % "
        "| Δ vs uncorrected (pts) | gap recovered | grad spikes | mean ESS | masked | mean kl |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = r["delta_vs_uncorrected"]
        if r["arm"] == "uncorrected" or not math.isfinite(delta):
            delta = "—"
        else:
            se = r["delta_se"]
            delta = f"{100 * delta:+.1f}" + (f" ± {100 * se:.1f}" if se > 0 else "")
        lines.append(
            f"| {r['source']} | {r['arm']} | {r['seeds']} "
            f"| {pct(r['final_val_acc'], sd(r, 'final_val_acc_std'))} "
            f"| {pct(r['late_val_acc'], sd(r, 'late_val_acc_std'))} "
            f"| {pct(r['final_sampled_acc'], sd(r, 'final_sampled_acc_std'))} "
            f"| {pct(r['val_auc'], sd(r, 'val_auc_std'))} | {delta} "
            f"| {pct(r['gap_recovered']) + ' %' if math.isfinite(r['gap_recovered']) else '—'} "
            f"| {r['grad_spikes']} | {num(r['ess_mean'], '.3f')} | {num(r['masked_mean'], '.3f')} "
            f"| {num(r['kl_mean'], '.1e')} |"
        )
    return lines


def mapping_tables(sources: Sequence[str]) -> list[str]:
    lines = [
        "Arms (every arm starts from decoupled mode with no correction, "
        f"`{' '.join(o.removeprefix(RC + '.') for o in DECOUPLED_NONE)}` under `{RC}`):",
        "",
        "| arm | what it is | overrides |",
        "|---|---|---|",
    ]
    for arm in ARMS.values():
        overrides = " ".join(f"`{o}`" for o in arm.overrides) or "(none)"
        if arm.name == "reference":
            overrides = "(none; no mismatch source: k=1, float32 rollout)"
        lines.append(f"| {arm.name} | {arm.label} | {overrides} |")
    lines += ["", "Mismatch sources:", "", "| source | what it is | overrides |", "|---|---|---|"]
    for name in sources:
        s = SOURCES[name]
        lines.append(f"| {s.name} | {s.label} | {' '.join(f'`{o}`' for o in s.overrides)} |")
    return lines


def summary_lines(rows: list[dict], strongest: str) -> list[str]:
    """Facts computed from the table: gap, best arm, recovery, noise (no interpretation)."""
    lines = []
    for source in dict.fromkeys(r["source"] for r in rows):
        by_arm = {r["arm"]: r for r in rows if r["source"] == source}
        ref, unc = by_arm.get("reference"), by_arm.get("uncorrected")
        corrected = [r for r in by_arm.values() if ARMS[r["arm"]].corrected]
        if not (ref and unc):
            continue
        gap = ref["final_val_acc"] - unc["final_val_acc"]
        noise = max(ref["final_val_acc_std"], unc["final_val_acc_std"])
        text = (
            f"- **{source}**: reference {pct(ref['final_val_acc'])} %, uncorrected "
            f"{pct(unc['final_val_acc'])} % (gap {100 * gap:+.1f} pts; seed std up to "
            f"{100 * noise:.1f} pts)"
        )
        if corrected:
            best = max(corrected, key=lambda r: r["final_val_acc"])
            text += (
                f"; best corrected: {best['arm']} {pct(best['final_val_acc'])} % "
                f"({100 * best['delta_vs_uncorrected']:+.1f} pts vs uncorrected"
            )
            if gap > 0:
                late_gap = ref["late_val_acc"] - unc["late_val_acc"]
                late = (best["late_val_acc"] - unc["late_val_acc"]) / late_gap
                text += (
                    f"; {pct(best['gap_recovered'])} % of the gap, {pct(late)} % on last-3 accuracy"
                )
            text += ")"
        lines.append(text + ".")
    if lines:
        lines.insert(0, f"Computed from the table (strongest source: {strongest}):")
        lines.insert(1, "")
    return lines


def hardware() -> str:
    import torch

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, CPU only"


SETTINGS = {
    False: "Setting: GRPO on builtin:arith (2-digit addition), builtin:tiny warm-started to ~30 % "
    "sampled accuracy, 32 prompts x 8 samples, lr 1e-4 (10 warm-up steps), 100 steps, 1 PPO epoch",
    True: "Setting: the smoke configuration (untrained builtin:tiny, 2 steps, 4 prompts x 4 "
    "samples, 8 validation prompts): it tests the code path, its numbers mean nothing",
}


def write_markdown(
    rows: list[dict], path: Path, *, meta: dict[str, Any], sources: Sequence[str]
) -> None:
    status = meta["status"]
    lines = [
        "# Mismatch study: when rollout correction helps",
        "",
        f"Status: **{status}** — {meta['done']} of {meta['planned']} runs ({meta['mode']} mode).",
        "",
        f"Command: `{meta['command']}`  ",
        f"Hardware: {meta['hardware']}; runs in parallel: {meta['jobs']}, 1 torch thread each.  ",
        f"Wall time: {meta['wall_min']:.1f} min (the runs; the warm start is cached).  ",
        SETTINGS[meta["mode"] == "smoke"]
        + "; seeds "
        + ", ".join(map(str, meta["seeds"]))
        + (
            f" on {meta['strongest']}, the first {len(meta.get('other_seeds', meta['seeds']))} on the other sources."
            if len(meta["sources"]) > 1
            else "."
        ),
        "",
        "Final val acc: greedy accuracy on 256 held-out prompts after the last step "
        "(mean ± sample std over seeds); last-3: the mean of the evaluations at steps 80, 90 and "
        "100; sampled acc: one temperature-1 sample per prompt (final); "
        "val AUC: area under the validation accuracy curve (every 10 steps) divided by the "
        "step budget; Δ vs uncorrected: difference of the final val acc means ± its standard "
        "error from the seed spread; gap recovered: (arm − uncorrected) / (reference − uncorrected); grad "
        f"spikes: optimiser steps with grad norm > {SPIKE_FACTOR:g}× the run's median, summed "
        "over seeds; mean ESS / masked: mean over steps of `rollout_is_eff_sample_size` / "
        "`rollout_rs_masked_fraction` (— where the arm has no IS / RS); mean kl: "
        "`rollout_corr/kl`, the measured mismatch the correction saw. The reference row is one "
        "set of runs shared by every source.",
        "",
        *results_table(rows),
        "",
        *summary_lines(rows, meta["strongest"]),
        "",
        *mapping_tables(sources),
        "",
        f"![validation accuracy per arm, {meta['strongest']}]({STEM}.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(records: list[dict], path: Path, strongest: str, sources: Sequence[str]) -> None:
    """Left: validation accuracy per arm on the strongest source (mean ± std over seeds).
    Right: final validation accuracy per source for the arms run there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for arm in ARMS:
        runs = select(records, strongest, arm)
        if not runs:
            continue
        steps = [s for s, _ in runs[0]["curves"]["val_acc"]]
        curves = [[v for _, v in r["curves"]["val_acc"]] for r in runs]
        curves = [c for c in curves if len(c) == len(steps)]
        mean = [statistics.fmean(col) for col in zip(*curves, strict=True)]
        std = [statistics.stdev(col) if len(col) > 1 else 0.0 for col in zip(*curves, strict=True)]
        style = "--" if arm == "reference" else "-"
        (line,) = left.plot(steps, mean, style, label=f"{arm} (n={len(curves)})")
        left.fill_between(
            steps,
            [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)],
            color=line.get_color(),
            alpha=0.12,
        )
    left.set_title(f"validation accuracy (greedy), {SOURCES[strongest].label}", fontsize=10)
    left.set_xlabel("step")
    left.set_ylabel("accuracy")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    arms_seen = [a for a in ARMS if any(r["arm"] == a for r in records)]
    width = 0.8 / max(1, len(arms_seen))
    for i, arm in enumerate(arms_seen):
        xs, ys = [], []
        for j, source in enumerate(sources):
            for r in select(records, source, arm):
                xs.append(j + (i - (len(arms_seen) - 1) / 2) * width)
                ys.append(r["final_val_acc"])
        right.scatter(xs, ys, s=14, label=arm)
    right.set_xticks(range(len(sources)), list(sources), fontsize=8)
    right.set_title("final validation accuracy per run, by mismatch source", fontsize=10)
    right.set_ylabel("accuracy")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(records: list[dict], out: Path, meta: dict, sources: Sequence[str]) -> None:
    rows = aggregate(records, sources)
    write_csv(rows, out / f"{STEM}.csv")
    write_markdown(rows, out / f"{STEM}.md", meta=meta, sources=sources)
    write_plot(records, out / f"{STEM}.png", meta["strongest"], sources)


# --------------------------------------------------------------------------- driver


def load_records(path: Path) -> tuple[dict | None, list[dict]]:
    """(the study's meta line, the run records) of a ``_runs.jsonl`` file."""
    if not path.exists():
        return None, []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    metas = [line["meta"] for line in lines if "meta" in line]
    return (metas[-1] if metas else None), [line for line in lines if "key" in line]


def elapsed_minutes(records: list[dict]) -> float:
    """Wall time of the runs: per session (a --resume starts a new one), first start to last
    finish, summed over sessions."""
    sessions: dict[Any, list[dict]] = {}
    for r in records:
        sessions.setdefault(r.get("session"), []).append(r)
    return (
        sum(
            max(r["finished_at"] for r in rs) - min(r["started_at"] for r in rs)
            for rs in sessions.values()
        )
        / 60
    )


def report_only(out: Path) -> int:
    """Rewrite the table, CSV and plot from the recorded runs (no training)."""
    meta, records = load_records(out / f"{STEM}_runs.jsonl")
    if meta is None or not records:
        print(f"no recorded study in {out}", file=sys.stderr)
        return 1
    done = len(records)
    # Every recorded source, not only the last session's: a --resume with --sources or --arms
    # adds to the runs of earlier sessions, and the report covers them all.
    recorded = {record["source"] for record in records}
    sources = [source for source in SOURCES if source in recorded]
    meta.update(done=done, wall_min=elapsed_minutes(records), planned=max(meta["planned"], done))
    meta["status"] = "complete" if done >= meta["planned"] else "partial"
    write_outputs(records, out, meta, sources)
    print(f"rewrote {out / STEM}.md/.csv/.png from {done} runs")
    return 0


def run_all(jobs: list[Job], workers: int, on_done) -> None:
    """Run ``jobs`` on ``workers`` processes (in this process when 1), calling ``on_done``."""
    if workers <= 1:
        for job in jobs:
            on_done(run_job(job))
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending: set[Future] = {pool.submit(run_job, job) for job in jobs}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                on_done(future.result())


def _environment_record() -> dict[str, Any]:
    """Package versions, rcx's revision and the platform (`rcx.store.provenance`)."""
    from rcx.store.provenance import environment_record

    return environment_record()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 seed, 2 arms, strongest source")
    mode.add_argument("--smoke", action="store_true", help="2 steps, tiny batches (the test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument(
        "--other-seeds", type=int, default=3, help="how many of --seeds the other sources use"
    )
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one per core)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder of the outputs (full study: {RESULTS}; --quick/--smoke: {SCRATCH}, so "
        "the committed results are never overwritten by a partial run)",
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs already recorded")
    parser.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=None,
        help="run only these arms (default: every arm where the design places it), e.g. the "
        "2026 arms alone: --arms icepop_token opsm_bypass_ppo_clip cispo_bypass gspo_bypass",
    )  # fmt: skip
    parser.add_argument(
        "--report", action="store_true", help="only rewrite the outputs from the recorded runs"
    )
    parser.add_argument(
        "--best", choices=[a for a in ARMS if ARMS[a].corrected],
        help="corrected arm for the other sources (default: best on the strongest source)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:
        args.out = SCRATCH if (args.quick or args.smoke) else RESULTS
    if args.report:
        return report_only(args.out)
    extra: tuple[str, ...] = SMOKE if args.smoke else ()
    seeds = args.seeds[:1] if (args.quick or args.smoke) else args.seeds
    sources = [STRONGEST] if (args.quick or args.smoke) else args.sources
    strongest = sources[0]
    all_arms = ["reference", "uncorrected", "bypass_ppo_clip"] if args.smoke else list(ARMS)
    if args.smoke and args.arms:  # a smoke run of chosen arms (e.g. to check the 2026 arms run)
        all_arms = list(args.arms)
    if args.quick:
        all_arms = ["uncorrected", "bypass_ppo_clip"]
    if args.arms:
        all_arms = [a for a in all_arms if a in args.arms]
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"

    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / f"{STEM}_runs.jsonl"
    if not args.resume:
        runs_path.unlink(missing_ok=True)
    _, records = load_records(runs_path)
    prepare_warm_start(extra)

    first = [
        a for a in all_arms if a in ("reference", "uncorrected") or runs_on(a, strongest, strongest)
    ]
    phase1 = jobs_for([strongest], first, seeds, extra)
    other_seeds = seeds[: args.other_seeds]
    own = sum(1 for s in sources[1:] for a in all_arms if s in ARMS[a].sources)
    default_arms = [a for a in ("reference", "uncorrected") if a in all_arms]
    # Per other source and seed: uncorrected and the best arm (the reference is shared), and the
    # arms placed there by design.
    per_source = ("uncorrected" in all_arms) + (0 if args.arms else 1)
    planned = len(phase1) + ((len(sources) - 1) * per_source + own) * len(other_seeds)
    meta = {
        "mode": mode,
        "status": "partial",
        "planned": planned,
        "done": 0,
        "command": " ".join(["python", "bench/mismatch_study.py", *(argv or sys.argv[1:])]),
        "hardware": hardware(),
        "environment": _environment_record(),
        "jobs": args.jobs,
        "seeds": seeds,
        "other_seeds": other_seeds,
        "strongest": strongest,
        "sources": sources,
        "wall_min": 0.0,
    }
    with runs_path.open("a") as handle:
        handle.write(json.dumps({"meta": meta}) + "\n")

    session = time.time()

    def on_done(record: dict) -> None:
        record["session"] = session
        records.append(record)
        with runs_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        meta.update(done=len(records), wall_min=elapsed_minutes(records))
        print(
            f"[{len(records)}/{planned}] {record['key']}: final val acc "
            f"{record['final_val_acc']:.3f}, {record['wall_s']:.0f} s",
            flush=True,
        )
        write_outputs(records, args.out, meta, sources)

    done_keys = {r["key"] for r in records}
    run_all([j for j in phase1 if j.key not in done_keys], args.jobs, on_done)
    if len(sources) > 1:
        best = args.best or best_corrected(records, strongest, all_arms)
        phase2: list[Job] = []
        for source in sources[1:]:
            arms = [*default_arms, *([best] if best and not args.arms else [])]
            arms += [a for a in all_arms if source in ARMS[a].sources]
            phase2 += [j for j in jobs_for([source], arms, other_seeds, extra) if j not in phase2]
        done_keys = {r["key"] for r in records}
        run_all([j for j in phase2 if j.key not in done_keys], args.jobs, on_done)
    meta.update(status="complete", done=len(records), wall_min=elapsed_minutes(records))
    write_outputs(records, args.out, meta, sources)
    print(f"wrote {args.out / STEM}.md/.csv/.png in {meta['wall_min']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
