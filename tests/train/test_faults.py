"""Faults during training: updates skipped for non-finite gradients, said as such, and a run
that stops FAILED when they keep coming."""

from __future__ import annotations

import pytest
import torch

from rcx.errors import RcxError
from rcx.train.faults import NonFiniteGradientsError, check_update
from rcx.train.trainer import train

SKIPPED_RS = {"rollout_corr/skipped_update": 1.0}
SKIPPED_NONFINITE = {"rollout_corr/skipped_update": 1.0, "actor/nonfinite_grad": 1.0}
UPDATED = {"rollout_corr/skipped_update": 0.0, "actor/nonfinite_grad": 1.0}


def test_a_skip_for_nonfinite_gradients_does_not_blame_rejection_sampling() -> None:
    with pytest.warns(UserWarning, match="step 4: non-finite gradients .*1 of at most 3") as info:
        assert check_update(4, SKIPPED_NONFINITE, 0, 3) == 1
    assert not any("rejection sampling" in str(w.message) for w in info)
    with pytest.warns(UserWarning, match="rejection sampling masked every token"):
        assert check_update(5, SKIPPED_RS, 1, 3) == 1  # neither counts nor resets


def test_an_optimiser_step_resets_the_count_and_the_limit_stops_the_run() -> None:
    assert check_update(1, UPDATED, 2, 3) == 0
    with pytest.warns(UserWarning):
        streak = check_update(1, SKIPPED_NONFINITE, 0, 3)
        streak = check_update(2, SKIPPED_NONFINITE, streak, 3)
    with pytest.raises(NonFiniteGradientsError, match="3 consecutive steps") as info:
        check_update(3, SKIPPED_NONFINITE, streak, 3)
    assert isinstance(info.value, RcxError) and "max_nonfinite_steps=3" in str(info.value)


@pytest.mark.slow
def test_nonfinite_gradients_every_step_end_the_run_failed(
    tiny_config, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch, runs_named
) -> None:
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda *args, **kwargs: torch.tensor(float("inf"))
    )
    cfg = tiny_config(
        "grpo-rs-only", "trainer.total_training_steps=4", "trainer.max_nonfinite_steps=2"
    )
    with (
        pytest.warns(UserWarning, match="step 1: non-finite gradients"),
        pytest.raises(NonFiniteGradientsError, match="step 2: .*2 consecutive steps"),
    ):
        train(cfg)
    (run,) = runs_named(cfg.trainer.experiment_name)
    assert run.info.status == "FAILED"
