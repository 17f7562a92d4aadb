"""Log-prob dumps: one file per training step, written by the trainer, read by whatif and calibrate.

With ``trainer.dump_log_probs: true`` the trainer writes ``<run dir>/log_probs/step_000001.pt``
(run dir = the checkpoint folder) every step and uploads it to MLflow under ``log_probs/``. A
``torch.save`` dict, loadable with ``torch.load(f, weights_only=True)``:

    format             FORMAT_VERSION (1)
    step               int
    mode               "decoupled" | "bypass"
    rollout_log_probs  (B, T) float32   log-prob of each sampled token under the rollout policy
    train_log_probs    (B, T) float32   what the correction compared against: pi_old (decoupled)
                                        or pi_theta at each micro-batch's forward, epoch 1 (bypass)
    response_mask      (B, T) bool      real response tokens (before rejection)
    prompt_index       (B,)   int32     which prompt of the step each response answers
    scores             (B,)   float32   the outcome reward
    rollout_correction dict             the algorithm.rollout_correction config in force
    advantage          dict             (optional) how the run computed advantages: adv_estimator,
                                        norm_adv_by_std_in_grpo, gamma (what-if's OPSM replay
                                        recomputes outcome-only advantages from scores with it)
    staleness          (B,)   int32     (optional) updates between the weights that generated each
                                        response and the step that trained on it (1 in
                                        one_step_off after step 1; 0 in sync mode with k = 1;
                                        0 .. max_off_policy_threshold in fully_async)
    weight_version     (B,)   int32     (optional) the version (updates) of the weights that
                                        generated each response

Log-probs are kept in float32: a log-ratio of 1e-3 would not survive float16 rounding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rcx.errors import RcxError

FORMAT_VERSION = 1


def write_dump(
    folder: str | Path,
    step: int,
    *,
    mode: str,
    rollout_log_probs: torch.Tensor,
    train_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    prompt_index: torch.Tensor,
    scores: torch.Tensor,
    rollout_correction: Mapping[str, Any],
    advantage: Mapping[str, Any] | None = None,
    staleness: torch.Tensor | None = None,
    weight_version: torch.Tensor | None = None,
) -> Path:
    """Write one step's dump as ``folder/step_<step:06d>.pt`` (atomically); returns its path.

    ``advantage`` (the run's advantage settings), ``staleness`` and ``weight_version`` (B,)
    are stored only when given."""
    path = Path(folder) / f"step_{step:06d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT_VERSION,
        "step": step,
        "mode": mode,
        "rollout_log_probs": rollout_log_probs.detach().float().cpu(),
        "train_log_probs": train_log_probs.detach().float().cpu(),
        "response_mask": response_mask.detach().bool().cpu(),
        "prompt_index": prompt_index.detach().to(torch.int32).cpu(),
        "scores": scores.detach().float().cpu(),
        "rollout_correction": dict(rollout_correction),
    }
    if advantage is not None:
        payload["advantage"] = dict(advantage)
    if staleness is not None:
        payload["staleness"] = staleness.detach().to(torch.int32).cpu()
    if weight_version is not None:
        payload["weight_version"] = weight_version.detach().to(torch.int32).cpu()
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


class DumpError(RcxError, ValueError):
    """A dump cannot be read or used; the message names the file and what was wrong."""


@dataclass
class DumpStack:
    """Every dumped step stacked: row i of the ``(N, T)`` tensors belongs to ``steps[row_step[i]]``.

    Rows of shorter steps are padded with mask 0. ``sources`` lists the files read, in step order.
    ``scores`` and ``prompt_index`` are None unless every dump holds them; ``mode`` and
    ``advantage`` are the first dump's (None and empty when it does not record them).
    """

    train_log_probs: torch.Tensor  # (N, T) float32
    rollout_log_probs: torch.Tensor  # (N, T) float32
    response_mask: torch.Tensor  # (N, T) bool
    row_step: torch.Tensor  # (N,) int64 index into steps
    steps: list[int]
    sources: list[Path] = field(default_factory=list)
    rollout_correction: dict[str, Any] = field(default_factory=dict)  # the first dump's config
    scores: torch.Tensor | None = None  # (N,) float32 outcome reward per row
    prompt_index: torch.Tensor | None = None  # (N,) int64 prompt of the row within its step
    mode: str | None = None  # "decoupled" | "bypass"
    advantage: dict[str, Any] = field(default_factory=dict)  # the first dump's advantage settings
    staleness: torch.Tensor | None = None  # (N,) int64 updates between generation and training

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def staleness_levels(self) -> list[int]:
        """The staleness values present, ascending (empty when the dumps do not record it)."""
        return [] if self.staleness is None else sorted(set(self.staleness.tolist()))

    def subset(self, rows: torch.Tensor) -> DumpStack:
        """The stack of the rows where ``rows`` (N,) bool is True, steps without such rows
        dropped (row order kept, so each step's rows stay contiguous)."""
        kept_steps = sorted(set(self.row_step[rows].tolist()))
        renumber = torch.full((self.num_steps,), -1, dtype=torch.int64)
        renumber[kept_steps] = torch.arange(len(kept_steps))

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows]

        return DumpStack(
            self.train_log_probs[rows],
            self.rollout_log_probs[rows],
            self.response_mask[rows],
            renumber[self.row_step[rows]],
            [self.steps[k] for k in kept_steps],
            self.sources,
            self.rollout_correction,
            scores=pick(self.scores),
            prompt_index=pick(self.prompt_index),
            mode=self.mode,
            advantage=self.advantage,
            staleness=pick(self.staleness),
        )

    def step_slice(self, k: int) -> slice:
        """Rows of the k-th step (steps are stacked contiguously)."""
        rows = torch.nonzero(self.row_step == k).flatten()
        return slice(int(rows[0]), int(rows[-1]) + 1)


def dump_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand DUMP arguments: a ``.pt`` file, a ``log_probs/`` folder, or a run folder holding one.

    Raises :class:`DumpError` when a path does not exist or a folder holds no dump.
    """
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
            continue
        if not path.exists():
            raise DumpError(f"dump {path}: no such file or folder")
        folder = path / "log_probs" if (path / "log_probs").is_dir() else path
        found = sorted(p for p in folder.glob("*.pt") if p.is_file())
        if not found:
            raise DumpError(
                f"dump {path}: no *.pt log-prob dump in it (a run writes them to "
                f"<checkpoint dir>/log_probs/ when trainer.dump_log_probs=true)"
            )
        files += found
    if not files:
        raise DumpError("no dump given: pass one or more dump files or folders")
    return files


def read_dump(path: Path) -> dict[str, Any]:
    """One step's dump, checked: the three ``(B, T)`` tensors with equal shapes, and a step."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise DumpError(f"dump {path}: not a readable torch dump ({exc})") from None
    if not isinstance(data, Mapping):
        raise DumpError(f"dump {path}: expected a dict, got {type(data).__name__}")
    missing = [k for k in TENSOR_FIELDS if k not in data]
    if missing:
        raise DumpError(
            f"dump {path}: missing {', '.join(missing)} (has {', '.join(map(str, data))}); "
            f"expected a trainer.dump_log_probs file"
        )
    check_dump_schema(data, path)
    return dict(data)


#: The ``(B, T)`` tensors every dump holds.
TENSOR_FIELDS = ("train_log_probs", "rollout_log_probs", "response_mask")


def check_dump_schema(data: Mapping[str, Any], path: Path) -> None:
    """Raise :class:`DumpError` naming ``path`` and the field when ``data`` is not a usable dump:
    the three fields tensors of one non-empty ``(B, T)`` shape, log-probs floating point and not
    all NaN/inf on the response tokens, a mask that selects at least one token, ``step`` a
    non-negative int, ``rollout_correction`` a mapping of valid correction settings."""
    for name in TENSOR_FIELDS:
        value = data[name]
        if not isinstance(value, torch.Tensor):
            raise DumpError(
                f"dump {path}: field {name} is {type(value).__name__}, expected a (B, T) tensor"
            )
    shapes = {k: tuple(data[k].shape) for k in TENSOR_FIELDS}
    if len(set(shapes.values())) != 1 or len(shapes["response_mask"]) != 2:
        raise DumpError(f"dump {path}: tensors must share one (B, T) shape, got {shapes}")
    if 0 in shapes["response_mask"]:
        raise DumpError(
            f"dump {path}: fields {', '.join(TENSOR_FIELDS)} have shape "
            f"{shapes['response_mask']}: no responses or no tokens"
        )
    mask = data["response_mask"]
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise DumpError(f"dump {path}: field response_mask must hold 0/1 (or bool) values")
    if not bool(mask.bool().any()):
        raise DumpError(f"dump {path}: field response_mask selects no token (all zero)")
    for name in ("train_log_probs", "rollout_log_probs"):
        values = data[name]
        if not values.is_floating_point():
            raise DumpError(
                f"dump {path}: field {name} is {values.dtype}, expected float log-probs"
            )
        if not bool(torch.isfinite(values[mask.bool()]).any()):
            raise DumpError(f"dump {path}: field {name} is NaN or inf on every response token")
    step = data.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise DumpError(
            f"dump {path}: field step is {step!r} ({type(step).__name__}), expected an int >= 0"
        )
    _check_rollout_correction(data.get("rollout_correction", {}), path)


def _check_rollout_correction(rc: Any, path: Path) -> None:
    """``rollout_correction`` must be a mapping that validates as algorithm.rollout_correction."""
    if rc is None:
        return
    if not isinstance(rc, Mapping):
        raise DumpError(
            f"dump {path}: field rollout_correction is {type(rc).__name__}, expected a mapping "
            f"of algorithm.rollout_correction keys"
        )
    from pydantic import ValidationError

    from rcx.config.models import RolloutCorrectionConfig

    try:
        RolloutCorrectionConfig.model_validate(dict(rc))
    except ValidationError as exc:
        first = exc.errors()[0]
        field_name = (
            f"rollout_correction.{first['loc'][0]}" if first["loc"] else "rollout_correction"
        )
        raise DumpError(
            f"dump {path}: field {field_name} = {first.get('input')!r}: {first['msg']}"
        ) from None


def load_dumps(paths: Iterable[str | Path]) -> DumpStack:
    """Read every dump, order them by step, and stack them (see :class:`DumpStack`)."""
    files = dump_files(paths)
    dumps = [(read_dump(f), f) for f in files]
    for i, (d, f) in enumerate(dumps):
        d.setdefault("step", i + 1)
        d["_file"] = f
    dumps.sort(key=lambda df: df[0]["step"])
    steps = [d["step"] for d, _ in dumps]
    dupes = sorted({s for s in steps if steps.count(s) > 1})
    if dupes:
        raise DumpError(
            f"step(s) {dupes} appear in more than one dump; pass the dumps of one run at a time"
        )
    width = max(d["response_mask"].shape[1] for d, _ in dumps)
    train, rollout, mask, row_step = [], [], [], []
    for k, (d, _) in enumerate(dumps):
        pad = width - d["response_mask"].shape[1]
        train.append(torch.nn.functional.pad(d["train_log_probs"].float(), (0, pad)))
        rollout.append(torch.nn.functional.pad(d["rollout_log_probs"].float(), (0, pad)))
        mask.append(torch.nn.functional.pad(d["response_mask"].bool(), (0, pad)))
        row_step.append(torch.full((d["response_mask"].shape[0],), k, dtype=torch.int64))
    first = dumps[0][0]
    return DumpStack(
        torch.cat(train),
        torch.cat(rollout),
        torch.cat(mask),
        torch.cat(row_step),
        steps,
        [f for _, f in dumps],
        dict(first.get("rollout_correction") or {}),
        scores=_stacked_rows([d for d, _ in dumps], "scores", torch.float32),
        prompt_index=_stacked_rows([d for d, _ in dumps], "prompt_index", torch.int64),
        mode=first.get("mode"),
        advantage=dict(first.get("advantage") or {}),
        staleness=_stacked_rows([d for d, _ in dumps], "staleness", torch.int64),
    )


def _stacked_rows(dumps: list[dict[str, Any]], key: str, dtype: torch.dtype) -> torch.Tensor | None:
    """``key``'s ``(B,)`` vectors of every dump concatenated, or None when any dump lacks one of
    the right length (older or hand-made dumps: only what-if's OPSM replay needs them)."""
    rows = []
    for d in dumps:
        value = d.get(key)
        if not isinstance(value, torch.Tensor) or value.shape != d["response_mask"].shape[:1]:
            return None
        rows.append(value.to(dtype))
    return torch.cat(rows)


def write_synthetic_dumps(
    folder: str | Path,
    *,
    steps: int = 100,
    batch: int = 256,
    length: int = 8,
    log_ratio_std: float = 0.05,
    outlier_share: float = 0.01,
    seed: int = 0,
    rollout_correction: Mapping[str, Any] | None = None,
    sync_interval: int | None = None,
) -> list[Path]:
    """Write ``steps`` dumps in the trainer's format (``step_000001.pt``, ...) into ``folder``.

    For tests, benchmarks and trying ``rcx whatif`` without a run. The defaults match the default
    preset's batch (32 prompts x 8 responses, 8 response tokens). Each token's log-ratio is
    Gaussian with std ``log_ratio_std`` (bf16-like mismatch is ~0.006, staleness 0.04-0.14), plus
    a share ``outlier_share`` of tokens with a log-ratio of +-U(1, 3); response lengths are uniform
    in [1, length] (mask 1 up to the length). With ``sync_interval`` the dumps also record the
    staleness a run with that ``weight_sync_interval`` has, ``(step - 1) % sync_interval``, and
    a sample s updates old gets ``(1 + s)`` times the log-ratio std.
    """
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for step in range(1, steps + 1):
        rollout = -torch.rand(batch, length, generator=gen) * 3.0  # (B, T) log-probs in [-3, 0]
        stale = 0 if sync_interval is None else (step - 1) % sync_interval
        log_ratio = torch.randn(batch, length, generator=gen) * log_ratio_std * (1 + stale)
        outlier = torch.rand(batch, length, generator=gen) < outlier_share
        sign = torch.where(torch.rand(batch, length, generator=gen) < 0.5, -1.0, 1.0)
        jump = sign * (1.0 + 2.0 * torch.rand(batch, length, generator=gen))
        log_ratio = torch.where(outlier, jump, log_ratio)
        lengths = torch.randint(1, length + 1, (batch,), generator=gen)  # (B,)
        mask = torch.arange(length)[None, :] < lengths[:, None]  # (B, T) bool
        path = write_dump(
            folder,
            step,
            mode="bypass",
            rollout_log_probs=rollout,
            train_log_probs=rollout + log_ratio,
            response_mask=mask,
            prompt_index=torch.arange(batch) // 8,
            scores=torch.zeros(batch),
            rollout_correction=dict(rollout_correction or {}),
            staleness=None if sync_interval is None else torch.full((batch,), stale),
        )
        paths.append(path)
    return paths
