"""The configuration tree, with verl's key names.

Each field is documented once, here; the description feeds ``rcx keys``, ``rcx presets show``
and the JSON schema. Models forbid unknown keys; the loader reports them first with a
"did you mean" hint (see :mod:`rcx.config.loading`). Cross-field rules live in
:mod:`rcx.config.findings`, so that every problem of a config is listed at once.
"""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any, ClassVar, Literal

import annotated_types
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rcx.algos.criteria import CorrectionSpec, ParsedCorrection, is_off, parse_correction

#: A number as YAML 1.2's core schema writes it (no ``_``; ``.inf``/``.nan``, not ``inf``/``nan``).
YAML12_NUMBER = re.compile(
    r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|0o[0-7]+|0x[0-9a-fA-F]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
)

#: Seeds: torch.manual_seed takes 64 bits, but the data order seeds torch with
#: ``seed * 1_000_003 + epoch`` and numpy's legacy seed is 32-bit: 32 bits fit every use.
MAX_SEED = 2**32 - 1
#: Sampling temperatures. Below 0.01, logits / T leave float16's range (65504) for logits over
#: 655 (rollout.dtype may be float16), and sampling is greedy in all but name (use
#: do_sample: false); above 100 every distribution is uniform to within 1% per logit unit.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0
#: MLflow's limits: an experiment name is a 256-character column, a run name a 250-character one.
MAX_PROJECT_NAME, MAX_EXPERIMENT_NAME = 256, 250


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters (a finding is one line)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(text):,} in all"
    return f"{text[:limit]}... ({size})"


def _number_types(annotation: Any) -> set[type]:
    """{int} / {float} / {int, float} for a numeric field (optionally nullable), else empty."""
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, types.UnionType)
        else (annotation,)
    )
    args = tuple(a for a in args if a is not type(None))
    return set(args) if args and all(a in (int, float) for a in args) else set()


def accepted(model: type[Section], name: str) -> str:
    """What a numeric field accepts, in words: "a finite number > 0.0", "an integer >= 0 and
    <= 7", or the section's own words (``Section.accepts``)."""
    if name in model.accepts:
        return model.accepts[name]
    info = model.model_fields[name]
    kinds = _number_types(info.annotation)
    finite = not model.model_config.get("allow_inf_nan", True)
    noun = "an integer" if kinds == {int} else ("a finite number" if finite else "a number")
    lo = hi = None
    for m in info.metadata:
        if isinstance(m, annotated_types.Gt):
            lo = f"> {m.gt}"
        elif isinstance(m, annotated_types.Ge):
            lo = f">= {m.ge}"
        elif isinstance(m, annotated_types.Lt):
            hi = f"< {m.lt}"
        elif isinstance(m, annotated_types.Le):
            hi = f"<= {m.le}"
    bounds = " and ".join(b for b in (lo, hi) if b)
    nullable = type(None) in typing.get_args(info.annotation)
    return f"{noun}{' ' + bounds if bounds else ''}{' or null' if nullable else ''}"


class Section(BaseModel):
    """A config section: unknown keys are errors; assignments are validated.

    Numbers are YAML 1.2 numbers and finite: a string reaching a numeric field must read as a
    YAML 1.2 number (pydantic alone would read ``1.5_2`` as 1.52 and ``inf`` as infinity), and
    infinities and NaN are refused (a section may allow them, see ``allow_inf_nan``).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    #: Field -> why a string that is not a number is wrong there (instead of the generic words).
    string_hints: ClassVar[dict[str, str]] = {}
    #: Field -> what it accepts, where the field's type and bounds do not say it all.
    accepts: ClassVar[dict[str, str]] = {}

    @field_validator("*", mode="before")
    @classmethod
    def _yaml12_finite_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        name = info.field_name
        if name is None:
            return v
        annotation = cls.model_fields[name].annotation
        if _number_types(annotation):
            return cls._check_number(name, v)
        items = typing.get_args(annotation)
        if (
            typing.get_origin(annotation) is tuple
            and isinstance(v, (list, tuple))
            and items
            and all(_number_types(t) for t in items if t is not Ellipsis)
        ):
            return type(v)(cls._check_number(name, item) for item in v)
        return v

    @classmethod
    def _check_number(cls, name: str, v: Any) -> Any:
        if isinstance(v, str) and not YAML12_NUMBER.fullmatch(v.strip()):
            hint = cls.string_hints.get(name) if "_" in v else None
            why = hint or (
                "not a number (YAML 1.2 numbers have no '_')" if "_" in v else "not a number"
            )
            raise ValueError(f"{why}; got {short_repr(v)}; accepted: {accepted(cls, name)}")
        if float not in _number_types(cls.model_fields[name].annotation) and not isinstance(
            v, float
        ):
            return v
        if isinstance(v, str):
            v = v.strip()
            try:
                number = float(v)
            except ValueError:
                return v  # 0x1f, 0o17: pydantic says what is wrong
            finite = math.isfinite(number)
        else:
            finite = not isinstance(v, float) or math.isfinite(v)
        if not finite and not cls.model_config.get("allow_inf_nan", True):
            raise ValueError(f"not finite; got {v!r}; accepted: {accepted(cls, name)}")
        return v


def _none_if_off(value: Any) -> Any:
    return None if is_off(value) else value


# ------------------------------------------------------------------------------------- data ---


class BuiltinTaskConfig(Section):
    digits: int = Field(
        2, ge=1, le=6, description="builtin:arith: digits per operand (2 = up to 99+99)."
    )
    length: int = Field(
        5, ge=1, le=32, description="builtin:reverse: length of the string to reverse."
    )
    num_train: int = Field(
        20000, ge=1, description="Number of training prompts generated for a built-in task."
    )
    num_val: int = Field(
        256, ge=1, description="Number of validation prompts (disjoint from training)."
    )
    seed: int = Field(
        0, ge=0, le=MAX_SEED, description="Seed of the built-in task's train/validation split."
    )


class DataConfig(Section):
    train_files: str | list[str] = Field(
        "builtin:arith",
        description="Training data: builtin:arith, builtin:reverse, or verl-format parquet file(s).",
    )
    val_files: str | list[str] = Field(
        "builtin:arith", description="Validation data, same forms as data.train_files."
    )
    prompt_key: str = Field(
        "prompt", description="Parquet column holding the prompt (chat messages)."
    )
    max_prompt_length: int = Field(
        16, ge=1, description="Longest prompt in tokens; longer prompts are skipped and counted."
    )
    max_response_length: int = Field(8, ge=1, description="Most tokens generated per response.")
    train_batch_size: int = Field(
        32, ge=1, description="Prompts per training step (each gets rollout.n responses)."
    )
    val_batch_size: int | None = Field(
        None,
        ge=1,
        description="Prompts per validation batch (null: the whole validation set at once).",
    )
    builtin: BuiltinTaskConfig = Field(
        default_factory=BuiltinTaskConfig, description="Options of the built-in synthetic tasks."
    )


# -------------------------------------------------------------------------------- algorithm ---


class RolloutCorrectionConfig(Section):
    # The grammar checks its own numbers (RCX-E004/E005 say what is wrong with inf there).
    # rollout_is_threshold is float | str: a string reaches the grammar as written, so "1.5_2"
    # is read as a band (and refused: lo must be < 1), never as the number 1.52.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=True)
    rollout_is: Literal["token", "sequence"] | None = Field(
        None, description="IS weights: token, sequence, or null (off)."
    )
    rollout_is_threshold: float | str = Field(
        2.0,
        description="IS bound: a number C > 1 truncates the weights at C (TIS); a band 'lo_hi' "
        "(0 < lo < 1 < hi, e.g. '0.5_5.0', verl's IcePop) sets weights outside [lo, hi] to 0.",
    )
    rollout_is_batch_normalize: bool = Field(
        False, description="Divide the truncated IS weights by their batch mean (mean weight 1)."
    )
    rollout_rs: str | list[str] | None = Field(
        None,
        description="Rejection criteria, comma-separated (e.g. token_k1,seq_max_k2), or null (off).",
    )
    rollout_rs_threshold: str | float | None = Field(
        None,
        description="RS bounds, one entry per criterion: 'L_U' or U for k1, U for k2/k3 (e.g. '0.6_1.6,2.5').",
    )
    bypass_mode: bool = Field(
        False,
        description="true: reuse rollout log-probs as pi_old (two policies); false: recompute pi_old (three).",
    )
    loss_type: Literal["ppo_clip", "reinforce", "cispo", "gspo"] = Field(
        "ppo_clip",
        description="Policy loss: ppo_clip, reinforce (bypass only; decoupled falls back to "
        "ppo_clip), cispo (clipped stop-gradient ratio x A x log-prob) or gspo (clipped "
        "sequence ratio); clip ranges from actor_rollout_ref.actor.clip_ratio(_low/_high).",
    )
    off_policy_mask_threshold: float | None = Field(
        None,
        description="Off-policy sequence masking (TRL's name; DeepSeek-V3.2): mask a sequence "
        "whose advantage is < 0 and whose mean per-token lp_rollout - lp_train exceeds this "
        "delta (nats, e.g. 0.5); null: off.",
    )
    loss_denominator: Literal["kept", "generated"] = Field(
        "kept",
        description="What the loss divides by after rejection: kept (tokens/sequences left "
        "after RS and OPSM) or generated (every response token/sequence, so rejection "
        "shrinks the loss).",
    )
    baseline_includes_rejected: bool = Field(
        True,
        description="grpo/rloo: fully rejected sequences still count in their group's "
        "baseline (true) or are left out of it (false; decoupled mode, where RS runs before "
        "the advantages).",
    )

    _parsed: ParsedCorrection = PrivateAttr()

    @field_validator("rollout_is", "rollout_rs", "rollout_rs_threshold", mode="before")
    @classmethod
    def _off_is_none(cls, v: Any) -> Any:
        return _none_if_off(v)

    @model_validator(mode="after")
    def _parse_once(self) -> RolloutCorrectionConfig:
        # Parsed here, once per (re)validation; grammar problems are reported by rcx validate
        # (rcx.config.findings), not raised, so that every problem is listed at once.
        self._parsed = parse_correction(
            self.rollout_is,
            self.rollout_is_threshold,
            self.rollout_is_batch_normalize,
            self.rollout_rs,
            self.rollout_rs_threshold,
            self.off_policy_mask_threshold,
        )
        return self

    @property
    def parsed(self) -> ParsedCorrection:
        """The parse of the IS/RS settings: the spec, or every problem found."""
        return self._parsed

    @property
    def spec(self) -> CorrectionSpec:
        """The parsed IS/RS settings; raises the first grammar problem of an invalid config."""
        if self._parsed.problems:
            raise self._parsed.problems[0]
        assert self._parsed.spec is not None
        return self._parsed.spec

    @property
    def enabled(self) -> bool:
        """True when IS or RS is on."""
        return self.rollout_is is not None or self.rollout_rs is not None


class AlgorithmConfig(Section):
    adv_estimator: Literal["grpo", "rloo", "gae", "reinforce_plus_plus"] = Field(
        "grpo",
        description="Advantage estimator: grpo, rloo, gae (needs the critic) or reinforce_plus_plus.",
    )
    gamma: float = Field(
        1.0, ge=0.0, le=1.0, description="Discount factor (gae, reinforce_plus_plus)."
    )
    lam: float = Field(1.0, ge=0.0, le=1.0, description="GAE lambda.")
    norm_adv_by_std_in_grpo: bool = Field(
        True, description="GRPO: divide by the group's reward std."
    )
    rollout_correction: RolloutCorrectionConfig = Field(
        default_factory=RolloutCorrectionConfig,
        description="Rollout correction: importance sampling, rejection sampling, mode and loss.",
    )


# ----------------------------------------------------------------------- actor_rollout_ref ---


class OptimConfig(Section):
    lr: float = Field(3e-4, gt=0.0, description="Learning rate (AdamW).")
    lr_warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps, then constant.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must lie in [0, 1), got {list(v)}")
        return v


class ModelConfig(Section):
    path: str = Field(
        "builtin:tiny",
        description="builtin:tiny or a local Hugging Face model directory (never downloaded).",
    )
    warm_start_steps: int = Field(
        1000,
        ge=0,
        description="builtin:tiny: most supervised warm-start steps before RL, stopped early at "
        "~30% sampled accuracy (0: none); cached.",
    )
    enable_gradient_checkpointing: bool = Field(
        False,
        description="Recompute activations in the backward pass (less memory, ~1/3 more compute).",
    )


class FsdpConfig(Section):
    param_offload: bool = Field(
        False,
        description="Multi-process: keep sharded parameters (and their gradients) in CPU memory "
        "between uses (FSDP2 CPU offload; with optimizer_offload, one policy for both).",
    )
    optimizer_offload: bool = Field(
        False,
        description="Multi-process: keep the optimizer state in CPU memory (FSDP2 CPU offload "
        "moves parameters, gradients and optimizer state together).",
    )


class ActorConfig(Section):
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Actor optimiser.")
    fsdp_config: FsdpConfig = Field(
        default_factory=FsdpConfig, description="FSDP2 sharding options (several processes)."
    )
    ppo_mini_batch_size: int = Field(
        32, ge=1, description="Prompts per optimiser step (x rollout.n responses), as in verl."
    )
    ppo_micro_batch_size_per_gpu: int | None = Field(
        None,
        ge=1,
        description="Responses per forward/backward (gradient accumulation); null: whole mini-batch.",
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each batch.")
    shuffle: bool = Field(False, description="Shuffle responses between mini-batches.")
    clip_ratio: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip epsilon.")
    clip_ratio_low: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Lower clip epsilon (null: clip_ratio); 1 puts no lower bound on the ratio "
        "(CISPO's setting).",
    )
    clip_ratio_high: float | None = Field(
        None, gt=0.0, description="Upper clip epsilon (null: clip_ratio)."
    )
    clip_ratio_c: float = Field(
        3.0, gt=1.0, description="Dual-clip bound for negative advantages; > 1."
    )
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"
    ] = Field("token-mean", description="How per-token losses are aggregated.")
    entropy_coeff: float = Field(0.0, ge=0.0, description="Entropy bonus coefficient.")
    use_kl_loss: bool = Field(False, description="Add a KL loss to a frozen reference model.")
    kl_loss_coef: float = Field(0.001, ge=0.0, description="Weight of the KL loss.")
    kl_loss_type: Literal["kl", "abs", "mse", "low_var_kl"] = Field(
        "low_var_kl", description="KL estimator of the KL loss."
    )
    grad_clip: float = Field(1.0, gt=0.0, description="Max gradient norm.")
    temperature: float | None = Field(
        None,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Temperature the trainer scores tokens at (null: rollout.temperature); "
        "a different value is a mismatch source.",
    )
    sampling_mask_replay: bool = Field(
        False,
        description="Score under the rollout's top-k/top-p truncation: the engine reports the "
        "kept token set per position and the trainer renormalises over it (hf engine only).",
    )


class ValKwargsConfig(Section):
    do_sample: bool = Field(False, description="Validation: sample (true) or greedy (false).")
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Validation sampling temperature.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Validation nucleus sampling p.")
    top_k: int = Field(-1, ge=-1, description="Validation top-k (-1: off).")
    n: int = Field(1, ge=1, description="Validation samples per prompt.")


class RolloutConfig(Section):
    name: Literal["hf", "vllm"] = Field(
        "hf", description="Rollout engine: hf (any device) or vllm (GPU)."
    )
    n: int = Field(8, ge=1, description="Responses sampled per prompt.")
    temperature: float = Field(
        1.0,
        ge=MIN_TEMPERATURE,
        le=MAX_TEMPERATURE,
        description="Sampling temperature (the rollout log-probs include it).",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling p (1.0: off).")
    top_k: int = Field(-1, ge=-1, description="Top-k sampling (-1: off).")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false).")
    calculate_log_probs: bool = Field(
        True,
        description="Rollout log-probs are needed (any correction, bypass); false forbids both.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Precision of the rollout copy of the weights (a mismatch source)."
    )
    quantization: Literal["none", "int8", "fp8"] = Field(
        "none",
        description="Fake-quantise the rollout copy's weights: none, int8 or fp8 (a mismatch source).",
    )
    weight_sync_interval: int = Field(
        1,
        ge=1,
        description="Refresh the rollout weights every k steps (k > 1: data up to k-1 updates stale).",
    )
    gpu_memory_utilization: float = Field(
        0.5, gt=0.0, le=1.0, description="vllm: share of GPU memory it may use."
    )
    tensor_model_parallel_size: int = Field(
        1, ge=1, description="vllm: GPUs one rollout engine shards the model over."
    )
    val_kwargs: ValKwargsConfig = Field(
        default_factory=ValKwargsConfig, description="Sampling for validation."
    )

    @field_validator("quantization", mode="before")
    @classmethod
    def _null_is_none(cls, v: Any) -> Any:
        return "none" if v is None else v


class ActorRolloutRefConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    actor: ActorConfig = Field(default_factory=ActorConfig, description="Actor training.")
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig, description="Rollout engine and sampling."
    )


# ----------------------------------------------------------------------------------- critic ---


class CriticConfig(Section):
    enable: bool | None = Field(
        None, description="Train a critic (null: exactly when adv_estimator is gae)."
    )
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(lr=1e-3), description="Critic optimiser."
    )
    cliprange_value: float = Field(0.5, gt=0.0, description="Value clipping range.")
    ppo_micro_batch_size_per_gpu: int | None = Field(
        None, ge=1, description="Responses per critic forward/backward."
    )
    grad_clip: float = Field(1.0, gt=0.0, description="Critic max gradient norm.")


# ---------------------------------------------------------------------------------- trainer ---


class TrainerConfig(Section):
    project_name: str = Field(
        "rcx", min_length=1, max_length=MAX_PROJECT_NAME, description="MLflow experiment name."
    )
    experiment_name: str = Field(
        "default",
        min_length=1,
        max_length=MAX_EXPERIMENT_NAME,
        description="MLflow run name; also names the checkpoint folder.",
    )
    logger: list[Literal["console", "mlflow", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["console", "mlflow"],
        description=(
            "Where metrics go: console, mlflow, tensorboard (event files in the checkpoint "
            "folder), wandb (offline unless $WANDB_MODE says otherwise); the last two are extras."
        ),
    )
    total_epochs: int = Field(
        1, ge=1, description="Passes over the training prompts (if total_training_steps is null)."
    )
    total_training_steps: int | None = Field(
        None, ge=1, description="Training steps (overrides total_epochs)."
    )
    test_freq: int = Field(10, description="Validate every k steps (<= 0: only before and after).")
    save_freq: int = Field(
        50, description="Checkpoint every k steps (<= 0: only at the end and on interrupt)."
    )
    val_before_train: bool = Field(True, description="Validate before the first step.")
    default_local_dir: str | None = Field(
        None, description="Checkpoint folder (null: checkpoints/<project_name>/<experiment_name>)."
    )
    max_actor_ckpt_to_keep: int | None = Field(
        None, ge=1, description="Keep only the newest k checkpoints (null: keep all)."
    )
    resume_mode: Literal["auto", "disable", "resume_path"] = Field(
        "auto",
        description="auto: continue from the latest checkpoint; disable: start fresh; resume_path: use resume_from_path.",
    )
    resume_from_path: str | None = Field(
        None, description="Checkpoint to resume from (resume_mode: resume_path)."
    )
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (null: local sqlite:///mlflow.db)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA (bf16 autocast) when present, else CPU."
    )
    seed: int = Field(
        1, ge=0, le=MAX_SEED, description="Seed of sampling, shuffling and initialisation."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="Torch CPU threads per process (null: 1 on <= 2 cores, else cores // 2, "
        "divided among the processes of this node).",
    )
    n_gpus_per_node: int = Field(
        1,
        ge=1,
        description="Training processes per node (one per GPU; on CPU, processes): > 1 shards "
        "the models with FSDP2 and rcx train starts them itself (torch's process launcher).",
    )
    nnodes: int = Field(
        1, ge=1, description="Nodes (> 1: launch each node with torchrun; see the README)."
    )
    dump_log_probs: bool = Field(
        False,
        description="Dump rollout and training log-probs per step (for rcx whatif/calibrate).",
    )
    async_mode: Literal["sync", "one_step_off", "fully_async"] = Field(
        "sync",
        description=(
            "sync: generate, then train; one_step_off (verl's name): a rollout process generates "
            "batch k+1 while the trainer updates on batch k (staleness 1); fully_async (verl's "
            "name): a pool of rollout processes generates prompt groups continuously, up to "
            "max_off_policy_threshold weight versions ahead. Both async modes: one training "
            "process, hf engine, weight_sync_interval 1."
        ),
    )
    max_off_policy_threshold: int = Field(
        4,
        ge=1,
        description=(
            "fully_async only (verl's name): the staleness cap, in weight versions (updates "
            "between the weights that generated a group and the step that trains on it); at "
            "most (cap + 1) x train_batch_size prompt groups are requested and not yet consumed."
        ),
    )
    max_off_policy_strategy: Literal["drop", "wait"] = Field(
        "drop",
        description=(
            "fully_async only (verl's name): drop, a group older than the cap when the trainer "
            "reaches it is not trained on; wait, a worker does not start a group before the "
            "weights that keep it within the cap are published (nothing is dropped)."
        ),
    )
    rollout_workers: int = Field(
        1,
        ge=1,
        description=(
            "fully_async only (rcx's name): rollout processes in the pool, each with its own "
            "engine copy and one torch thread."
        ),
    )
    max_nonfinite_steps: int = Field(
        5,
        ge=1,
        description=(
            "Stop the run (FAILED) after this many consecutive steps in which non-finite "
            "gradients prevented every optimiser step."
        ),
    )

    @field_validator("logger", mode="before")
    @classmethod
    def _single_logger(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class CustomRewardConfig(Section):
    path: str | None = Field(None, description="Python file defining a custom reward function.")
    name: str = Field("compute_score", description="Name of the reward function in that file.")
    timeout_s: float = Field(
        600.0,
        gt=0.0,
        le=86400.0,
        description=(
            "Seconds the custom reward may take for one batch of responses; past it the run "
            "stops FAILED."
        ),
    )


# ------------------------------------------------------------------------------------- root ---


class RcxConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="Prompts and lengths.")
    algorithm: AlgorithmConfig = Field(
        default_factory=AlgorithmConfig, description="Advantages and rollout correction."
    )
    actor_rollout_ref: ActorRolloutRefConfig = Field(
        default_factory=ActorRolloutRefConfig, description="Model, actor and rollout."
    )
    critic: CriticConfig = Field(default_factory=CriticConfig, description="Value model (gae).")
    trainer: TrainerConfig = Field(
        default_factory=TrainerConfig, description="Run length, logging, checkpoints."
    )
    custom_reward_function: CustomRewardConfig = Field(
        default_factory=CustomRewardConfig, description="Optional user reward function."
    )

    @model_validator(mode="after")
    def _resolve_critic_enable(self) -> RcxConfig:
        if self.critic.enable is None:
            # object.__setattr__: resolving a default is not a user assignment to re-validate.
            object.__setattr__(self.critic, "enable", self.algorithm.adv_estimator == "gae")
        return self

    @property
    def rollout_correction(self) -> RolloutCorrectionConfig:
        return self.algorithm.rollout_correction

    @property
    def world_size(self) -> int:
        """Training processes: ``trainer.n_gpus_per_node * trainer.nnodes``."""
        return self.trainer.n_gpus_per_node * self.trainer.nnodes

    def checkpoint_dir(self) -> str:
        """``trainer.default_local_dir`` or ``checkpoints/<project_name>/<experiment_name>``."""
        t = self.trainer
        return t.default_local_dir or f"checkpoints/{t.project_name}/{t.experiment_name}"
