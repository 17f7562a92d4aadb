"""Faults a training step can end with: an update skipped, and why; non-finite gradients that
keep coming.

A step whose mini-batches took no optimiser step logs ``rollout_corr/skipped_update = 1``. There
are two causes, reported differently: rejection sampling masked every token (the correction
working as configured), or the gradients were non-finite (``inf``/``nan``: a loss term or an lr
out of range). The second is a fault: after ``trainer.max_nonfinite_steps`` consecutive such
steps the run stops with :class:`NonFiniteGradientsError` (the MLflow run ends FAILED).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from rcx.errors import RcxError


class NonFiniteGradientsError(RcxError, RuntimeError):
    """Too many consecutive steps without an optimiser step because of non-finite gradients."""


def skipped_by_nonfinite_gradients(metrics: Mapping[str, float]) -> bool:
    """Whether the step took no optimiser step and a mini-batch had non-finite gradients."""
    skipped = metrics.get("rollout_corr/skipped_update", 0.0) >= 1.0
    return skipped and metrics.get("actor/nonfinite_grad", 0.0) > 0.0


def check_update(step: int, metrics: Mapping[str, float], streak: int, limit: int) -> int:
    """Warn about a skipped update, naming its cause; return the new count of consecutive steps
    skipped for non-finite gradients. Raises :class:`NonFiniteGradientsError` when it reaches
    ``limit`` (``trainer.max_nonfinite_steps``)."""
    if metrics.get("rollout_corr/skipped_update", 0.0) < 1.0:
        return 0
    if not skipped_by_nonfinite_gradients(metrics):
        warnings.warn(
            f"step {step}: rejection sampling masked every token; update skipped", stacklevel=3
        )
        return streak
    streak += 1
    if streak >= limit:
        raise NonFiniteGradientsError(
            f"step {step}: non-finite gradients (grad norm inf or nan) prevented every optimiser "
            f"step for {streak} consecutive steps (trainer.max_nonfinite_steps={limit}); the "
            f"weights are those of the last good step. Check the loss coefficients "
            f"(entropy_coeff, kl_loss_coef) and the learning rate"
        )
    warnings.warn(
        f"step {step}: non-finite gradients (grad norm inf or nan); update skipped "
        f"({streak} of at most {limit} consecutive steps, trainer.max_nonfinite_steps)",
        stacklevel=3,
    )
    return streak
