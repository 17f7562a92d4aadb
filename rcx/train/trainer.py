"""The trainer behind ``rcx train``: setup and resume, the loop, one step. One process, or one
of several (``trainer.n_gpus_per_node``; FSDP2, the data-parallel contract in
:mod:`rcx.train.distributed`): then rank 0 alone prints, tracks and writes checkpoint metadata.

One step, as :meth:`Trainer.train_step` reads top to bottom::

    1 prompts        train_batch_size prompts, a pure function of (seed, step)
    2 generate       n responses each from the rollout copy, with their rollout log-probs
    3 rewards        outcome score of each response, placed on its last valid token
    4 pi_old         the anchor: decoupled, one extra forward of the training model;
                     bypass, the rollout log-probs
    5 ref log-probs  only with use_kl_loss: the frozen reference model
    6 values         gae only: the critic
    7 correction     decoupled: IS weights + RS mask once per batch from (pi_old, pi_rollout)
    8 advantages     grpo | rloo | gae | reinforce_plus_plus; then (decoupled) OPSM
    9 actor update   ppo_epochs x mini-batches x micro-batches (:mod:`rcx.train.actor`; bypass:
                     correction recomputed per micro-batch from pi_theta vs pi_rollout)
   10 critic update  gae only (:mod:`rcx.train.critic`)
   11 metrics        reward/, response_length/, actor/, critic/, rollout_corr/, timing/, perf/

Choices and simplifications, each deliberate:

* The policy stays in ``eval()`` mode (no dropout): pi_old and pi_theta must be the same function
  of the weights, or the PPO ratio would measure dropout noise.
* In bypass mode the ``rollout_corr/*`` metrics are means over the step's micro-batches and
  epochs. A step in which no mini-batch took an optimiser step logs
  ``rollout_corr/skipped_update = 1`` and a warning. The critic still learns from such a batch:
  value targets do not depend on the policy mismatch.
* The learning rate is constant after a linear warm-up over ``lr_warmup_steps`` training steps.
* The rollout copy is refreshed every ``weight_sync_interval`` steps (the trainer decides when:
  :func:`rcx.train.step.sync_rollout_weights`); in between it samples from stale weights.
* Sampling is seeded per prompt (``engine.generate(seed=[...])``, from the run seed, the step
  and the prompt's place in the step's batch) and the prompt order is a pure function of
  ``(seed, step)``: a resumed run replays exactly what an uninterrupted one does, and a prompt's
  responses do not depend on the rank or batch that generates them.
* Validation generates from a float32 copy of the *training* weights (not the possibly stale,
  low-precision rollout copy): ``val/reward_mean`` and ``val/accuracy`` follow
  ``rollout.val_kwargs`` (greedy by default); when that is greedy, ``val/sampled_accuracy`` and
  ``val/sampled_reward_mean`` add one sample per prompt at the rollout sampling settings.
  ``accuracy`` is the share of responses with score >= 1 (full credit).

Ctrl-C: the first press finishes the current step, saves a checkpoint, marks the MLflow run
KILLED and returns a :class:`TrainResult` with ``exit_code == 130``; a second press stops at once,
and saves a checkpoint only if the interrupted step had not yet touched the weights (from its
first update until it is logged, the weights belong to no completed step), and says where a
resume starts; a press while a checkpoint is written waits for it. Resume: :mod:`rcx.train.resume`.

With ``trainer.dump_log_probs: true`` each step's log-probs are dumped (format in
:mod:`rcx.store.dumps`).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from rcx.config.limits import checkpoint_dir_problem
from rcx.config.models import RcxConfig
from rcx.config.yamlio import dump_yaml
from rcx.errors import RcxError
from rcx.markup import esc
from rcx.rollout.hf import eos_token_ids
from rcx.store.checkpoint import (
    latest_checkpoint,
)
from rcx.store.provenance import environment_params, environment_record
from rcx.store.tracking import NullTracker, RunStatus, abandon, flatten_config, plot_history
from rcx.train.async_rollout import AsyncRollout, make_async_rollout
from rcx.train.distributed import (
    any_rank,
    barrier,
    close_world,
    init_world,
    launched_world,
    local_device,
)
from rcx.train.evaluate import score_rollout, validate
from rcx.train.interrupt import (
    CtrlC,
    StopRequested,
    hard_stop_message,
    ignore_sigterm,
    install_sigint,
    restore_sigint,
)
from rcx.train.metrics import (
    PlainProgress,
    progress_bar,
    progress_info,
    run_summary,
    summary_table,
)
from rcx.train.parts import build_parts
from rcx.train.pretrain import warm_start_metadata, warm_start_params, warm_start_shortfall
from rcx.train.resume import (
    apply_optim_changes,
    last_logged_step,
    open_run_trackers,
    plan_resume,
    refuse_new_work_when_complete,
)
from rcx.train.setup import (
    configure_threads,
    load_data,
    load_policy,
    resolve_device,
    rollout_engines,
    sampling_params,
    seed_everything,
    total_steps,
)
from rcx.train.state import restore_run_state, save_run_state
from rcx.train.step import train_step

EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}


@dataclass
class TrainResult:
    """What a training run did. ``exit_code`` is what ``rcx train`` should exit with."""

    status: RunStatus
    step: int  # last completed step
    total_steps: int
    run_id: str | None
    checkpoint: Path | None
    metrics: dict[str, float]  # the last step's metrics
    val_start: dict[str, float]
    val_end: dict[str, float]
    history: dict[str, list[tuple[int, float]]]
    wall_s: float
    resumed_from: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


def train(
    cfg: RcxConfig,
    *,
    findings: Sequence[Any] | None = None,
    console: Console | None = None,
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> TrainResult:
    """Train ``cfg`` to ``trainer.total_training_steps``; the CLI's entry point.

    ``findings`` (the validate findings, already printed by the CLI) are recorded as an MLflow
    tag. ``parent_run_id`` nests the run under a sweep. Raises, after marking the MLflow run
    FAILED, on errors the user must fix (tracking server unreachable, model or data unusable,
    unreadable checkpoint); returns a KILLED result on Ctrl-C.
    """
    console = console or Console(highlight=False)
    trainer = None
    try:
        trainer = Trainer(cfg, console=console, parent_run_id=parent_run_id, tags=tags)
        if findings:
            trainer.tracker.log_text(
                "\n".join(
                    f"{getattr(f, 'code', '')} {getattr(f, 'path', '')}: {getattr(f, 'message', f)}"
                    for f in findings
                ),
                "validate_findings.txt",
            )
        return trainer.fit()
    finally:
        close_world(trainer.world if trainer is not None else launched_world())


class Trainer:
    """Holds the run's parts; :meth:`fit` runs the loop, :meth:`train_step` one step."""

    def __init__(
        self,
        cfg: RcxConfig,
        *,
        console: Console,
        parent_run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        # Several processes: rank 0 alone speaks (console, MLflow, plots, checkpoint metadata).
        self.world = init_world(resolve_device(cfg.trainer.device), cfg.world_size)
        self.console = console if self.world.is_main else Console(quiet=True)
        self.show = "console" in cfg.trainer.logger and self.world.is_main
        self.ckpt_dir = Path(cfg.checkpoint_dir())
        if problem := checkpoint_dir_problem(str(self.ckpt_dir)):  # before any run is opened
            raise RcxError(f"checkpoint folder: {problem}")
        self.started = time.perf_counter()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.val_start: dict[str, float] = {}
        self.val_end: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.step = 0
        self.resumed_from = 0
        # True from a step's first weight update until its metrics are logged: the weights then
        # belong to no completed step, so a hard interrupt must not checkpoint them.
        self.weights_dirty = False
        self.ctrl_c = CtrlC(self.console.print)
        self.nonfinite_streak = 0  # consecutive steps skipped for non-finite gradients
        self.async_rollout: AsyncRollout | None = None  # one_step_off / fully_async workers

        # Lock the folder and pick the resume target first (cheap: meta.json, config.yaml), so
        # that a refused resume or an unreachable server is reported before anything heavy loads.
        # Several processes: rank 0 locks (and sets an earlier run aside), then the others plan.
        if not self.world.is_main:
            barrier(self.world)
        self.plan = plan_resume(cfg, self.ckpt_dir, warn=self._warn, own=self.world.is_main)
        if self.world.is_main:
            barrier(self.world)
        try:
            self.tracker = (
                open_run_trackers(cfg, self.plan, self.ckpt_dir, parent_run_id, tags)
                if self.world.is_main
                else NullTracker()
            )
        except BaseException:
            self.plan.lock.release()
            raise
        self.resume_path = self.plan.checkpoint
        self.logged_through = last_logged_step(self.tracker)  # replayed steps are not re-logged
        self.console.print(self.tracker.describe(), markup=False, highlight=False)
        try:
            self._build()
        except BaseException as exc:  # a reopened run keeps the status it had
            abandon(self.tracker, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            self.plan.lock.release()
            raise

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        """Load model, data, engines, optimisers; restore the checkpoint when resuming."""
        cfg, world = self.cfg, self.world
        self.device = local_device(resolve_device(cfg.trainer.device), world)
        self.threads = configure_threads(cfg.trainer.num_threads)
        seed_everything(cfg.trainer.seed)
        if not world.is_main:
            barrier(world)  # rank 0 warm-starts builtin:tiny first (it fills the cache)
        model, self.tokenizer, self.model_path = load_policy(cfg, self.device, self.show)
        if world.is_main:
            barrier(world)
        self.warm_start = warm_start_metadata(self.model_path)
        # The engines and the reference copy the full weights, before they are sharded.
        self.train_data, self.val_data, self.scorer = load_data(cfg, self.tokenizer)
        self.total_steps = total_steps(cfg, len(self.train_data))
        self.engine, self.val_engine = rollout_engines(
            cfg, model, self.tokenizer, self.model_path, self.device
        )
        self.eos_ids = torch.tensor(eos_token_ids(model, self.tokenizer))
        self.sampling, self.val_sampling, scoring = sampling_params(cfg)
        self.actor, self.critic, self.ref_model = build_parts(
            cfg, model, scoring, self.device, world
        )
        if self.resume_path is not None:
            self._restore(self.resume_path)
            refuse_new_work_when_complete(self.step, self.total_steps, self.plan.changes)
        self.async_rollout = make_async_rollout(cfg, self)  # its process starts with step 1

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Validate, run the remaining steps, validate, save; end the MLflow run."""
        status: RunStatus = "FAILED"
        previous_handler = install_sigint(self.ctrl_c.handler)
        try:
            self._announce()
            if self.step >= self.total_steps:
                self.console.print(
                    f"already complete: checkpoint at step {self.step} of {self.total_steps}"
                )
            else:
                self._run_loop()
            plot = self._plot_in_background()
            self._save()
            self._finish_artifacts(plot)
            status = "FINISHED"
        except StopRequested:
            status = "KILLED"
            self._save()
            self.console.print(
                f"[yellow]interrupted: checkpoint of step {self.step} saved in {esc(self.ckpt_dir)}; "
                f"run again with the same config to resume[/]"
            )
        except KeyboardInterrupt:
            status = "KILLED"
            # Several processes: the ranks may be anywhere in the step; no collective save.
            saved = None if self.weights_dirty or self.world.distributed else self._save()
            latest = latest_checkpoint(self.ckpt_dir)
            self.console.print(f"[yellow]{esc(hard_stop_message(self.step, saved, latest))}[/]")
        finally:
            # SIGTERM now (a launcher stopping the ranks) must not cut the status update short.
            ignore_sigterm()
            if self.async_rollout is not None:  # stopped (or reaped) before the status is final
                self.async_rollout.close()
            self.tracker.finish(status)
            restore_sigint(previous_handler)
            self.plan.lock.release()
        result = TrainResult(
            status=status,
            step=self.step,
            total_steps=self.total_steps,
            run_id=self.tracker.run_id,
            checkpoint=latest_checkpoint(self.ckpt_dir),
            metrics=dict(self.last_metrics),
            val_start=self.val_start,
            val_end=self.val_end,
            history={k: list(v) for k, v in self.history.items()},
            wall_s=time.perf_counter() - self.started,
            resumed_from=self.resumed_from,
        )
        if self.show and status == "FINISHED":
            title = f"rcx train: {status} after {result.step} steps ({result.wall_s:.0f} s)"
            self.console.print(summary_table(title, result.history, result.run_id))
            self._print_summary(result)
        return result

    def _run_loop(self) -> None:
        t = self.cfg.trainer
        if self.step == 0 and t.val_before_train:
            self.val_start = self.validate(step=0)
            self._log(self.val_start, step=0)
        # Off a terminal (a pipe, CI) the live bar shows nothing until the end (then a squeezed
        # line): plain lines instead.
        plain = None
        if self.show and not self.console.is_terminal:
            plain = PlainProgress(self.console, self.total_steps, first_step=self.step + 1)
        with progress_bar(self.console, self.show and plain is None) as progress:
            bar = progress.add_task("train", total=self.total_steps, completed=self.step, info="")
            for step in range(self.step + 1, self.total_steps + 1):
                metrics = self.train_step(step)
                last = step == self.total_steps
                if last or (t.test_freq > 0 and step % t.test_freq == 0):
                    val = self.validate(step=step)
                    metrics.update(val)
                    if last:
                        self.val_end = val
                self.step = step
                self._log(metrics, step=step)
                self.weights_dirty = False
                if not last and t.save_freq > 0 and step % t.save_freq == 0:
                    self._save()
                progress.update(bar, completed=step, info=progress_info(metrics))
                if plain is not None:
                    plain.update(step, metrics)
                if any_rank(self.ctrl_c.requested, self.world):  # every rank stops together
                    raise StopRequested

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        """Run step ``step`` (1-based) end to end; return its metrics (:mod:`rcx.train.step`)."""
        return train_step(self, step)

    # ------------------------------------------------------------------ rewards & validation

    def score(
        self, batch: Any, examples: Sequence[Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outcome reward (B,) of each response, and the reward hook's extras. Scoring changes
        nothing the checkpoint keeps, so a Ctrl-C meanwhile abandons the step at once (one
        process): a hung custom reward never holds a stop for its whole timeout."""
        with self.ctrl_c.abandonable(allowed=not self.world.distributed):
            return score_rollout(self.scorer, self.tokenizer, batch, examples, self.device)

    def validate(self, step: int) -> dict[str, float]:
        """Reward and accuracy on the validation prompts, from float32 training weights."""
        self.val_engine.sync_weights(self.actor.model, step)
        return validate(
            self.val_engine,
            self.val_data,
            self.scorer,
            self.tokenizer,
            val_sampling=self.val_sampling,
            sampling=self.sampling,
            batch_size=self.cfg.data.val_batch_size,
            seed=self.cfg.trainer.seed,
            device=self.device,
            world=self.world,
        )

    # ------------------------------------------------------------------ persistence

    def _save(self) -> Path | None:
        """Checkpoint the completed step ``self.step`` (nothing before the first step)."""
        if self.step == 0:
            return None
        with self.ctrl_c.saving():  # a second Ctrl-C waits for the checkpoint
            return save_run_state(self)

    def _restore(self, path: Path) -> None:
        self.step, self.resume_path = restore_run_state(self, path, warn=self._warn)
        self.resumed_from = self.step
        apply_optim_changes(self.plan.changes, self.actor, self.critic)

    # ------------------------------------------------------------------ console & tracking

    def _announce(self) -> None:
        """Print where things go; log params and the resolved config (first session only)."""
        environment = environment_record()
        notes = self.tracker.log_params(
            {
                **flatten_config(self.cfg.model_dump(mode="json")),
                **environment_params(environment),
                **warm_start_params(self.warm_start),
            }
        )
        self.tracker.log_text(dump_yaml(self.cfg.model_dump(mode="json")), "config.yaml")
        self.tracker.log_text(json.dumps(environment, indent=2) + "\n", "versions.json")
        self._warn_about_warm_start()
        self.console.print(
            f"rcx train: {self.total_steps} steps, {self.actor.plan.mode} mode, "
            f"{self.cfg.algorithm.adv_estimator}, device {self.device} "
            f"({self.threads} thread{'s' * (self.threads != 1)}); "
            f"checkpoints in {self.ckpt_dir}",
            markup=False,
        )
        if self.resumed_from:
            self.console.print(f"resumed from step {self.resumed_from} ({esc(self.resume_path)})")
        for note in [*self.plan.notes(), *notes]:
            self.console.print(f"[yellow]{esc(note)}[/]")

    def _print_summary(self, result: TrainResult) -> None:
        """The end-of-run lines a person reads (see `run_summary`), then any warm-start warning."""
        plot = self.ckpt_dir / "metrics.png"
        lines = run_summary(
            result.history,
            steps_run=result.step - result.resumed_from,
            wall_s=result.wall_s,
            tracking=self.tracker.describe(),
            plot=plot if plot.is_file() else None,
            checkpoint=result.checkpoint,
        )
        for line in lines:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self._warn_about_warm_start()

    def _warn_about_warm_start(self) -> None:
        if shortfall := warm_start_shortfall(self.warm_start or {}):
            self.console.print(f"[bold red]warning[/] {esc(shortfall)}", soft_wrap=True)

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        for key, value in clean.items():
            self.history[key].append((step, value))
        self.last_metrics = clean
        if step > self.logged_through:  # a step replayed after a kill was logged already
            self.tracker.log_metrics(clean, step=step)

    def _warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning: {esc(message)}[/]", soft_wrap=True)

    def _plot_in_background(self) -> Future[Path | None]:
        """Start drawing ``metrics.png`` from the finished history in a thread, so that the
        checkpoint is written meanwhile; :meth:`_finish_artifacts` waits for it. Rank 0 only."""
        if not self.world.is_main:
            nothing: Future[Path | None] = Future()
            nothing.set_result(None)
            return nothing
        history = {k: list(v) for k, v in self.history.items()}
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcx-plot")
        future = pool.submit(plot_history, history, self.ckpt_dir / "metrics.png")
        pool.shutdown(wait=False)  # the thread ends with the task
        return future

    def _finish_artifacts(self, plot: Future[Path | None]) -> None:
        png = plot.result()
        if png is not None:
            self.tracker.log_artifact(png, "plots")
