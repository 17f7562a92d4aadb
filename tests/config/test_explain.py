"""``--explain``: mode, loss, where IS weights go, RS intervals."""

import pytest

from rcx.config import load_config
from rcx.config.explain import explain, explain_lines


def test_grpo_multi_rs_is_bypass_with_metrics_only_weights():
    info = explain(load_config("grpo-multi-rs"))
    assert (info["mode"], info["policies"], info["loss"]) == ("bypass", 2, "ppo_clip")
    assert info["is"]["applied"] == "metrics_only"
    token_k1, seq_max_k2 = info["rs"]
    assert (token_k1["ratio_lower"], token_k1["ratio_upper"]) == (0.6, 1.6)
    assert seq_max_k2["ratio_lower"] == pytest.approx(0.1069, abs=1e-4)
    assert seq_max_k2["ratio_upper"] == pytest.approx(9.3565, abs=1e-4)


def test_rloo_applies_weights_in_reinforce():
    info = explain(load_config("rloo-seq-is"))
    assert info["loss"] == "reinforce" and info["is"]["applied"] == "loss"
    assert info["is"]["batch_normalize"] is True and info["rs"] == []


def test_gae_is_decoupled_three_policies():
    info = explain(load_config("gae-seq-is-rs"))
    assert (info["mode"], info["policies"], info["is"]["applied"]) == ("decoupled", 3, "loss")


def test_decoupled_reinforce_is_reported_as_ppo_clip():
    cfg = load_config(overrides=["algorithm.rollout_correction.loss_type=reinforce"])
    assert explain(cfg)["loss"] == "ppo_clip"
    assert any("ignored" in line for line in explain_lines(cfg))


def test_lines_state_the_interval_in_words():
    text = "\n".join(explain_lines(load_config("grpo-multi-rs")))
    assert "every token of a kept sequence has r in [0.107, 9.36]" in text
    assert "metrics only" in text
    seq = load_config(
        overrides=[
            "algorithm.rollout_correction.rollout_rs=seq_sum_k1",
            "algorithm.rollout_correction.rollout_rs_threshold=0.5_2",
        ]
    )
    assert "single tokens are not bounded" in "\n".join(explain_lines(seq))


def test_bypass_says_where_the_correction_is_recomputed():
    """As the actor does (rcx.train.actor.policy_loss: once per micro-batch, in the forward that
    carries the gradient), and as the README says."""
    mode = explain_lines(load_config(preset="grpo-multi-rs"))[0]
    assert "recomputed for every micro-batch" in mode and "mini-batch" not in mode


def test_icepop_band_cispo_gspo_opsm_and_denominators_are_explained():
    cfg = load_config(
        overrides=[
            "algorithm.rollout_correction.rollout_is=token",
            "algorithm.rollout_correction.rollout_is_threshold=0.5_5.0",
            "algorithm.rollout_correction.loss_type=cispo",
            "algorithm.rollout_correction.off_policy_mask_threshold=0.5",
            "algorithm.rollout_correction.loss_denominator=generated",
        ]
    )
    info = explain(cfg)
    assert info["is"]["kind"] == "band" and (info["is"]["lower"], info["is"]["upper"]) == (0.5, 5)
    assert info["loss"] == "cispo" and info["is"]["applied"] == "loss"
    assert info["opsm"]["threshold"] == 0.5 and info["loss_denominator"] == "generated"
    text = "\n".join(explain_lines(cfg))
    assert "w = r if 0.5 <= r <= 5 else 0" in text and "the mask is left alone" in text
    assert "CISPO" in text and "OPSM" in text and "every generated token" in text
    gspo = load_config(overrides=[*BYPASS_GSPO])
    assert explain(gspo)["is"]["applied"] == "metrics_only"
    assert "GSPO, sequence ratio" in "\n".join(explain_lines(gspo))


BYPASS_GSPO = [
    "algorithm.rollout_correction.bypass_mode=true",
    "algorithm.rollout_correction.loss_type=gspo",
    "algorithm.rollout_correction.rollout_is=token",
]
