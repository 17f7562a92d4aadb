"""rcx sweep: grid parsing, validated trials, orchestration, MLflow parent/child runs, resume.

Orchestration is tested with small trial functions that log to MLflow as the trainer does (a
child run under the sweep's parent); the tests marked ``trainer`` at the end run the real
trainer on the embedded default (2 steps per trial).
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import rcx.experiments.sweep as sweep_mod
from rcx.cli import app
from rcx.experiments.sweep import (
    GridAxis,
    SweepError,
    TrialResult,
    TrialSpec,
    invalid_trials,
    parse_grid,
    plan_sweep,
    rank_trials,
    ray_resources,
    read_sweep_file,
    run_in_processes,
    run_on_ray,
    run_sweep,
)

RC = "algorithm.rollout_correction"
IS_AXIS = f"{RC}.rollout_is_threshold"
RS_AXIS = f"{RC}.rollout_rs_threshold"


# ------------------------------------------------------------------------------ grid parsing


@pytest.mark.parametrize(
    ("text", "values"),
    [
        (f"{IS_AXIS}=1.5,2.0,3", (1.5, 2.0, 3)),
        ("trainer.val_before_train=true,false", (True, False)),
        (f'{RS_AXIS}=["0.6_1.6,2.5","0.5_2.0,3.0"]', ("0.6_1.6,2.5", "0.5_2.0,3.0")),
        # Threshold strings are verbatim: never 0.52 (YAML 1.1) nor re-rendered numbers.
        (f"{RS_AXIS}=0.5_2,2.50", ("0.5_2", "2.50")),
        (f"{RS_AXIS}=[0.5_2, 2.50, null]", ("0.5_2", "2.50", None)),
        ("rollout_rs_threshold=[0.5_2]", ("0.5_2",)),
        ('trainer.logger=[["console"], ["mlflow"]]', (["console"], ["mlflow"])),
        (f"{RC}.rollout_rs=null,token_k1", (None, "token_k1")),
    ],
)
def test_parse_grid_values(text: str, values: tuple[Any, ...]) -> None:
    axis = parse_grid(text)
    assert axis.values == values
    assert axis.key == text.partition("=")[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rollout_is_threshold", "expected KEY=V1,V2"),
        ("=1,2", "expected KEY=V1,V2"),
        ("a..b=1", "expected KEY=V1,V2"),
        (f"{IS_AXIS}=", "no values given"),
        (f"{IS_AXIS}=1.5,,2", "empty value"),
        (f'{RS_AXIS}=["0.6_1.6,2.5"', "not a valid YAML list"),
        (f"{IS_AXIS}=[]", "the list is empty"),
    ],
)
def test_parse_grid_errors(text: str, message: str) -> None:
    with pytest.raises(SweepError, match=message.replace("[", r"\[")):
        parse_grid(text)


# ------------------------------------------------------------------------------------ plans


def base_raw(tmp_path: Path, uri: str | None, project: str = "rcx-sweep-tests") -> dict[str, Any]:
    return sweep_mod.base_from_sources(
        "grpo-multi-rs",
        None,
        [
            f"trainer.project_name={project}",
            'trainer.logger=["mlflow"]' if uri else 'trainer.logger=["console"]',
            *([f"trainer.tracking_uri={uri}"] if uri else []),
        ],
    )


def test_plan_is_the_cartesian_product_with_own_run_names_and_folders(tmp_path: Path) -> None:
    axes = [parse_grid(f"{IS_AXIS}=1.5,3.0"), parse_grid(f'{RS_AXIS}=["0.6_1.6,2.5","2.0"]')]
    plan = plan_sweep(base_raw(tmp_path, None), axes, name="thr", out_dir=tmp_path / "s")
    assert [t.name for t in plan.trials] == ["t00", "t01", "t02", "t03"]
    assert [(t.params[IS_AXIS], t.params[RS_AXIS]) for t in plan.trials] == [
        (1.5, "0.6_1.6,2.5"),
        (1.5, "2.0"),
        (3.0, "0.6_1.6,2.5"),
        (3.0, "2.0"),
    ]
    cfgs = [t.report.config for t in plan.trials]
    assert [c.trainer.experiment_name for c in cfgs] == [f"thr-t0{i}" for i in range(4)]
    assert len({c.trainer.default_local_dir for c in cfgs}) == 4
    assert cfgs[3].algorithm.rollout_correction.rollout_rs_threshold == "2.0"
    assert cfgs[3].algorithm.rollout_correction.rollout_rs == "token_k1,seq_max_k2"  # preset
    assert not invalid_trials(plan)


def test_invalid_trials_carry_the_validator_findings(tmp_path: Path) -> None:
    axes = [
        parse_grid(f"{IS_AXIS}=1.0,2.0"),
        parse_grid(f'{RS_AXIS}=["0.6_1.6,2.5", "0.6_1.6,0.5_2.5"]'),
    ]
    plan = plan_sweep(base_raw(tmp_path, None), axes, name="bad", out_dir=tmp_path / "s")
    bad = {t.name: sorted({f.code for f in t.report.errors}) for t in invalid_trials(plan)}
    # t00: cap 1.0 (E005); t01: cap 1.0 and 'L_U' for seq_max_k2 ('_' on a k2 entry, E004);
    # t03: the same E004; t02 is valid.
    assert bad == {"t00": ["RCX-E005"], "t01": ["RCX-E004", "RCX-E005"], "t03": ["RCX-E004"]}
    with pytest.raises(SweepError, match="invalid trial"):
        run_sweep(plan, trial_fn=succeed)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        ([], "no grid given"),
        ([GridAxis("a.b", (1,)), GridAxis("a.b", (2,))], "given twice"),
        ([GridAxis("trainer.experiment_name", ("x",))], "set per trial by the sweep"),
    ],
)
def test_bad_axes(tmp_path: Path, axes: list[GridAxis], message: str) -> None:
    with pytest.raises(SweepError, match=message):
        plan_sweep({}, axes, name="x", out_dir=tmp_path)


def test_sweep_file(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("trainer:\n  total_training_steps: 7\n")
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: thr\npreset: grpo-multi-rs\nconfig: base.yaml\n"
        "base:\n  data:\n    train_batch_size: 16\n"
        "overrides: ['trainer.seed=5']\n"
        f"grid:\n  {RS_AXIS}: ['0.6_1.6,2.5', 0.5_2]\n  {IS_AXIS}: [1.5, 2]\n"
        "metric: reward/mean\nmode: min\n"
    )
    sf = read_sweep_file(path)
    assert (sf.name, sf.metric, sf.mode) == ("thr", "reward/mean", "min")
    assert sf.axes[0].values == ("0.6_1.6,2.5", "0.5_2")
    raw = sweep_mod.base_from_sources(None, None, ["trainer.seed=9"], sf)
    assert raw["trainer"]["total_training_steps"] == 7  # config file over preset (100)
    assert raw["trainer"]["seed"] == 9  # CLI over the file's overrides (5)
    assert raw["data"]["train_batch_size"] == 16
    assert raw["algorithm"]["rollout_correction"]["rollout_rs"] == "token_k1,seq_max_k2"
    path.write_text("grid: {a.b: [1]}\nmetrics: x\n")
    with pytest.raises(SweepError, match="unknown key\\(s\\) metrics"):
        read_sweep_file(path)


def test_rank_trials_by_mode_and_missing_metric(tmp_path: Path) -> None:
    plan = plan_sweep(
        base_raw(tmp_path, None), [parse_grid(f"{IS_AXIS}=1.5,2,3,4")], name="r", out_dir=tmp_path
    )
    results = {
        "t00": TrialResult("t00", "FINISHED", history={"m": [(1, 9.0), (2, 0.2)]}),
        "t01": TrialResult("t01", "FINISHED", history={"m": [(2, 0.7), (1, 0.1)]}),
        "t02": TrialResult("t02", "FAILED", history={"m": [(1, 5.0)]}, error="x"),
        "t03": TrialResult("t03", "FINISHED", final={"other": 1.0}),
    }
    ranked = rank_trials(plan.trials, results, "m", "max")
    assert [(r.rank, r.trial.name, r.value) for r in ranked] == [
        (1, "t01", 0.7),  # the value at the last step, not the best or the last logged
        (2, "t00", 0.2),
        (None, "t02", 5.0),  # failed trials are not ranked
        (None, "t03", None),
    ]
    assert [r.trial.name for r in rank_trials(plan.trials, results, "m", "min")][:2] == [
        "t00",
        "t01",
    ]


# -------------------------------------------------------------------- orchestration (MLflow)


def succeed(spec: TrialSpec) -> TrialResult:
    """A trial that logs like the trainer: a child run with val/reward_mean at steps 0 and 2."""
    from rcx.store.tracking import open_tracker

    cfg = spec.config
    rc = cfg.algorithm.rollout_correction
    if rc.rollout_is_threshold == 3.0 and rc.rollout_rs_threshold == "2.0":
        raise RuntimeError("custom reward exploded")
    tracker = open_tracker(
        logger=cfg.trainer.logger,
        project_name=cfg.trainer.project_name,
        experiment_name=cfg.trainer.experiment_name,
        tracking_uri=cfg.trainer.tracking_uri,
        parent_run_id=spec.parent_run_id,
        resume_run_id=_run_ids.get(spec.run_name),  # as the trainer resumes from a checkpoint
    )
    _run_ids[spec.run_name] = tracker.run_id
    final = 1.0 / rc.rollout_is_threshold + (0.1 if rc.rollout_rs_threshold == "2.0" else 0.0)
    history = {"val/reward_mean": [(0, 0.1), (2, final)]}
    for step, value in history["val/reward_mean"]:
        tracker.log_metrics({"val/reward_mean": value}, step=step)
    tracker.finish("FINISHED")
    return TrialResult(spec.name, "FINISHED", run_id=tracker.run_id, history=history)


def runs_of(uri: str, parent_id: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    return {"parent": parent, **{r.info.run_name: r for r in children}}


def two_by_two(tmp_path: Path, uri: str, name: str):
    axes = [parse_grid(f"{IS_AXIS}=1.5,3.0"), parse_grid(f'{RS_AXIS}=["0.6_1.6,2.5", "2.0"]')]
    return plan_sweep(base_raw(tmp_path, uri), axes, name=name, out_dir=tmp_path / name)


def test_sweep_records_parent_children_failure_ranking_and_plot(
    tmp_path: Path, mlflow_uri: str, run_name: str
) -> None:
    plan = two_by_two(tmp_path, mlflow_uri, run_name)
    events: list[str] = []
    outcome = run_sweep(plan, trial_fn=succeed, on_event=events.append)
    assert {n: r.status for n, r in outcome.results.items()} == {
        "t00": "FINISHED",
        "t01": "FINISHED",
        "t02": "FINISHED",
        "t03": "FAILED",  # raised; the others went on
    }
    assert "custom reward exploded" in outcome.results["t03"].error
    runs = runs_of(mlflow_uri, outcome.parent_run_id)
    assert set(runs) == {"parent", *(f"{run_name}-t0{i}" for i in range(4))}
    assert runs["parent"].info.status == "FINISHED"
    assert runs["parent"].data.tags["rcx.sweep.failed_trials"] == "1"
    failed = runs[f"{run_name}-t03"]  # created by the sweep: the trial died before its run
    assert failed.info.status == "FAILED"
    assert "custom reward exploded" in failed.data.tags["rcx.error"]
    assert runs[f"{run_name}-t00"].info.status == "FINISHED"

    ranked = rank_trials(plan.trials, outcome.results, "val/reward_mean", "max")
    assert [r.trial.name for r in ranked] == ["t01", "t00", "t02", "t03"]
    assert outcome.plot is not None and outcome.plot.read_bytes()[:4] == b"\x89PNG"
    from mlflow.tracking import MlflowClient

    artifacts = [
        a.path for a in MlflowClient(tracking_uri=mlflow_uri).list_artifacts(outcome.parent_run_id)
    ]
    assert {"val_reward_mean.png", "ranking.txt"} <= set(artifacts)
    state = json.loads((plan.out_dir / "sweep.json").read_text())
    assert state["parent_run_id"] == outcome.parent_run_id
    assert [t["status"] for t in state["trials"].values()] == ["FINISHED"] * 3 + ["FAILED"]
    assert any("t03 FAILED" in e for e in events)


_calls: list[str] = []
_run_ids: dict[str, str] = {}  # run name -> MLflow run id, like the trainer's checkpoints


def interrupt_at_t02(spec: TrialSpec) -> TrialResult:
    """t02 is interrupted as the trainer reports Ctrl-C: its run KILLED, a KILLED result."""
    _calls.append(spec.name)
    if spec.name != "t02":
        return succeed(spec)
    from rcx.store.tracking import open_tracker

    cfg = spec.config
    tracker = open_tracker(
        logger=cfg.trainer.logger,
        project_name=cfg.trainer.project_name,
        experiment_name=cfg.trainer.experiment_name,
        tracking_uri=cfg.trainer.tracking_uri,
        parent_run_id=spec.parent_run_id,
    )
    _run_ids[spec.run_name] = tracker.run_id
    tracker.finish("KILLED")
    return TrialResult(spec.name, "KILLED", run_id=tracker.run_id, error="training ended KILLED")


def counting(spec: TrialSpec) -> TrialResult:
    _calls.append(spec.name)
    if spec.name == "t03":
        return TrialResult(spec.name, "FINISHED", history={"val/reward_mean": [(2, 0.0)]})
    return succeed(spec)


def test_ctrl_c_keeps_finished_trials_and_resume_skips_them(
    tmp_path: Path, mlflow_uri: str, run_name: str
) -> None:
    plan = two_by_two(tmp_path, mlflow_uri, run_name)
    _calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, trial_fn=interrupt_at_t02)
    assert _calls == ["t00", "t01", "t02"]  # t03 never started
    state = json.loads((plan.out_dir / "sweep.json").read_text())
    statuses = [t["status"] for t in state["trials"].values()]
    assert statuses == ["FINISHED", "FINISHED", "KILLED", "PENDING"]
    parent_id = state["parent_run_id"]
    runs = runs_of(mlflow_uri, parent_id)
    assert runs["parent"].info.status == "KILLED"
    killed = runs[f"{run_name}-t02"]
    assert killed.info.status == "KILLED"
    assert killed.data.tags["rcx.error"] == "training ended KILLED"

    with pytest.raises(SweepError, match="pass --resume"):
        run_sweep(plan, trial_fn=counting)
    _calls.clear()
    events: list[str] = []
    outcome = run_sweep(plan, trial_fn=counting, resume=True, on_event=events.append)
    assert _calls == ["t02", "t03"]  # t00, t01 not rerun
    assert "t00 already FINISHED, not rerun" in events
    assert outcome.parent_run_id == parent_id  # the same parent run, reopened
    assert [outcome.results[f"t0{i}"].status for i in range(4)] == ["FINISHED"] * 4
    runs = runs_of(mlflow_uri, parent_id)
    assert runs["parent"].info.status == "FINISHED"
    assert len(runs) == 1 + 3  # t03 of `counting` logs no run of its own
    resumed = runs[f"{run_name}-t02"]  # the same run, continued and finished
    assert resumed.info.run_id == killed.info.run_id
    assert resumed.info.status == "FINISHED"
    assert "rcx.error" not in resumed.data.tags

    changed = plan_sweep(
        base_raw(tmp_path, mlflow_uri),
        [parse_grid(f"{IS_AXIS}=1.5,5.0"), parse_grid(f'{RS_AXIS}=["0.6_1.6,2.5", "2.0"]')],
        name=run_name,
        out_dir=plan.out_dir,
    )
    with pytest.raises(SweepError, match="different grid"):
        run_sweep(changed, trial_fn=counting, resume=True)


# ------------------------------------------------------------------------ processes and Ray


def quick(spec: TrialSpec) -> TrialResult:
    """No MLflow: a result that says which process ran it; trial t01 crashes its process."""
    if spec.name == "t01":
        os._exit(3)
    if spec.name == "t02":
        raise ValueError("bad trial")
    return TrialResult(spec.name, "FINISHED", final={"pid": float(os.getpid())})


def test_parallel_processes_isolate_crashes_and_failures(tmp_path: Path) -> None:
    plan = plan_sweep(
        base_raw(tmp_path, None), [parse_grid(f"{IS_AXIS}=1.5,2,3,4")], name="p", out_dir=tmp_path
    )
    results: dict[str, TrialResult] = {}
    specs = [sweep_mod._spec(plan, t, None) for t in plan.trials]
    run_in_processes(
        specs, quick, 2, tmp_path, lambda r: results.__setitem__(r.name, r), lambda e: None
    )
    assert {n: r.status for n, r in sorted(results.items())} == {
        "t00": "FINISHED",
        "t01": "FAILED",
        "t02": "FAILED",
        "t03": "FINISHED",
    }
    assert "exited with code 3" in results["t01"].error
    assert "ValueError: bad trial" in results["t02"].error
    pids = {results["t00"].final["pid"], results["t03"].final["pid"], float(os.getpid())}
    assert len(pids) == 3  # each trial in its own process, none in this one


def killed_first(spec: TrialSpec) -> TrialResult:
    """t00 reports what the trainer reports after Ctrl-C; the others take a moment."""
    import time

    if spec.name == "t00":
        return TrialResult(spec.name, "KILLED", error="training ended KILLED at step 3")
    time.sleep(1.0)
    return TrialResult(spec.name, "FINISHED")


def test_a_killed_trial_in_a_process_stops_the_sweep(tmp_path: Path) -> None:
    plan = plan_sweep(
        base_raw(tmp_path, None), [parse_grid(f"{IS_AXIS}=1.5,2,3,4")], name="k", out_dir=tmp_path
    )
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan, trial_fn=killed_first, parallel=2)
    state = json.loads((tmp_path / "sweep.json").read_text())
    # t01 ran alongside t00 and was awaited; t02 and t03 never started.
    assert [t["status"] for t in state["trials"].values()] == [
        "KILLED",
        "FINISHED",
        "PENDING",
        "PENDING",
    ]


class FakeRef:
    """An object ref (hashable by identity, like Ray's)."""

    def __init__(self, kind: str, value: Any) -> None:
        self.kind, self.value = kind, value


class FakeRay(types.ModuleType):
    """Just enough of Ray's API: tasks run at submission; ``get`` re-raises a task's error."""

    def __init__(self) -> None:
        super().__init__("ray")
        self.inits: list[dict[str, Any]] = []
        self.options_seen: list[dict[str, Any]] = []

    def init(self, **kwargs: Any) -> None:
        self.inits.append(kwargs)

    def remote(self, fn: Any) -> Any:
        ray = self

        class Remote:
            def options(self, **opts: Any) -> Any:
                ray.options_seen.append(opts)
                return self

            def remote(self, *args: Any) -> Any:
                try:
                    return FakeRef("ok", fn(*args))
                except BaseException as exc:  # noqa: BLE001
                    return FakeRef("err", exc)

        return Remote()

    def wait(self, refs: list[Any], num_returns: int = 1) -> tuple[list[Any], list[Any]]:
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref: FakeRef) -> Any:
        if ref.kind == "err":
            raise RuntimeError(f"worker died: {ref.value!r}")
        return ref.value

    def cancel(self, ref: Any, force: bool = False) -> None:
        pass

    def get_runtime_context(self) -> Any:
        return types.SimpleNamespace(get_task_id=lambda: "fake-task")


def crash_in_ray(spec: TrialSpec) -> TrialResult:
    if spec.name == "t01":
        raise SystemExit(1)  # not an Exception: escapes call_trial like a dying worker
    return TrialResult(spec.name, "FINISHED")


def test_ray_executor_submits_each_trial_with_its_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    plan = plan_sweep(
        base_raw(tmp_path, None),
        [parse_grid("trainer.device=cpu,cuda")],
        name="ray",
        out_dir=tmp_path / "ray",
    )
    recorded: list[TrialResult] = []
    specs = [sweep_mod._spec(plan, t, None) for t in plan.trials]
    run_on_ray(specs, crash_in_ray, "ray://head:10001", recorded.append)
    assert fake.inits == [{"address": "ray://head:10001", "ignore_reinit_error": True}]
    assert fake.options_seen == [
        {"num_cpus": 1.0, "num_gpus": 0.0},
        {"num_cpus": 1.0, "num_gpus": 1.0},
    ]
    assert [(r.name, r.status) for r in recorded] == [("t00", "FINISHED"), ("t01", "FAILED")]
    assert "Ray task failed" in recorded[1].error
    assert recorded[0].worker.startswith("ray task fake-task on ")


def test_ray_missing_is_a_clear_error_before_anything_is_created(
    tmp_path: Path, mlflow_uri: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without Ray: one clear message naming the extra, and no sweep folder, state file or
    MLflow parent run left behind."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(SweepError, match="pip install 'rcx\\[ray\\]'"):
        sweep_mod.import_ray()
    result = sweep_cli(
        tmp_path / "s",
        f"trainer.tracking_uri={mlflow_uri}",
        "--grid",
        f"{IS_AXIS}=1.5,2.0",
        "--executor",
        "ray",
        "--name",
        run_name,
    )
    assert result.exit_code == 1
    assert "Ray, which is not installed" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()
    assert MlflowClient(tracking_uri=mlflow_uri).get_experiment_by_name(run_name) is None


def test_ray_resources_follow_the_trial_config(tmp_path: Path) -> None:
    from rcx.config import load_config

    cfg = load_config(overrides=["trainer.num_threads=4", "trainer.device=cuda"])
    assert ray_resources(cfg) == {"num_cpus": 4.0, "num_gpus": 1.0}
    assert ray_resources(load_config()) == {"num_cpus": 1.0, "num_gpus": 0.0}


#: The driver of the real-Ray test, run as ``python -c DRIVER rcx-args...``: it starts a local
#: Ray instance (2 CPUs, no dashboard; RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in its environment
#: keeps every Ray process on 127.0.0.1), runs the rcx command line against it (the executor
#: joins the running instance), stops Ray, and prints what the test checks.
RAY_DRIVER = """
import json, os, sys
import ray
ctx = ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
info = {"node_ip": ctx.address_info["node_ip_address"], "session": ctx.address_info["session_dir"]}
info["pid"] = os.getpid()
try:
    from rcx.cli import app
    try:
        app(args=sys.argv[1:], prog_name="rcx")
    except SystemExit as exc:
        info["exit"] = exc.code
finally:
    ray.shutdown()
print("RAY-DRIVER " + json.dumps(info))
"""


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_text(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.slow
def test_real_ray_sweep_trains_two_trials_in_ray_workers(
    tiny_config: Any, tmp_path: Path, mlflow_uri: str, run_name: str
) -> None:
    """``rcx sweep --executor ray`` against a real local Ray instance on 127.0.0.1: both trials
    (2 training steps each) run as Ray tasks in worker processes, their MLflow runs are FINISHED
    and nested under the sweep's parent run, and Ray's processes are gone afterwards."""
    import subprocess

    base = tiny_base_file(tiny_config, tmp_path)
    repo = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Linux too: bind to 127.0.0.1, not the LAN IP
        "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p),
    }
    args = ["sweep", str(base), "--grid", f"{IS_AXIS}=1.5,3.0", "--executor", "ray"]
    args += ["--name", run_name, "--out", str(tmp_path / "sweep")]
    proc = subprocess.run(
        [sys.executable, "-c", RAY_DRIVER, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RAY-DRIVER ")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads(lines[-1].removeprefix("RAY-DRIVER "))
    assert info["exit"] == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert info["node_ip"] == "127.0.0.1"

    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    trials = state["trials"]
    assert [t["status"] for t in trials.values()] == ["FINISHED", "FINISHED"]
    for t in trials.values():
        worker = t["result"]["worker"]  # "ray task <id> on host:pid"
        assert worker.startswith("ray task ") and " None " not in worker, worker
        assert int(worker.rsplit(":", 1)[1]) != info["pid"]  # a Ray worker, not the driver
    runs = runs_of(mlflow_uri, state["parent_run_id"])  # children: tags.mlflow.parentRunId
    assert set(runs) == {"parent", f"{run_name}-t00", f"{run_name}-t01"}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    for name in ("t00", "t01"):
        child = runs[f"{run_name}-{name}"]
        assert child.info.run_id == trials[name]["result"]["run_id"]
        assert "val/reward_mean" in child.data.metrics

    # ray.shutdown() stopped the instance the driver started: no process of its session is left.
    session = Path(info["session"]).name
    for _ in range(50):
        if not processes_mentioning(session):
            break
        time.sleep(0.2)
    assert processes_mentioning(session) == []


def quick_ok(spec: TrialSpec) -> TrialResult:
    return TrialResult(spec.name, "FINISHED", final={"val/reward_mean": 1.0})


# ------------------------------------------------------------------------------------- CLI


def sweep_cli(out: Path, *args: str) -> Any:
    """``rcx sweep --preset grpo-multi-rs ARGS --out OUT``, run in process."""
    return CliRunner().invoke(app, ["sweep", "--preset", "grpo-multi-rs", *args, "--out", str(out)])


def test_cli_dry_run_lists_trials_and_starts_nothing(tmp_path: Path) -> None:
    result = sweep_cli(
        tmp_path / "s",
        "--grid",
        f"{IS_AXIS}=1.5,3.0",
        "--grid",
        f'{RS_AXIS}=["0.6_1.6,2.5","0.5_2.0,3.0"]',
        "--dry-run",
    )
    assert result.exit_code == 0, result.output
    assert "4 trials" in result.output
    assert "0.5_2.0,3.0" in result.output
    assert "dry run: 4 valid trials" in result.output
    assert not (tmp_path / "s").exists()


def test_cli_invalid_grid_value_aborts_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(sweep_mod, "run_trainer_trial", lambda spec: ran.append(spec.name))
    result = sweep_cli(
        tmp_path / "s",
        "--grid",
        f"{IS_AXIS}=2.0,0.9",
    )
    assert result.exit_code == 1
    assert "t01 is invalid" in result.output
    assert "RCX-E005" in result.output
    assert "nothing was started" in result.output
    assert ran == [] and not (tmp_path / "s").exists()
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid", "nokey"], "expected KEY=V1,V2"),
        ([], "no grid given"),
        (["--grid", "algorithm.rollout_corection.rollout_is=token"], "RCX-E001"),
        (["--sweep", "missing.yaml"], "cannot read config file"),
        (["--grid", f"{IS_AXIS}=2", "--preset", "nope"], "no preset 'nope'"),
    ],
)
def test_cli_bad_input_is_one_clear_message(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["sweep", "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_sweep_with_injected_trials_prints_the_ranking(
    tmp_path: Path, mlflow_uri: str, run_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sweep_mod, "run_trainer_trial", succeed)
    result = sweep_cli(
        tmp_path / "s",
        'trainer.logger=["mlflow"]',
        f"trainer.tracking_uri={mlflow_uri}",
        "--grid",
        f"{IS_AXIS}=1.5,3.0",
        "--grid",
        f'{RS_AXIS}=["0.6_1.6,2.5", "2.0"]',
        "--name",
        run_name,
    )
    assert result.exit_code == 1  # one trial failed
    assert "ranked by val/reward_mean (max)" in result.output
    assert "custom reward exploded" in result.output
    lines = [ln for ln in result.output.splitlines() if "FINISHED" in ln or "FAILED" in ln]
    assert [ln.split()[1:3] for ln in lines if ln.startswith("│")][:1] == [["1", "│"]]
    assert (tmp_path / "s" / "ranking.txt").read_text().splitlines()[1].split()[:2] == [
        "1",
        "t01",
    ]


# ------------------------------------------------------------------- with the real trainer


def tiny_base_file(tiny_config: Any, tmp_path: Path, *overrides: str) -> Path:
    """The conftest's shrunk grpo-multi-rs config (2 steps, CPU), written as a config file."""
    from rcx.config.yamlio import dump_yaml

    cfg = tiny_config("grpo-multi-rs", *overrides)
    path = tmp_path / "base.yaml"
    path.write_text(dump_yaml(cfg.model_dump(mode="json")))
    return path


def test_trainer_sweep_2x2_on_the_embedded_default(
    tiny_config: Any, tmp_path: Path, mlflow_uri: str, run_name: str
) -> None:
    base = tiny_base_file(tiny_config, tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            str(base),
            "--grid",
            f"{IS_AXIS}=1.5,3.0",
            "--grid",
            f'{RS_AXIS}=["0.6_1.6,2.5","0.5_2.0,3.0"]',
            "--name",
            run_name,
            "--out",
            str(tmp_path / "sweep"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ranked by val/reward_mean (max)" in result.output
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    runs = runs_of(mlflow_uri, state["parent_run_id"])
    assert set(runs) == {"parent", *(f"{run_name}-t0{i}" for i in range(4))}
    assert {r.info.status for r in runs.values()} == {"FINISHED"}
    child = runs[f"{run_name}-t03"]
    assert child.data.params[RS_AXIS] == "0.5_2.0,3.0"
    assert child.data.params[IS_AXIS] == "3.0"
    assert "val/reward_mean" in child.data.metrics
    assert "rollout_corr/rollout_rs_masked_fraction" in child.data.metrics
    ranking = (tmp_path / "sweep" / "ranking.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in ranking[1:]] == ["1", "2", "3", "4"]
    assert (tmp_path / "sweep" / "val_reward_mean.png").is_file()


BAD_REWARD = """
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    raise RuntimeError("this reward always fails")
"""


def test_trainer_sweep_failing_trial_then_resume_skips_the_finished_one(
    tiny_config: Any, tmp_path: Path, mlflow_uri: str, run_name: str
) -> None:
    base = tiny_base_file(tiny_config, tmp_path)
    bad = tmp_path / "bad_reward.py"
    bad.write_text(BAD_REWARD)
    good = tmp_path / "length_reward.py"  # written by the tiny_config fixture
    args = [
        "sweep",
        str(base),
        "--grid",
        f"custom_reward_function.path={good},{bad}",
        "--name",
        run_name,
        "--out",
        str(tmp_path / "sweep"),
    ]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    state = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [t["status"] for t in state["trials"].values()] == ["FINISHED", "FAILED"]
    runs = runs_of(mlflow_uri, state["parent_run_id"])
    assert runs[f"{run_name}-t00"].info.status == "FINISHED"
    failed = runs[f"{run_name}-t01"]
    assert failed.info.status == "FAILED"
    assert "this reward always fails" in failed.data.tags["rcx.error"]

    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 1, again.output
    assert "t00 already FINISHED, not rerun" in again.output
    assert "t00 started" not in again.output
    assert "t01 started" in again.output
    resumed = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert resumed["parent_run_id"] == state["parent_run_id"]
    assert resumed["trials"]["t00"]["result"] == state["trials"]["t00"]["result"]


def test_cli_sweep_file_dry_run(tmp_path: Path) -> None:
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "name: from-file\npreset: grpo-multi-rs\n"
        f"grid:\n  {RS_AXIS}: ['0.6_1.6,2.5', '0.5_2,3.0', '0.7_1.4,5']\n"
        "metric: reward/mean\nmode: min\n"
    )
    result = CliRunner().invoke(
        app,
        ["sweep", "--sweep", str(path), "--grid", f"{IS_AXIS}=1.5,2", "--dry-run"],
    )
    assert result.exit_code == 0, result.output
    assert "sweep from-file: 6 trials" in result.output
    assert "0.5_2,3.0" in result.output and "0.7_1.4,5" in result.output
    assert "dry run: 6 valid trials" in result.output


def test_a_sweep_file_name_that_is_not_a_string_is_a_clear_error(tmp_path: Path) -> None:
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text("name: [1]\npreset: grpo-rs-only\ngrid:\n  trainer.seed: [1, 2]\n")
    with pytest.raises(SweepError, match=r"'name' must be a string, got list \[1\]"):
        sweep_mod.read_sweep_file(sweep_file)


def test_ray_executor_without_ray_fails_before_anything_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ray" else real_find_spec(name, *a),
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "sweep",
            "--preset",
            "grpo-rs-only",
            "--grid",
            "trainer.seed=1,2",
            "--executor",
            "ray",
            "--name",
            "noray",
            "trainer.tracking_uri=sqlite:///" + str(tmp_path / "mlflow.db"),
        ],
    )
    assert result.exit_code == 1, result.output
    assert "pip install 'rcx[ray]'" in " ".join(result.output.split())
    assert not (tmp_path / "sweeps").exists() and not (tmp_path / "mlflow.db").exists()
