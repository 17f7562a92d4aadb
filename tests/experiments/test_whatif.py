"""rcx whatif: replaying correction configs over log-prob dumps.

The central check: every per-step statistic of the replay equals what
``compute_rollout_correction`` reports when called on that step alone, for token and sequence IS,
batch normalisation, single and combined criteria, and NaN log-probs in a dump.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rcx.algos.correction import compute_rollout_correction
from rcx.cli import app
from rcx.experiments.whatif import CorrectionSettings, build_settings, correction_key, replay
from rcx.store.dumps import DumpError, load_dumps, write_synthetic_dumps

P = "rollout_corr/"


@pytest.fixture
def dumps(tmp_path: Path) -> Path:
    """4 steps x 24 sequences x 6 tokens, mismatch std 0.1 with 3% outliers."""
    folder = tmp_path / "run" / "log_probs"
    write_synthetic_dumps(
        folder,
        steps=4,
        batch=24,
        length=6,
        log_ratio_std=0.1,
        outlier_share=0.03,
        seed=3,
        rollout_correction={
            "rollout_is": "token",
            "rollout_is_threshold": 2.0,
            "rollout_rs": "token_k1",
            "rollout_rs_threshold": "0.5_2.0",
            "bypass_mode": True,
        },
    )
    return folder


CONFIGS = [
    CorrectionSettings("token", 2.0, False, "token_k1,seq_max_k2", "0.6_1.6,2.5"),
    CorrectionSettings("sequence", 3.0, True, "seq_mean_k1", "1.1"),
    CorrectionSettings("token", 1.2, True, None, None),
    CorrectionSettings(None, 2.0, False, "seq_sum_k3,token_k2", "0.3,0.02"),
    CorrectionSettings("sequence", 1.5, False, "seq_sum_k1", "0.8_1.3"),
]


def direct_step(stack, k: int, settings: CorrectionSettings):
    sl = stack.step_slice(k)
    return compute_rollout_correction(
        stack.train_log_probs[sl],
        stack.rollout_log_probs[sl],
        stack.response_mask[sl],
        **settings.kwargs(),
    )


def assert_matches_direct(stack, result, settings: CorrectionSettings) -> None:
    for k in range(stack.num_steps):
        direct = direct_step(stack, k, settings)
        m = direct.metrics
        got = {name: values[k] for name, values in result.per_step.items()}
        if settings.rollout_rs:
            assert got["masked_fraction"] == pytest.approx(m[P + "rollout_rs_masked_fraction"])
            assert got["seq_masked_fraction"] == pytest.approx(
                m[P + "rollout_rs_seq_masked_fraction"]
            )
            for name in settings.rollout_rs.split(","):
                key = f"{P}rollout_rs_{name}_masked_fraction"
                assert got[f"{name}/masked_fraction"] == pytest.approx(m[key]), (name, k)
                seq_key = f"{P}rollout_rs_{name}_seq_masked_fraction"
                assert got[f"{name}/seq_masked_fraction"] == pytest.approx(m[seq_key])
        else:
            assert "masked_fraction" not in got
        if settings.rollout_is:
            valid = direct.weights != 0  # weights are > 0 exactly at valid tokens
            assert got["ess"] == pytest.approx(m[P + "rollout_is_eff_sample_size"], rel=1e-5)
            assert got["truncated_fraction"] == pytest.approx(
                m[P + "rollout_is_ratio_fraction_high"]
            )
            assert got["weight_mean"] == pytest.approx(
                float(direct.weights[valid].double().mean()), rel=1e-5
            )
            assert got["weight_max"] == pytest.approx(float(direct.weights.max()), rel=1e-5)
            if settings.rollout_is_batch_normalize:
                assert got["norm_factor"] == pytest.approx(
                    m[P + "rollout_is_batch_norm_factor"], rel=1e-5
                )
        else:
            assert "ess" not in got


@pytest.mark.parametrize("settings", CONFIGS, ids=lambda s: s.label)
def test_replay_matches_compute_rollout_correction_per_step(dumps: Path, settings) -> None:
    stack = load_dumps([dumps])
    (result,) = replay(stack, [settings])
    assert result.steps == [1, 2, 3, 4]
    assert_matches_direct(stack, result, settings)


def test_overall_pools_tokens_and_averages_ess(dumps: Path) -> None:
    stack = load_dumps([dumps])
    settings = CONFIGS[0]
    (result,) = replay(stack, [settings])
    tokens = [int(stack.response_mask[stack.step_slice(k)].sum()) for k in range(4)]
    pooled = sum(f * n for f, n in zip(result.per_step["masked_fraction"], tokens, strict=True))
    assert result.overall["masked_fraction"] == pytest.approx(pooled / sum(tokens))
    assert result.overall["ess"] == pytest.approx(sum(result.per_step["ess"]) / 4)
    assert result.overall["ess_min"] == min(result.per_step["ess"])
    assert result.overall["masked_fraction_max"] == max(result.per_step["masked_fraction"])
    # The data has 3% outliers at |log r| >= 1: token_k1 in [0.6, 1.6] must reject some.
    assert result.overall["masked_fraction"] > 0.01


def test_nonfinite_log_probs_are_counted_as_the_correction_counts_them(tmp_path: Path) -> None:
    write_synthetic_dumps(tmp_path, steps=2, batch=8, length=5, seed=1)
    path = tmp_path / "step_000002.pt"
    data = torch.load(path, weights_only=True)
    data["train_log_probs"][0, 0] = float("nan")
    data["rollout_log_probs"][1, 0] = float("-inf")
    torch.save(data, path)
    stack = load_dumps([tmp_path])
    settings = CorrectionSettings("token", 2.0, True, "token_k1", "0.8_1.25")
    (result,) = replay(stack, [settings])
    assert_matches_direct(stack, result, settings)
    assert all(math.isfinite(v) for v in result.overall.values())


def test_steps_are_ordered_and_padded(tmp_path: Path) -> None:
    write_synthetic_dumps(tmp_path / "a", steps=1, batch=4, length=3, seed=0)
    write_synthetic_dumps(tmp_path / "b", steps=2, batch=5, length=7, seed=1)
    (tmp_path / "b" / "step_000001.pt").rename(tmp_path / "b" / "late.pt")
    late = torch.load(tmp_path / "b" / "late.pt", weights_only=True)
    late["step"] = 9
    torch.save(late, tmp_path / "b" / "late.pt")
    stack = load_dumps([tmp_path / "b", tmp_path / "a" / "step_000001.pt"])
    assert stack.steps == [1, 2, 9]
    assert stack.response_mask.shape == (4 + 5 + 5, 7)
    assert not stack.response_mask[:4, 3:].any()  # the 3-token step is padded with mask 0
    assert stack.row_step.tolist() == [0] * 4 + [1] * 5 + [2] * 5


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing_key", "missing response_mask"),
        ("missing_path", "no such file or folder"),
        ("empty_folder", "no *.pt log-prob dump"),
        ("duplicate_step", "appear in more than one dump"),
        ("shape", "share one (B, T) shape"),
        ("not_torch", "not a readable torch dump"),
    ],
)
def test_bad_dumps_get_specific_errors(tmp_path: Path, setup: str, message: str) -> None:
    write_synthetic_dumps(tmp_path / "d", steps=1, batch=4, length=3)
    path = tmp_path / "d" / "step_000001.pt"
    data = torch.load(path, weights_only=True)
    args: list[Path] = [path]
    if setup == "missing_key":
        del data["response_mask"]
        torch.save(data, path)
    elif setup == "missing_path":
        args = [tmp_path / "nope"]
    elif setup == "empty_folder":
        (tmp_path / "empty").mkdir()
        args = [tmp_path / "empty"]
    elif setup == "duplicate_step":
        torch.save(data, tmp_path / "copy.pt")
        args = [path, tmp_path / "copy.pt"]
    elif setup == "shape":
        data["train_log_probs"] = data["train_log_probs"][:, :2]
        torch.save(data, path)
    elif setup == "not_torch":
        path.write_text("hello")
    with pytest.raises(DumpError, match=re.escape(message)):
        load_dumps(args)


def test_build_settings_validates_with_the_config_finding_codes() -> None:
    configs, invalid = build_settings(
        {"rollout_is": "token"},
        [
            ("algorithm.rollout_correction.rollout_is_threshold", [1.0, 2.0]),
            ("rollout_rs", ["seq_max_k2"]),
            ("rollout_rs_threshold", ["0.5_2.5", "2.5"]),
        ],
    )
    assert [(c.rollout_is_threshold, c.rollout_rs_threshold) for c in configs] == [(2.0, "2.5")]
    codes = sorted({f.code for _, findings in invalid for f in findings})
    assert codes == ["RCX-E004", "RCX-E005"]
    assert len(invalid) == 3


def test_only_correction_keys_can_be_replayed() -> None:
    assert correction_key("algorithm.rollout_correction.rollout_rs") == "rollout_rs"
    with pytest.raises(ValueError, match="cannot be replayed offline"):
        correction_key("actor_rollout_ref.actor.optim.lr")


def test_cli_whatif_grid_over_the_dump_config(dumps: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "whatif",
            str(dumps.parent),  # the run folder holding log_probs/
            "--grid",
            "rollout_is_threshold=1.5,3.0",
            "--grid",
            'rollout_rs_threshold=["0.6_1.6", 0.5_2]',
            "--format",
            "json",
        ],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    configs = [c["config"] for c in doc["configs"]]
    assert [(c["rollout_is_threshold"], c["rollout_rs_threshold"]) for c in configs] == [
        (1.5, "0.6_1.6"),
        (1.5, "0.5_2"),  # verbatim: never 0.52
        (3.0, "0.6_1.6"),
        (3.0, "0.5_2"),
    ]
    # The base (rollout_is, rollout_rs) comes from the config recorded in the dump.
    assert {c["rollout_is"] for c in configs} == {"token"}
    assert {c["rollout_rs"] for c in configs} == {"token_k1"}
    assert doc["steps"] == [1, 2, 3, 4]
    assert len(doc["configs"][0]["per_step"]["ess"]) == 4


def test_cli_whatif_text_tables(dumps: Path) -> None:
    result = CliRunner().invoke(
        app, ["whatif", str(dumps), "-g", "rollout_is=token,sequence", "--per-step"]
    )
    assert result.exit_code == 0, result.output
    assert "what-if, overall" in result.output
    assert "#1: is=sequence C=2 rs=token_k1@0.5_2.0" in result.output  # base from the dump
    assert "per criterion alone" in result.output
    assert result.output.count("per step:") == 2


def test_cli_whatif_invalid_config_replays_nothing(dumps: Path) -> None:
    result = CliRunner().invoke(
        app, ["whatif", str(dumps), "--grid", "rollout_rs=seq_max_k2,token_k9"]
    )
    assert result.exit_code == 1
    assert "RCX-E002" in result.output
    assert "nothing was replayed" in result.output
    assert "Traceback" not in result.output


def test_cli_whatif_rejects_a_training_key(dumps: Path) -> None:
    result = CliRunner().invoke(
        app, ["whatif", str(dumps), "--grid", "actor_rollout_ref.actor.ppo_epochs=1,2"]
    )
    assert result.exit_code == 1
    assert "cannot be replayed offline" in result.output


def test_whatif_reads_the_trainers_own_dumps(tiny_config, tmp_path: Path) -> None:
    """A real 2-step decoupled run with trainer.dump_log_probs=true, replayed from its folder.

    Decoupled mode computes the correction once per batch from exactly the dumped tensors, so
    replaying the run's own config must reproduce the metrics the trainer logged.
    """
    from rcx.train.trainer import train

    cfg = tiny_config(
        "grpo-multi-rs",
        "trainer.dump_log_probs=true",
        'trainer.logger=["console"]',
        "algorithm.rollout_correction.bypass_mode=false",
        "actor_rollout_ref.rollout.dtype=bfloat16",  # a real mismatch, so RS has work to do
    )
    result = train(cfg)
    assert result.status == "FINISHED"
    stack = load_dumps([cfg.checkpoint_dir()])
    assert stack.steps == [1, 2]
    assert stack.rollout_correction["rollout_rs"] == "token_k1,seq_max_k2"
    response = CliRunner().invoke(
        app,
        [
            "whatif",
            cfg.checkpoint_dir(),
            "--grid",
            "rollout_is_threshold=2.0,1.5",
            "--format",
            "json",
        ],
    )
    assert response.exit_code == 0, response.output
    doc = json.loads(response.output)
    assert len(doc["configs"]) == 2
    own = doc["configs"][0]
    assert own["config"]["rollout_rs_threshold"] == "0.6_1.6,2.5"  # the run's own, from the dump
    for name in ("rollout_rs_masked_fraction", "rollout_is_eff_sample_size"):
        logged = [v for _, v in sorted(result.history[P + name])]
        stat = "masked_fraction" if "masked" in name else "ess"
        assert own["per_step"][stat] == pytest.approx(logged, rel=1e-5), name
    for entry in doc["configs"]:
        settings = CorrectionSettings(**entry["config"])
        (replayed,) = replay(stack, [settings])
        assert_matches_direct(stack, replayed, settings)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_icepop_band_replay_matches_the_correction_per_step(dumps: Path, level) -> None:
    settings = CorrectionSettings(level, "0.9_1.1", False, None, None)
    stack = load_dumps([dumps])
    (result,) = replay(stack, [settings])
    assert "band=0.9_1.1" in settings.label and "truncated_fraction" not in result.per_step
    for k in range(stack.num_steps):
        m = direct_step(stack, k, settings).metrics
        assert result.per_step["oob_fraction"][k] == pytest.approx(m[P + "rollout_is_oob_ratio"])
        assert result.per_step["ess"][k] == pytest.approx(
            m[P + "rollout_is_eff_sample_size"], rel=1e-5
        )


def test_whatif_cli_sweeps_bands_given_as_typed(dumps: Path) -> None:
    result = CliRunner().invoke(
        app, ["whatif", str(dumps), "--grid", "rollout_is_threshold=0.5_2,0.2_5,2"]
    )
    assert result.exit_code == 0, result.output
    assert "band=0.5_2" in result.output and "band=0.2_5" in result.output
    assert "C=2" in result.output


# ------------------------------------------------------------------------ OPSM replay ---------


def opsm_dump(
    folder: Path,
    train: list[list[float]],
    mask: list[list[int]],
    scores: list[float],
    prompt_index: list[int],
    *,
    mode: str = "decoupled",
    rollout_correction: dict | None = None,
    advantage: dict | None = None,
    step: int = 1,
) -> Path:
    """One step whose rollout log-probs are all -1: a token's log-ratio is train + 1."""
    from rcx.store.dumps import write_dump

    train_t = torch.tensor(train)
    return write_dump(
        folder,
        step,
        mode=mode,
        rollout_log_probs=torch.full_like(train_t, -1.0),
        train_log_probs=train_t,
        response_mask=torch.tensor(mask, dtype=torch.bool),
        prompt_index=torch.tensor(prompt_index),
        scores=torch.tensor(scores),
        rollout_correction=rollout_correction or {},
        advantage=advantage,
    )


GRPO = {"adv_estimator": "grpo", "norm_adv_by_std_in_grpo": True, "gamma": 1.0}


def test_opsm_replay_on_a_hand_computed_batch(tmp_path: Path) -> None:
    """Prompts 0 and 1, two responses each; grpo signs (+, -, -, +). Mean lp_rollout - lp_train:
    seq 0 (1 token) 0, seq 1 1.0, seq 2 0.2, seq 3 2.0. With delta 0.5 only seq 1 (A < 0 and
    1.0 > 0.5) is masked: 1 of 4 sequences, its 2 of 7 valid tokens. Seq 3 drifted further but
    has A > 0; seq 2 has A < 0 but drifted less than delta."""
    opsm_dump(
        tmp_path,
        train=[[-1.0, -1.0], [-2.0, -2.0], [-1.2, -1.2], [-3.0, -3.0]],
        mask=[[1, 0], [1, 1], [1, 1], [1, 1]],
        scores=[1.0, 0.0, 0.0, 1.0],
        prompt_index=[0, 0, 1, 1],
        advantage=GRPO,
    )
    stack = load_dumps([tmp_path])
    on, loose = (
        CorrectionSettings(off_policy_mask_threshold=0.5),
        CorrectionSettings(off_policy_mask_threshold=1.5),
    )
    (result, result_loose, off) = replay(stack, [on, loose, CorrectionSettings()])
    assert result.per_step["opsm_seq_masked_fraction"] == [pytest.approx(1 / 4)]
    assert result.per_step["opsm_masked_fraction"] == [pytest.approx(2 / 7)]
    assert result.overall["opsm_masked_fraction"] == pytest.approx(2 / 7)
    assert result_loose.overall["opsm_seq_masked_fraction"] == 0.0  # 1.0 < 1.5: nothing masked
    assert "opsm_seq_masked_fraction" not in off.overall
    assert on.label == "opsm=0.5"


def test_opsm_baseline_without_rejected_sequences_flips_a_sign(tmp_path: Path) -> None:
    """One group, scores (0, 0.5, 1). RS token_k1 0.1_10 rejects seq 0 whole (ratio e^-5).
    Everyone in the baseline: mean 0.5, seq 1's advantage is 0, so only seq 0 (A < 0, mean
    log-ratio gap 5) is masked. Baseline without seq 0 (decoupled, baseline_includes_rejected:
    false): mean 0.75, seq 1's A < 0 and its gap 1.0 > 0.5, so it is masked too. Bypass mode
    ignores the setting (the trainer's baselines always count every sequence there)."""
    common = dict(
        train=[[-6.0, -6.0], [-2.0, -2.0], [-1.0, -1.0]],
        mask=[[1, 1], [1, 1], [1, 1]],
        scores=[0.0, 0.5, 1.0],
        prompt_index=[0, 0, 0],
        advantage=GRPO,
    )
    rs = dict(rollout_rs="token_k1", rollout_rs_threshold="0.1_10", off_policy_mask_threshold=0.5)
    grid = [
        CorrectionSettings(**rs, baseline_includes_rejected=True),
        CorrectionSettings(**rs, baseline_includes_rejected=False),
    ]
    opsm_dump(tmp_path / "decoupled", **common, mode="decoupled")
    opsm_dump(tmp_path / "bypass", **common, mode="bypass")
    with_all, without = replay(load_dumps([tmp_path / "decoupled"]), grid)
    assert with_all.overall["seq_masked_fraction"] == pytest.approx(1 / 3)  # RS: seq 0
    assert with_all.overall["opsm_seq_masked_fraction"] == pytest.approx(1 / 3)
    assert without.overall["opsm_seq_masked_fraction"] == pytest.approx(2 / 3)
    bypass = replay(load_dumps([tmp_path / "bypass"]), grid)
    assert [r.overall["opsm_seq_masked_fraction"] for r in bypass] == [pytest.approx(1 / 3)] * 2


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_plus_plus"])
def test_opsm_replay_matches_the_trainers_functions_per_step(tmp_path: Path, estimator) -> None:
    """3 steps of different widths, random scores: each step's OPSM fractions equal
    off_policy_sequence_mask's metrics on that step alone, with that step's advantages."""
    from rcx.algos.advantages import compute_advantages, token_rewards_from_scores
    from rcx.algos.correction import off_policy_sequence_mask

    gen = torch.Generator().manual_seed(7)
    record = {"adv_estimator": estimator, "norm_adv_by_std_in_grpo": False, "gamma": 0.9}
    for step, width in ((1, 5), (2, 3), (3, 6)):
        batch = 12
        train = -1.0 + torch.randn(batch, width, generator=gen) * 0.8
        lengths = torch.randint(1, width + 1, (batch,), generator=gen)
        mask = (torch.arange(width)[None, :] < lengths[:, None]).int()
        scores = torch.randint(0, 3, (batch,), generator=gen).float()
        opsm_dump(
            tmp_path,
            train.tolist(),
            mask.tolist(),
            scores.tolist(),
            (torch.arange(batch) // 4).tolist(),
            advantage=record,
            step=step,
        )
    stack = load_dumps([tmp_path])
    (result,) = replay(stack, [CorrectionSettings(off_policy_mask_threshold=0.1)])
    masked_any = 0.0
    for k in range(stack.num_steps):
        sl = stack.step_slice(k)
        scores, mask = stack.scores[sl], stack.response_mask[sl]
        adv, _ = compute_advantages(
            estimator,
            scores,
            token_rewards_from_scores(scores, mask),
            mask,
            stack.prompt_index[sl],
            gamma=0.9,
            norm_by_std=False,
        )
        _, m = off_policy_sequence_mask(
            stack.train_log_probs[sl], stack.rollout_log_probs[sl], mask, adv, 0.1
        )
        for stat in ("opsm_seq_masked_fraction", "opsm_masked_fraction"):
            assert result.per_step[stat][k] == pytest.approx(m[P + stat]), (stat, k)
        masked_any += m[P + "opsm_seq_masked_fraction"]
    assert masked_any > 0  # the check is not vacuous


def test_opsm_replay_needs_outcome_advantages(tmp_path: Path) -> None:
    """gae, no recorded estimator, a contradicting --adv-estimator, no scores: each is a clear
    error that replays nothing; --adv-estimator fills in an older dump's missing record."""
    batch = dict(train=[[-2.0], [-1.0]], mask=[[1], [1]], scores=[0.0, 1.0], prompt_index=[0, 0])
    opsm_dump(tmp_path / "gae", **batch, advantage={"adv_estimator": "gae"})
    opsm_dump(tmp_path / "old", **batch)
    opsm = CorrectionSettings(off_policy_mask_threshold=0.5)
    with pytest.raises(ValueError, match="adv_estimator is 'gae'.*critic's values"):
        replay(load_dumps([tmp_path / "gae"]), [opsm])
    with pytest.raises(ValueError, match="do not record its adv_estimator.*--adv-estimator"):
        replay(load_dumps([tmp_path / "old"]), [opsm])
    (result,) = replay(load_dumps([tmp_path / "old"]), [opsm], adv_estimator="rloo")
    assert result.overall["opsm_seq_masked_fraction"] == pytest.approx(1 / 2)
    assert replay(load_dumps([tmp_path / "old"]), [CorrectionSettings()])  # no OPSM: no need
    runner = CliRunner()
    clash = runner.invoke(
        app,
        [
            "whatif",
            str(tmp_path / "gae"),
            "-g",
            "off_policy_mask_threshold=0.5",
            "--adv-estimator",
            "grpo",
        ],
    )
    assert clash.exit_code == 1 and "record adv_estimator=gae" in clash.output
    with pytest.raises(ValueError, match="adv_estimator is 'grpo_typo'.*does not know"):
        replay(load_dumps([tmp_path / "old"]), [opsm], adv_estimator="grpo_typo")
    assert "Traceback" not in clash.output

    no_scores = tmp_path / "no_scores"
    no_scores.mkdir()
    data = torch.load(tmp_path / "old" / "step_000001.pt", weights_only=True)
    del data["scores"]
    torch.save(data, no_scores / "step_000001.pt")
    response = runner.invoke(
        app,
        [
            "whatif",
            str(no_scores),
            "-g",
            "off_policy_mask_threshold=0.5",
            "--adv-estimator",
            "grpo",
        ],
    )
    assert response.exit_code == 1, response.output
    assert "lack them" in response.output and "Traceback" not in response.output


def test_cli_whatif_sweeps_opsm_delta(tmp_path: Path) -> None:
    opsm_dump(
        tmp_path,
        train=[[-1.0, -1.0], [-2.0, -2.0], [-1.2, -1.2], [-3.0, -3.0]],
        mask=[[1, 0], [1, 1], [1, 1], [1, 1]],
        scores=[1.0, 0.0, 0.0, 1.0],
        prompt_index=[0, 0, 1, 1],
        advantage=GRPO,
    )
    text = CliRunner().invoke(
        app, ["whatif", str(tmp_path), "-g", "off_policy_mask_threshold=0.5,1.5", "--per-step"]
    )
    assert text.exit_code == 0, text.output
    assert "#0: opsm=0.5" in text.output and "OPSM seq masked" in text.output
    doc = json.loads(
        CliRunner()
        .invoke(
            app,
            [
                "whatif",
                str(tmp_path),
                "-g",
                "off_policy_mask_threshold=0.5,1.5",
                "--format",
                "json",
            ],
        )
        .output
    )
    overall = [c["overall"]["opsm_seq_masked_fraction"] for c in doc["configs"]]
    assert overall == [pytest.approx(0.25), 0.0]
    assert doc["configs"][0]["config"]["off_policy_mask_threshold"] == 0.5
    assert (
        "algorithm.rollout_correction.off_policy_mask_threshold=0.5"
        in doc["configs"][0]["overrides"]
    )


def test_whatif_replays_opsm_from_the_trainers_own_dumps(tiny_config) -> None:
    """A real 2-step decoupled run with OPSM at delta 0: replaying its own config gives, per
    step, exactly the OPSM fractions the trainer logged (the dump records scores, groups and
    the estimator; decoupled OPSM runs once per batch against the dumped pi_old)."""
    from rcx.train.trainer import train

    cfg = tiny_config(
        "grpo-multi-rs",
        "trainer.dump_log_probs=true",
        'trainer.logger=["console"]',
        "algorithm.rollout_correction.bypass_mode=false",
        "algorithm.rollout_correction.off_policy_mask_threshold=0.0",
        "algorithm.rollout_correction.baseline_includes_rejected=false",
        "actor_rollout_ref.rollout.dtype=bfloat16",
    )
    result = train(cfg)
    assert result.status == "FINISHED"
    stack = load_dumps([cfg.checkpoint_dir()])
    assert stack.advantage["adv_estimator"] == "grpo" and stack.mode == "decoupled"
    response = CliRunner().invoke(app, ["whatif", cfg.checkpoint_dir(), "--format", "json"])
    assert response.exit_code == 0, response.output
    own = json.loads(response.output)["configs"][0]
    assert own["config"]["off_policy_mask_threshold"] == 0.0
    for stat in ("opsm_seq_masked_fraction", "opsm_masked_fraction"):
        logged = [v for _, v in sorted(result.history[P + stat])]
        assert own["per_step"][stat] == pytest.approx(logged, rel=1e-6), stat
    assert max(own["per_step"]["opsm_seq_masked_fraction"]) > 0  # OPSM had work to do


#: Crafted dumps (issue 15): each edit of a valid dump, and the field the error must name.
CRAFTED = {
    "all_nan": (
        lambda d: d.update(train_log_probs=torch.full_like(d["train_log_probs"], math.nan)),
        "field train_log_probs is NaN or inf on every response token",
    ),
    "zero_mask": (
        lambda d: d.update(response_mask=torch.zeros_like(d["response_mask"])),
        "field response_mask selects no token",
    ),
    "zero_size": (
        lambda d: d.update(
            {k: d[k][:0] for k in ("train_log_probs", "rollout_log_probs", "response_mask")}
        ),
        "no responses or no tokens",
    ),
    "non_tensor": (
        lambda d: d.update(rollout_log_probs=[[0.0, 0.0, 0.0]] * 4),
        "field rollout_log_probs is list, expected a (B, T) tensor",
    ),
    "step_none": (
        lambda d: d.update(step=None),
        "field step is None (NoneType), expected an int >= 0",
    ),
    "rc_list": (
        lambda d: d.update(rollout_correction=["token_k1"]),
        "field rollout_correction is list, expected a mapping",
    ),
    "rs_five": (
        lambda d: d.update(rollout_correction={"rollout_rs": 5}),
        "field rollout_correction.rollout_rs = 5",
    ),
}


@pytest.mark.parametrize("command", ["whatif", "calibrate"])
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_dumps_are_one_line_errors_naming_file_and_field(
    tmp_path: Path, case: str, command: str
) -> None:
    write_synthetic_dumps(tmp_path, steps=2, batch=4, length=3)
    path = tmp_path / "step_000002.pt"
    data = torch.load(path, weights_only=True)
    edit, message = CRAFTED[case]
    edit(data)
    torch.save(data, path)
    result = CliRunner().invoke(
        app,
        [command, str(tmp_path), "--plot", str(tmp_path / "c.png")]
        if command == "calibrate"
        else [command, str(tmp_path)],
    )
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    text = " ".join(result.output.split())
    assert str(path) in text and message in text, result.output


# ------------------------------------------------------------------------ by staleness ---


def test_by_staleness_replays_each_level_on_its_own_samples(tmp_path: Path) -> None:
    from rcx.experiments.whatif import replay_by_staleness

    write_synthetic_dumps(tmp_path, steps=4, batch=16, length=6, log_ratio_std=0.1, sync_interval=2)
    stack = load_dumps([tmp_path])
    configs = [CorrectionSettings(rollout_is="token", rollout_is_threshold=2.0)]
    levels = replay_by_staleness(stack, configs)
    assert sorted(levels) == [0, 1]
    assert [r.steps for r in (levels[0][0], levels[1][0])] == [[1, 3], [2, 4]]
    # Each level's numbers are those of replaying its steps alone, and the stale level (twice
    # the log-ratio std in these dumps) has the lower ESS.
    alone = replay(stack.subset(stack.staleness == 1), configs)[0]
    assert levels[1][0].overall == alone.overall
    assert levels[1][0].overall["ess"] < levels[0][0].overall["ess"]


def test_cli_by_staleness_table_and_json(tmp_path: Path) -> None:
    write_synthetic_dumps(tmp_path, steps=2, batch=8, length=4, sync_interval=2)
    text = CliRunner().invoke(app, ["whatif", str(tmp_path), "--by-staleness"])
    assert text.exit_code == 0, text.output
    assert "what-if by staleness" in text.output
    as_json = CliRunner().invoke(
        app, ["whatif", str(tmp_path), "--by-staleness", "--format", "json"]
    )
    assert sorted(json.loads(as_json.output)["by_staleness"]) == ["0", "1"]
    old = tmp_path / "old"
    write_synthetic_dumps(old, steps=1, batch=4, length=3)  # no staleness recorded
    refused = CliRunner().invoke(app, ["whatif", str(old), "--by-staleness"])
    assert refused.exit_code == 1 and "do not record each sample's staleness" in refused.output
