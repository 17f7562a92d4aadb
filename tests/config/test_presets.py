"""The four seed presets carry exactly the seed's correction and algorithm values; the frontier
presets carry the values of the combinations verl ships (IcePop, GSPO, CISPO)."""

import pytest

from rcx.config import load_config
from rcx.config.loading import presets_dir

SEED = {
    "rloo-seq-is": dict(adv_estimator="rloo", rollout_is="sequence", rollout_is_threshold=2.0,
                        rollout_is_batch_normalize=True, rollout_rs=None, rollout_rs_threshold=None,
                        bypass_mode=True, loss_type="reinforce", ppo_epochs=1),
    "grpo-multi-rs": dict(adv_estimator="grpo", rollout_is="token", rollout_is_threshold=2.0,
                          rollout_is_batch_normalize=False, rollout_rs="token_k1,seq_max_k2",
                          rollout_rs_threshold="0.6_1.6,2.5", bypass_mode=True,
                          loss_type="ppo_clip", ppo_epochs=1),
    "gae-seq-is-rs": dict(adv_estimator="gae", rollout_is="sequence", rollout_is_threshold=3.0,
                          rollout_is_batch_normalize=True, rollout_rs="token_k1",
                          rollout_rs_threshold="0.5_2.0", bypass_mode=False, loss_type="ppo_clip",
                          ppo_epochs=4, gamma=0.99, lam=0.95),
    "grpo-rs-only": dict(adv_estimator="grpo", rollout_is=None, rollout_rs="token_k1,seq_max_k2",
                         rollout_rs_threshold="0.7_1.4,2.0", bypass_mode=True,
                         loss_type="ppo_clip", ppo_epochs=1),
}  # fmt: skip


FRONTIER = {
    "grpo-token-icepop": dict(adv_estimator="grpo", rollout_is="token",
                              rollout_is_threshold="0.5_5.0", bypass_mode=False,
                              loss_type="ppo_clip"),
    "grpo-bypass-pg-token-icepop": dict(adv_estimator="grpo", rollout_is="token",
                                        rollout_is_threshold="0.5_5.0", bypass_mode=True,
                                        loss_type="reinforce"),
    "grpo-gspo": dict(adv_estimator="grpo", rollout_is=None, bypass_mode=False, loss_type="gspo",
                      clip_ratio_low=3e-4, clip_ratio_high=4e-4,
                      loss_agg_mode="seq-mean-token-mean"),
    "grpo-bypass-cispo": dict(adv_estimator="grpo", rollout_is=None, bypass_mode=True,
                              loss_type="cispo", clip_ratio_low=1.0, clip_ratio_high=0.28),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SEED) + sorted(FRONTIER))
def test_preset_matches_seed(name):
    cfg = load_config(name)
    rc = cfg.algorithm.rollout_correction
    for key, value in {**SEED, **FRONTIER}[name].items():
        if key in ("ppo_epochs", "clip_ratio_low", "clip_ratio_high", "loss_agg_mode"):
            got = getattr(cfg.actor_rollout_ref.actor, key)
        elif key in ("adv_estimator", "gamma", "lam"):
            got = getattr(cfg.algorithm, key)
        else:
            got = getattr(rc, key)
        assert got == value, (name, key)


def test_icepop_presets_parse_the_band_as_written():
    for name in ("grpo-token-icepop", "grpo-bypass-pg-token-icepop"):
        spec = load_config(name).algorithm.rollout_correction.spec
        assert (spec.is_lower, spec.is_threshold) == (0.5, 5.0)


@pytest.mark.parametrize("name", sorted(FRONTIER))
def test_frontier_preset_opens_with_purpose_test_and_command(name):
    text = (presets_dir() / f"{name}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and "mode" in header[0]  # what it is: the method and its mode
    assert any(line.startswith("# Tested on:") for line in header)
    assert f"# Run:  rcx train --preset {name}" in header


@pytest.mark.parametrize("name", sorted(SEED))
def test_preset_opens_with_purpose_seed_and_command(name):
    text = (presets_dir() / f"{name}.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert header and "seed configuration" in header[0]
    assert f"# Run:  rcx train --preset {name}" in header
