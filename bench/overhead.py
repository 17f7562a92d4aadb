"""Overhead benchmark: everything around the training step, each against a baseline of the same run.

    python bench/overhead.py                      # 3 repeats of a 10-step run, fresh MLflow store
    python bench/overhead.py --repeats 5 --steps 20 --json out.json
    python bench/overhead.py KEY=VALUE ...        # extra overrides for the run
    python bench/overhead.py --trl-site /tmp/trl  # TRL's import as a baseline too (see --help)

Each repeat spawns, in alternation, the baseline ``python -c "import torch, transformers"`` and
``rcx train --preset grpo-multi-rs`` (``val_before_train=false``, only the final validation,
``--steps`` steps) in a fresh working directory, so every run creates its own MLflow store, as a
new user's first run does. The run is instrumented from inside (this file re-executed with
``--child``: it wraps ``Trainer.train_step`` and ``Trainer._log`` with timers and then calls
the ``rcx`` CLI), and reports, as medians over the repeats:

* ``startup_s``: from spawning the process to the start of step 1, and its ratio to the import
  baseline (target <= 1.3; TRL's GRPOTrainer measured ~1.2 on this machine), and to a second
  baseline, ``import torch, transformers.modeling_utils``: ``import transformers`` is lazy, and
  any process that builds a transformers model (TRL's too) pays for its model classes; with
  ``--trl-site DIR`` also to ``from trl import GRPOConfig, GRPOTrainer`` (TRL installed in DIR);
* ``step_s``: a training step (steps 2.., ``Trainer.train_step``);
* ``log_ms`` / ``log_share``: a step's metric logging (``Trainer._log``) and its share of the step
  (target <= 2 %);
* ``end_s``: from the end of the last step's logging to the process exit (checkpoint, plot,
  closing the run, summary, interpreter shutdown), and its ratio to a step;
* ``peak_rss_mb``: the peak resident memory of the training process plus that of the MLflow
  tracking process it starts (:mod:`rcx.store.tracking_process`), and its ratio to the import
  baseline's (``main_rss_mb`` and ``child_rss_mb`` separately);
* ``total_s``: the whole process.

The warm start is made once, untimed, before the repeats. Timings depend on the machine and its
load: compare ratios measured in one run.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

STEP_EVENT = "step"
LOG_EVENT = "log"
SELF_RSS = "rss_self_mb"  # the training process's own peak
CHILD_RSS = "rss_tracking_mb"  # the MLflow tracking process's peak (VmHWM before it is closed)


def child(events_path: str, argv: list[str]) -> None:
    """Run the ``rcx`` CLI with ``argv``, writing (event, step, start, end) wall times as JSON."""
    import atexit

    events: list[tuple[str, int, float, float]] = []

    def dump() -> None:
        import resource

        self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        events.append((SELF_RSS, 0, 0.0, self_mb))
        events.append((CHILD_RSS, 0, 0.0, sum(tracking_peaks_mb)))
        with open(events_path, "w") as fh:
            json.dump(events, fh)

    atexit.register(dump)  # registered first, so it runs after every handler the run adds
    tracking_peaks_mb: list[float] = []
    try:
        from rcx.store import tracking_process  # no MLflow: its process imports it
    except ImportError:  # an rcx that tracks in-process (a before/after comparison)
        tracking_process = None
    if tracking_process is not None:
        close = tracking_process.TrackingProcess.close

        def measured_close(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            tracking_peaks_mb.append(peak_rss_mb(self.pid))
            return close(self, *args, **kwargs)

        tracking_process.TrackingProcess.close = measured_close

    def timed(name: str, method):  # noqa: ANN001, ANN202 - a thin wrapper around a method
        def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            step = kwargs.get("step", args[0] if args else 0)
            start = time.time()
            try:
                return method(self, *args, **kwargs)
            finally:
                events.append((name, int(step), start, time.time()))

        return wrapper

    def instrument(trainer: ModuleType) -> None:
        trainer.Trainer.train_step = timed(STEP_EVENT, trainer.Trainer.train_step)
        trainer.Trainer._log = timed(LOG_EVENT, trainer.Trainer._log)

    # Instrumented when the CLI imports it: importing it here would load torch and transformers
    # before the CLI starts, which is not the order a user's run has.
    sys.meta_path.insert(0, PatchOnImport("rcx.train.trainer", instrument))
    from rcx.cli import main

    sys.argv = ["rcx", *argv]
    main()


def peak_rss_mb(pid: int) -> float:
    """The peak resident memory of the live process ``pid`` (``VmHWM``), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Calls ``patch(module)`` once the module ``name`` has been executed by its first import."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name, self.patch = name, patch

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_then_patch(module: ModuleType) -> None:
            execute(module)
            self.patch(module)

        spec.loader.exec_module = exec_then_patch
        return spec


def spawn(
    argv: list[str], cwd: str, env: dict[str, str] | None = None
) -> tuple[float, float, float]:
    """Run ``argv`` to completion in ``cwd``: (start wall time, end wall time, peak RSS in MB)."""
    import subprocess

    start = time.time()
    proc = subprocess.Popen(
        argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.time()
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return start, end, usage.ru_maxrss / 1024


def run_once(steps: int, overrides: list[str]) -> dict[str, float]:
    """One instrumented ``rcx train`` process in a fresh directory; its figures."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rcx-overhead-") as tmp:
        events_path = os.path.join(tmp, "events.json")
        args = [
            "train",
            "--preset",
            "grpo-multi-rs",
            f"trainer.total_training_steps={steps}",
            "trainer.val_before_train=false",
            "trainer.test_freq=0",
            *overrides,
        ]
        start, end, rss = spawn(
            [sys.executable, os.path.abspath(__file__), "--child", events_path, *args], tmp
        )
        with open(events_path) as fh:
            events = json.load(fh)
    step_times = {s: (a, b) for name, s, a, b in events if name == STEP_EVENT}
    logs = {s: (a, b) for name, s, a, b in events if name == LOG_EVENT and s >= 1}
    if set(step_times) != set(range(1, steps + 1)):
        raise SystemExit(f"expected steps 1..{steps}, the run recorded {sorted(step_times)}")
    rss_of = {name: b for name, _, _, b in events if name in (SELF_RSS, CHILD_RSS)}
    step_s = statistics.median(b - a for s, (a, b) in step_times.items() if s > 1)
    log_s = statistics.median(b - a for a, b in logs.values())
    return {
        "startup_s": step_times[1][0] - start,
        "step_s": step_s,
        "log_ms": 1000 * log_s,
        "log_share": log_s / step_s,
        "end_s": end - logs[steps][1],
        # Both processes at their peaks at once (an upper bound): the training process and the
        # MLflow tracking process it starts. ``rss`` (wait4) is only the larger of the two, and
        # counts a forked child's pages before its exec (git, from the provenance record).
        "peak_rss_mb": rss_of.get(SELF_RSS, rss) + rss_of.get(CHILD_RSS, 0.0),
        "main_rss_mb": rss_of.get(SELF_RSS, rss),
        "child_rss_mb": rss_of.get(CHILD_RSS, 0.0),
        "total_s": end - start,
    }


#: TRL's import, what a TRL GRPO run pays before it builds anything (with ``--trl-site``).
TRL_IMPORT = "from trl import GRPOConfig, GRPOTrainer"


def baseline_once(trl_site: str | None = None) -> dict[str, float]:
    """``python -c "import torch, transformers"`` (wall time, peak RSS), and the same with the
    model classes (``transformers.modeling_utils``: wall time); with ``trl_site`` (a folder
    holding TRL and its own dependencies, e.g. ``pip install --target``; on ``PYTHONPATH`` for
    this baseline only, so it cannot change what the rcx runs import) also TRL's import."""
    start, end, rss = spawn([sys.executable, "-c", "import torch, transformers"], os.getcwd())
    code = "import torch, transformers.modeling_utils"
    floor_start, floor_end, _ = spawn([sys.executable, "-c", code], os.getcwd())
    out = {"import_s": end - start, "import_rss_mb": rss, "models_s": floor_end - floor_start}
    if trl_site:
        env = {**os.environ, "PYTHONPATH": trl_site}
        trl_start, trl_end, _ = spawn([sys.executable, "-c", TRL_IMPORT], os.getcwd(), env)
        out["trl_import_s"] = trl_end - trl_start
    return out


def ensure_warm_start(overrides: list[str]) -> None:
    """Make (or find) the preset's cached warm start, untimed."""
    import subprocess

    subprocess.run(
        [sys.executable, "-m", "rcx", "pretrain", "--preset", "grpo-multi-rs", *overrides],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def summarise(runs: list[dict[str, float]], bases: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the repeats, and the ratios to the baselines."""
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med.update({k: statistics.median(b[k] for b in bases) for k in bases[0]})
    med["startup_ratio"] = med["startup_s"] / med["import_s"]
    med["startup_vs_models"] = med["startup_s"] / med["models_s"]
    if "trl_import_s" in med:
        med["startup_vs_trl_import"] = med["startup_s"] / med["trl_import_s"]
    med["end_in_steps"] = med["end_s"] / med["step_s"]
    med["rss_ratio"] = med["peak_rss_mb"] / med["import_rss_mb"]
    return med


def report(med: dict[str, float], repeats: int, steps: int) -> list[str]:
    """The lines printed: each figure, its baseline and the ratio."""
    ok = {True: "ok", False: "OVER TARGET"}
    trl = []
    if "trl_import_s" in med:
        trl = [
            f"                      {'':6s}     {TRL_IMPORT} {med['trl_import_s']:.2f} s   ratio "
            f"{med['startup_vs_trl_import']:.2f}"
        ]
    return [
        f"rcx overhead: median of {repeats} repeats, {steps}-step runs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}, {os.cpu_count()} CPUs",
        f"  start-up to step 1  {med['startup_s']:6.2f} s   import torch, transformers "
        f"{med['import_s']:.2f} s   ratio {med['startup_ratio']:.2f} "
        f"({ok[med['startup_ratio'] <= 1.3]}: <= 1.3)",
        f"                      {'':6s}     import torch, transformers.modeling_utils "
        f"{med['models_s']:.2f} s   ratio {med['startup_vs_models']:.2f}",
        *trl,
        f"  step                {med['step_s']:6.3f} s",
        f"  logging per step    {med['log_ms']:6.2f} ms  share of a step "
        f"{100 * med['log_share']:.2f} % ({ok[med['log_share'] <= 0.02]}: <= 2 %)",
        f"  end of run          {med['end_s']:6.2f} s   = {med['end_in_steps']:.1f} steps",
        f"  peak RSS            {med['peak_rss_mb']:6.0f} MB  import torch, transformers "
        f"{med['import_rss_mb']:.0f} MB   ratio {med['rss_ratio']:.2f}",
        f"    of which          {med['main_rss_mb']:6.0f} MB  training process, "
        f"{med['child_rss_mb']:.0f} MB  the MLflow tracking process",
        f"  whole process       {med['total_s']:6.2f} s",
    ]


def main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the medians (and every repeat) here")
    parser.add_argument(
        "--trl-site",
        help="a folder holding TRL (pip install --target DIR trl): adds TRL's import as a "
        "third start-up baseline, imported with DIR on PYTHONPATH (that baseline only)",
    )
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of the run")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is start-up)")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # inherited by every child
    ensure_warm_start(args.overrides)
    runs, bases = [], []
    for _ in range(args.repeats):
        bases.append(baseline_once(args.trl_site))
        runs.append(run_once(args.steps, args.overrides))
    med = summarise(runs, bases)
    print("\n".join(report(med, args.repeats, args.steps)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"median": med, "runs": runs, "baselines": bases}, fh, indent=2)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        child(sys.argv[2], sys.argv[3:])
    else:
        main(sys.argv[1:])
