"""Rollout correction: importance-sampling weights, rejection masks and off-policy metrics.

Pure tensor code: no model, trainer or I/O. For every response token t of sequence i
with mask m[i,t], ``log_r = clamp(lp_train - lp_rollout, -20, 20)`` and ``r = exp(log_r)``.

- IS (``rollout_is``): ``token``: ``w[i,t] = min(r[i,t], C) * m[i,t]``; ``sequence``:
  ``w[i,t] = min(exp(clamp(S_i)), C) * m[i,t]`` with ``S_i = sum_t m[i,t] * log_r[i,t]``.
  Optional batch normalisation divides by the mean weight (tokens, or sequences for ``sequence``).
- RS (``rollout_rs``): every criterion of :mod:`rcx.algos.criteria` keeps a token or a whole
  sequence; a token survives only if every criterion keeps it. RS zeroes mask entries only.
- Metrics: verl's names under ``rollout_corr/``, computed from a handful of fused
  reductions and brought to the host with one ``tolist()``.

Tokens whose log-ratio is NaN or +-inf at a valid position are dropped from the returned mask,
counted in ``rollout_corr/nonfinite_fraction`` and left out of every other statistic. Every
statistic is taken over the remaining valid tokens; a sequence with none is ignored everywhere.

Where rcx differs from verl's ``rollout_corr_helper`` on purpose (same weights, masks and metrics
otherwise, for symmetric k1 bounds and every k2/k3 criterion):

- k1 bounds apply to r (``L <= r <= U``); verl bounds 1/r. Same set when ``L = 1/U``.
- ``_fraction_high`` / ``_fraction_low`` of a k1 criterion are the shares with r above U / below
  L (verl: -log r above log U / below log L, i.e. the two swapped for symmetric bounds).
- ``rollout_is_eff_sample_size`` is of the applied (truncated) weights; verl first clamps them to
  [1/C, C]. ``rollout_is_std`` is of the raw ratios; verl's is of ratios clamped to [1/C, C].
- Per-sequence log-ratio sums are clamped to +-20 everywhere (seq_sum_k1, sequence IS, chi2_seq),
  and kl / k3_kl / log_ppl_diff use the clamped per-token log-ratio; verl clamps only before exp.
- Sequences without a valid token are left out of every per-sequence statistic (verl counts
  them in some: ``rollout_rs_seq_masked_fraction``, the ppl metrics, the IS fractions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from rcx.algos.criteria import CorrectionSpec, RSCriterion, correction_spec
from rcx.algos.losses import LOG_RATIO_BOUND

PREFIX = "rollout_corr/"

_FLOAT_MAX = {
    torch.float32: torch.finfo(torch.float32).max,
    torch.float64: torch.finfo(torch.float64).max,
}


@dataclass(frozen=True)
class CorrectionResult:
    """What :func:`compute_rollout_correction` returns.

    ``weights``: ``(B, T)`` IS weights (no gradient), zero at padding, or None when IS is off.
    ``mask``: ``(B, T)``, dtype of the input ``response_mask``; rejected and non-finite entries
    zeroed. ``metrics``: ``dict[str, float]``, every key prefixed ``rollout_corr/``.
    """

    weights: torch.Tensor | None
    mask: torch.Tensor
    metrics: dict[str, float]


# ------------------------------------------------------------------------------------ reductions


class _Reductions:
    """Collects per-sequence vectors and scalars, reduces them together, syncs once.

    Every registered ``(B,)`` row gets its total over all sequences and its mean, unbiased std,
    max and min over the valid sequences, all from one ``(k, B)`` float64 matrix. Metrics are
    registered as closures over the resolved numbers and evaluated after the single ``tolist()``.
    Rows and scalars are stacked per dtype before the one conversion to float64: a conversion
    per entry would cost more than the reductions themselves.
    """

    def __init__(self, seq_valid: torch.Tensor, counts: torch.Tensor) -> None:
        self.seq_valid = seq_valid  # (B,) bool
        self.rows: list[torch.Tensor] = [counts]  # row 0: valid tokens per sequence
        self.scalars: list[torch.Tensor] = []
        self.metrics: list[tuple[str, Callable[[], float]]] = []
        self._sum: list[float] = []
        self._mean: list[float] = []
        self._std: list[float] = []
        self._max: list[float] = []
        self._min: list[float] = []
        self._scalar: list[float] = []

    def row(self, values: torch.Tensor) -> int:
        """Register a ``(B,)`` vector; its entries at invalid sequences must be finite."""
        self.rows.append(values)
        return len(self.rows) - 1

    def scalar(self, value: torch.Tensor) -> int:
        self.scalars.append(value.reshape(()))
        return len(self.scalars) - 1

    def add(self, name: str, fn: Callable[[], float]) -> None:
        self.metrics.append((PREFIX + name, fn))

    def total(self, i: int) -> float:
        return self._sum[i]

    def tokens(self) -> float:
        """The number of valid tokens in the batch."""
        return self._sum[0]

    def seq_mean(self, i: int) -> float:
        return self._mean[i]

    def seq_std(self, i: int) -> float:
        return self._std[i]

    def seq_max(self, i: int) -> float:
        return self._max[i]

    def seq_min(self, i: int) -> float:
        return self._min[i]

    def value(self, j: int) -> float:
        return self._scalar[j]

    def sync(self) -> None:
        """Reduce every row and scalar and bring them to the host: the one host sync."""
        sv = self.seq_valid
        rows, row_order = _stack_as_float64(self.rows)  # (k, B)
        num_seqs = sv.sum(dtype=torch.float64)
        means = rows.masked_fill(~sv, 0.0).sum(1) / num_seqs
        centred = (rows - means[:, None]).masked_fill_(~sv, 0.0)
        # Unbiased like torch.std (verl's seq_std); a single sequence has std 0.
        var = centred.square().sum(1) / (num_seqs - 1).clamp_min(1.0)
        maxes = rows.masked_fill(~sv, -math.inf).amax(1)
        mins = rows.masked_fill(~sv, math.inf).amin(1)
        parts = [rows.sum(1), means, var.sqrt(), maxes, mins]
        scalar_order: list[int] = []
        if self.scalars:
            scalars, scalar_order = _stack_as_float64(self.scalars)
            parts.append(scalars)
        flat = torch.cat(parts).tolist()
        k = len(self.rows)
        sections = [flat[j * k : (j + 1) * k] for j in range(5)]
        self._sum, self._mean, self._std, self._max, self._min = (
            _unpermute(section, row_order) for section in sections
        )
        self._scalar = _unpermute(flat[5 * k :], scalar_order)

    def evaluate(self) -> dict[str, float]:
        """The registered metrics, after :meth:`sync`."""
        return {name: float(fn()) for name, fn in self.metrics}


def _stack_as_float64(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Stack same-shape tensors, one stack and one conversion per dtype; returns the order used."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    stacks = [torch.stack([tensors[i] for i in idx]).to(torch.float64) for idx in groups.values()]
    order = [i for idx in groups.values() for i in idx]
    return torch.cat(stacks), order


def _unpermute(values: list[float], order: list[int]) -> list[float]:
    out = [0.0] * len(order)
    for position, index in enumerate(order):
        out[index] = values[position]
    return out


# ------------------------------------------------------------------------------- shared tensors


class LogRatios:
    """The per-token quantities every part of the correction shares (and what-if and calibrate
    reuse, so that they count and measure exactly as the correction does).

    ``log_ratio`` is clamped to +-20 and set to 0 wherever a token is not valid, so that sums
    need no mask and 0 (ratio 1) is neutral for most comparisons.
    """

    def __init__(
        self, train_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, mask: torch.Tensor
    ) -> None:
        dtype = _compute_dtype(train_log_probs, rollout_log_probs)
        train = train_log_probs.detach().to(dtype)
        rollout = rollout_log_probs.detach().to(dtype)
        mask_bool = mask if mask.dtype == torch.bool else mask.bool()

        log_ratio = train - rollout  # (B, T)
        # One (B, T) buffer serves three steps in turn (see "fresh buffer" below): the finite
        # check, the masked train log-probs, then r - 1.
        scratch = torch.abs(log_ratio)
        # |x| <= max is False for NaN and +-inf: one comparison finds both.
        valid = scratch.le_(_FLOAT_MAX[dtype]).bool() & mask_bool  # (B, T)
        self.num_masked = torch.count_nonzero(mask_bool)
        log_ratio.masked_fill_(~valid, 0.0)
        self.raw_sum = log_ratio.sum(-1)  # (B,) before the safety clamp: log-ppl metrics
        log_ratio.clamp_(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)

        self.dtype = dtype
        self.log_ratio = log_ratio
        self.valid = valid
        counts = valid.sum(-1, dtype=torch.int32)  # (B,)
        self.num_tokens = counts.sum()
        self.counts = counts.to(dtype)  # (B,)
        self.seq_valid = counts > 0  # (B,)
        self.safe_counts = self.counts.clamp_min(1.0)  # (B,) divisor that is never 0
        self.sum = log_ratio.sum(-1)  # (B,) S_i of clamped tokens
        self.seq_log_ratio = self.sum.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)  # (B,)
        zero = torch.zeros((), dtype=dtype, device=log_ratio.device)
        self.train_sum = torch.where(valid, train, zero, out=scratch).sum(-1)  # (B,)
        # r - 1 per token (exact for r in [0.5, 2]): small deviations keep their precision in
        # the sums below, where mean(r^2) - mean(r)^2 would cancel.
        self.ratio_minus_one = torch.exp(log_ratio, out=scratch).sub_(1.0)  # (B, T), 0 at invalid
        flat = self.ratio_minus_one.view(-1)
        self.dev_sum = self.ratio_minus_one.sum(-1)  # (B,) sum (r - 1)
        self.dev_sq_total = torch.dot(flat, flat)  # sum (r - 1)^2
        self._extremes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._row_extremes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._above: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._below: dict[float, tuple[torch.Tensor, torch.Tensor]] = {}
        self._k2: torch.Tensor | None = None
        self._k3: torch.Tensor | None = None
        self._spare: torch.Tensor | None = None
        self._free: list[torch.Tensor] = []  # (B, T) buffers no longer needed, for reuse

    # Each fresh (B, T) buffer costs page faults comparable to the arithmetic done in it (the
    # allocator returns large blocks to the OS), so buffers whose contents are no longer needed
    # are handed on to later temporaries and to the outputs.

    def spare(self) -> torch.Tensor:
        """A (B, T) scratch buffer for a temporary that dies before the next call."""
        if self._spare is None:
            self._spare = self.reuse(self.dtype)
            if self._spare is None:
                self._spare = torch.empty_like(self.log_ratio)
        return self._spare

    def reuse(self, dtype: torch.dtype) -> torch.Tensor | None:
        """A released (B, T) buffer of ``dtype``, or None."""
        for i, buffer in enumerate(self._free):
            if buffer.dtype == dtype:
                return self._free.pop(i)
        return None

    def take_ratio_buffer(self) -> torch.Tensor:
        """Hand the ``r - 1`` buffer over (for the weights) once its statistics are taken."""
        buffer, self.ratio_minus_one = self.ratio_minus_one, None
        return buffer

    def release_statistics(self) -> None:
        """Drop the cached k2/k3 tensors and free the spare once the criteria are done."""
        self._k2 = self._k3 = None
        self.release_spare()

    def release_spare(self) -> None:
        if self._spare is not None:
            self._free.append(self._spare)
            self._spare = None

    def release_comparisons(self) -> None:
        self._above.clear()
        self._below.clear()

    def release_ratio(self) -> None:
        """Free the ``r - 1`` buffer once every statistic that needs it has been taken."""
        if self.ratio_minus_one is not None:
            self._free.append(self.ratio_minus_one)
            self.ratio_minus_one = None  # type: ignore[assignment]

    def log_ratio_extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Max and min of log_r over valid tokens (0-dim tensors)."""
        if self._extremes is None:
            lr, valid = self.log_ratio, self.valid
            hi = torch.where(valid, lr, -math.inf).amax()
            lo = torch.where(valid, lr, math.inf).amin()
            self._extremes = (hi, lo)
        return self._extremes

    def row_extremes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sequence max and min of log_r ``(B,)``, invalid tokens counted as 0.

        Exact for what they serve: maxima of k2 and k3, which are 0 at log_r = 0 and grow with
        |log_r| on either side, so a 0 never exceeds a valid token's value.
        """
        if self._row_extremes is None:
            self._row_extremes = (self.log_ratio.amax(-1), self.log_ratio.amin(-1))
        return self._row_extremes

    def above(self, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_r > bound`` (B, T) and its count; cached, as IS and k1 often share a bound."""
        if bound not in self._above:
            hit = self.log_ratio > bound
            self._above[bound] = (hit, torch.count_nonzero(hit))
        return self._above[bound]

    def below(self, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_r < bound`` (B, T) and its count; cached."""
        if bound not in self._below:
            hit = self.log_ratio < bound
            self._below[bound] = (hit, torch.count_nonzero(hit))
        return self._below[bound]

    def statistic(self, name: str) -> torch.Tensor:
        """The per-token k2 or k3 tensor (B, T)."""
        return self.k2() if name == "k2" else self.k3()

    def token_statistic(self, statistic: str) -> torch.Tensor:
        """A criterion's per-token statistic (B, T), 0 at invalid tokens: ``-log r`` (k1),
        ``0.5 log_r^2`` (k2) or ``r - 1 - log_r`` (k3)."""
        return -self.log_ratio if statistic == "k1" else self.statistic(statistic)

    def sequence_statistic(self, statistic: str, aggregation: str) -> torch.Tensor:
        """A sequence criterion's per-sequence statistic (B,): the sum, mean or max over the
        sequence's valid tokens of the token statistic; k1's sum is of the clamped S_i."""
        if statistic == "k1":
            return -self.seq_log_ratio if aggregation == "sum" else -self.sum / self.safe_counts
        if aggregation == "max":
            # k2 and k3 grow with |log_r| on either side of 0: the max sits at an extreme.
            row_max, row_min = self.row_extremes()
            if statistic == "k2":
                extreme = torch.maximum(row_max, -row_min)
                return extreme * extreme * 0.5
            return torch.maximum(_k3(row_max), _k3(row_min))
        total = self.statistic(statistic).sum(-1)  # (B,)
        return total if aggregation == "sum" else total / self.safe_counts

    def k2(self) -> torch.Tensor:
        """``0.5 * log_r**2`` per token, 0 at invalid tokens. (B, T)"""
        if self._k2 is None:
            self._k2 = torch.mul(self.log_ratio, self.log_ratio).mul_(0.5)
        return self._k2

    def k3(self) -> torch.Tensor:
        """``r - 1 - log_r`` per token, 0 at invalid tokens. (B, T)"""
        if self._k3 is None:
            self._k3 = self.ratio_minus_one - self.log_ratio
        return self._k3


def _compute_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    dtype = torch.promote_types(a.dtype, b.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"log-probs must be floating point, got {a.dtype} and {b.dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------------------------ validation


def _check_inputs(
    train_log_probs: torch.Tensor, rollout_log_probs: torch.Tensor, response_mask: torch.Tensor
) -> None:
    shapes = (train_log_probs.shape, rollout_log_probs.shape, response_mask.shape)
    if train_log_probs.dim() != 2:
        raise ValueError(
            f"train_log_probs must be 2-D (batch, response_length), got shape "
            f"{tuple(train_log_probs.shape)}"
        )
    if len(set(shapes)) != 1:
        raise ValueError(
            "train_log_probs, rollout_log_probs and response_mask must have the same shape, got "
            + ", ".join(str(tuple(s)) for s in shapes)
        )
    if response_mask.numel() == 0:
        raise ValueError(f"response_mask has no valid token (shape {tuple(shapes[0])})")


# ------------------------------------------------------------------------------- public entries


def compute_rollout_correction(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rollout_is: str | None = None,
    rollout_is_threshold: float | str = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | list[str] | None = None,
    rollout_rs_threshold: str | float | None = None,
) -> CorrectionResult:
    """IS weights, RS mask and ``rollout_corr/`` metrics for one batch.

    Args:
        train_log_probs: ``(B, T)`` log pi_train of the sampled tokens: pi_old (decoupled) or the
            current policy (bypass). Detached here; float32/float64 are kept, half precision is
            computed (and returned) in float32.
        rollout_log_probs: ``(B, T)`` log pi_rollout as reported by the rollout engine.
        response_mask: ``(B, T)``, nonzero at response tokens; any dtype.
        rollout_is: ``"token"``, ``"sequence"`` or None/"null" (off).
        rollout_is_threshold: the cap C (> 1) of the truncated weights, or an IcePop band
            ``"lo_hi"`` (0 < lo < 1 < hi): weights outside [lo, hi] are set to 0.
        rollout_is_batch_normalize: divide the truncated weights by their batch mean (tokens for
            ``token``, valid sequences for ``sequence``); a mean <= 1e-8 leaves them as they are.
        rollout_rs: comma-separated criteria (``token_k1,seq_max_k2``; legacy aliases accepted)
            or None/"null" (off).
        rollout_rs_threshold: one entry per criterion or one shared (``"0.5_2.0,2.5"``, ``2.0``).

    Returns:
        :class:`CorrectionResult`. With ``log_r`` the clamped log-ratio, ``r = exp(log_r)`` and
        ``S_i = sum_t log_r``: token weights ``min(r, C)``, sequence weights
        ``min(exp(clamp(S_i)), C)``, both times the mask (then / the batch mean if normalising).

    Raises:
        ValueError: mismatched or non-2-D shapes, no valid token (or none with finite
            log-probs), invalid settings (same message as ``rcx validate``).
    """
    spec = correction_spec(
        rollout_is=rollout_is,
        rollout_is_threshold=rollout_is_threshold,
        rollout_is_batch_normalize=rollout_is_batch_normalize,
        rollout_rs=rollout_rs,
        rollout_rs_threshold=rollout_rs_threshold,
    )
    return compute_correction(spec, train_log_probs, rollout_log_probs, response_mask)


def compute_correction(
    spec: CorrectionSpec,
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
) -> CorrectionResult:
    """IS weights, RS mask and ``rollout_corr/`` metrics for one batch, per a parsed ``spec``.

    What :func:`compute_rollout_correction` computes (tensors and results as described there),
    with the settings already parsed: the trainer's path, called once per batch (decoupled) or
    per micro-batch (bypass) with nothing left to parse.
    """
    is_level, criteria = spec.is_level, spec.criteria
    _check_inputs(train_log_probs, rollout_log_probs, response_mask)

    with torch.no_grad():
        lr = LogRatios(train_log_probs, rollout_log_probs, response_mask)
        red = _Reductions(lr.seq_valid, lr.counts)
        i_masked = red.scalar(lr.num_masked)
        i_tokens = red.scalar(lr.num_tokens)
        _off_policy_metrics(lr, red, i_masked)
        keep = lr.valid
        if criteria:
            keep = _rejection(lr, red, criteria)
        lr.release_statistics()
        if is_level != "token":
            lr.release_ratio()
        weights = None
        if is_level == "token":
            weights = _token_is(lr, red, spec)
        elif is_level == "sequence":
            weights = _sequence_is(lr, red, spec)
        lr.release_comparisons()
        lr.release_spare()
        mask = _apply_keep(response_mask, keep, lr.reuse(response_mask.dtype))
        red.sync()
        # Checked after the computation so that the whole call needs a single host sync.
        if red.value(i_masked) == 0:
            raise ValueError("response_mask has no valid token (all zeros): nothing to correct")
        if red.value(i_tokens) == 0:
            raise ValueError(
                "every valid token has a non-finite (NaN or inf) log-prob: nothing to correct"
            )
        metrics = red.evaluate()
    return CorrectionResult(weights=weights, mask=mask, metrics=metrics)


def _apply_keep(
    response_mask: torch.Tensor, keep: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The response mask with every entry outside ``keep`` zeroed, in its own dtype. (B, T)"""
    if response_mask.dtype == torch.bool:
        return keep if keep is not response_mask else keep.clone()
    zero = torch.zeros((), dtype=response_mask.dtype, device=response_mask.device)
    return torch.where(keep, response_mask, zero, out=out)


# ------------------------------------------------------------------------- off-policy diagnostics


def _off_policy_metrics(lr: LogRatios, red: _Reductions, i_masked: int) -> None:
    """KL, perplexity and chi-square diagnostics (always computed).

    Per sequence, with means over its valid tokens: ``log_ppl_train = -mean lp_train``,
    ``log_ppl_diff = mean lp_rollout - mean lp_train``. Batch values are means over valid
    sequences, except ``kl = mean(-log_r)``, ``k3_kl = mean(r - 1 - log_r)`` and
    ``chi2_token = mean(r^2) - 1`` (over valid tokens) and ``chi2_seq = mean_i exp(2 S_i) - 1``.
    """
    i_sum = red.row(lr.sum)
    i_dev = red.row(lr.dev_sum)
    i_dev_sq = red.scalar(lr.dev_sq_total)
    counts = lr.safe_counts.double()
    train_mean = lr.train_sum.double() / counts  # (B,) mean lp_train
    rollout_mean = train_mean - lr.raw_sum.double() / counts  # (B,) mean lp_rollout
    # mean(lp_rollout - lp_train) over the clamped log-ratios, so ppl_ratio <= exp(20).
    log_ppl_diff = -lr.sum.double() / counts  # (B,)
    i_train_log_ppl = red.row(-train_mean)
    i_train_ppl = red.row(torch.exp(-train_mean))
    i_roll_log_ppl = red.row(-rollout_mean)
    i_roll_ppl = red.row(torch.exp(-rollout_mean))
    i_diff = red.row(log_ppl_diff)
    i_abs_diff = red.row(log_ppl_diff.abs())
    i_ppl_ratio = red.row(torch.exp(log_ppl_diff))
    i_chi2_seq = red.row(torch.exp(2.0 * lr.seq_log_ratio.double()))

    red.add("kl", lambda: -red.total(i_sum) / red.tokens())
    red.add("k3_kl", lambda: (red.total(i_dev) - red.total(i_sum)) / red.tokens())
    red.add("training_ppl", lambda: red.seq_mean(i_train_ppl))
    red.add("training_log_ppl", lambda: red.seq_mean(i_train_log_ppl))
    red.add("rollout_ppl", lambda: red.seq_mean(i_roll_ppl))
    red.add("rollout_log_ppl", lambda: red.seq_mean(i_roll_log_ppl))
    red.add("log_ppl_diff", lambda: red.seq_mean(i_diff))
    red.add("log_ppl_abs_diff", lambda: red.seq_mean(i_abs_diff))
    red.add("log_ppl_diff_max", lambda: red.seq_max(i_diff))
    red.add("log_ppl_diff_min", lambda: red.seq_min(i_diff))
    red.add("ppl_ratio", lambda: red.seq_mean(i_ppl_ratio))
    # mean(r^2) - 1 = mean((r-1)^2) + 2 mean(r-1), without the cancellation.
    red.add("chi2_token", lambda: (red.value(i_dev_sq) + 2.0 * red.total(i_dev)) / red.tokens())
    red.add("chi2_seq", lambda: red.seq_mean(i_chi2_seq) - 1.0)
    red.add("nonfinite_fraction", lambda: 1.0 - red.tokens() / red.value(i_masked))


# ------------------------------------------------------------------------- importance sampling


def _is_bounds(spec: CorrectionSpec) -> tuple[float, float]:
    """``(log lower, log upper)`` of the raw-ratio fractions: the band [lo, hi] or [1/C, C]."""
    log_upper = math.log(spec.is_threshold)
    if spec.is_lower is None:
        return -log_upper, log_upper
    return math.log(spec.is_lower), log_upper


def _ess(red: _Reductions, i_sum: int, i_sq: int, total: Callable[[int], float]) -> float:
    """``(sum w)^2 / (n * sum w^2)`` = 1 / mean((w / mean w)^2); 0 when every weight is 0 (an
    IcePop band that zeroed the whole batch)."""
    sq = total(i_sq)
    return total(i_sum) ** 2 / (red.tokens() * sq) if sq > 0 else 0.0


def _token_is(lr: LogRatios, red: _Reductions, spec: CorrectionSpec) -> torch.Tensor:
    """Token IS weights (B, T) and their metrics.

    Truncation (``is_lower`` None): ``w = min(r, C) * m``. IcePop band [lo, hi]:
    ``w = r * m`` where ``lo <= r <= hi``, 0 outside (the mask is left alone), and
    ``rollout_is_oob_ratio`` is the share of valid tokens zeroed. Statistics describe the raw
    ratios r (after the safety clamp, before truncation or zeroing); ESS is
    ``1 / mean((w / mean w)^2)`` of the applied weights w over valid tokens.
    """
    threshold = spec.is_threshold
    log_lo, log_hi = _is_bounds(spec)
    hi, lo = lr.log_ratio_extremes()
    i_dev = red.row(lr.dev_sum)
    # Two-pass variance: one-pass moments of ratios up to e^20 would cancel catastrophically.
    mean_dev = lr.dev_sum.sum() / lr.num_tokens
    centred = torch.sub(lr.ratio_minus_one, mean_dev, out=lr.spare())  # (B, T)
    centred.masked_fill_(~lr.valid, 0.0)
    i_sq_dev = red.scalar(torch.dot(centred.view(-1), centred.view(-1)))
    del centred
    i_max = red.scalar(hi)
    i_min = red.scalar(lo)
    # Invalid tokens hold log_r = 0, inside every bound: they never count as above or below.
    above, n_above = lr.above(log_hi)  # (B, T)
    below, n_below = lr.below(log_lo)  # (B, T)
    i_high = red.scalar(n_above)
    i_low = red.scalar(n_below)

    weights = torch.exp(lr.log_ratio, out=lr.take_ratio_buffer())  # (B, T)
    if spec.is_band:
        weights.masked_fill_(above | below, 0.0)
        red.add(
            "rollout_is_oob_ratio", lambda: (red.value(i_high) + red.value(i_low)) / red.tokens()
        )
    else:
        weights.clamp_(max=threshold)
    weights.masked_fill_(~lr.valid, 0.0)
    w_sum = weights.sum()
    i_w_sum = red.scalar(w_sum)
    i_w_sq = red.scalar(torch.dot(weights.view(-1), weights.view(-1)))
    if spec.is_batch_normalize:
        mean = w_sum / lr.num_tokens
        factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        weights.div_(factor)
        i_factor = red.scalar(factor)
        red.add("rollout_is_batch_norm_factor", lambda: red.value(i_factor))

    def mean_dev() -> float:
        return red.total(i_dev) / red.tokens()

    red.add("rollout_is_mean", lambda: 1.0 + mean_dev())
    red.add("rollout_is_std", lambda: math.sqrt(red.value(i_sq_dev) / red.tokens()))
    red.add("rollout_is_max", lambda: math.exp(red.value(i_max)))
    red.add("rollout_is_min", lambda: math.exp(red.value(i_min)))
    red.add("rollout_is_ratio_fraction_high", lambda: red.value(i_high) / red.tokens())
    red.add("rollout_is_ratio_fraction_low", lambda: red.value(i_low) / red.tokens())
    red.add("rollout_is_eff_sample_size", lambda: _ess(red, i_w_sum, i_w_sq, red.value))
    _seq_weight_metrics(red, 1.0 + lr.dev_sum / lr.safe_counts, spec)
    return weights


def _sequence_is(lr: LogRatios, red: _Reductions, spec: CorrectionSpec) -> torch.Tensor:
    """Sequence IS weights (B, T), one per sequence broadcast to its tokens, and their metrics.

    Truncation: ``min(exp(clamp(S_i)), C) * m``. IcePop band [lo, hi]: ``exp(S_i) * m`` where
    ``lo <= exp(S_i) <= hi``, 0 outside; ``rollout_is_oob_ratio`` is the share of valid
    sequences zeroed. ``rollout_is_mean``/``_std`` weight each sequence by its token count (the
    weights are broadcast to tokens); max/min/fractions come from the per-sequence ratios
    exp(S_i) and the fractions are shares of valid sequences.
    """
    log_lo, log_hi = _is_bounds(spec)
    s = lr.seq_log_ratio  # (B,) clamped S_i
    n = lr.counts
    ratio = torch.exp(s)  # (B,)
    dev = torch.expm1(s)  # (B,) exp(S_i) - 1, precise near 0
    above, below = s > log_hi, s < log_lo  # (B,)
    if spec.is_band:
        applied = torch.where(above | below, torch.zeros_like(ratio), ratio)  # (B,)
    else:
        applied = torch.clamp(ratio, max=spec.is_threshold)  # (B,) min(exp(S_i), C)
    i_dev = red.row(n * dev)
    i_ratio = red.row(ratio)
    # Token-weighted two-pass variance of exp(S_i), in float64 over (B,).
    n64, ratio64 = n.double(), torch.exp(s.double())
    mean64 = (n64 * ratio64).sum() / n64.sum()
    i_sq_dev = red.scalar((n64 * (ratio64 - mean64).square()).sum())
    i_high = red.row(above)
    i_low = red.row(below)
    i_w = red.row(n * applied)
    i_w_sq = red.row(n * applied * applied)
    if spec.is_band:
        i_oob = red.row(above | below)
        red.add("rollout_is_oob_ratio", lambda: red.seq_mean(i_oob))

    seq_valid = lr.seq_valid
    if spec.is_batch_normalize:
        mean = applied.masked_fill(~seq_valid, 0.0).sum() / seq_valid.sum()
        factor = torch.where(mean > 1e-8, mean, torch.ones_like(mean))
        applied = applied / factor
        i_factor = red.scalar(factor)
        red.add("rollout_is_batch_norm_factor", lambda: red.value(i_factor))
    zero = torch.zeros((), dtype=lr.dtype, device=applied.device)
    weights = torch.where(lr.valid, applied[:, None], zero, out=lr.reuse(lr.dtype))  # (B, T)

    def mean_dev() -> float:
        return red.total(i_dev) / red.tokens()

    red.add("rollout_is_mean", lambda: 1.0 + mean_dev())
    red.add("rollout_is_std", lambda: math.sqrt(red.value(i_sq_dev) / red.tokens()))
    red.add("rollout_is_max", lambda: red.seq_max(i_ratio))
    red.add("rollout_is_min", lambda: red.seq_min(i_ratio))
    red.add("rollout_is_ratio_fraction_high", lambda: red.seq_mean(i_high))
    red.add("rollout_is_ratio_fraction_low", lambda: red.seq_mean(i_low))
    red.add("rollout_is_eff_sample_size", lambda: _ess(red, i_w, i_w_sq, red.total))
    _seq_weight_metrics(red, ratio, spec)
    return weights


def _seq_weight_metrics(red: _Reductions, seq_ratio: torch.Tensor, spec: CorrectionSpec) -> None:
    """``rollout_is_seq_*``: the per-sequence mean *raw* ratio ``(B,)`` over valid sequences.

    ``_fraction_high`` / ``_low`` are the shares of sequences whose mean raw ratio lies above the
    cap (band: hi) / below 1/C (band: lo). Raw, before truncation (verl #6806: from the truncated
    weights ``_fraction_high`` could never be above 0).
    """
    upper = spec.is_threshold
    lower = 1.0 / upper if spec.is_lower is None else spec.is_lower
    i_seq = red.row(seq_ratio)
    i_high = red.row(seq_ratio > upper)
    i_low = red.row(seq_ratio < lower)

    def seq_max_deviation() -> float:
        return max(abs(red.seq_max(i_seq) - 1.0), abs(red.seq_min(i_seq) - 1.0))

    red.add("rollout_is_seq_mean", lambda: red.seq_mean(i_seq))
    red.add("rollout_is_seq_std", lambda: red.seq_std(i_seq))
    red.add("rollout_is_seq_max", lambda: red.seq_max(i_seq))
    red.add("rollout_is_seq_min", lambda: red.seq_min(i_seq))
    red.add("rollout_is_seq_max_deviation", seq_max_deviation)
    red.add("rollout_is_seq_fraction_high", lambda: red.seq_mean(i_high))
    red.add("rollout_is_seq_fraction_low", lambda: red.seq_mean(i_low))


# --------------------------------------------------------------------------- rejection sampling


def _rejection(lr: LogRatios, red: _Reductions, criteria: Sequence[RSCriterion]) -> torch.Tensor:
    """The kept tokens (B, T) bool: valid and kept by every criterion; registers RS metrics."""
    keep = lr.valid
    seq_keep: torch.Tensor | None = None
    for criterion in criteria:
        if criterion.level == "token":
            token_keep = _token_criterion(lr, red, criterion)
            keep = keep & token_keep
        else:
            kept = _sequence_criterion(lr, red, criterion)
            seq_keep = kept if seq_keep is None else seq_keep & kept
    if seq_keep is not None:
        keep = keep & seq_keep[:, None]
    kept_counts = keep.sum(-1, dtype=torch.int32).to(lr.dtype)  # (B,)
    i_rejected = red.row(lr.counts - kept_counts)
    i_seq_rejected = red.row((kept_counts < lr.counts).to(lr.dtype))
    red.add("rollout_rs_masked_fraction", lambda: red.total(i_rejected) / red.tokens())
    red.add("rollout_rs_seq_masked_fraction", lambda: red.seq_mean(i_seq_rejected))
    return keep


def _stat_bounds(criterion: RSCriterion) -> tuple[float, float]:
    """The keep interval in the statistic's space: k1's statistic is -log r."""
    if criterion.statistic == "k1":
        assert criterion.lower is not None
        return -math.log(criterion.upper), -math.log(criterion.lower)
    return 0.0, criterion.upper


def _token_criterion(lr: LogRatios, red: _Reductions, criterion: RSCriterion) -> torch.Tensor:
    """Keep mask (B, T) of one token-level criterion, and its ``rollout_rs_<name>_*`` metrics.

    token_k1 keeps ``L <= r <= U``; token_k2/k3 keep ``k <= U``. The statistic reported is
    -log r for k1, ``0.5 log_r^2`` for k2, ``r - 1 - log_r`` for k3.
    """
    lo, hi = _stat_bounds(criterion)
    valid = lr.valid
    if criterion.statistic == "k1":
        log_lower, log_upper = -hi, -lo
        # "high" / "low" follow the keep rule on r: above U / below L.
        above, n_high = lr.above(log_upper)  # (B, T)
        below, n_low_all = lr.below(log_lower)  # (B, T)
        keep = ~(above | below)  # L <= r <= U; invalid tokens are dropped by the caller
        # Invalid tokens hold log_r = 0: they only count when a bound lies beyond 1.
        if log_upper < 0.0:
            n_high = torch.count_nonzero(above & valid)
        n_low: torch.Tensor | None = n_low_all
        if log_lower > 0.0:
            n_low = torch.count_nonzero(below & valid)
        bounded = torch.clamp(lr.log_ratio, log_lower, log_upper, out=lr.spare())  # (B, T)
        if not log_lower <= 0.0 <= log_upper:
            bounded.masked_fill_(~valid, 0.0)
        stat_row = -lr.sum  # (B,) sum of -log r
        clamped_sum = -bounded.sum()
        hi_t, lo_t = lr.log_ratio_extremes()
        stat_max, stat_min = -lo_t, -hi_t
    else:
        stat = lr.statistic(criterion.statistic)  # (B, T), 0 at invalid
        keep = stat <= hi
        bounded = torch.clamp(stat, lo, hi, out=lr.spare())  # (B, T)
        stat_row = stat.sum(-1)
        clamped_sum = bounded.sum()
        # k2 >= 0 exactly, so the zeros at invalid tokens cannot be its maximum; k3 can round
        # to a tiny negative value.
        stat_max = stat.amax() if criterion.statistic == "k2" else _masked_max(stat, valid)
        stat_min = torch.where(valid, stat, math.inf).amin()
        n_high = torch.count_nonzero(stat > hi)  # hi > 0 = stat at invalid tokens
        n_low = None
    flat = bounded.view(-1)
    clamped_sq_sum = torch.dot(flat, flat)
    del bounded, flat

    kept_counts = (keep & valid).sum(-1, dtype=torch.int32).to(lr.dtype)  # (B,)
    rows = _CriterionRows(
        red,
        criterion,
        stat_sum=stat_row,
        clamped_sum=clamped_sum,
        clamped_sq_sum=clamped_sq_sum,
        seq_values=stat_row / lr.safe_counts,
        rejected=lr.counts - kept_counts,
        seq_rejected=kept_counts < lr.counts,
    )
    name = rows.name
    i_max, i_min, i_high = red.scalar(stat_max), red.scalar(stat_min), red.scalar(n_high)
    red.add(f"{name}_max", lambda: red.value(i_max))
    red.add(f"{name}_min", lambda: red.value(i_min))
    red.add(f"{name}_fraction_high", lambda: red.value(i_high) / red.tokens())
    if n_low is not None:
        i_low = red.scalar(n_low)
        red.add(f"{name}_fraction_low", lambda: red.value(i_low) / red.tokens())
    else:
        red.add(f"{name}_fraction_low", lambda: 0.0)
    rows.add_common()
    return keep


def _sequence_criterion(lr: LogRatios, red: _Reductions, criterion: RSCriterion) -> torch.Tensor:
    """Keep mask (B,) of one sequence-level criterion, and its ``rollout_rs_<name>_*`` metrics.

    The per-sequence statistic is the sum, mean or max over the sequence's valid tokens of the
    token statistic (-log r, k2 or k3); seq_sum_k1 keeps ``L <= exp(S_i) <= U`` (S_i clamped),
    seq_mean_k1 ``L <= exp(S_i / n_i) <= U``, the others ``statistic <= U``.
    """
    lo, hi = _stat_bounds(criterion)
    n = lr.counts
    values = lr.sequence_statistic(criterion.statistic, criterion.aggregation)  # (B,)
    keep = (values >= lo) & (values <= hi) if criterion.statistic == "k1" else values <= hi
    rejected = (~keep).to(lr.dtype)
    bounded = values.clamp(lo, hi)  # (B,)
    weighted = n * bounded  # each sequence counts once per token
    rows = _CriterionRows(
        red,
        criterion,
        stat_sum=n * values,
        clamped_sum=weighted.sum(),
        clamped_sq_sum=(weighted * bounded).sum(),
        seq_values=values,
        rejected=n * rejected,
        seq_rejected=rejected,
    )
    name, i_seq = rows.name, rows.i_seq
    red.add(f"{name}_max", lambda: red.seq_max(i_seq))
    red.add(f"{name}_min", lambda: red.seq_min(i_seq))
    red.add(f"{name}_fraction_high", lambda: red.seq_mean(rows.i_seq_high))
    if rows.k1:
        red.add(f"{name}_fraction_low", lambda: red.seq_mean(rows.i_seq_low))
    else:
        red.add(f"{name}_fraction_low", lambda: 0.0)
    rows.add_common()
    return keep


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """``r - 1 - log_r``, evaluated exactly as the per-token k3 tensor is."""
    return torch.exp(log_ratio).sub_(1.0) - log_ratio


def _masked_max(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, values, -math.inf).amax()


class _CriterionRows:
    """Per-sequence rows shared by both criterion levels, and the metrics built from them.

    ``seq_values`` is the per-sequence statistic (token level: its mean over the sequence);
    ``lo, hi`` is the keep interval in the statistic's space (see :func:`_stat_bounds`).
    """

    def __init__(
        self,
        red: _Reductions,
        criterion: RSCriterion,
        *,
        stat_sum: torch.Tensor,
        clamped_sum: torch.Tensor,
        clamped_sq_sum: torch.Tensor,
        seq_values: torch.Tensor,
        rejected: torch.Tensor,
        seq_rejected: torch.Tensor,
    ) -> None:
        self.red = red
        self.name = f"rollout_rs_{criterion.criterion}"
        self.k1 = criterion.statistic == "k1"
        lo, hi = _stat_bounds(criterion)
        self.i_stat = red.row(stat_sum)
        self.i_clamped = red.scalar(clamped_sum)
        self.i_clamped_sq = red.scalar(clamped_sq_sum)
        self.i_seq = red.row(seq_values)
        self.i_rejected = red.row(rejected)
        self.i_seq_rejected = red.row(seq_rejected)
        # "high" / "low" follow the keep rule: for k1 (statistic -log r) r above U is the
        # statistic below lo, r below L the statistic above hi.
        self.i_seq_high = red.row(seq_values < lo if self.k1 else seq_values > hi)
        self.i_seq_low = red.row(seq_values > hi) if self.k1 else -1

    def mean(self) -> float:
        return self.red.total(self.i_stat) / self.red.tokens()

    def std(self) -> float:
        """Std over valid tokens of the statistic clamped to the keep interval (as verl)."""
        red = self.red
        tokens = red.tokens()
        if tokens <= 1:
            return 0.0
        mean = red.value(self.i_clamped) / tokens
        return math.sqrt(max(red.value(self.i_clamped_sq) / tokens - mean * mean, 0.0))

    def add_common(self) -> None:
        """Mean, std, masked fractions and the ``_seq_*`` statistics of the per-sequence values."""
        red, name, i_seq = self.red, self.name, self.i_seq
        red.add(f"{name}_mean", self.mean)
        red.add(f"{name}_std", self.std)
        red.add(f"{name}_masked_fraction", lambda: red.total(self.i_rejected) / red.tokens())
        red.add(f"{name}_seq_masked_fraction", lambda: red.seq_mean(self.i_seq_rejected))
        red.add(f"{name}_seq_mean", lambda: red.seq_mean(i_seq))
        red.add(f"{name}_seq_std", lambda: red.seq_std(i_seq))
        red.add(f"{name}_seq_max", lambda: red.seq_max(i_seq))
        red.add(f"{name}_seq_min", lambda: red.seq_min(i_seq))
        red.add(
            f"{name}_seq_max_deviation",
            lambda: max(abs(red.seq_max(i_seq)), abs(red.seq_min(i_seq))),
        )
        red.add(f"{name}_seq_fraction_high", lambda: red.seq_mean(self.i_seq_high))
        if self.k1:
            red.add(f"{name}_seq_fraction_low", lambda: red.seq_mean(self.i_seq_low))


# ------------------------------------------------------------------ off-policy sequence masking


def off_policy_sequence_mask(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    threshold: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Off-policy sequence masking (OPSM, DeepSeek-V3.2): which sequences to keep, ``(B,)`` bool.

    With ``d_i = mean_t (lp_rollout - lp_train)`` over the valid tokens of sequence i (per-token
    log-ratios clamped to +-20; NaN/inf tokens left out) and ``A_i`` the mean of its advantages
    over the same tokens, sequence i is masked when ``A_i < 0 and d_i > threshold``: a negative
    update on a sample the training policy has drifted away from is dropped whole. Sequences
    without a valid token are kept (there is nothing to mask).

    Metrics (one host sync): ``rollout_corr/opsm_seq_masked_fraction`` (share of valid
    sequences masked) and ``rollout_corr/opsm_masked_fraction`` (share of valid tokens).
    """
    _check_inputs(train_log_probs, rollout_log_probs, response_mask)
    with torch.no_grad():
        dtype = _compute_dtype(train_log_probs, rollout_log_probs)
        log_ratio = train_log_probs.detach().to(dtype) - rollout_log_probs.detach().to(dtype)
        valid = torch.isfinite(log_ratio) & response_mask.bool()  # (B, T)
        log_ratio = torch.where(valid, log_ratio, 0.0).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        counts = valid.sum(-1)  # (B,)
        safe = counts.clamp_min(1).to(dtype)
        kl = -log_ratio.sum(-1) / safe  # (B,) d_i
        adv = torch.where(valid, advantages.detach().to(dtype), 0.0).sum(-1) / safe  # (B,) A_i
        masked = (adv < 0) & (kl > threshold) & (counts > 0)  # (B,)
        stats = torch.stack(
            [masked.sum(), (counts > 0).sum(), (counts * masked).sum(), counts.sum()]
        ).tolist()
    seqs, tokens = max(stats[1], 1), max(stats[3], 1)
    metrics = {
        PREFIX + "opsm_seq_masked_fraction": stats[0] / seqs,
        PREFIX + "opsm_masked_fraction": stats[2] / tokens,
    }
    return ~masked, metrics
