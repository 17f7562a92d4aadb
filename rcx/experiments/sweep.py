"""Sweeps: a grid of configs, each trial a full training run, one MLflow parent run.

The pieces, in the order a sweep uses them::

    axes = [parse_grid("algorithm.rollout_correction.rollout_is_threshold=1.5,2.0"), ...]
    plan = plan_sweep(base_raw, axes, name="thr", out_dir=Path("sweeps/thr"))  # cartesian product
    bad = invalid_trials(plan)          # every trial validated before anything runs
    outcome = run_sweep(plan, trial_fn=run_trainer_trial, parallel=1)
    ranked = rank_trials(plan.trials, outcome.results, plan.metric, plan.mode)  # the table

Contracts:

* **Grid values.** ``KEY=V1,V2`` splits on commas; ``KEY=[...]`` is a YAML list, for values that
  contain commas themselves (threshold lists such as ``"0.6_1.6,2.5"``). Each value is read as an
  override value would be (:func:`rcx.config.loading.parse_override`), so threshold strings stay
  exactly as typed: ``0.5_2`` is L=0.5, U=2, never 0.52 — in a YAML list too.
* **Trials.** One per point of the cartesian product, in the order the axes were given (the last
  axis varies fastest), named ``t00``, ``t01``, ...; each gets its own MLflow run name
  (``<sweep>-t00``) and checkpoint folder (``<root>/t00``).
* **State.** ``<out_dir>/sweep.json`` records every trial's status, run id, final metrics and the
  curve of the ranking metric; it is rewritten atomically after each trial. Resuming a sweep
  (same name and grid) reruns only trials that are not ``FINISHED``.
* **Failures.** A trial that raises is recorded ``FAILED`` (in the state file and as a FAILED
  child run carrying the error in the tag ``rcx.error`` and the artifact ``error.txt``); the
  others go on. Ctrl-C (or a trial reporting ``KILLED``: the trainer caught Ctrl-C and saved a
  checkpoint) starts no further trial, marks running trials ``KILLED``, the parent run
  ``KILLED``, keeps every finished trial, and re-raises ``KeyboardInterrupt``. On resume, a
  KILLED trial continues from its checkpoint in the same MLflow run (the trainer's
  ``resume_mode: auto``).
* **Executors.** ``local`` runs trials one after another in this process (``parallel=1``) or in
  N spawned processes; ``ray`` submits each trial as a task to an existing Ray cluster. Ray is an
  optional extra: it is imported only when asked for.

The trial function is injectable (``trial_fn(spec) -> TrialResult``), so orchestration is tested
without training; the default, :func:`run_trainer_trial`, calls :func:`rcx.train.trainer.train`.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rcx.algos.modes import update_plan
from rcx.config.findings import RC
from rcx.config.loading import (
    ConfigError,
    ValidationReport,
    deep_merge,
    get_dotted,
    is_verbatim_key,
    merge_sources,
    parse_override,
    read_config_file,
    set_dotted,
    validate_raw,
)
from rcx.config.yamlio import Yaml12Loader, load_yaml
from rcx.errors import RcxError
from rcx.experiments.runs import final_value

#: The metric a sweep is ranked by unless ``--metric`` says otherwise: the last validation reward.
DEFAULT_METRIC = "val/reward_mean"
STATE_FILE = "sweep.json"
STATE_FORMAT = 1
TrialStatus = Literal["PENDING", "RUNNING", "FINISHED", "FAILED", "KILLED"]
Mode = Literal["max", "min"]
#: Keys a sweep sets per trial itself; a grid over them would make trials collide.
RESERVED_KEYS = ("trainer.experiment_name", "trainer.default_local_dir")
#: Keys allowed at the top of a ``--sweep`` file.
SWEEP_FILE_KEYS = ("name", "preset", "config", "base", "overrides", "grid", "metric", "mode")


class SweepError(RcxError, ValueError):
    """A sweep cannot start or continue; the message says what was wrong and what is accepted."""


# ------------------------------------------------------------------------------------- grid ---


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid`` entry: a dotted config key and the values it takes, in order."""

    key: str
    values: tuple[Any, ...]


def parse_grid(text: str) -> GridAxis:
    """``KEY=V1,V2,...`` or ``KEY=[V1, V2, ...]`` (a YAML list) -> :class:`GridAxis`.

    Raises :class:`SweepError` for a missing ``=``, an empty key, an empty value or list, or a
    malformed YAML list.
    """
    key, sep, rest = text.partition("=")
    key, rest = key.strip(), rest.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SweepError(
            f"--grid {text!r}: expected KEY=V1,V2,... with a dotted key, e.g. "
            f"algorithm.rollout_correction.rollout_is_threshold=1.5,2.0"
        )
    if not rest:
        raise SweepError(f"--grid {key}: no values given; write {key}=V1,V2,...")
    if rest.startswith("["):
        return GridAxis(key, tuple(_yaml_list_values(key, rest)))
    parts = [p.strip() for p in rest.split(",")]
    if any(not p for p in parts):
        raise SweepError(
            f"--grid {key}={rest}: empty value (stray comma?); values that contain commas "
            f'themselves go in a YAML list: {key}=["0.6_1.6,2.5","0.5_2.0,3.0"]'
        )
    return GridAxis(key, tuple(parse_override(f"{key}={p}")[1] for p in parts))


def _yaml_list_values(key: str, text: str) -> list[Any]:
    """The items of a YAML flow list; threshold keys keep each item's text exactly as written."""
    try:
        node = yaml.compose(text, Loader=Yaml12Loader)
        items = load_yaml(text)
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise SweepError(f"--grid {key}={text}: not a valid YAML list ({first})") from None
    if not isinstance(items, list) or not isinstance(node, yaml.SequenceNode):
        raise SweepError(f"--grid {key}={text}: expected a YAML list such as [a, b]")
    if not items:
        raise SweepError(f"--grid {key}=[]: the list is empty; give at least one value")
    if not is_verbatim_key(key):
        return items
    out: list[Any] = []
    for item_node in node.value:
        if not isinstance(item_node, yaml.ScalarNode):
            raise SweepError(f"--grid {key}: each value must be a string, got {text}")
        out.append(parse_override(f"{key}={item_node.value}")[1])
    return out


def axes_from_mapping(grid: Mapping[str, Any], source: str) -> list[GridAxis]:
    """Axes from a sweep file's ``grid:`` mapping (``key: [v1, v2]`` or ``key: v``)."""
    if not isinstance(grid, Mapping) or not grid:
        raise SweepError(f"{source}: 'grid' must be a non-empty mapping of KEY: [values]")
    axes = []
    for key, values in grid.items():
        values = list(values) if isinstance(values, list) else [values]
        if not values:
            raise SweepError(f"{source}: grid key {key!r} has an empty list of values")
        if is_verbatim_key(str(key)):
            values = [v if v is None or isinstance(v, str) else str(v) for v in values]
        axes.append(GridAxis(str(key), tuple(values)))
    return axes


def check_axes(axes: Sequence[GridAxis]) -> None:
    """Refuse an empty grid, a key given twice, and keys the sweep sets per trial itself."""
    if not axes:
        raise SweepError("no grid given: add --grid KEY=V1,V2,... or a --sweep file with 'grid:'")
    seen: set[str] = set()
    for axis in axes:
        if axis.key in seen:
            raise SweepError(f"grid key {axis.key!r} is given twice; give all its values once")
        if axis.key in RESERVED_KEYS:
            raise SweepError(
                f"grid key {axis.key!r} is set per trial by the sweep (run name and checkpoint "
                f"folder); sweep other keys"
            )
        seen.add(axis.key)


def format_value(value: Any) -> str:
    """A grid value as the user would type it."""
    return value if isinstance(value, str) else json.dumps(value)


# ------------------------------------------------------------------------------------ plan ---


@dataclass
class Trial:
    """One point of the grid. ``raw`` is the full config tree the trial trains with."""

    index: int
    name: str
    params: dict[str, Any]
    raw: dict[str, Any]
    report: ValidationReport | None = None

    @property
    def label(self) -> str:
        """``rollout_is_threshold=1.5 rollout_rs_threshold=0.6_1.6,2.5`` (leaf keys)."""
        return " ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in self.params.items())


@dataclass
class SweepPlan:
    name: str
    out_dir: Path
    axes: list[GridAxis]
    base_raw: dict[str, Any]
    trials: list[Trial]
    metric: str = DEFAULT_METRIC
    mode: Mode = "max"


def plan_sweep(
    base_raw: Mapping[str, Any],
    axes: Sequence[GridAxis],
    *,
    name: str,
    out_dir: Path,
    metric: str = DEFAULT_METRIC,
    mode: Mode = "max",
) -> SweepPlan:
    """The cartesian product of ``axes`` over ``base_raw``, each trial validated.

    Every trial's run name is ``<name>-tNN`` and its checkpoint folder ``<root>/tNN`` where root is
    the base ``trainer.default_local_dir`` if set, else ``<out_dir>/checkpoints``.
    """
    check_axes(axes)
    if mode not in ("max", "min"):
        raise SweepError(f"--mode must be max or min, got {mode!r}")
    root = get_dotted(base_raw, "trainer.default_local_dir") or str(out_dir / "checkpoints")
    combos = list(itertools.product(*(axis.values for axis in axes)))
    width = max(2, len(str(len(combos) - 1)))
    trials = []
    for index, combo in enumerate(combos):
        short = f"t{index:0{width}d}"
        raw = copy.deepcopy(dict(base_raw))
        params = {axis.key: value for axis, value in zip(axes, combo, strict=True)}
        for key, value in params.items():
            set_dotted(raw, key, copy.deepcopy(value))
        set_dotted(raw, "trainer.experiment_name", f"{name}-{short}")
        set_dotted(raw, "trainer.default_local_dir", str(Path(root) / short))
        trial = Trial(index, short, params, raw)
        trial.report = validate_raw(raw)
        trials.append(trial)
    return SweepPlan(name, Path(out_dir), list(axes), dict(base_raw), trials, metric, mode)


def trial_configs(plan: SweepPlan) -> list[Any]:
    """Every trial's validated ``RcxConfig``, in order; empty when any trial is invalid."""
    configs = [t.report.config for t in plan.trials if t.report is not None and t.report.valid]
    return configs if len(configs) == len(plan.trials) else []


def inert_keys(cfg: Any) -> dict[str, str]:
    """Correction keys that cannot change training under ``cfg`` (an ``RcxConfig``), each with
    the reason, read from the update plan the trainer follows (:func:`rcx.algos.modes.update_plan`):

    * IS weights that do not enter the loss (metrics-only under bypass + ppo_clip, RCX-W002, or
      ``rollout_is`` null) make ``rollout_is_threshold`` and ``rollout_is_batch_normalize``
      inert, and, when metrics-only, ``rollout_is`` itself;
    * decoupled mode always uses PPO-clip, so ``loss_type`` is inert (RCX-W004);
    * with ``rollout_rs`` null, ``rollout_rs_threshold`` is inert (RCX-W011).

    The metrics of an inert key may still change; the weights the run trains do not.
    """
    rc = cfg.algorithm.rollout_correction
    plan = update_plan(rc.rollout_is, rc.bypass_mode, rc.loss_type)
    out: dict[str, str] = {}
    if plan.is_weights == "metrics_only":
        why = "under bypass + ppo_clip the IS weights are metrics-only (RCX-W002)"
        for key in ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize"):
            out[f"{RC}.{key}"] = why
    elif plan.is_weights == "off":
        for key in ("rollout_is_threshold", "rollout_is_batch_normalize"):
            out[f"{RC}.{key}"] = "rollout_is is null: there are no IS weights"
    if not plan.bypass:
        out[f"{RC}.loss_type"] = (
            "decoupled mode (bypass_mode=false) always uses ppo_clip (RCX-W004)"
        )
    if rc.rollout_rs is None:
        out[f"{RC}.rollout_rs_threshold"] = "rollout_rs is null: nothing is rejected (RCX-W011)"
    return out


def inert_axes(plan: SweepPlan) -> dict[str, str]:
    """Grid keys that cannot change training in any trial (:func:`inert_keys` of every valid
    trial's config), each with the first trial's reason. Empty when a trial is invalid."""
    configs = trial_configs(plan)
    if not configs:
        return {}
    per_trial = [inert_keys(cfg) for cfg in configs]
    return {
        axis.key: per_trial[0][axis.key]
        for axis in plan.axes
        if all(axis.key in inert for inert in per_trial)
    }


def mismatch_sources(cfg: Any) -> list[str]:
    """What makes pi_rollout differ from the policy the update scores, under ``cfg`` (an
    ``RcxConfig``): the rollout's precision, quantisation, staleness, truncation, temperature or
    engine, a CUDA trainer (bf16 autocast), and, in bypass mode, updates within a step (several
    mini-batches or epochs move pi_theta away from pi_rollout). Empty: every ratio is 1 up to
    rounding, so no correction setting has anything to act on."""
    arr = cfg.actor_rollout_ref
    rollout, actor = arr.rollout, arr.actor
    checks = {
        f"rollout.dtype={rollout.dtype}": rollout.dtype != "float32",
        f"rollout.quantization={rollout.quantization}": rollout.quantization != "none",
        f"rollout.weight_sync_interval={rollout.weight_sync_interval}": (
            rollout.weight_sync_interval > 1
        ),
        f"rollout.top_p={rollout.top_p}": rollout.top_p < 1.0,
        f"rollout.top_k={rollout.top_k}": rollout.top_k > 0,
        f"actor.temperature={actor.temperature}": (
            actor.temperature is not None and actor.temperature != rollout.temperature
        ),
        f"rollout.name={rollout.name}": rollout.name != "hf",
        f"trainer.device={cfg.trainer.device}": cfg.trainer.device == "cuda",
        "several updates per step in bypass mode": (
            cfg.algorithm.rollout_correction.bypass_mode
            and (actor.ppo_epochs > 1 or actor.ppo_mini_batch_size < cfg.data.train_batch_size)
        ),
    }
    return [source for source, present in checks.items() if present]


def unmatched_correction_axes(plan: SweepPlan) -> list[str]:
    """Grid keys under ``algorithm.rollout_correction`` when no valid trial has a mismatch
    source (:func:`mismatch_sources`): the correction then sees ratios of 1 in every trial.
    Empty when a trial is invalid or has a source."""
    configs = trial_configs(plan)
    if not configs or any(mismatch_sources(cfg) for cfg in configs):
        return []
    return [axis.key for axis in plan.axes if axis.key.startswith(f"{RC}.")]


def name_clash(plan: SweepPlan, resume: bool) -> str | None:
    """Why the sweep cannot start under this name (its folder holds a sweep already and
    ``resume`` is false), or None. :func:`run_sweep` refuses on the same condition."""
    if resume or load_state(plan.out_dir) is None:
        return None
    return (
        f"a sweep named {plan.name!r} already exists in {plan.out_dir}; pass --resume to "
        f"continue it (finished trials are kept) or choose another --name"
    )


def invalid_trials(plan: SweepPlan) -> list[Trial]:
    """Trials whose config has errors (their findings are in ``trial.report``)."""
    return [t for t in plan.trials if t.report is None or not t.report.valid]


@dataclass
class SweepFile:
    """The contents of a ``--sweep`` YAML file."""

    name: str | None = None
    preset: str | None = None
    config: Path | None = None
    base: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    axes: list[GridAxis] = field(default_factory=list)
    metric: str | None = None
    mode: Mode | None = None


def read_sweep_file(path: Path) -> SweepFile:
    """Read a sweep YAML::

        name: thr                      # optional; the sweep's name
        preset: grpo-multi-rs          # optional base preset
        config: base.yaml              # optional config file, relative to this file
        base: {trainer: {total_training_steps: 20}}   # optional inline config
        overrides: ["data.train_batch_size=16"]      # optional KEY=VALUE list
        grid:
          algorithm.rollout_correction.rollout_rs_threshold: ["0.6_1.6,2.5", "0.5_2.0,3.0"]
        metric: val/reward_mean        # optional
        mode: max                      # optional

    Raises :class:`SweepError` naming the file and the offending key.
    """
    try:
        data = read_config_file(path)
    except ConfigError as e:
        raise SweepError(f"--sweep {path}: {e.findings[0].message}") from None
    unknown = sorted(set(data) - set(SWEEP_FILE_KEYS))
    if unknown:
        raise SweepError(
            f"--sweep {path}: unknown key(s) {', '.join(unknown)}; accepted: "
            f"{', '.join(SWEEP_FILE_KEYS)} (config keys go under 'base:')"
        )
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError(f"--sweep {path}: 'base' must be a mapping of config keys")
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise SweepError(f"--sweep {path}: 'overrides' must be a list of KEY=VALUE strings")
    config = data.get("config")
    for key in ("name", "preset", "config", "metric"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise SweepError(
                f"--sweep {path}: {key!r} must be a string, got {type(data[key]).__name__} "
                f"{data[key]!r}"
            )
    mode = data.get("mode")
    if mode is not None and mode not in ("max", "min"):
        raise SweepError(f"--sweep {path}: mode must be max or min, got {mode!r}")
    return SweepFile(
        name=data.get("name"),
        preset=data.get("preset"),
        config=(path.parent / config) if config else None,
        base=base,
        overrides=overrides,
        axes=axes_from_mapping(data.get("grid") or {}, f"--sweep {path}") if "grid" in data else [],
        metric=data.get("metric"),
        mode=mode,
    )


def base_from_sources(
    preset: str | None,
    config_file: Path | None,
    overrides: Sequence[str],
    sweep_file: SweepFile | None = None,
) -> dict[str, Any]:
    """The base raw tree: sweep file (preset, config, base, overrides), then CLI sources.

    Raises :class:`rcx.config.ConfigError` for an unreadable preset, file or override.
    """
    sf = sweep_file or SweepFile()
    raw = merge_sources(sf.preset, sf.config, sf.overrides)
    raw = deep_merge(raw, sf.base)
    return deep_merge(raw, merge_sources(preset, config_file, list(overrides)))


# ----------------------------------------------------------------------------------- trials ---


@dataclass
class TrialSpec:
    """What a trial function receives (picklable: it crosses process and Ray boundaries)."""

    name: str
    index: int
    run_name: str
    params: dict[str, Any]
    config: Any  # rcx.config.RcxConfig
    parent_run_id: str | None
    metric: str


@dataclass
class TrialResult:
    """What a trial function returns. ``history`` maps metric -> [(step, value), ...]."""

    name: str
    status: TrialStatus
    run_id: str | None = None
    final: dict[str, float] = field(default_factory=dict)
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    worker: str | None = None  # where it ran: "host:pid", with the Ray task id under Ray

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["history"] = {k: [list(p) for p in v] for k, v in self.history.items()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrialResult:
        history = {k: [(int(s), float(v)) for s, v in pts] for k, pts in data["history"].items()}
        return cls(**{**data, "history": history})


TrialFn = Callable[[TrialSpec], TrialResult]


def call_trial(trial_fn: TrialFn, spec: TrialSpec) -> TrialResult:
    """Run one trial; any exception becomes a FAILED result carrying the error and traceback.

    ``KeyboardInterrupt`` is not caught: the sweep handles it.
    """
    start = time.perf_counter()
    try:
        result = trial_fn(spec)
    except Exception as exc:  # noqa: BLE001 - a failing trial must not stop the others
        tail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
        result = TrialResult(spec.name, "FAILED", error=f"{type(exc).__name__}: {exc}\n{tail}")
    result.name = spec.name
    result.seconds = result.seconds or round(time.perf_counter() - start, 3)
    result.worker = result.worker or f"{socket.gethostname()}:{os.getpid()}"
    return result


def run_trainer_trial(spec: TrialSpec) -> TrialResult:
    """The default trial: one :func:`rcx.train.trainer.train` run, nested under the sweep's parent run.

    The result carries the last value of every metric, the ranking metric's curve, the status
    (FINISHED, or KILLED after Ctrl-C) and the MLflow run id. An exception propagates: the sweep
    records it as FAILED (the trainer has already marked its own run FAILED).
    """
    from rcx.train.trainer import train  # lazy: torch is heavy

    out = train(
        spec.config,
        parent_run_id=spec.parent_run_id,
        tags={"rcx.sweep.trial": spec.name, "rcx.sweep.params": json.dumps(spec.params)[:4000]},
    )
    final = dict(out.metrics)
    for key, points in out.history.items():
        if points:
            final[key] = max(points)[1]  # the value at the last step it was logged
    # Only the ranking metric's curve is kept (the full history is in MLflow).
    history = {spec.metric: list(out.history.get(spec.metric, []))}
    error = None if out.status == "FINISHED" else f"training ended {out.status} at step {out.step}"
    return TrialResult(
        spec.name, out.status, run_id=out.run_id, final=final, history=history, error=error
    )


# ------------------------------------------------------------------------------------ state ---


def state_path(out_dir: Path) -> Path:
    return Path(out_dir) / STATE_FILE


def load_state(out_dir: Path) -> dict[str, Any] | None:
    """The saved state of a sweep, or None if it never started."""
    path = state_path(out_dir)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"{path} is not valid JSON ({e}); move it away to start afresh") from None


def save_state(out_dir: Path, state: Mapping[str, Any]) -> None:
    """Write the state atomically (a reader never sees half a file)."""
    path = state_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)


def new_state(plan: SweepPlan) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "name": plan.name,
        "parent_run_id": None,
        "metric": plan.metric,
        "mode": plan.mode,
        "trials": {
            t.name: {"params": _jsonable(t.params), "status": "PENDING", "result": None}
            for t in plan.trials
        },
    }


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(params), default=str))


def resume_state(plan: SweepPlan, state: Mapping[str, Any]) -> dict[str, Any]:
    """Check that a saved sweep has the same trials as ``plan``; return it for continuing."""
    saved = state.get("trials", {})
    planned = {t.name: _jsonable(t.params) for t in plan.trials}
    if {k: v["params"] for k, v in saved.items()} != planned:
        raise SweepError(
            f"sweep {plan.name!r} in {plan.out_dir} was started with a different grid; resume it "
            f"with the same grid, or choose another --name"
        )
    return dict(state)


def finished_results(state: Mapping[str, Any]) -> dict[str, TrialResult]:
    return {
        name: TrialResult.from_json(t["result"])
        for name, t in state["trials"].items()
        if t["status"] == "FINISHED" and t.get("result")
    }


# ------------------------------------------------------------------------------- execution ---


@dataclass
class SweepOutcome:
    plan: SweepPlan
    results: dict[str, TrialResult]
    parent_run_id: str | None
    interrupted: bool = False
    skipped: list[str] = field(default_factory=list)
    plot: Path | None = None


def run_sweep(
    plan: SweepPlan,
    *,
    trial_fn: TrialFn | None = None,
    parallel: int = 1,
    executor: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    resume: bool = False,
    on_event: Callable[[str], None] = lambda line: None,
) -> SweepOutcome:
    """Run every trial of a valid plan that has not finished yet; see the module docstring.

    ``trial_fn`` defaults to :func:`run_trainer_trial`. Raises :class:`SweepError` if a trial is
    invalid, if the sweep exists and ``resume`` is false,
    and re-raises ``KeyboardInterrupt`` after recording the interruption.
    """
    trial_fn = trial_fn or run_trainer_trial
    bad = invalid_trials(plan)
    if bad:
        raise SweepError(f"{len(bad)} invalid trial(s): {', '.join(t.name for t in bad)}")
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    if executor == "ray":
        require_ray()  # before the state file and the parent run exist
    clash = name_clash(plan, resume)
    if clash:
        raise SweepError(clash)
    saved = load_state(plan.out_dir)
    state = resume_state(plan, saved) if saved is not None else new_state(plan)
    results = finished_results(state)
    skipped = [t.name for t in plan.trials if t.name in results]
    for name in skipped:
        on_event(f"{name} already FINISHED, not rerun")

    base_cfg = plan.trials[0].report.config  # type: ignore[union-attr]
    parent = _open_parent(plan, base_cfg, state.get("parent_run_id"))
    state["parent_run_id"] = parent.run_id
    save_state(plan.out_dir, state)
    specs = [_spec(plan, t, parent.run_id) for t in plan.trials if t.name not in results]

    earlier = {name: t["status"] for name, t in state["trials"].items()}  # before this session

    def record(result: TrialResult) -> None:
        before = earlier[result.name]
        results[result.name] = result
        state["trials"][result.name].update(status=result.status, result=result.to_json())
        save_state(plan.out_dir, state)
        if result.status in ("FAILED", "KILLED") and parent.run_id:
            mark_child_run(parent, plan, result)
        elif before in ("FAILED", "KILLED") and parent.run_id and result.run_id:
            parent.delete_run_tag(result.run_id, "rcx.error")  # a resumed trial that now finished
        error = f": {result.error.splitlines()[0]}" if result.error else ""
        on_event(f"{result.name} {result.status} in {result.seconds:.1f}s{error}")

    outcome = SweepOutcome(plan, results, parent.run_id, skipped=skipped)
    try:
        if executor == "ray":
            run_on_ray(specs, trial_fn, ray_address, record)
        elif parallel == 1:
            for spec in specs:
                on_event(f"{spec.name} started: {_trial(plan, spec.name).label}")
                state["trials"][spec.name]["status"] = "RUNNING"
                save_state(plan.out_dir, state)
                result = call_trial(trial_fn, spec)
                record(result)
                if result.status == "KILLED":  # the trainer caught Ctrl-C and saved: stop here
                    raise KeyboardInterrupt
        else:
            run_in_processes(specs, trial_fn, parallel, plan.out_dir, record, on_event)
    except (KeyboardInterrupt, SystemExit):
        for t in state["trials"].values():
            if t["status"] == "RUNNING":
                t["status"] = "KILLED"
        save_state(plan.out_dir, state)
        parent.finish("KILLED")
        outcome.interrupted = True
        raise KeyboardInterrupt from None
    outcome.plot = finish_parent(plan, parent, results)
    return outcome


def _trial(plan: SweepPlan, name: str) -> Trial:
    return next(t for t in plan.trials if t.name == name)


def _spec(plan: SweepPlan, trial: Trial, parent_run_id: str | None) -> TrialSpec:
    assert trial.report is not None and trial.report.config is not None
    cfg = trial.report.config
    return TrialSpec(
        name=trial.name,
        index=trial.index,
        run_name=cfg.trainer.experiment_name,
        params=dict(trial.params),
        config=cfg,
        parent_run_id=parent_run_id,
        metric=plan.metric,
    )


def _open_parent(plan: SweepPlan, cfg: Any, resume_run_id: str | None) -> Any:
    """The sweep's parent run (a NullTracker when the base config does not log to MLflow)."""
    from rcx.store.tracking import open_tracker

    parent = open_tracker(
        logger=cfg.trainer.logger,
        project_name=cfg.trainer.project_name,
        experiment_name=plan.name,
        tracking_uri=cfg.trainer.tracking_uri,
        resume_run_id=resume_run_id,
        tags={"rcx.sweep": plan.name, "rcx.sweep.metric": plan.metric},
    )
    params = {f"sweep.grid.{a.key}": json.dumps(list(a.values), default=str) for a in plan.axes}
    params.update(
        {
            "sweep.metric": plan.metric,
            "sweep.mode": plan.mode,
            "sweep.num_trials": str(len(plan.trials)),
        }
    )
    parent.log_params(params)
    return parent


def mark_child_run(parent: Any, plan: SweepPlan, result: TrialResult) -> None:
    """Make sure a failed or killed trial has a child run with that status and its error.

    The trainer may have failed before it created its run: then one is created here.
    """
    result.run_id = parent.end_child_run(
        f"{plan.name}-{result.name}",
        result.status,
        run_id=result.run_id,
        error=result.error,
        tags={"rcx.sweep.trial": result.name},
    )


def run_in_processes(
    specs: Sequence[TrialSpec],
    trial_fn: TrialFn,
    parallel: int,
    out_dir: Path,
    record: Callable[[TrialResult], None],
    on_event: Callable[[str], None],
) -> None:
    """Run trials in up to ``parallel`` spawned processes; each writes its result to a file.

    A process that dies without a result (a crash, a kill) is recorded FAILED with its exit code.
    On Ctrl-C (which the terminal also delivers to the children) running trials get up to 30 s to
    record their own interruption before they are terminated. A trial that reports KILLED (the
    trainer caught Ctrl-C) also stops the sweep: no new trial starts, the running ones are
    awaited, then ``KeyboardInterrupt`` is raised, even if this process never saw the signal.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = list(specs)
    running: dict[str, tuple[Any, TrialSpec, Path]] = {}
    results_dir = Path(out_dir) / "results"
    results_dir.mkdir(parents=True, exist_ok=True)

    def collect(name: str) -> TrialResult:
        proc, spec, path = running.pop(name)
        proc.join()
        if path.is_file():
            result = TrialResult.from_json(json.loads(path.read_text()))
        else:
            error = f"trial process exited with code {proc.exitcode} without a result"
            result = TrialResult(spec.name, "FAILED", error=error)
        record(result)
        return result

    interrupted = False
    try:
        while queue or running:
            while queue and len(running) < parallel:
                spec = queue.pop(0)
                path = results_dir / f"{spec.name}.json"
                path.unlink(missing_ok=True)
                proc = ctx.Process(target=_process_main, args=(trial_fn, spec, path), daemon=False)
                proc.start()
                running[spec.name] = (proc, spec, path)
                on_event(f"{spec.name} started in process {proc.pid}")
            for name in [n for n, (p, _, _) in running.items() if not p.is_alive()]:
                if collect(name).status == "KILLED":
                    interrupted = True
                    queue.clear()
            time.sleep(0.05)
        if interrupted:
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        deadline = time.monotonic() + 30
        for proc, _, _ in running.values():
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.terminate()
        for name in list(running):
            _, spec, path = running[name]
            if not path.is_file():
                path.write_text(
                    json.dumps(TrialResult(spec.name, "KILLED", error="interrupted").to_json())
                )
            collect(name)
        raise


def _process_main(trial_fn: TrialFn, spec: TrialSpec, path: Path) -> None:
    """Entry point of a trial process: run it and write its result file atomically."""
    try:
        result = call_trial(trial_fn, spec)
    except KeyboardInterrupt:
        result = TrialResult(spec.name, "KILLED", error="interrupted (Ctrl-C)")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result.to_json()))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- ray ---


RAY_MISSING = (
    "--executor ray needs Ray, which is not installed (it is an optional extra): "
    "pip install 'rcx[ray]' (or pip install ray); without --ray-address a local Ray "
    "instance is started, or pass a cluster's address (ray://head:10001, auto)"
)


def require_ray() -> None:
    """Raise :class:`SweepError` saying how to get Ray when it is not installed (checked with
    ``find_spec``, without importing it)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise SweepError(RAY_MISSING)


def import_ray() -> Any:
    """``import ray``, or a :class:`SweepError` that says how to get it."""
    try:
        import ray
    except ImportError:
        raise SweepError(RAY_MISSING) from None
    return ray


def call_trial_in_ray(trial_fn: TrialFn, spec: TrialSpec) -> TrialResult:
    """:func:`call_trial` as a Ray task: ``worker`` also names the Ray task that ran it."""
    import ray

    result = call_trial(trial_fn, spec)
    task_id = ray.get_runtime_context().get_task_id()
    result.worker = f"ray task {task_id} on {result.worker}"
    return result


def ray_resources(cfg: Any) -> dict[str, float]:
    """Ray task resources of one trial: its torch CPU threads, and one GPU when it trains on CUDA.

    ``trainer.device: auto`` asks for no GPU (the trial then uses CUDA only if Ray's worker happens
    to see one); set ``trainer.device=cuda`` to have Ray place each trial on a GPU.
    """
    cpus = float(cfg.trainer.num_threads or 1)
    gpus = 1.0 if cfg.trainer.device == "cuda" else 0.0
    return {"num_cpus": cpus, "num_gpus": gpus}


def run_on_ray(
    specs: Sequence[TrialSpec],
    trial_fn: TrialFn,
    address: str | None,
    record: Callable[[TrialResult], None],
) -> None:
    """Submit every trial as a Ray task (with :func:`ray_resources`) and record them as they end.

    Workers must reach the tracking store: a local SQLite store works on a single-node cluster
    only; use a tracking server (``trainer.tracking_uri``) for several nodes. Ctrl-C cancels the
    tasks still running.
    """
    ray = import_ray()
    ray.init(address=address, ignore_reinit_error=True)
    remote_trial = ray.remote(call_trial_in_ray)
    pending = {
        remote_trial.options(**ray_resources(spec.config)).remote(trial_fn, spec): spec
        for spec in specs
    }
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                spec = pending.pop(ref)
                try:
                    record(ray.get(ref))
                except Exception as exc:  # noqa: BLE001 - a lost worker fails one trial only
                    record(TrialResult(spec.name, "FAILED", error=f"Ray task failed: {exc}"))
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


# ---------------------------------------------------------------------------------- results ---


@dataclass
class RankedTrial:
    rank: int | None
    trial: Trial
    result: TrialResult | None
    value: float | None


def rank_trials(
    trials: Sequence[Trial], results: Mapping[str, TrialResult], metric: str, mode: Mode
) -> list[RankedTrial]:
    """Finished trials with the metric first, best first; then the rest (no rank), in order."""
    rows = []
    for t in trials:
        result = results.get(t.name)
        value = None if result is None else final_value(result, metric)
        rows.append(RankedTrial(None, t, result, value))
    scored = [r for r in rows if r.value is not None and r.result and r.result.status == "FINISHED"]
    scored.sort(key=lambda r: r.value if mode == "min" else -r.value)  # type: ignore[operator]
    for i, r in enumerate(scored, 1):
        r.rank = i
    return scored + [r for r in rows if r not in scored]


def plot_trials(
    trials: Sequence[Trial], results: Mapping[str, TrialResult], metric: str, path: Path
) -> Path | None:
    """One line per trial: ``metric`` against step. None when no trial logged the metric."""
    curves = [
        (t, results[t.name].history[metric])
        for t in trials
        if t.name in results and results[t.name].history.get(metric)
    ]
    if not curves:
        return None
    from rcx.store.plots import panel_grid, plot_curve, save_figure

    fig, (ax,) = panel_grid(1, panel_size=(8.0, 4.5))
    for trial, points in curves:
        plot_curve(ax, points, trial.name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(curves) > 8 else 1)
    return save_figure(fig, path)


def ranking_text(plan: SweepPlan, ranked: Sequence[RankedTrial]) -> str:
    """The ranked table as plain text (the console table's content; logged to the parent run)."""
    lines = [f"sweep {plan.name}: {plan.metric} ({plan.mode})"]
    for r in ranked:
        status = r.result.status if r.result else "NOT RUN"
        value = "-" if r.value is None else f"{r.value:.6g}"
        rank = "-" if r.rank is None else str(r.rank)
        lines.append(f"{rank:>3} {r.trial.name:<5} {status:<8} {value:>12}  {r.trial.label}")
    return "\n".join(lines) + "\n"


def finish_parent(plan: SweepPlan, parent: Any, results: Mapping[str, TrialResult]) -> Path | None:
    """Plot, log the ranking and the plot to the parent run, and end it.

    The parent ends FAILED only when every trial failed; otherwise FINISHED, with the tag
    ``rcx.sweep.failed_trials`` counting failures.
    """
    safe = plan.metric.replace("/", "_")
    plot = plot_trials(plan.trials, results, plan.metric, plan.out_dir / f"{safe}.png")
    ranked = rank_trials(plan.trials, results, plan.metric, plan.mode)
    text = ranking_text(plan, ranked)
    (plan.out_dir / "ranking.txt").write_text(text)
    if plot is not None:
        parent.log_artifact(plot)
    parent.log_text(text, "ranking.txt")
    best = next((r for r in ranked if r.rank == 1), None)
    if best is not None and best.value is not None:
        parent.log_metrics({f"sweep/best/{plan.metric}": best.value}, step=0)
    failed = [r for r in results.values() if r.status != "FINISHED"]
    if parent.run_id and getattr(parent, "uri", None):
        parent.set_tag("rcx.sweep.failed_trials", str(len(failed)))
    all_failed = bool(results) and len(failed) == len(results)
    parent.finish("FAILED" if all_failed else "FINISHED")
    return plot
