"""bench/overhead.py: the ratios it reports, against each baseline of the same run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def overhead(bench_script):
    yield from bench_script("overhead")


def _run(startup: float) -> dict[str, float]:
    return {
        "startup_s": startup, "step_s": 0.4, "log_ms": 0.2, "log_share": 0.0005,
        "end_s": 1.6, "peak_rss_mb": 900.0, "main_rss_mb": 700.0, "child_rss_mb": 200.0,
        "total_s": 9.0,
    }  # fmt: skip


def test_ratios_use_the_medians_of_the_same_run(overhead) -> None:
    runs = [_run(3.0), _run(3.2), _run(9.0)]  # median 3.2: one slow repeat does not count
    bases = [
        {"import_s": 1.6, "import_rss_mb": 240.0, "models_s": 3.2, "trl_import_s": 6.4},
        {"import_s": 1.6, "import_rss_mb": 240.0, "models_s": 3.4, "trl_import_s": 5.0},
        {"import_s": 1.7, "import_rss_mb": 240.0, "models_s": 3.2, "trl_import_s": 6.4},
    ]
    med = overhead.summarise(runs, bases)
    assert med["startup_ratio"] == pytest.approx(3.2 / 1.6)
    assert med["startup_vs_models"] == pytest.approx(1.0)
    assert med["startup_vs_trl_import"] == pytest.approx(3.2 / 6.4)
    lines = "\n".join(overhead.report(med, 3, 10))
    assert "from trl import GRPOConfig, GRPOTrainer 6.40 s   ratio 0.50" in lines
    assert "ratio 2.00 (OVER TARGET: <= 1.3)" in lines


def test_without_trl_there_is_no_trl_baseline(overhead) -> None:
    base = {"import_s": 2.0, "import_rss_mb": 240.0, "models_s": 3.0}
    med = overhead.summarise([_run(2.4)], [base])
    assert "startup_vs_trl_import" not in med
    lines = "\n".join(overhead.report(med, 1, 10))
    assert "trl" not in lines and "ratio 1.20 (ok: <= 1.3)" in lines
