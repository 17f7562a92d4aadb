"""Findings: what ``rcx validate`` reports, each with a stable code (documented in the README).

Codes are stable: dashboards, CI scripts and sweeps match on them. Errors make a config invalid;
warnings flag a config that runs but probably does not do what its author meant.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

from rcx.algos.criteria import RSCriterion, token_ratio_interval
from rcx.algos.modes import RATIO_LOSSES
from rcx.config import limits
from rcx.config.models import RcxConfig, RolloutCorrectionConfig, TrainerConfig

Level = Literal["error", "warning"]

#: Every code, with a one-line title (the README lists them with an example each).
CODES: dict[str, str] = {
    "RCX-W001": "bypass mode with ppo_epochs > 1 (the anchor stays at pi_rollout while the policy moves)",
    "RCX-W002": "rollout_is set under bypass with a loss that carries the ratio (ppo_clip, cispo, gspo): weights are metrics-only",
    "RCX-W003": "rollout_is_batch_normalize without rollout_is (nothing to normalise)",
    "RCX-W004": "loss_type reinforce with bypass off (ignored: decoupled mode uses PPO-clip)",
    "RCX-W005": "legacy rollout_rs alias (token, sequence, geometric)",
    "RCX-W006": "a k1 interval that excludes r = 1 (every on-policy token rejected)",
    "RCX-W007": "RS bounds so tight they reject almost every token at typical mismatch",
    "RCX-W008": "RS bounds so loose they reject nothing at typical mismatch",
    "RCX-W009": "a data file or model directory that does not exist here (checked again at train time)",
    "RCX-W010": "ppo_mini_batch_size does not divide train_batch_size (last mini-batch is smaller)",
    "RCX-W011": "rollout_rs_threshold set without rollout_rs (ignored: no rejection criterion)",
    "RCX-W012": "loss_type gspo with a loss_agg_mode other than seq-mean-token-mean (GSPO's objective)",
    "RCX-W013": "baseline_includes_rejected: false where it cannot act (bypass mode, or an estimator without group baselines)",
    "RCX-W014": "a denominator choice with nothing rejected (RS and OPSM off): it changes nothing",
    "RCX-W015": "sampling_mask_replay without top-p/top-k truncation: nothing to replay",
    "RCX-E001": "unknown key",
    "RCX-E002": "unknown rejection criterion",
    "RCX-E003": "threshold count matches neither 1 nor the number of criteria",
    "RCX-E004": "malformed or missing threshold entry",
    "RCX-E005": "rollout_is_threshold <= 1",
    "RCX-E006": "correction or bypass mode with calculate_log_probs: false",
    "RCX-E007": "group estimator (grpo, rloo) with rollout.n < 2",
    "RCX-E008": "gae with the critic disabled",
    "RCX-E009": "invalid type or value",
    "RCX-E010": "removed legacy key",
    "RCX-E011": "unreadable input: config file, preset name or KEY=VALUE override",
    "RCX-E012": "checkpoint folder that cannot be written here (not a folder, no permission, path too long)",
    "RCX-E013": "a step or the built-in data needs more memory than this machine has available",
    "RCX-E014": "a logger in trainer.logger whose package is not installed here (names the extra)",
    "RCX-E015": "sampling_mask_replay with the vllm engine (it does not report the kept token sets)",
    "RCX-E016": "a batch that the training processes cannot share evenly (n_gpus_per_node x nnodes)",
    "RCX-W016": "a fully_async setting (max_off_policy_threshold, max_off_policy_strategy, rollout_workers) with another async_mode (ignored)",
    "RCX-E017": "trainer.async_mode one_step_off or fully_async with what it does not support: several training processes, the vllm engine, weight_sync_interval > 1",
}

RC = "algorithm.rollout_correction"
#: The trainer keys only ``async_mode: fully_async`` reads (W016 when set in another mode).
FULLY_ASYNC_KEYS = ("max_off_policy_threshold", "max_off_policy_strategy", "rollout_workers")

#: Per-token |log r| below which an RS bound rejects almost everything (bf16 rollouts see a mean
#: |log r| of ~0.006 and a max of 0.2-0.4), and above which it rejects nothing at typical mismatch.
TIGHT_LOG_RATIO = 0.02
LOOSE_LOG_RATIO = 10.0


@dataclass(frozen=True)
class Finding:
    code: str
    level: Level
    path: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def error(code: str, path: str, message: str) -> Finding:
    return Finding(code, "error", path, message)


def warning(code: str, path: str, message: str) -> Finding:
    return Finding(code, "warning", path, message)


def correction_findings(rc: RolloutCorrectionConfig) -> list[Finding]:
    """The problems of the config's parsed IS/RS settings, and its legacy aliases (RCX-W005)."""
    parsed = rc.parsed
    problems = [error(p.code, f"{RC}.{p.path}", p.message) for p in parsed.problems]
    is_problems = [f for f in problems if not f.path.startswith(f"{RC}.rollout_rs")]
    aliases = [
        warning(
            "RCX-W005",
            f"{RC}.rollout_rs",
            f"{alias!r} is a legacy alias; write {canonical!r} (same behaviour)",
        )
        for alias, canonical in parsed.aliases
    ]
    rs_problems = [f for f in problems if f not in is_problems]
    return is_problems + aliases + rs_problems


def _rs_bound_findings(criteria: Sequence[RSCriterion]) -> list[Finding]:
    path = f"{RC}.rollout_rs_threshold"
    out: list[Finding] = []
    for c in criteria:
        if c.statistic == "k1" and c.lower is not None and not (c.lower <= 1.0 <= c.upper):
            out.append(
                warning(
                    "RCX-W006",
                    path,
                    f"{c.criterion} keeps {c.keeps()}, which excludes r = 1: every on-policy "
                    f"token or sequence is rejected",
                )
            )
            continue
        interval = token_ratio_interval(c)
        if interval is None:
            continue
        half_width = min(-math.log(interval[0]), math.log(interval[1]))
        if half_width < TIGHT_LOG_RATIO:
            out.append(
                warning(
                    "RCX-W007",
                    path,
                    f"{c.criterion} keeps only tokens with r in [{interval[0]:.4g}, {interval[1]:.4g}] "
                    f"(|log r| < {half_width:.3g}); typical rollout mismatch (bf16: mean |log r| "
                    f"~0.006, max 0.2-0.4) would reject almost every sequence",
                )
            )
        elif min(-math.log(interval[0]), math.log(interval[1])) >= LOOSE_LOG_RATIO:
            out.append(
                warning(
                    "RCX-W008",
                    path,
                    f"{c.criterion} keeps every token with r in [{interval[0]:.3g}, {interval[1]:.3g}] "
                    f"(|log r| up to {half_width:.3g}); it rejects nothing at typical mismatch",
                )
            )
    return out


def _exists_locally(path: str) -> bool:
    return path.startswith("builtin:") or os.path.exists(os.path.expanduser(path))


def _file_findings(cfg: RcxConfig) -> list[Finding]:
    out: list[Finding] = []
    for key in ("train_files", "val_files"):
        value = getattr(cfg.data, key)
        for f in [value] if isinstance(value, str) else value:
            if not _exists_locally(f):
                out.append(
                    warning(
                        "RCX-W009",
                        f"data.{key}",
                        f"{f!r} does not exist here; training will stop on it",
                    )
                )
    model_path = cfg.actor_rollout_ref.model.path
    train_files = cfg.data.train_files
    train_files = [train_files] if isinstance(train_files, str) else train_files
    warm_start = cfg.actor_rollout_ref.model.warm_start_steps
    if (
        model_path == "builtin:tiny"
        and warm_start > 0
        and not any(f.startswith("builtin:") for f in train_files)
    ):
        out.append(
            error(
                "RCX-E009",
                "actor_rollout_ref.model.warm_start_steps",
                f"builtin:tiny warm-starts ({warm_start} steps) on a built-in task, but "
                f"data.train_files names none; set actor_rollout_ref.model.warm_start_steps=0 "
                f"(an untrained model) or point actor_rollout_ref.model.path at your own model",
            )
        )
    if not _exists_locally(model_path):
        out.append(
            warning(
                "RCX-W009",
                "actor_rollout_ref.model.path",
                f"{model_path!r} is not a local directory (rcx never downloads from a hub); "
                f"training needs builtin:tiny or a local Hugging Face model directory",
            )
        )
    return out


def _machine_findings(cfg: RcxConfig) -> list[Finding]:
    """The checkpoint folder (RCX-E012) and the memory estimate (RCX-E013), on this machine."""
    out: list[Finding] = []
    folder_key = (
        "trainer.default_local_dir" if cfg.trainer.default_local_dir else "trainer.project_name"
    )
    problem = limits.checkpoint_dir_problem(cfg.checkpoint_dir())
    if problem:
        out.append(error("RCX-E012", folder_key, f"checkpoint folder: {problem}"))
    available = limits.available_memory()
    if available is None:
        return out
    data, arr = cfg.data, cfg.actor_rollout_ref
    builtin = [
        f
        for key in ("train_files", "val_files")
        for f in (
            [getattr(data, key)] if isinstance(getattr(data, key), str) else getattr(data, key)
        )
        if f.startswith("builtin:")
    ]
    if builtin:
        prompts = data.builtin.num_train + data.builtin.num_val
        need = prompts * limits.BYTES_PER_BUILTIN_PROMPT
        if need > available:
            out.append(
                error(
                    "RCX-E013",
                    "data.builtin.num_train",
                    f"{prompts:,} built-in prompts need ~{limits.human_bytes(need)} "
                    f"(~{limits.BYTES_PER_BUILTIN_PROMPT} B each), more than the "
                    f"{limits.human_bytes(available)} available here; use fewer",
                )
            )
    shape = limits.model_shape(arr.model.path)
    if shape is not None:
        est = limits.step_memory(
            shape,
            data.train_batch_size,
            arr.rollout.n,
            data.max_prompt_length,
            data.max_response_length,
            arr.actor.ppo_micro_batch_size_per_gpu,
            arr.rollout.name,
        )
        if est.total > available:
            h = limits.human_bytes
            out.append(
                error(
                    "RCX-E013",
                    "data.train_batch_size",
                    f"a step of {est.responses:,} responses x {est.tokens} tokens needs "
                    f"~{h(est.total)} (KV cache {h(est.kv_cache)}, scores {h(est.scores)}, "
                    f"forward {h(est.forward)}), more than the {h(available)} available here; "
                    f"lower data.train_batch_size or rollout.n, or set "
                    f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
                )
            )
    return out


def _logger_findings(cfg: RcxConfig) -> list[Finding]:
    """RCX-E014 for each optional logger whose package is absent (looked up, not imported)."""
    from rcx.store.loggers import missing_package_message, missing_packages

    return [
        error("RCX-E014", "trainer.logger", missing_package_message(name))
        for name in missing_packages(cfg.trainer.logger)
    ]


def check_config(cfg: RcxConfig) -> list[Finding]:
    """Cross-field checks of a config whose individual fields are already valid."""
    rc = cfg.algorithm.rollout_correction
    actor = cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    out: list[Finding] = []

    out += correction_findings(rc)
    if rc.parsed.spec is not None:
        out += _rs_bound_findings(rc.parsed.spec.criteria)

    if (rc.enabled or rc.bypass_mode) and not rollout.calculate_log_probs:
        what = "bypass_mode" if rc.bypass_mode and not rc.enabled else "rollout correction"
        out.append(
            error(
                "RCX-E006",
                "actor_rollout_ref.rollout.calculate_log_probs",
                f"{what} needs the rollout log-probs; set actor_rollout_ref.rollout.calculate_log_probs=true",
            )
        )
    if cfg.algorithm.adv_estimator in ("grpo", "rloo") and rollout.n < 2:
        out.append(
            error(
                "RCX-E007",
                "actor_rollout_ref.rollout.n",
                f"{cfg.algorithm.adv_estimator} compares responses within a group and needs "
                f"rollout.n >= 2, got {rollout.n}",
            )
        )
    if cfg.algorithm.adv_estimator == "gae" and not cfg.critic.enable:
        out.append(
            error(
                "RCX-E008",
                "critic.enable",
                "adv_estimator gae needs a critic; set critic.enable=true (or null)",
            )
        )
    if actor.ppo_mini_batch_size > cfg.data.train_batch_size:
        out.append(
            error(
                "RCX-E009",
                "actor_rollout_ref.actor.ppo_mini_batch_size",
                f"ppo_mini_batch_size ({actor.ppo_mini_batch_size}) exceeds data.train_batch_size "
                f"({cfg.data.train_batch_size}); both count prompts",
            )
        )
    elif cfg.data.train_batch_size % actor.ppo_mini_batch_size:
        out.append(
            warning(
                "RCX-W010",
                "actor_rollout_ref.actor.ppo_mini_batch_size",
                f"{actor.ppo_mini_batch_size} does not divide data.train_batch_size "
                f"({cfg.data.train_batch_size}); the last mini-batch of each epoch is smaller",
            )
        )

    if rc.bypass_mode and actor.ppo_epochs > 1:
        out.append(
            warning(
                "RCX-W001",
                "actor_rollout_ref.actor.ppo_epochs",
                f"bypass mode anchors PPO at pi_rollout, but with ppo_epochs={actor.ppo_epochs} the "
                f"policy moves between epochs; use ppo_epochs=1 or bypass_mode=false",
            )
        )
    if rc.rollout_is is not None and rc.bypass_mode and rc.loss_type in RATIO_LOSSES:
        out.append(
            warning(
                "RCX-W002",
                f"{RC}.rollout_is",
                f"under bypass + {rc.loss_type} the loss's ratio pi_theta/pi_rollout already is "
                f"the IS correction: IS weights are computed for metrics only, never applied",
            )
        )
    if rc.rollout_rs_threshold is not None and rc.rollout_rs is None:
        out.append(
            warning(
                "RCX-W011",
                f"{RC}.rollout_rs_threshold",
                f"{rc.rollout_rs_threshold!r} is ignored: rollout_rs is null, so nothing is "
                f"rejected; name the criteria, e.g. {RC}.rollout_rs=token_k1",
            )
        )
    if rc.rollout_is_batch_normalize and rc.rollout_is is None:
        out.append(
            warning(
                "RCX-W003",
                f"{RC}.rollout_is_batch_normalize",
                "batch normalisation is on but rollout_is is null: there are no weights to normalise",
            )
        )
    if rc.loss_type == "reinforce" and not rc.bypass_mode:
        out.append(
            warning(
                "RCX-W004",
                f"{RC}.loss_type",
                "loss_type reinforce applies in bypass mode only; decoupled mode (bypass_mode=false) "
                "uses PPO-clip, so this setting is ignored",
            )
        )
    out += _frontier_findings(cfg) + _distributed_findings(cfg) + _async_findings(cfg)
    return out + _file_findings(cfg) + _machine_findings(cfg) + _logger_findings(cfg)


def _distributed_findings(cfg: RcxConfig) -> list[Finding]:
    """Batches every process can take an equal, whole-group share of (E016): each rank gets
    whole prompts (all ``n`` responses) and the same number of them."""
    world = cfg.world_size
    if world == 1:
        return []
    procs = (
        f"the {world} training processes (trainer.n_gpus_per_node="
        f"{cfg.trainer.n_gpus_per_node} x trainer.nnodes={cfg.trainer.nnodes})"
    )
    out: list[Finding] = []
    for path, value in (
        ("data.train_batch_size", cfg.data.train_batch_size),
        (
            "actor_rollout_ref.actor.ppo_mini_batch_size",
            cfg.actor_rollout_ref.actor.ppo_mini_batch_size,
        ),
    ):
        if value % world:
            out.append(
                error(
                    "RCX-E016",
                    path,
                    f"{value} prompts cannot be shared evenly by {procs}; use a multiple of {world}",
                )
            )
    return out


def _async_findings(cfg: RcxConfig) -> list[Finding]:
    """What the rollout workers cannot run with (E017): one_step_off and fully_async run beside
    one training process, build hf engines, and get new weights after every update. The
    fully_async settings are ignored in the other modes (W016)."""
    mode = cfg.trainer.async_mode
    if mode != "fully_async":
        defaults = TrainerConfig.model_fields
        out = [
            warning(
                "RCX-W016",
                f"trainer.{key}",
                f"{getattr(cfg.trainer, key)!r} is ignored: only trainer.async_mode=fully_async "
                f"reads it (this run is {mode})",
            )
            for key in FULLY_ASYNC_KEYS
            if getattr(cfg.trainer, key) != defaults[key].default
        ]
        if mode == "sync":
            return out
    else:
        out = []
    rollout = cfg.actor_rollout_ref.rollout
    refused = [
        (
            cfg.world_size > 1,
            "trainer.n_gpus_per_node",
            f"{cfg.world_size} training processes (n_gpus_per_node x nnodes); {mode} runs "
            "with one: set trainer.n_gpus_per_node=1 trainer.nnodes=1 or async_mode=sync",
        ),
        (
            rollout.name != "hf",
            "actor_rollout_ref.rollout.name",
            f"the {rollout.name} engine; the rollout worker runs the hf engine: set "
            "actor_rollout_ref.rollout.name=hf or async_mode=sync",
        ),
        (
            rollout.weight_sync_interval > 1,
            "actor_rollout_ref.rollout.weight_sync_interval",
            f"weight_sync_interval={rollout.weight_sync_interval}; the workers get new weights "
            "after every update (the staleness is the async mode's): set it to 1",
        ),
    ]
    return out + [
        error("RCX-E017", path, f"trainer.async_mode={mode} does not support {what}")
        for hit, path, what in refused
        if hit
    ]


def _frontier_findings(cfg: RcxConfig) -> list[Finding]:
    """GSPO's aggregation, the denominator choices and sampling-mask replay (W012-W015, E015)."""
    rc = cfg.algorithm.rollout_correction
    actor = cfg.actor_rollout_ref.actor
    rollout = cfg.actor_rollout_ref.rollout
    out: list[Finding] = []
    if rc.loss_type == "gspo" and actor.loss_agg_mode != "seq-mean-token-mean":
        out.append(
            warning(
                "RCX-W012",
                "actor_rollout_ref.actor.loss_agg_mode",
                f"GSPO's objective is a mean over sequences of each sequence's clipped ratio "
                f"times A (seq-mean-token-mean); {actor.loss_agg_mode} weighs sequences "
                f"differently (token-mean: by length)",
            )
        )
    if not rc.baseline_includes_rejected:
        if rc.bypass_mode:
            why = (
                "in bypass mode rejection runs per micro-batch during the update, after the "
                "advantages, so every sequence stays in its baseline"
            )
        elif cfg.algorithm.adv_estimator not in ("grpo", "rloo"):
            why = f"{cfg.algorithm.adv_estimator} has no group baseline"
        else:
            why = None
        if why:
            out.append(warning("RCX-W013", f"{RC}.baseline_includes_rejected", f"ignored: {why}"))
    spec = rc.parsed.spec
    rejects = spec is not None and (bool(spec.criteria) or spec.opsm_threshold is not None)
    if not rejects:
        if rc.loss_denominator != "kept":
            out.append(
                warning(
                    "RCX-W014",
                    f"{RC}.loss_denominator",
                    "RS and OPSM are off: kept and generated tokens are the same, so "
                    "loss_denominator changes nothing",
                )
            )
        if not rc.baseline_includes_rejected:
            out.append(
                warning(
                    "RCX-W014",
                    f"{RC}.baseline_includes_rejected",
                    "RS is off: no sequence is rejected, so every one stays in its baseline",
                )
            )
    if actor.sampling_mask_replay:
        if rollout.name == "vllm":
            out.append(
                error(
                    "RCX-E015",
                    "actor_rollout_ref.actor.sampling_mask_replay",
                    "the vllm engine does not report the kept token sets; use "
                    "actor_rollout_ref.rollout.name=hf or sampling_mask_replay=false",
                )
            )
        elif rollout.top_p >= 1.0 and rollout.top_k == -1:
            out.append(
                warning(
                    "RCX-W015",
                    "actor_rollout_ref.actor.sampling_mask_replay",
                    "rollout.top_p is 1 and rollout.top_k is -1: the rollout samples the full "
                    "distribution, so there is no truncation to replay",
                )
            )
    return out
