"""The single-node trainer behind ``rcx train`` (SPEC §4, §7; issue 5).

One step, as :meth:`Trainer.train_step` reads top to bottom::

    1 prompts        train_batch_size prompts, a pure function of (seed, step)
    2 generate       n responses each from the rollout copy, with their rollout log-probs
    3 rewards        outcome score of each response, placed on its last valid token
    4 old log-probs  decoupled only: one extra forward of the training model (pi_old)
    5 ref log-probs  only with use_kl_loss: the frozen reference model
    6 values         gae only: the critic
    7 advantages     grpo | rloo | gae | reinforce_plus_plus
    8 correction     decoupled: IS weights + RS mask once per batch from (pi_old, pi_rollout)
    9 actor update   ppo_epochs x mini-batches x micro-batches (bypass: correction recomputed
                     per micro-batch from the current pi_theta vs pi_rollout, no gradient)
   10 critic update  gae only
   11 metrics        reward/, response_length/, actor/, critic/, rollout_corr/, timing/, perf/

Choices and simplifications, each deliberate:

* The training side scores tokens under ``logits / temperature`` with **no** top-k/top-p
  truncation (what verl's actor does), so a truncated rollout is a real mismatch source (§7.3).
  The temperature is the rollout's unless ``actor.temperature`` sets another (a mismatch source).
* The policy stays in ``eval()`` mode (no dropout): pi_old and pi_theta must be the same function
  of the weights, or the PPO ratio would measure dropout noise.
* Micro-batches (``ppo_micro_batch_size_per_gpu`` responses) accumulate gradients, each scaled
  by its share of the mini-batch's responses (verl's rule); with the default (no
  micro-batching) the aggregation is exact. In bypass mode the correction is computed per
  micro-batch, from the same forward that carries the gradient (no extra forward); its
  ``rollout_corr/*`` metrics are then means over the step's micro-batches and epochs.
* A mini-batch in which RS rejects every token takes no optimiser step (AdamW would still move
  the weights through momentum and weight decay); a step in which no mini-batch survives logs
  ``rollout_corr/skipped_update = 1`` and a warning. The critic still learns from such a batch:
  value targets do not depend on the policy mismatch.
* The entropy bonus and the KL loss are aggregated over the plain response mask: they are
  regularisers, not part of the off-policy correction, so RS does not switch them off.
* The learning rate is constant after a linear warm-up over ``lr_warmup_steps`` training steps.
* Sampling is seeded per step (``engine.generate(seed=...)``) and the prompt order is a pure
  function of ``(seed, step)``, so a resumed run replays exactly what an uninterrupted one does.
* Validation generates from a float32 copy of the *training* weights (not the possibly stale,
  low-precision rollout copy): ``val/reward_mean`` and ``val/accuracy`` follow
  ``rollout.val_kwargs`` (greedy by default); when that is greedy, ``val/sampled_accuracy`` and
  ``val/sampled_reward_mean`` add one sample per prompt at the rollout sampling settings.
  ``accuracy`` is the share of responses with score >= 1 (full credit).

Ctrl-C: the first press finishes the current step, saves a checkpoint, marks the MLflow run
KILLED and returns a :class:`TrainResult` with ``exit_code == 130``; a second press stops at once,
and saves a checkpoint only if the interrupted step had not yet touched the weights (from its
first update until it is logged, the weights belong to no completed step).

Log-prob dumps (``trainer.dump_log_probs: true``) — one file per step,
``<run dir>/log_probs/step_000001.pt`` (run dir = the checkpoint folder), also uploaded to MLflow
under ``log_probs/``. A ``torch.save`` dict, loadable with ``torch.load(f, weights_only=True)``:

    format             1
    step               int
    mode               "decoupled" | "bypass"
    rollout_log_probs  (B, T) float32   log-prob of each sampled token under the rollout policy
    train_log_probs    (B, T) float32   what the correction compared against: pi_old (decoupled)
                                        or pi_theta at each micro-batch's forward, epoch 1 (bypass)
    response_mask      (B, T) bool      real response tokens (before rejection)
    prompt_index       (B,)   int32     which prompt of the step each response answers
    scores             (B,)   float32   the outcome reward
    rollout_correction dict             the algorithm.rollout_correction config in force

Log-probs are kept in float32: a log-ratio of 1e-3 would not survive float16 rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import random
import re
import signal
import time
import warnings
import zlib
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rcx.algos.advantages import token_rewards_from_scores
from rcx.algos.losses import entropy_from_logits
from rcx.cli.common import esc
from rcx.config.limits import checkpoint_dir_problem
from rcx.config.models import RcxConfig
from rcx.errors import RcxError
from rcx.store.checkpoint import (
    CheckpointError,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from rcx.store.tracking import RunStatus, Tracker, flatten_config, open_tracker, plot_history

DUMP_FORMAT = 1
EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}
#: Metrics shown in the progress bar and the summary table, when present.
KEY_METRICS = (
    ("reward/mean", "reward"),
    ("reward/accuracy", "acc"),
    ("rollout_corr/rollout_rs_masked_fraction", "masked"),
    ("rollout_corr/rollout_is_eff_sample_size", "ess"),
    ("rollout_corr/kl", "kl"),
    ("actor/pg_clipfrac", "clipfrac"),
)


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


# =========================================================================== setup helpers


class DeviceError(RcxError, RuntimeError):
    """The requested device is not available."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("trainer.device=cuda but no CUDA device is available; use auto or cpu")
    return torch.device(name)


def configure_threads(num_threads: int | None) -> int:
    """Set torch's CPU threads: ``num_threads``, else 1 on <= 2 cores, else cores // 2."""
    cores = os.cpu_count() or 1
    threads = num_threads or (1 if cores <= 2 else cores // 2)
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(seed: int, purpose: str, step: int) -> int:
    """A 31-bit seed that is a pure function of (run seed, purpose, step)."""
    return zlib.crc32(f"{seed}|{purpose}|{step}".encode()) & 0x7FFFFFFF


def total_steps(cfg: RcxConfig, num_train: int) -> int:
    """``total_training_steps``, else ``total_epochs`` passes over the training prompts."""
    if cfg.trainer.total_training_steps is not None:
        return cfg.trainer.total_training_steps
    per_epoch = max(1, num_train // cfg.data.train_batch_size)
    return per_epoch * cfg.trainer.total_epochs


def warmup_lambda(warmup_steps: int):
    """Linear warm-up to the full lr over ``warmup_steps`` scheduler steps, then constant."""

    def factor(step: int) -> float:
        return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

    return factor


class StageTimer:
    """``with timer("gen"):`` accumulates wall time into ``timing/gen`` (seconds)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[stage] += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"timing/{k}": v for k, v in self.seconds.items()}


class MetricBag:
    """Collects per-micro-batch values; ``means()`` averages each key."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)

    def add(self, metrics: Mapping[str, Any], prefix: str = "") -> None:
        for key, value in metrics.items():
            value = float(value.item() if torch.is_tensor(value) else value)
            self.values[prefix + key].append(value)

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.values.items() if v}


# =========================================================================== critic


class ValueModel(torch.nn.Module):
    """The critic: the policy's transformer body (a copy) with a scalar head.

    ``forward`` returns one value per position, (B, L). The head starts at zero, so the first
    values are 0 and the first GAE advantages are the discounted returns.
    """

    def __init__(self, policy: torch.nn.Module) -> None:
        super().__init__()
        self.body = copy.deepcopy(policy.base_model)
        self.body.requires_grad_(True)
        self.head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)
        self.head.to(next(self.body.parameters()).device)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.body(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        return self.head(hidden.float()).squeeze(-1)  # (B, L)


# =========================================================================== the trainer


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
        self.console = console
        self.show = "console" in cfg.trainer.logger
        self.ckpt_dir = Path(cfg.checkpoint_dir())
        if problem := checkpoint_dir_problem(str(self.ckpt_dir)):  # before any run is opened
            raise RcxError(f"checkpoint folder: {problem}")
        self.rc = cfg.algorithm.rollout_correction
        self.started = time.perf_counter()
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.val_start: dict[str, float] = {}
        self.val_end: dict[str, float] = {}
        self.last_metrics: dict[str, float] = {}
        self.step = 0
        self.resumed_from = 0
        # True from a step's first weight update until its metrics are logged: the weights then
        # belong to no completed step, so a hard interrupt must not checkpoint them.
        self._dirty = False
        self._stop_requested = False

        # Resume target first (cheap: only its meta.json), so that the MLflow run can be reopened
        # and an unreachable server reported before anything heavy loads.
        self.resume_path = find_resume_checkpoint(cfg, self.ckpt_dir)
        resume_run_id = None
        if self.resume_path is not None:
            resume_run_id = _read_run_id(self.resume_path)
        self.tracker: Tracker = open_tracker(
            logger=cfg.trainer.logger,
            project_name=cfg.trainer.project_name,
            experiment_name=cfg.trainer.experiment_name,
            tracking_uri=cfg.trainer.tracking_uri,
            resume_run_id=resume_run_id,
            parent_run_id=parent_run_id,
            tags=tags,
        )
        self.console.print(self.tracker.describe(), markup=False, highlight=False)
        try:
            self._build()
        except KeyboardInterrupt:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            raise

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        """Load model, data, engines, optimisers; restore the checkpoint when resuming."""
        cfg, arr = self.cfg, self.cfg.actor_rollout_ref
        self.device = resolve_device(cfg.trainer.device)
        self.threads = configure_threads(cfg.trainer.num_threads)
        seed_everything(cfg.trainer.seed)
        self.model, self.tokenizer, self.model_path = load_policy(cfg, self.device, self.show)
        self.ref_model = None
        if arr.actor.use_kl_loss:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False)
        self.model.requires_grad_(True)
        self.optimizer, self.scheduler = make_optimizer(self.model.parameters(), arr.actor.optim)
        self.critic = self.critic_optimizer = self.critic_scheduler = None
        if cfg.critic.enable:
            self.critic = ValueModel(self.model)
            self.critic_optimizer, self.critic_scheduler = make_optimizer(
                self.critic.parameters(), cfg.critic.optim
            )
        self.train_data, self.val_data, self.scorer = load_data(cfg, self.tokenizer)
        self.total_steps = total_steps(cfg, len(self.train_data))
        self.sampling, self.val_sampling, self.score_sampling = sampling_params(cfg)
        from rcx.rollout import make_rollout_engine

        rollout = arr.rollout
        self.engine = make_rollout_engine(
            rollout.name,
            self.model,
            self.tokenizer,
            dtype=rollout.dtype,
            quantization=rollout.quantization,
            weight_sync_interval=rollout.weight_sync_interval,
            device=self.device,
            model_path=None if self.model_path.startswith("builtin:") else self.model_path,
            gpu_memory_utilization=rollout.gpu_memory_utilization,
            seed=cfg.trainer.seed,
        )
        self.val_engine = make_rollout_engine("hf", self.model, self.tokenizer, device=self.device)
        self.eos_ids = torch.tensor(sorted(_eos_ids(self.model, self.tokenizer)))
        if self.resume_path is not None:
            self._restore(self.resume_path)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        """Validate, run the remaining steps, validate, save; end the MLflow run."""
        status: RunStatus = "FAILED"
        previous_handler = _install_sigint(self._on_sigint)
        try:
            self._announce()
            if self.step >= self.total_steps:
                self.console.print(
                    f"already complete: checkpoint at step {self.step} of {self.total_steps}"
                )
            else:
                self._run_loop()
            self._save()
            self._finish_artifacts()
            status = "FINISHED"
        except _StopRequested:
            status = "KILLED"
            self._save()
            self.console.print(
                f"[yellow]interrupted: checkpoint of step {self.step} saved in {esc(self.ckpt_dir)}; "
                f"run again with the same config to resume[/]"
            )
        except KeyboardInterrupt:
            status = "KILLED"
            if not self._dirty:
                self._save()
            self.console.print(f"[yellow]interrupted at step {self.step + 1}[/]")
        finally:
            _restore_sigint(previous_handler)
            self.tracker.finish(status)
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
            self.console.print(summary_table(result))
        return result

    def _run_loop(self) -> None:
        t = self.cfg.trainer
        if self.step == 0 and t.val_before_train:
            self.val_start = self.validate(step=0)
            self._log(self.val_start, step=0)
        with self._progress() as progress:
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
                self._dirty = False
                if not last and t.save_freq > 0 and step % t.save_freq == 0:
                    self._save()
                progress.update(bar, completed=step, info=progress_info(metrics))
                if self._stop_requested:
                    raise _StopRequested

    # ------------------------------------------------------------------ one step

    def train_step(self, step: int) -> dict[str, float]:
        """Run step ``step`` (1-based) end to end; return its metrics."""
        cfg, rc = self.cfg, self.rc
        timer, metrics = StageTimer(self.device), {}
        step_start = time.perf_counter()
        metrics["actor/lr"] = self.optimizer.param_groups[0]["lr"]  # the lr of this step

        # 1. Prompts: a pure function of (seed, step), so a resumed run sees the same batch.
        indices = self.train_data.batch(step - 1, cfg.data.train_batch_size, cfg.trainer.seed)
        examples = [self.train_data.examples[i] for i in indices]
        prompts = [self.train_data.prompt_ids[i] for i in indices]

        # 2. Generate n responses per prompt from the rollout copy, refreshed every k steps
        #    (step - 1 updates applied so far; k > 1 leaves the copy up to k - 1 updates stale).
        with timer("gen"):
            self.engine.sync_weights(self.model, step - 1)
            seed = derive_seed(cfg.trainer.seed, "gen", step)
            batch = self.engine.generate(prompts, self.sampling, seed=seed).to(self.device)
        response_mask = batch.response_mask.float()  # (B, T)
        rollout_log_probs = batch.rollout_log_probs.float()  # (B, T)
        metrics["rollout/staleness"] = float(step - 1 - batch.weight_version)

        # 3. Rewards: the outcome score sits on each response's last valid token.
        with timer("reward"):
            per_response = [examples[i] for i in batch.prompt_index.tolist()]
            scores, extras = self.score(batch, per_response)  # (B,), {name: (B,)}
            token_rewards = token_rewards_from_scores(scores, response_mask)  # (B, T)
        metrics.update(reward_metrics(scores, "reward"))
        metrics.update({f"reward/extra/{k}": float(v.float().mean()) for k, v in extras.items()})
        metrics.update(length_metrics(batch, self.eos_ids, cfg.data.max_response_length))

        # 4. pi_old. Decoupled: one extra forward of the training model. Bypass: the rollout's.
        if rc.bypass_mode:
            old_log_probs = rollout_log_probs
        else:
            with timer("old_log_prob"):
                old_log_probs = self.forward_log_probs(self.model, batch)  # (B, T)

        # 5. Reference log-probs, only when a KL loss is on.
        ref_log_probs = None
        if self.ref_model is not None:
            with timer("ref"):
                ref_log_probs = self.forward_log_probs(self.ref_model, batch)  # (B, T)

        # 6. Values (gae): the critic's estimate before each response token.
        values = None
        if self.critic is not None:
            with timer("values"):
                values = self.forward_values(batch)  # (B, T)

        # 7. Advantages.
        with timer("adv"):
            advantages, returns = compute_advantages(
                cfg.algorithm, scores, token_rewards, response_mask, batch.prompt_index, values
            )  # (B, T) each
        metrics.update(advantage_metrics(advantages, returns, values, response_mask))

        # 8. Rollout correction, decoupled mode: once per batch, w = pi_old / pi_rollout.
        is_weights, train_mask = None, response_mask
        if not rc.bypass_mode:
            with timer("correction"):
                correction = rollout_correction(rc, old_log_probs, rollout_log_probs, response_mask)
            is_weights, train_mask = correction.is_weights, correction.response_mask
            metrics.update(correction.metrics)

        # 9. Actor update: ppo_epochs passes over mini-batches of ppo_mini_batch_size prompts.
        #    From here until the step is logged, the weights belong to no completed step.
        self._dirty = True
        with timer("update_actor"):
            actor_metrics, dumped_train_lp = self.update_actor(
                step, batch, old_log_probs, advantages, is_weights, train_mask, ref_log_probs
            )
        metrics.update(actor_metrics)
        if metrics.get("rollout_corr/skipped_update", 0.0) >= 1.0:
            warnings.warn(
                f"step {step}: rejection sampling masked every token; update skipped",
                stacklevel=2,
            )

        # 10. Critic update (gae).
        if self.critic is not None:
            with timer("update_critic"):
                metrics.update(self.update_critic(batch, values, returns, response_mask))
            step_scheduler(self.critic_scheduler)
        step_scheduler(self.scheduler)

        # 11. Metrics: timing, throughput; optional log-prob dump.
        if self.cfg.trainer.dump_log_probs:
            train_lp = old_log_probs if not rc.bypass_mode else dumped_train_lp
            self.dump_log_probs(step, batch, train_lp, scores)
        metrics.update(timer.metrics())
        metrics["timing/step"] = time.perf_counter() - step_start
        tokens = float(batch.response_mask.sum() + batch.prompt_mask.sum())
        metrics["perf/tokens_per_s"] = tokens / max(
            metrics["timing/step"], 1e-9
        )  # prompt + response
        if self.device.type == "cuda":
            metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics

    # ------------------------------------------------------------------ updates

    def update_actor(
        self,
        step: int,
        batch: Any,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        is_weights: torch.Tensor | None,
        train_mask: torch.Tensor,
        ref_log_probs: torch.Tensor | None,
    ) -> tuple[dict[str, float], torch.Tensor]:
        """``ppo_epochs`` passes of mini-batch updates; returns (metrics, epoch-1 log-probs).

        Decoupled: PPO-clip on pi_theta / pi_old, per-token loss times ``is_weights``, over
        ``train_mask`` (RS applied). Bypass: the correction is recomputed per micro-batch from the
        current pi_theta vs pi_rollout; ppo_clip uses the ratio pi_theta / pi_rollout (weights
        logged only), reinforce uses ``-w * A * log pi_theta``.
        """
        cfg, rc, actor = self.cfg, self.rc, self.cfg.actor_rollout_ref.actor
        size = batch.response_ids.shape[0]
        mini, micro = self.batch_split(size, actor.ppo_micro_batch_size_per_gpu)
        response_mask = batch.response_mask.float()
        rollout_log_probs = batch.rollout_log_probs.float()
        epoch1_log_probs = torch.zeros_like(rollout_log_probs)
        bag, optimizer_steps = MetricBag(), 0
        generator = torch.Generator().manual_seed(derive_seed(cfg.trainer.seed, "shuffle", step))
        for epoch in range(actor.ppo_epochs):
            order = (
                torch.randperm(size, generator=generator) if actor.shuffle else torch.arange(size)
            )
            for start in range(0, size, mini):
                mb_rows = order[start : start + mini]
                self.optimizer.zero_grad(set_to_none=True)
                kept_tokens = 0.0
                for mstart in range(0, len(mb_rows), micro):
                    rows = mb_rows[mstart : mstart + micro].to(self.device)
                    log_probs, entropy = self.forward_log_probs(
                        self.model, batch, rows=rows, grad=True, entropy=True
                    )  # (b, T) each
                    mask = response_mask[rows]  # (b, T) before rejection
                    if epoch == 0:
                        epoch1_log_probs[rows] = log_probs.detach().float()
                    loss, loss_metrics = actor_loss(
                        actor,
                        rc,
                        log_probs=log_probs,
                        old_log_probs=old_log_probs[rows],
                        advantages=advantages[rows],
                        is_weights=None if is_weights is None else is_weights[rows],
                        train_mask=mask if rc.bypass_mode else train_mask[rows],
                        response_mask=mask,
                        entropy=entropy,
                        ref_log_probs=None if ref_log_probs is None else ref_log_probs[rows],
                    )
                    bag.add(loss_metrics)
                    bag.add({"actor/entropy": masked_mean(entropy.detach(), mask)})
                    if rc.bypass_mode:  # RS applied inside the loss, per micro-batch
                        kept = loss_metrics["actor/kept_token_fraction"] * float(mask.sum())
                    else:
                        kept = float(train_mask[rows].sum())
                    if kept > 0:  # an all-rejected micro-batch contributes no update at all
                        kept_tokens += kept
                        (loss * (len(rows) / len(mb_rows))).backward()
                if kept_tokens == 0:
                    bag.add({"actor/skipped_minibatch": 1.0})
                    continue
                bag.add({"actor/skipped_minibatch": 0.0})
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), actor.grad_clip)
                bag.add({"actor/grad_norm": grad_norm})
                if torch.isfinite(grad_norm):
                    self.optimizer.step()
                    optimizer_steps += 1
                else:
                    bag.add({"actor/nonfinite_grad": 1.0})
        self.optimizer.zero_grad(set_to_none=True)
        metrics = bag.means()
        metrics["rollout_corr/skipped_update"] = 1.0 if optimizer_steps == 0 else 0.0
        metrics["actor/optimizer_steps"] = float(optimizer_steps)
        return metrics, epoch1_log_probs

    def batch_split(self, size: int, micro_per_gpu: int | None) -> tuple[int, int]:
        """(mini-batch, micro-batch) sizes in responses: ``ppo_mini_batch_size`` prompts x n,
        then ``micro_per_gpu`` responses per forward (null: the whole mini-batch)."""
        actor, n = self.cfg.actor_rollout_ref.actor, self.cfg.actor_rollout_ref.rollout.n
        mini = min(size, actor.ppo_mini_batch_size * n)
        return mini, min(mini, micro_per_gpu or mini)

    def update_critic(
        self,
        batch: Any,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        response_mask: torch.Tensor,
    ) -> dict[str, float]:
        """Value regression to ``returns`` with clipping around ``old_values`` (gae)."""
        cfg, actor = self.cfg, self.cfg.actor_rollout_ref.actor
        size = batch.response_ids.shape[0]
        mini, micro = self.batch_split(size, cfg.critic.ppo_micro_batch_size_per_gpu)
        bag = MetricBag()
        for _epoch in range(actor.ppo_epochs):
            for start in range(0, size, mini):
                mb_rows = torch.arange(start, min(size, start + mini))
                self.critic_optimizer.zero_grad(set_to_none=True)
                for mstart in range(0, len(mb_rows), micro):
                    rows = mb_rows[mstart : mstart + micro].to(self.device)
                    values = self.forward_values(batch, rows=rows, grad=True)  # (b, T)
                    loss, loss_metrics = critic_loss(
                        values, old_values[rows], returns[rows], response_mask[rows], cfg
                    )
                    bag.add(loss_metrics)
                    (loss * (len(rows) / len(mb_rows))).backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.critic.parameters(), cfg.critic.grad_clip
                )
                bag.add({"critic/grad_norm": grad_norm})
                if torch.isfinite(grad_norm):
                    self.critic_optimizer.step()
        self.critic_optimizer.zero_grad(set_to_none=True)
        metrics = bag.means()
        metrics["critic/lr"] = self.critic_optimizer.param_groups[0]["lr"]
        return metrics

    # ------------------------------------------------------------------ forwards

    def forward_log_probs(
        self,
        model: torch.nn.Module,
        batch: Any,
        rows: torch.Tensor | None = None,
        grad: bool = False,
        entropy: bool = False,
    ) -> Any:
        """Training-side log-probs of the sampled tokens, (b, T) float32, under
        ``logits / temperature`` (no top-k/top-p). With ``entropy``: ``(log_probs, entropy)``.

        Without ``grad`` the whole batch (or ``rows``) goes through in micro-batches.
        """
        from rcx.rollout import position_ids_from_mask, processed_log_probs

        rows = (
            torch.arange(batch.response_ids.shape[0], device=self.device) if rows is None else rows
        )
        input_ids = batch.input_ids[rows]  # (b, P+T)
        attention_mask = batch.attention_mask[rows]  # (b, P+T)
        length = batch.response_length
        chunk = len(rows) if grad else self._forward_chunk()
        out_lp, out_ent = [], []
        with torch.set_grad_enabled(grad), self._autocast():
            for s in range(0, len(rows), chunk):
                ids, am = input_ids[s : s + chunk], attention_mask[s : s + chunk]
                logits = model(
                    input_ids=ids,
                    attention_mask=am,
                    position_ids=position_ids_from_mask(am),
                    use_cache=False,
                ).logits[:, -length - 1 : -1, :]  # (b, T, V)
                out_lp.append(processed_log_probs(logits, ids[:, -length:], self.score_sampling))
                if entropy:
                    scaled = logits.float() / self.score_sampling.temperature
                    out_ent.append(entropy_from_logits(scaled))
        log_probs = torch.cat(out_lp)  # (b, T)
        return (log_probs, torch.cat(out_ent)) if entropy else log_probs

    def forward_values(self, batch: Any, rows: torch.Tensor | None = None, grad: bool = False):
        """Critic values before each response token, (b, T) float32."""
        from rcx.rollout import position_ids_from_mask

        rows = (
            torch.arange(batch.response_ids.shape[0], device=self.device) if rows is None else rows
        )
        am = batch.attention_mask[rows]
        length = batch.response_length
        with torch.set_grad_enabled(grad), self._autocast():
            values = self.critic(batch.input_ids[rows], am, position_ids_from_mask(am))
        return values[:, -length - 1 : -1].float()  # (b, T)

    def _autocast(self) -> Any:
        """bf16 autocast on CUDA (SPEC §7.2), nothing on CPU; a fresh context per use."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _forward_chunk(self) -> int:
        actor = self.cfg.actor_rollout_ref.actor
        return actor.ppo_micro_batch_size_per_gpu or 1 << 30

    # ------------------------------------------------------------------ rewards & validation

    def score(
        self, batch: Any, examples: Sequence[Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Outcome reward of each response, (B,) float32, from the decoded response text, and
        the reward hook's extra values (each (B,)), if any."""
        from rcx.data.rewards import score_responses

        scores, extras = score_responses(
            self.scorer, decode_responses(self.tokenizer, batch), examples
        )
        return scores.to(self.device), extras

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Reward and accuracy on the validation prompts, from float32 training weights."""
        start = time.perf_counter()
        self.val_engine.sync_weights(self.model, step, force=True)
        runs = [("val", self.val_sampling)]
        if not self.val_sampling.do_sample:
            runs.append(("val/sampled", dataclasses.replace(self.sampling, n=1)))
        metrics: dict[str, float] = {}
        size = self.cfg.data.val_batch_size or len(self.val_data)
        for name, sampling in runs:
            all_scores = []
            for s in range(0, len(self.val_data), size):
                prompts = self.val_data.prompt_ids[s : s + size]
                examples = self.val_data.examples[s : s + size]
                seed = derive_seed(self.cfg.trainer.seed, name, s)
                batch = self.val_engine.generate(prompts, sampling, seed=seed)
                per_sample = [examples[i] for i in batch.prompt_index.tolist()]
                all_scores.append(self.score(batch, per_sample)[0])
            scores = torch.cat(all_scores)
            prefix = "val/" if name == "val" else "val/sampled_"
            metrics[f"{prefix}reward_mean"] = float(scores.mean())
            metrics[f"{prefix}accuracy"] = float((scores >= 1.0).float().mean())
        metrics["timing/validation"] = time.perf_counter() - start
        return metrics

    # ------------------------------------------------------------------ persistence

    def _save(self) -> Path | None:
        """Checkpoint the completed step ``self.step`` (nothing before the first step)."""
        if self.step == 0:
            return None
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "critic": None if self.critic is None else self.critic.state_dict(),
            "critic_optimizer": None if self.critic is None else self.critic_optimizer.state_dict(),
            "critic_scheduler": None if self.critic is None else self.critic_scheduler.state_dict(),
            "rollout": self.engine.state_dict(),
            "rng": capture_rng_state(),
            "extra": {
                "history": {k: list(v) for k, v in self.history.items()},
                "val_start": dict(self.val_start),
            },
        }
        from rcx.config.yamlio import dump_yaml

        return save_checkpoint(
            self.ckpt_dir,
            self.step,
            state,
            config_yaml=dump_yaml(self.cfg.model_dump(mode="json")),
            mlflow_run_id=self.tracker.run_id,
            # verl's key; not in the config tree yet (keep every checkpoint until it is).
            keep_last=getattr(self.cfg.trainer, "max_actor_ckpt_to_keep", None),
        )

    def _restore(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        state = ckpt.state
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.critic is not None:
            if state.get("critic") is None:
                raise CheckpointError(f"{path} has no critic, but this config trains one")
            self.critic.load_state_dict(state["critic"])
            self.critic_optimizer.load_state_dict(state["critic_optimizer"])
            self.critic_scheduler.load_state_dict(state["critic_scheduler"])
        self.engine.load_state_dict(state["rollout"])
        restore_rng_state(state["rng"])
        extra = state.get("extra", {})
        for key, points in extra.get("history", {}).items():
            self.history[key] = [(int(s), float(v)) for s, v in points]
        self.val_start = dict(extra.get("val_start", {}))
        self.step = self.resumed_from = ckpt.step

    def dump_log_probs(
        self, step: int, batch: Any, train_log_probs: torch.Tensor, scores: torch.Tensor
    ) -> Path:
        """Write this step's log-prob dump (format in the module docstring); upload it."""
        path = self.ckpt_dir / "log_probs" / f"step_{step:06d}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": DUMP_FORMAT,
            "step": step,
            "mode": "bypass" if self.rc.bypass_mode else "decoupled",
            "rollout_log_probs": batch.rollout_log_probs.detach().float().cpu(),
            "train_log_probs": train_log_probs.detach().float().cpu(),
            "response_mask": batch.response_mask.detach().bool().cpu(),
            "prompt_index": batch.prompt_index.detach().to(torch.int32).cpu(),
            "scores": scores.detach().float().cpu(),
            "rollout_correction": self.rc.model_dump(mode="json"),
        }
        tmp = path.with_suffix(".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        self.tracker.log_artifact(path, "log_probs")
        return path

    # ------------------------------------------------------------------ console & tracking

    def _announce(self) -> None:
        """Print where things go; log params and the resolved config (first session only)."""
        from rcx.config.yamlio import dump_yaml

        notes = self.tracker.log_params(flatten_config(self.cfg.model_dump(mode="json")))
        self.tracker.log_text(dump_yaml(self.cfg.model_dump(mode="json")), "config.yaml")
        mode = "bypass" if self.rc.bypass_mode else "decoupled"
        self.console.print(
            f"rcx train: {self.total_steps} steps, {mode} mode, "
            f"{self.cfg.algorithm.adv_estimator}, device {self.device} "
            f"({self.threads} thread{'s' * (self.threads != 1)}); "
            f"checkpoints in {self.ckpt_dir}",
            markup=False,
        )
        if self.resumed_from:
            self.console.print(f"resumed from step {self.resumed_from} ({esc(self.resume_path)})")
        for note in notes:
            self.console.print(f"[yellow]{esc(note)}[/]")

    def _log(self, metrics: Mapping[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()}
        for key, value in clean.items():
            self.history[key].append((step, value))
        self.last_metrics = clean
        self.tracker.log_metrics(clean, step=step)

    def _finish_artifacts(self) -> None:
        png = plot_history(self.history, self.ckpt_dir / "metrics.png")
        if png is not None:
            self.tracker.log_artifact(png, "plots")

    def _progress(self) -> Progress:
        return Progress(
            TextColumn("step"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not self.show,
            transient=False,
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        self.console.print(
            "[yellow]Ctrl-C: finishing this step, then saving a checkpoint "
            "(press again to stop now)[/]"
        )


class _StopRequested(Exception):
    """Raised at a step boundary after the first Ctrl-C."""


def _install_sigint(handler: Any) -> Any:
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave the default KeyboardInterrupt behaviour
        return None


def _restore_sigint(previous: Any) -> None:
    if previous is not None:
        with suppress(ValueError):
            signal.signal(signal.SIGINT, previous)


# =========================================================================== loading


def find_resume_checkpoint(cfg: RcxConfig, ckpt_dir: Path) -> Path | None:
    """The checkpoint to resume from per ``trainer.resume_mode``, or None to start fresh."""
    t = cfg.trainer
    if t.resume_mode == "disable":
        return None
    if t.resume_mode == "resume_path":
        if not t.resume_from_path:
            raise CheckpointError("trainer.resume_mode=resume_path needs trainer.resume_from_path")
        path = Path(t.resume_from_path)
        found = path if (path / "meta.json").is_file() else latest_checkpoint(path)
        if found is None:
            raise CheckpointError(
                f"trainer.resume_from_path={t.resume_from_path!r} holds no complete checkpoint"
            )
        return found
    return latest_checkpoint(ckpt_dir)


def _read_run_id(path: Path) -> str | None:
    import json

    try:
        return json.loads((path / "meta.json").read_text()).get("mlflow_run_id")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path / 'meta.json'}: {exc}") from exc


def load_policy(cfg: RcxConfig, device: torch.device, show: bool = True) -> tuple[Any, Any, str]:
    """(model, tokenizer, resolved path): the policy in float32 and eval mode; builtin:tiny is
    warm-started (or taken from the cache) first, and the path is then its directory."""
    from rcx.models.loading import load_model_and_tokenizer
    from rcx.train.pretrain import resolve_model_path

    model_cfg = cfg.actor_rollout_ref.model
    path = resolve_model_path(
        model_cfg.path,
        model_cfg.warm_start_steps,
        cfg.data.train_files,
        builtin=builtin_task(cfg),
        seed=cfg.data.builtin.seed,
        progress=show,
    )
    model, tokenizer = load_model_and_tokenizer(
        path, dtype="float32", device=device, seed=cfg.trainer.seed
    )
    model.eval()
    return model, tokenizer, path


def builtin_task(cfg: RcxConfig) -> Any:
    """The built-in task named by ``data.train_files`` (default arith) with ``data.builtin.*``."""
    from rcx.data.tasks import BUILTIN_TASKS, BuiltinTask, as_file_list

    names = [f for f in as_file_list(cfg.data.train_files) if f in BUILTIN_TASKS]
    return BuiltinTask.from_config(names[0] if names else BUILTIN_TASKS[0], cfg.data.builtin)


def load_data(cfg: RcxConfig, tokenizer: Any) -> tuple[Any, Any, Any]:
    """Training and validation prompts, and the reward scorer."""
    from rcx.data.rewards import RewardScorer
    from rcx.data.tasks import load_prompts

    scorer = RewardScorer(cfg.custom_reward_function.path, cfg.custom_reward_function.name)
    common = dict(
        max_prompt_length=cfg.data.max_prompt_length,
        prompt_key=cfg.data.prompt_key,
        builtin=builtin_task(cfg),
        scorer=scorer,
    )
    train_data = load_prompts(cfg.data.train_files, "train", tokenizer, **common)
    val_data = load_prompts(cfg.data.val_files, "val", tokenizer, **common)
    return train_data, val_data, scorer


def sampling_params(cfg: RcxConfig) -> tuple[Any, Any, Any]:
    """(rollout sampling, validation sampling, training-side scoring: temperature only).

    The trainer scores at ``actor.temperature`` when set, else at the rollout's temperature.
    """
    from rcx.rollout import SamplingParams

    rollout, length = cfg.actor_rollout_ref.rollout, cfg.data.max_response_length
    sampling = SamplingParams.from_config(rollout, length)
    val = SamplingParams.from_config(rollout, length, validation=True)
    temperature = cfg.actor_rollout_ref.actor.temperature or rollout.temperature
    scoring = SamplingParams(temperature=temperature, max_new_tokens=length)
    return sampling, val, scoring


def make_optimizer(params: Any, optim: Any) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with a linear warm-up then constant lr (one scheduler step per training step)."""
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(optim.lr_warmup_steps))
    return optimizer, scheduler


def step_scheduler(scheduler: Any) -> None:
    """One lr-schedule step per training step, also after a step whose update was skipped
    (torch warns about that order; here it is intended: the schedule counts training steps)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler"))
        scheduler.step()


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    configured = getattr(model.config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return ids


def decode_responses(tokenizer: Any, batch: Any) -> list[str]:
    """Each response's text (masked tokens only, special tokens dropped)."""
    ids = batch.response_ids.cpu()
    mask = batch.response_mask.cpu().bool()
    return [
        tokenizer.decode(row[m].tolist(), skip_special_tokens=True)
        for row, m in zip(ids, mask, strict=True)
    ]


# =========================================================================== small math


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    total = float(mask.sum())
    return float((values * mask).sum()) / total if total > 0 else 0.0


def reward_metrics(scores: torch.Tensor, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}/mean": float(scores.mean()),
        f"{prefix}/std": float(scores.std()) if len(scores) > 1 else 0.0,
        f"{prefix}/accuracy": float((scores >= 1.0).float().mean()),
    }


def length_metrics(batch: Any, eos_ids: torch.Tensor, max_length: int) -> dict[str, float]:
    """response_length/{mean,max,min,clip_ratio}; clipped = hit max length without EOS."""
    lengths = batch.response_mask.sum(-1).float().cpu()  # (B,)
    last = (lengths.long() - 1).clamp(min=0)  # (B,)
    last_token = batch.response_ids.cpu()[torch.arange(len(lengths)), last]  # (B,)
    ended = torch.isin(last_token, eos_ids)
    clipped = (lengths >= max_length) & ~ended
    return {
        "response_length/mean": float(lengths.mean()),
        "response_length/max": float(lengths.max()),
        "response_length/min": float(lengths.min()),
        "response_length/clip_ratio": float(clipped.float().mean()),
    }


def advantage_metrics(
    advantages: torch.Tensor,
    returns: torch.Tensor,
    values: torch.Tensor | None,
    mask: torch.Tensor,
) -> dict[str, float]:
    out = {
        "critic/advantages/mean": masked_mean(advantages, mask),
        "critic/returns/mean": masked_mean(returns, mask),
    }
    if values is not None:
        out["critic/values/mean"] = masked_mean(values, mask)
    return out


def progress_info(metrics: Mapping[str, float]) -> str:
    return "  ".join(f"{short} {metrics[k]:.3f}" for k, short in KEY_METRICS if k in metrics)


def summary_table(result: TrainResult) -> Table:
    """Start (first logged) vs end (last logged) values of the key metrics."""
    table = Table(
        title=f"rcx train: {result.status} after {result.step} steps ({result.wall_s:.0f} s)"
    )
    table.add_column("metric")
    table.add_column("start", justify="right")
    table.add_column("end", justify="right")
    keys = [k for k, _ in KEY_METRICS] + [
        "val/accuracy",
        "val/reward_mean",
        "val/sampled_accuracy",
        "timing/step",
        "perf/tokens_per_s",
    ]
    for key in keys:
        points = result.history.get(key)
        if points:
            table.add_row(key, f"{points[0][1]:.4g}", f"{points[-1][1]:.4g}")
    if result.run_id:
        table.caption = f"MLflow run {result.run_id}"
    return table


# =========================================================================== adapters
# Thin adapters to rcx.correction, rcx.algos.losses and rcx.algos.advantages (helper-1's
# modules), so that the step above names what it does and the call conventions live here.


@dataclass
class CorrectionOutcome:
    is_weights: torch.Tensor | None  # (B, T) or None when IS is off
    response_mask: torch.Tensor  # (B, T) float, RS applied
    metrics: dict[str, float] = field(default_factory=dict)


def rollout_correction(
    rc: Any, train_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor
) -> CorrectionOutcome:
    """IS weights, RS mask and ``rollout_corr/*`` metrics for (train, rollout) log-probs."""
    from rcx.algos.correction import compute_rollout_correction_from_config

    out = compute_rollout_correction_from_config(rc, train_log_probs, rollout_log_probs, mask)
    return CorrectionOutcome(out.weights, out.mask.float(), dict(out.metrics))


def actor_loss(
    actor: Any,
    rc: Any,
    *,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    is_weights: torch.Tensor | None,
    train_mask: torch.Tensor,
    response_mask: torch.Tensor,
    entropy: torch.Tensor,
    ref_log_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of SPEC §4 for one micro-batch, plus entropy bonus and KL loss.

    ``train_mask``: decoupled, the batch-level RS-filtered mask; bypass, the plain response mask
    (``policy_loss`` recomputes the correction from ``log_probs`` and applies RS itself).
    The entropy bonus and the KL loss are aggregated over ``response_mask`` (regularisers, not
    part of the off-policy correction).
    """
    from rcx.algos import losses

    loss, metrics = losses.policy_loss(
        log_probs,
        old_log_probs,
        advantages,
        train_mask,
        bypass_mode=rc.bypass_mode,
        loss_type=rc.loss_type,
        is_weights=None if rc.bypass_mode else is_weights,
        rollout_correction=rc if rc.bypass_mode else None,
        clip_ratio=actor.clip_ratio,
        clip_ratio_low=actor.clip_ratio_low,
        clip_ratio_high=actor.clip_ratio_high,
        clip_ratio_c=actor.clip_ratio_c,
        loss_agg_mode=actor.loss_agg_mode,
    )
    if actor.entropy_coeff > 0:
        bonus = losses.agg_loss(entropy, response_mask, actor.loss_agg_mode)
        loss = loss - actor.entropy_coeff * bonus
    if ref_log_probs is not None:
        kl = losses.kl_penalty(log_probs, ref_log_probs, actor.kl_loss_type)  # (b, T)
        kl_loss = losses.agg_loss(kl, response_mask, actor.loss_agg_mode)
        loss = loss + actor.kl_loss_coef * kl_loss
        metrics["actor/kl_loss"] = float(kl_loss.detach())
    return loss, metrics


def critic_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: RcxConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (``critic/vf_loss``, ``critic/vf_clipfrac``)."""
    from rcx.algos import losses

    return losses.value_loss(
        values,
        returns,
        old_values,
        mask,
        cliprange_value=cfg.critic.cliprange_value,
        loss_agg_mode=cfg.actor_rollout_ref.actor.loss_agg_mode,
    )


def compute_advantages(
    algorithm: Any,
    scores: torch.Tensor,
    token_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: torch.Tensor,
    values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T), per ``algorithm.adv_estimator``.

    Only gae has value targets; for the others ``returns`` are the advantages (as in verl).
    """
    from rcx.algos import advantages as adv

    name = algorithm.adv_estimator
    if name == "gae":
        return adv.gae(
            token_rewards, values, response_mask, gamma=algorithm.gamma, lam=algorithm.lam
        )
    if name == "grpo":
        a = adv.grpo(scores, response_mask, index, norm_by_std=algorithm.norm_adv_by_std_in_grpo)
    elif name == "rloo":
        a = adv.rloo(scores, response_mask, index)
    elif name == "reinforce_plus_plus":
        a = adv.reinforce_plus_plus(token_rewards, response_mask, gamma=algorithm.gamma)
    else:
        raise ValueError(f"algorithm.adv_estimator={name!r} is not supported")
    return a, a
