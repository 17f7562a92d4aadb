"""rcx calibrate: proposals are checked against the targets with the correction itself.

Each proposal is re-measured here by calling ``compute_rollout_correction`` step by step on the
same dump, independently of the what-if machinery the calibration used.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcx.algos.correction import compute_rollout_correction
from rcx.cli import app
from rcx.config import validate_sources
from rcx.experiments.calibrate import (
    Calibration,
    CalibrationError,
    Targets,
    calibrate,
    candidate_entries,
    choose_cap,
    choose_rs,
    plot_calibration,
)
from rcx.experiments.whatif import Replayer
from rcx.store.dumps import DumpStack, load_dumps, write_synthetic_dumps

P = "rollout_corr/"


@pytest.fixture(scope="module")
def dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps x 128 sequences x 8 tokens; mismatch std 0.15 with 2% outliers."""
    folder = tmp_path_factory.mktemp("cal") / "log_probs"
    write_synthetic_dumps(
        folder, steps=6, batch=128, length=8, log_ratio_std=0.15, outlier_share=0.02, seed=7
    )
    return folder


@pytest.fixture(scope="module")
def stack(dump_dir: Path) -> DumpStack:
    return load_dumps([dump_dir])


def measure_directly(stack: DumpStack, cal: Calibration) -> tuple[list[float], list[float], float]:
    """(masked fraction per step, ESS per step, pooled masked fraction) from the correction."""
    masked, ess, rejected, tokens = [], [], 0.0, 0.0
    for k in range(stack.num_steps):
        sl = stack.step_slice(k)
        out = compute_rollout_correction(
            stack.train_log_probs[sl],
            stack.rollout_log_probs[sl],
            stack.response_mask[sl],
            **cal.proposal.kwargs(),
        )
        n = float(stack.response_mask[sl].sum())
        frac = out.metrics.get(P + "rollout_rs_masked_fraction", 0.0)
        masked.append(frac)
        rejected += frac * n
        tokens += n
        ess.append(out.metrics[P + "rollout_is_eff_sample_size"])
    return masked, ess, rejected / tokens


@pytest.mark.parametrize("criteria", [["token_k1"], ["token_k1", "seq_max_k2"], ["seq_mean_k3"]])
def test_proposal_meets_its_targets_on_the_dump(stack: DumpStack, criteria: list[str]) -> None:
    targets = Targets(max_masked=0.05, min_ess=0.9)
    cal = calibrate(stack, criteria=criteria, targets=targets, is_level="token")
    masked, ess, pooled = measure_directly(stack, cal)
    assert pooled <= 0.05
    assert sum(ess) / len(ess) >= 0.9
    assert cal.met == {"max_masked": True, "min_ess": True}
    assert cal.proposal.rollout_rs == ",".join(criteria)
    # Not vacuous: the dump's 2% outliers make an uncapped ESS fall below the target.
    assert cal.is_curve[0].ess < 0.9 < cal.is_chosen.ess


def test_proposal_is_the_tightest_bound_and_the_largest_cap_that_fit(stack: DumpStack) -> None:
    targets = Targets(max_masked=0.04, min_ess=0.95)
    cal = calibrate(stack, criteria=["token_k1", "seq_max_k2"], targets=targets)
    for name in cal.criteria:
        chosen = cal.rs_chosen[name]
        tighter = [p for p in cal.rs_curves[name] if p.bound < chosen.bound]
        assert chosen.masked_fraction <= 0.02  # half the budget each
        assert tighter and all(p.masked_fraction > 0.02 for p in tighter)
    larger = [p for p in cal.is_curve if p.cap > cal.is_chosen.cap]
    assert larger and all(p.ess < 0.95 for p in larger)
    assert cal.is_chosen.ess >= 0.95


def test_worst_step_targets_hold_at_every_step(stack: DumpStack) -> None:
    targets = Targets(max_masked=0.03, min_ess=0.85, worst_step=True)
    cal = calibrate(stack, criteria=["token_k2"], targets=targets, is_level="sequence")
    masked, ess, _ = measure_directly(stack, cal)
    assert max(masked) <= 0.03
    assert min(ess) >= 0.85
    assert cal.proposal.rollout_is == "sequence"
    assert cal.met == {"max_masked": True, "min_ess": True}
    # Worst-step targets are stricter than overall ones: the cap must be lower.
    overall = calibrate(
        stack, criteria=["token_k2"], targets=Targets(0.03, 0.85), is_level="sequence"
    )
    assert overall.proposal.rollout_is_threshold > cal.proposal.rollout_is_threshold


def test_unreachable_target_is_reported_not_hidden(stack: DumpStack) -> None:
    cal = calibrate(stack, criteria=["token_k1"], targets=Targets(0.0, 0.99999))
    assert cal.met["min_ess"] is False
    assert any("ESS" in note for note in cal.notes)


def test_candidate_entries_are_valid_config_values(stack: DumpStack) -> None:
    replayer = Replayer(stack)
    for name in ("token_k1", "seq_sum_k1", "seq_max_k2", "token_k3"):
        entries = candidate_entries(replayer, name)
        assert len(entries) > 5
        bounds = [u for _, u in entries]
        assert bounds == sorted(bounds, reverse=True)  # loosest first
        for entry, _ in entries[:3]:
            report = validate_sources(
                overrides=[
                    f"algorithm.rollout_correction.rollout_rs={name}",
                    f"algorithm.rollout_correction.rollout_rs_threshold={entry}",
                ]
            )
            assert not report.errors, (name, entry, report.errors)


def test_choosers_on_hand_made_points() -> None:
    from rcx.experiments.calibrate import IsPoint, RsPoint

    rs = [RsPoint("3", 3.0, 0.01, 0.02, 0.1), RsPoint("2", 2.0, 0.04, 0.05, 0.2)]
    assert choose_rs(rs, 0.05, "masked_fraction").entry == "2"
    assert choose_rs(rs, 0.03, "masked_fraction").entry == "3"
    assert choose_rs(rs, 0.03, "masked_fraction_max").entry == "3"
    assert choose_rs(rs, 0.001, "masked_fraction") is None
    caps = [IsPoint(10.0, 0.7, 0.6, 0.0), IsPoint(2.0, 0.92, 0.88, 0.1)]
    assert choose_cap(caps, 0.9, "ess").cap == 2.0
    assert choose_cap(caps, 0.9, "ess_min") is None


def test_bad_targets_and_criteria(stack: DumpStack) -> None:
    with pytest.raises(CalibrationError, match="--max-masked"):
        calibrate(stack, criteria=["token_k1"], targets=Targets(max_masked=1.5))
    with pytest.raises(CalibrationError, match="--min-ess"):
        calibrate(stack, criteria=["token_k1"], targets=Targets(min_ess=0.0))
    with pytest.raises(CalibrationError, match="unknown rejection criterion 'token_k9'"):
        calibrate(stack, criteria=["token_k9"], targets=Targets())


def test_plot_is_written(stack: DumpStack, tmp_path: Path) -> None:
    cal = calibrate(stack, criteria=["token_k1", "seq_max_k2"], targets=Targets())
    png = plot_calibration(cal, tmp_path / "cal.png")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_overrides_that_validate_and_meet_targets(
    dump_dir: Path, stack: DumpStack, tmp_path: Path
) -> None:
    png = tmp_path / "tradeoff.png"
    result = CliRunner().invoke(
        app,
        [
            "calibrate",
            str(dump_dir),
            "--max-masked",
            "0.05",
            "--min-ess",
            "0.9",
            "--criteria",
            "token_k1,seq_max_k2",
            "--plot",
            str(png),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "<- proposed" in result.output
    assert png.is_file()
    overrides = [ln for ln in result.output.splitlines() if ln.startswith("algorithm.")]
    assert len(overrides) == 5
    report = validate_sources(overrides=overrides)
    assert report.valid, report.findings
    rc = report.config.algorithm.rollout_correction
    assert rc.rollout_rs == "token_k1,seq_max_k2"
    out = compute_rollout_correction(
        stack.train_log_probs,
        stack.rollout_log_probs,
        stack.response_mask,
        rollout_rs=rc.rollout_rs,
        rollout_rs_threshold=rc.rollout_rs_threshold,
    )
    assert out.metrics[P + "rollout_rs_masked_fraction"] <= 0.05


def test_cli_exit_1_when_a_target_cannot_be_met(dump_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["calibrate", str(dump_dir), "--min-ess", "0.99999", "--plot", str(tmp_path / "p.png")],
    )
    assert result.exit_code == 1
    assert "does NOT meet every target" in result.output
    assert "Traceback" not in result.output


def test_tiny_mismatch_never_gets_a_bound_the_validator_warns_about(tmp_path: Path) -> None:
    write_synthetic_dumps(
        tmp_path, steps=3, batch=64, length=8, log_ratio_std=0.002, outlier_share=0.0
    )
    stack = load_dumps([tmp_path])
    cal = calibrate(stack, criteria=["token_k1", "seq_max_k2"], targets=Targets(0.05, 0.9))
    # The budget would allow |log r| ~ 0.003 bounds; the proposal stops at the W007 floor.
    assert cal.proposal.rollout_rs_threshold == "0.9794_1.021,0.0002005"
    report = validate_sources(overrides=cal.overrides())
    assert report.valid
    assert not [f for f in report.findings if f.code == "RCX-W007"], report.findings
    assert sum("RCX-W007" in note for note in cal.notes) == 2
    assert cal.proposal.rollout_is_threshold == 10.0  # ESS met everywhere: least truncation


def test_band_calibration_proposes_the_widest_band_meeting_ess(stack: DumpStack) -> None:
    # On this dump ESS is not monotone in the band width (wide bands keep the outliers' large
    # weights, narrow ones zero most tokens): the widest band that meets 0.94 is [0.2, 5].
    cal = calibrate(stack, criteria=[], targets=Targets(min_ess=0.94), is_level="token", band=True)
    assert all(p.band for p in cal.is_curve)
    chosen = cal.is_chosen
    assert chosen is not None and chosen.ess >= 0.94
    assert all(p.ess < 0.94 for p in cal.is_curve if p.cap > chosen.cap)
    lo, hi = str(cal.proposal.rollout_is_threshold).split("_")
    assert float(lo) == pytest.approx(1 / float(hi), rel=1e-3)
    assert validate_sources(overrides=cal.overrides()).valid


def test_calibrate_plot_with_an_unwritable_format_is_a_clear_error(tmp_path: Path) -> None:
    from rcx.store.dumps import write_synthetic_dumps

    write_synthetic_dumps(tmp_path / "d", steps=2, batch=8, length=4)
    result = CliRunner().invoke(
        app, ["calibrate", str(tmp_path / "d"), "--plot", str(tmp_path / "x.txt")]
    )
    assert (
        result.exit_code == 1
        and result.exception is None
        or isinstance(result.exception, SystemExit)
    )
    text = " ".join(result.output.split())
    assert "--plot" in text and "x.txt" in text and ".png" in text, result.output
    assert not (tmp_path / "x.txt").exists()


# ------------------------------------------------------------------------ by staleness ---


@pytest.fixture(scope="module")
def stale_dump_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps x 64 rows; in every step, half the rows are fresh (staleness 0, log-ratio std
    0.01) and half three updates old (staleness 3, std 0.4), interleaved as an asynchronous
    rollout delivers them."""
    import torch

    from rcx.store.dumps import write_dump

    folder = tmp_path_factory.mktemp("stale") / "log_probs"
    gen = torch.Generator().manual_seed(3)
    staleness = torch.tensor([0, 3] * 32)
    for step in range(1, 5):
        rollout = -torch.rand(64, 8, generator=gen) * 3.0
        std = torch.where(staleness == 0, 0.01, 0.4)[:, None]
        write_dump(
            folder,
            step,
            mode="bypass",
            rollout_log_probs=rollout,
            train_log_probs=rollout + torch.randn(64, 8, generator=gen) * std,
            response_mask=torch.ones(64, 8, dtype=torch.bool),
            prompt_index=torch.arange(64) // 8,
            scores=torch.zeros(64),
            rollout_correction={},
            staleness=staleness,
        )
    return folder


def test_dumps_carry_staleness_and_a_level_subset_keeps_only_its_rows(stale_dump_dir: Path) -> None:
    stack = load_dumps([stale_dump_dir])
    assert stack.staleness_levels() == [0, 3]
    stale = stack.subset(stack.staleness == 3)
    assert stale.steps == [1, 2, 3, 4] and stale.train_log_probs.shape == (4 * 32, 8)
    assert set(stale.staleness.tolist()) == {3}
    assert stale.step_slice(1) == slice(32, 64)  # each step's rows stay contiguous
    log_ratio = (stale.train_log_probs - stale.rollout_log_probs).std()
    assert 0.3 < float(log_ratio) < 0.5  # the std-0.4 rows, not the fresh ones


def test_each_staleness_level_gets_its_own_proposal(stale_dump_dir: Path) -> None:
    from rcx.experiments.calibrate import calibrate_by_staleness

    stack = load_dumps([stale_dump_dir])
    options = {"criteria": ["token_k1"], "targets": Targets(0.05, 0.9), "is_level": "token"}
    levels = calibrate_by_staleness(stack, **options)
    assert sorted(levels) == [0, 3]
    assert levels[3].is_chosen.cap < levels[0].is_chosen.cap  # stale samples need a lower cap
    fresh_k1, stale_k1 = (levels[k].rs_chosen["token_k1"].bound for k in (0, 3))
    assert stale_k1 > fresh_k1  # and looser RS bounds (in |log r|) to stay in the budget
    assert all(c.met == {"max_masked": True, "min_ess": True} for c in levels.values())


def test_cli_by_staleness_prints_each_level_and_json(stale_dump_dir: Path, tmp_path: Path) -> None:
    import json

    argv = ["calibrate", str(stale_dump_dir), "--by-staleness", "--plot", str(tmp_path / "c.png")]
    result = CliRunner().invoke(app, argv)
    assert "by staleness" in result.output, result.output
    rows = [ln for ln in result.output.splitlines() if re.match(r"│\s+[03] │\s+4 │", ln)]
    assert len(rows) == 2, result.output
    as_json = CliRunner().invoke(app, [*argv, "--format", "json"])
    out = json.loads(as_json.output)
    assert sorted(out["by_staleness"]) == ["0", "3"]
    stale = out["by_staleness"]["3"]
    assert (
        stale["overall_proposal_measured"]["ess"]
        < out["by_staleness"]["0"]["overall_proposal_measured"]["ess"]
    )


def test_cli_by_staleness_on_dumps_without_it_is_a_clear_error(
    dump_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app, ["calibrate", str(dump_dir), "--by-staleness", "--plot", str(tmp_path / "c.png")]
    )
    assert result.exit_code == 1
    assert "do not record each sample's staleness" in result.output
