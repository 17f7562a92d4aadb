"""GPU check kit (issue 12, item 7): one command on a lent GPU, one JSON of numbers back.

Four stages, each in its own process under its own time guard, so that a crash, an OOM or a hang
in one stage costs that stage only; the summary is rewritten after every stage:

  environment  versions of torch/transformers/tokenizers/numpy, the CUDA device, bf16 support,
               and which packages rcx needs are present (mlflow is optional and never imported).
  correction   ``rcx.correction.compute_rollout_correction`` on random log-probs with a realistic
               response mask at (1024, 4096) on the device: median ms after warm-up (synchronised),
               peak extra device memory; the same on CPU at (256, 2048) for reference.
  trainer      rcx's own trainer (``rcx.train.trainer.train``) on CUDA, preset ``grpo-multi-rs``, a bf16
               rollout copy against the float32 policy with bf16 autocast, a few steps on a model
               built here (no download is possible): Qwen2.5-0.5B's shape, randomly initialised,
               with rcx's character tokenizer (the built-in task uses it), so the embedding/LM head
               is tiny and the model has ~0.36 B parameters instead of 0.49 B. Reports step time by
               stage, generated tokens/s, peak memory and the last step's ``rollout_corr/*``.
  fsdp         ``torch.distributed.run`` with 1 process and nccl: the same model wrapped with FSDP2
               (``fully_shard`` per decoder layer, then the root; bf16 ``MixedPrecisionPolicy``),
               3 AdamW steps on random tokens, then a full state-dict gather. An environment check
               of FSDP2 + nccl on 1 rank, NOT rcx's trainer (multi-process rcx training is a later
               part of issue 12).

Needs: torch, transformers, tokenizers, numpy, safetensors, pyyaml, typer, rich, matplotlib (the
end-of-run plot) and pydantic (with pydantic-core, annotated-types, typing-inspection,
typing-extensions >= 4.16); NOT mlflow: the trainer runs with ``trainer.logger=["console"]``, and the
trainer stage fails if mlflow was imported anyway.

On the device (repo root as working directory, the wheels in ``.whl/``, results under ``$OUT``),
the command is :data:`DEVICE_COMMAND`::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && \
      OUT="$OUT" bash bench/gpu_check.sh

``bench/gpu_check.sh`` (which also installs the wheels itself when pydantic is missing) runs
``python3 bench/gpu_check.py --out $OUT/gpu_check.json`` under an outer ``timeout`` and tees the
log to ``$OUT/gpu_check.log``. On a CPU machine, ``python bench/gpu_check.py --smoke`` runs the same
four stages with tiny sizes (gloo instead of nccl) in well under a minute; tests/test_gpu_check.py
runs it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (small CPU hosts)

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Mapping, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # rcx runs from the checkout; it is not pip-installed there

#: The one-line command for the device machine (its tool takes at most 2000 characters).
DEVICE_COMMAND = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
    "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && "
    'OUT="$OUT" bash bench/gpu_check.sh'
)
STAGES = ("environment", "correction", "trainer", "fsdp")
#: module -> distribution, for the packages rcx imports on the console-only training path.
REQUIRED_PACKAGES = {
    "torch": "torch",
    "transformers": "transformers",
    "tokenizers": "tokenizers",
    "numpy": "numpy",
    "safetensors": "safetensors",
    "yaml": "PyYAML",
    "typer": "typer",
    "rich": "rich",
    "matplotlib": "matplotlib",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "annotated_types": "annotated-types",
    "typing_inspection": "typing-inspection",
    "typing_extensions": "typing-extensions",
}
OPTIONAL_PACKAGES = {"mlflow": "mlflow", "vllm": "vllm"}
CORRECTION_CASES: dict[str, dict[str, Any]] = {
    "token IS + batch norm + RS token_k1,seq_max_k2 (0.6_1.6,2.5)": dict(
        rollout_is="token",
        rollout_is_threshold=2.0,
        rollout_is_batch_normalize=True,
        rollout_rs="token_k1,seq_max_k2",
        rollout_rs_threshold="0.6_1.6,2.5",
    ),
    "sequence IS + batch norm": dict(
        rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True
    ),
}
#: The mismatch metrics the trainer summary lifts out of the last step (all rollout_corr/* follow).
KEY_MISMATCH_METRICS = (
    "rollout_corr/kl",
    "rollout_corr/k3_kl",
    "rollout_corr/log_ppl_abs_diff",
    "rollout_corr/rollout_rs_masked_fraction",
    "rollout_corr/rollout_rs_seq_masked_fraction",
    "rollout_corr/rollout_is_eff_sample_size",
)
NOTES = (
    "trainer: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate "
    "4864), randomly initialised, with rcx's character tokenizer (the built-in arith task uses "
    "it): the embedding/LM head is tiny, so the model has ~0.36 B parameters, not 0.49 B.",
    "trainer: float32 policy with bf16 autocast on CUDA (rcx's CUDA path) against a bfloat16 "
    "rollout copy (actor_rollout_ref.rollout.dtype=bfloat16): the rollout_corr/* metrics measure "
    "that precision mismatch. Step 1 includes warm-up; medians are over the later steps.",
    "trainer: the model is untrained (near-uniform next-token distribution, responses end at a "
    "random EOS, reward 0 so zero advantages): the mismatch is bf16-vs-fp32 precision on "
    "a near-uniform policy, smaller than on a trained model; the times are the real work.",
    "fsdp: an environment check of FSDP2 (fully_shard) + nccl under torchrun on 1 rank with the "
    "same model shape, NOT rcx's trainer: multi-process rcx training is a later part of issue 12.",
    "correction: random log-probs (rollout ~ -Exp(1), train = rollout + N(0, 0.05^2), plus N(0, 1) "
    "on 1% of tokens) with response lengths uniform in [T/8, T]; CUDA times are synchronised.",
)


# =========================================================================== sizes


@dataclass(frozen=True)
class ModelShape:
    """The transformer body of a Qwen2 config (the vocabulary comes from the tokenizer)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    max_positions: int


@dataclass(frozen=True)
class KitSizes:
    """Every size the kit uses; ``GPU_SIZES`` on the device, ``SMOKE_SIZES`` for CPU tests."""

    correction_shape: tuple[int, int]
    correction_repeats: int
    cpu_reference_shape: tuple[int, int]
    model: ModelShape
    train_steps: int
    train_batch_size: int
    rollout_n: int
    response_length: int
    mini_batch_size: int
    micro_batch_size: int
    num_train: int
    num_val: int
    fsdp_steps: int
    fsdp_batch: int
    fsdp_seq_len: int
    guards_s: dict[str, int] = field(default_factory=dict)


QWEN25_05B_SHAPE = ModelShape(
    hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, max_positions=32768
)
GPU_SIZES = KitSizes(
    correction_shape=(1024, 4096),
    correction_repeats=20,
    cpu_reference_shape=(256, 2048),
    model=QWEN25_05B_SHAPE,
    train_steps=4,
    train_batch_size=64,
    rollout_n=8,
    response_length=64,
    mini_batch_size=32,
    micro_batch_size=64,
    num_train=1024,
    num_val=64,
    fsdp_steps=3,
    fsdp_batch=8,
    fsdp_seq_len=1024,
    # 465 s in all: under 8 minutes even if every stage runs into its guard.
    guards_s={"environment": 45, "correction": 75, "trainer": 240, "fsdp": 105},
)
SMOKE_SIZES = KitSizes(
    correction_shape=(64, 128),
    correction_repeats=3,
    cpu_reference_shape=(32, 64),
    model=ModelShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, max_positions=256),
    train_steps=2,
    train_batch_size=4,
    rollout_n=4,
    response_length=8,
    mini_batch_size=2,
    micro_batch_size=4,
    num_train=64,
    num_val=8,
    fsdp_steps=2,
    fsdp_batch=2,
    fsdp_seq_len=16,
    guards_s={"environment": 60, "correction": 60, "trainer": 120, "fsdp": 120},
)


# =========================================================================== small helpers


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` as indented JSON to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


class StageRecord:
    """One stage's results; every :meth:`update` rewrites ``path`` (when given), so a stage that
    is killed by its time guard still leaves what it had measured."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.values: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.values.update(values)
        if self.path is not None:
            write_json_atomic(self.path, self.values)


def median_or_none(values: Sequence[float]) -> float | None:
    """The median of ``values``, or None for an empty sequence."""
    return float(statistics.median(values)) if values else None


def package_version(module: str, distribution: str) -> str | None:
    """The installed version of ``distribution`` if ``module`` is importable, else None.

    Looks the module up without importing it (so mlflow is never imported here).
    """
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "present (version unknown)"


def synchronize(device: str) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def qwen2_model(shape: ModelShape, tokenizer: Any, seed: int) -> Any:
    """A randomly initialised float32 ``Qwen2ForCausalLM`` of ``shape`` on CPU, with the
    vocabulary and special tokens of ``tokenizer`` and tied embeddings (as Qwen2.5-0.5B)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.eval()


def cuda_memory_gib() -> dict[str, float]:
    """Peak allocated and reserved CUDA memory of this process so far, in GiB."""
    import torch

    return {
        "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
    }


# =========================================================================== stage: environment


def stage_environment(sizes: KitSizes, device: str, record: StageRecord, workdir: Path) -> None:
    """Versions, the device and its bf16 support, and which packages rcx needs are present.

    Fails when a required package is missing or ``device`` is CUDA and no GPU is visible.
    """
    import torch

    record.update(
        python=platform.python_version(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        packages={m: package_version(m, d) for m, d in REQUIRED_PACKAGES.items()},
        optional_packages={m: package_version(m, d) for m, d in OPTIONAL_PACKAGES.items()},
    )
    record.update(cuda=cuda_description() if torch.cuda.is_available() else None)
    missing = [m for m, version in record.values["packages"].items() if version is None]
    record.update(missing_required=missing)
    if missing:
        raise RuntimeError(f"required packages missing: {', '.join(missing)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch sees no CUDA device")


def cuda_description() -> dict[str, Any]:
    """Name, capability, memory and bf16/nccl support of CUDA device 0."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "device_count": torch.cuda.device_count(),
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "total_memory_gib": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "cudnn": torch.backends.cudnn.version(),
        "nccl": nccl_version(),
    }


def nccl_version() -> str | None:
    """NCCL's version as ``"major.minor.patch"``, or None when torch was built without it."""
    import torch

    if not (torch.distributed.is_available() and torch.distributed.is_nccl_available()):
        return None
    version = torch.cuda.nccl.version()  # a tuple in recent torch, an int in old releases
    return ".".join(str(v) for v in version) if isinstance(version, tuple) else str(version)


# =========================================================================== stage: correction


def synthetic_log_probs(shape: tuple[int, int], seed: int) -> tuple[Any, Any, Any]:
    """``(train_log_probs, rollout_log_probs, response_mask)``, each ``(B, T)`` float32 on CPU.

    Rollout log-probs are ``-Exp(1)`` (mean -1 nat per token); the training side differs by
    ``N(0, 0.05^2)`` noise, plus ``N(0, 1)`` on 1% of the tokens (the heavy tail that makes RS
    reject something); each response is valid over a prefix of length uniform in ``[T/8, T]``
    (padding after it, zeros in the log-probs as the trainer has them).
    """
    import torch

    rows, cols = shape
    gen = torch.Generator().manual_seed(seed)
    rollout = -torch.empty(rows, cols).exponential_(1.0, generator=gen)  # (B, T)
    outliers = (torch.rand(rows, cols, generator=gen) < 0.01).float()  # (B, T)
    noise = 0.05 * torch.randn(rows, cols, generator=gen)  # (B, T)
    noise += outliers * torch.randn(rows, cols, generator=gen)
    train = rollout + noise  # (B, T)
    lengths = torch.randint(max(1, cols // 8), cols + 1, (rows, 1), generator=gen)  # (B, 1)
    mask = (torch.arange(cols).unsqueeze(0) < lengths).float()  # (B, T)
    return train * mask, rollout * mask, mask


def time_correction(
    inputs: tuple[Any, Any, Any], case: Mapping[str, Any], device: str, repeats: int
) -> dict[str, Any]:
    """Median and min wall ms of ``compute_rollout_correction(*inputs, **case)`` over ``repeats``
    synchronised calls after 3 warm-up calls; on CUDA also the peak memory the call adds on top
    of its inputs (outputs included). Also returns two of its metrics, as a sanity check."""
    import torch

    from rcx.correction import compute_rollout_correction

    def call() -> Any:
        return compute_rollout_correction(*inputs, **case)

    for _ in range(3):
        call()
    times_ms = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        call()
        synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    out: dict[str, Any] = {
        "median_ms": median_or_none(times_ms),
        "min_ms": min(times_ms),
        "repeats": repeats,
    }
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = call()
        synchronize(device)
        out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del result
    metrics = call().metrics
    out["masked_fraction"] = metrics.get("rollout_corr/rollout_rs_masked_fraction")
    out["ess"] = metrics.get("rollout_corr/rollout_is_eff_sample_size")
    out["metric_count"] = len(metrics)
    return out


def correction_suite(shape: tuple[int, int], device: str, repeats: int) -> dict[str, Any]:
    """:func:`time_correction` of every :data:`CORRECTION_CASES` entry at ``shape`` on ``device``."""
    train, rollout, mask = synthetic_log_probs(shape, seed=0)
    inputs = (train.to(device), rollout.to(device), mask.to(device))
    cases = {
        name: time_correction(inputs, case, device, repeats)
        for name, case in CORRECTION_CASES.items()
    }
    return {"shape": list(shape), "device": device, "cases": cases}


def stage_correction(sizes: KitSizes, device: str, record: StageRecord, workdir: Path) -> None:
    """The correction at ``sizes.correction_shape`` on ``device``, then a CPU reference."""
    record.update(
        device_run=correction_suite(sizes.correction_shape, device, sizes.correction_repeats)
    )
    repeats = max(3, sizes.correction_repeats // 4)
    record.update(cpu_reference=correction_suite(sizes.cpu_reference_shape, "cpu", repeats))


# =========================================================================== stage: trainer


def build_model_dir(shape: ModelShape, path: Path) -> dict[str, Any]:
    """Save a random Qwen2 of ``shape`` with rcx's char tokenizer as an rcx model directory.

    The rcx marker file makes ``rcx.models.load_tokenizer`` reload the char tokenizer (the
    built-in task's vocabulary). Returns the model's description (parameters, vocabulary, time).
    """
    from rcx.models.loading import build_char_tokenizer, count_parameters, save_model_dir

    start = time.perf_counter()
    tokenizer = build_char_tokenizer()
    model = qwen2_model(shape, tokenizer, seed=0)
    params = count_parameters(model)
    save_model_dir(model, tokenizer, path, builtin=True)
    return {
        "shape": asdict(shape),
        "vocab_size": len(tokenizer),
        "parameters": params,
        "embedding_parameters": model.get_input_embeddings().weight.numel(),
        "build_and_save_s": time.perf_counter() - start,
    }


def trainer_overrides(sizes: KitSizes, device: str, model_dir: Path, workdir: Path) -> list[str]:
    """KEY=VALUE overrides of the ``grpo-multi-rs`` preset for the trainer stage."""
    overrides = [
        f"actor_rollout_ref.model.path={model_dir}",
        f"trainer.device={device}",
        'trainer.logger=["console"]',
        f"trainer.total_training_steps={sizes.train_steps}",
        "trainer.test_freq=0",
        "trainer.save_freq=0",
        "trainer.val_before_train=false",
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={workdir / 'checkpoints'}",
        "trainer.project_name=gpu_check",
        "trainer.experiment_name=grpo-multi-rs",
        f"data.train_batch_size={sizes.train_batch_size}",
        f"data.max_response_length={sizes.response_length}",
        f"data.builtin.num_train={sizes.num_train}",
        f"data.builtin.num_val={sizes.num_val}",
        f"data.val_batch_size={sizes.num_val}",
        f"actor_rollout_ref.rollout.n={sizes.rollout_n}",
        "actor_rollout_ref.rollout.dtype=bfloat16",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={sizes.mini_batch_size}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={sizes.micro_batch_size}",
    ]
    if device == "cpu":
        overrides.append("trainer.num_threads=1")
    return overrides


def summarise_training(
    history: Mapping[str, Sequence[tuple[int, float]]],
    last: Mapping[str, float],
    responses_per_step: int,
) -> dict[str, Any]:
    """Step time (median over steps after the first, which includes warm-up), its split by
    ``timing/*`` stage, generated tokens/s, peak memory and the last step's mismatch metrics.

    Generated tokens/s of a step = mean response length x responses / ``timing/gen``.
    """

    def by_step(key: str) -> dict[int, float]:
        return {step: value for step, value in history.get(key, [])}

    step_times = by_step("timing/step")
    steps = sorted(step_times)
    steady = steps[1:] or steps
    gen_s, lengths = by_step("timing/gen"), by_step("response_length/mean")
    gen_tps = [lengths[s] * responses_per_step / gen_s[s] for s in steady if gen_s.get(s)]
    stage_keys = sorted(k for k in history if k.startswith("timing/") and k != "timing/validation")
    return {
        "steps": len(steps),
        "step_s_each": [step_times[s] for s in steps],
        "step_s_median": median_or_none([step_times[s] for s in steady]),
        "timing_s_median": {
            key.removeprefix("timing/"): median_or_none([by_step(key)[s] for s in steady])
            for key in stage_keys
            if all(s in by_step(key) for s in steady)
        },
        "validation_s": last.get("timing/validation"),
        "generated_tokens_per_s_median": median_or_none(gen_tps),
        "response_length_mean_last": last.get("response_length/mean"),
        "perf_tokens_per_s_last": last.get("perf/tokens_per_s"),
        "perf_max_memory_allocated_gb_last": last.get("perf/max_memory_allocated_gb"),
        "mismatch_last_step": {
            k.removeprefix("rollout_corr/"): last.get(k) for k in KEY_MISMATCH_METRICS
        },
        "rollout_corr_last_step": {k: v for k, v in last.items() if k.startswith("rollout_corr/")},
    }


def stage_trainer(sizes: KitSizes, device: str, record: StageRecord, workdir: Path) -> None:
    """rcx's trainer, ``grpo-multi-rs`` with a bf16 rollout, on a locally built Qwen2.

    Fails when the run does not finish or when mlflow got imported (console-only logging).
    """
    import torch
    from rich.console import Console

    from rcx.config import load_config
    from rcx.train.trainer import train

    model_dir = workdir / "model"
    try:
        record.update(model=build_model_dir(sizes.model, model_dir))
        overrides = trainer_overrides(sizes, device, model_dir, workdir)
        record.update(preset="grpo-multi-rs", overrides=overrides)
        cfg = load_config("grpo-multi-rs", None, overrides)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = train(cfg, console=Console(highlight=False, width=120))
        record.update(status_of_run=result.status, wall_s=result.wall_s)
        responses = sizes.train_batch_size * sizes.rollout_n
        record.update(**summarise_training(result.history, result.metrics, responses))
        if device.startswith("cuda"):
            record.update(cuda_memory=cuda_memory_gib())
        record.update(mlflow_imported="mlflow" in sys.modules)
        if result.status != "FINISHED":
            raise RuntimeError(f"training ended {result.status} at step {result.step}")
        if "mlflow" in sys.modules:
            raise RuntimeError('trainer.logger=["console"] imported mlflow')
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)


# =========================================================================== stage: fsdp


def shard_with_fsdp2(model: Any, device: str) -> Any:
    """``fully_shard`` each decoder layer, then the root, on a 1-D mesh of all ranks; on CUDA
    with bf16 parameters and float32 gradient reduction."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(
        "cuda" if device.startswith("cuda") else "cpu", (dist.get_world_size(),)
    )
    policy = MixedPrecisionPolicy()
    if device.startswith("cuda"):
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def fsdp_train_steps(
    model: Any, vocab_size: int, sizes: KitSizes, device: str, seed: int
) -> dict[str, Any]:
    """``sizes.fsdp_steps`` AdamW steps of next-token loss on random token batches; wall ms and
    loss per step (synchronised)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(seed)
    step_ms, losses = [], []
    for _ in range(sizes.fsdp_steps):
        shape = (sizes.fsdp_batch, sizes.fsdp_seq_len)
        ids = torch.randint(4, vocab_size, shape, generator=gen).to(device)  # (b, s)
        synchronize(device)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        step_ms.append((time.perf_counter() - start) * 1e3)
        losses.append(float(loss.detach()))
    return {
        "step_ms_each": step_ms,
        "step_ms_median_after_first": median_or_none(step_ms[1:] or step_ms),
        "loss_each": losses,
        "tokens_per_step": sizes.fsdp_batch * sizes.fsdp_seq_len,
    }


def gather_full_state_dict(model: Any) -> dict[str, Any]:
    """Gather the sharded model into a full CPU state dict (what a checkpoint or a weight push
    to a rollout engine needs); returns its size and the time it took."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    start = time.perf_counter()
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    return {
        "tensors": len(state),
        "elements": sum(t.numel() for t in state.values()),
        "seconds": time.perf_counter() - start,
    }


def stage_fsdp(sizes: KitSizes, device: str, record: StageRecord, workdir: Path) -> None:
    """Under torchrun: nccl (CUDA) or gloo (CPU) process group, FSDP2 Qwen2, a few steps."""
    import torch
    import torch.distributed as dist

    from rcx.models.loading import build_char_tokenizer, count_parameters

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend=backend)
    try:
        record.update(backend=backend, world_size=dist.get_world_size(), rank=dist.get_rank())
        tokenizer = build_char_tokenizer()
        model = qwen2_model(sizes.model, tokenizer, seed=0)
        record.update(shape=asdict(sizes.model), parameters=count_parameters(model))
        model = shard_with_fsdp2(model.to(device), device)
        record.update(mixed_precision="bf16 params, fp32 reduce" if backend == "nccl" else "none")
        record.update(
            **fsdp_train_steps(model, len(tokenizer), sizes, device, seed=dist.get_rank())
        )
        if device.startswith("cuda"):
            record.update(cuda_memory=cuda_memory_gib())
        record.update(full_state_dict=gather_full_state_dict(model))
    finally:
        dist.destroy_process_group()


# =========================================================================== stage process

STAGE_FUNCTIONS: dict[str, Callable[[KitSizes, str, StageRecord, Path], None]] = {
    "environment": stage_environment,
    "correction": stage_correction,
    "trainer": stage_trainer,
    "fsdp": stage_fsdp,
}


def run_stage_here(name: str, sizes: KitSizes, device: str, out: Path | None, workdir: Path) -> int:
    """Run one stage in this process; record ``status`` ok/failed (with the error) in ``out``.

    Under torchrun only rank 0 writes. Returns the process exit code (0 ok, 1 failed).
    """
    writer = out if int(os.environ.get("RANK", "0")) == 0 else None
    record = StageRecord(writer)
    record.update(status="running")
    try:
        STAGE_FUNCTIONS[name](sizes, device, record, workdir)
    except BaseException as exc:  # every failure, even Ctrl-C, is a result of the check
        record.update(
            status="failed",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc()[-3000:],
        )
        return 1
    record.update(status="ok")
    return 0


# =========================================================================== orchestration


class _Terminated(Exception):
    """SIGTERM/SIGHUP reached the orchestrator (e.g. an outer ``timeout``)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated(signal.Signals(signum).name)


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL it after 10 s; reap the child."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def run_guarded(cmd: Sequence[str], timeout_s: float, env: Mapping[str, str]) -> int | None:
    """Run ``cmd`` in its own process group (output inherited); its exit code, or None when
    it ran past ``timeout_s`` and was stopped (with everything it started)."""
    proc = subprocess.Popen(list(cmd), env=dict(env), start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process_group(proc)
        return None
    except BaseException:
        stop_process_group(proc)
        raise


def stage_command(name: str, args: argparse.Namespace, out: Path, workdir: Path) -> list[str]:
    """The command line of stage ``name``; the fsdp stage goes through ``torch.distributed.run``."""
    script = [str(Path(__file__).resolve()), "--stage", name, "--stage-out", str(out)]
    script += ["--device", args.device, "--workdir", str(workdir)]
    if args.smoke:
        script.append("--smoke")
    if name != "fsdp":
        return [sys.executable, *script]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    return [sys.executable, *launcher, *script]


def child_env() -> dict[str, str]:
    """This environment with the repo root on PYTHONPATH (after what is there) and unbuffered
    output, so that stage logs interleave in order."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(REPO_ROOT) not in paths:
        paths.append(str(REPO_ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_stage_process(
    name: str, args: argparse.Namespace, sizes: KitSizes, workdir: Path
) -> dict[str, Any]:
    """Run stage ``name`` under its time guard; its record, with ``status`` and ``seconds``."""
    out = workdir / f"stage_{name}.json"
    guard = sizes.guards_s[name]
    print(f"\n=== gpu_check: stage {name} (time guard {guard} s) ===", flush=True)
    start = time.perf_counter()
    code = run_guarded(stage_command(name, args, out, workdir), guard, child_env())
    record = read_json(out)
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["time_guard_s"] = guard
    if code is None:
        record.update(status="failed", error=f"timed out after {guard} s (stage time guard)")
    elif code != 0 and record.get("status") != "failed":
        record.update(status="failed", error=f"exited with code {code} before reporting a result")
    elif code == 0 and record.get("status") != "ok":
        record.update(status="failed", error="exited 0 without reporting status ok")
    print(
        f"=== gpu_check: stage {name}: {record['status']} in {record['seconds']} s ===", flush=True
    )
    return record


def new_summary(args: argparse.Namespace) -> dict[str, Any]:
    """The summary skeleton: what ran, where, and the notes that qualify the numbers."""
    return {
        "kit": "rcx bench/gpu_check.py (issue 12, item 7)",
        "mode": "smoke" if args.smoke else "full",
        "device": args.device,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "notes": list(NOTES),
        "stages": {},
    }


def orchestrate(args: argparse.Namespace, sizes: KitSizes) -> int:
    """Run the chosen stages one after another; rewrite ``args.out`` after each; print the
    summary. Returns 0 when every stage is ok, else 1."""
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = (
        Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rcx_gpu_check_"))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    summary = new_summary(args)
    start = time.perf_counter()
    previous = {
        sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGHUP)
    }
    name = None
    try:
        for name in args.stages:
            summary["stages"][name] = run_stage_process(name, args, sizes, workdir)
            summary["total_s"] = round(time.perf_counter() - start, 2)
            summary["all_ok"] = all(s.get("status") == "ok" for s in summary["stages"].values())
            write_json_atomic(out, summary)
    except _Terminated as exc:
        interrupted = f"{exc} after {time.perf_counter() - start:.0f} s"
        if name is not None and name not in summary["stages"]:
            partial = read_json(workdir / f"stage_{name}.json")  # what the stage had measured
            partial.update(status="failed", error=f"interrupted ({interrupted})")
            summary["stages"][name] = partial
        summary.update(interrupted=interrupted, all_ok=False)
        write_json_atomic(out, summary)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n=== gpu_check summary ===")
    print(json.dumps(summary, indent=2, default=str), flush=True)
    print(f"written to {out}")
    return 0 if summary.get("all_ok") else 1


# =========================================================================== command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="Summary JSON path.")
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sizes (CPU tests); implies --device cpu."
    )
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=STAGES,
        default=list(STAGES),
        help="Stages to run, in order (default: all).",
    )
    parser.add_argument("--workdir", default=None, help="Scratch folder (default: a temp dir).")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: one stage
    parser.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.smoke else "cuda"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE_SIZES if args.smoke else GPU_SIZES
    if args.stage:
        out = Path(args.stage_out) if args.stage_out else None
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="rcx_gpu_check_stage_"))
        return run_stage_here(args.stage, sizes, args.device, out, workdir)
    return orchestrate(args, sizes)


if __name__ == "__main__":
    sys.exit(main())
