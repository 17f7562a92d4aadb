"""bench/warm_start.py: the warm-start robustness table, run for real on a capped budget."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "warm_start.py"


def test_one_row_runs_in_its_own_process_on_the_forced_kernel_path():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "now-avx2", "--max-steps", "50", "--jobs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    table = done.stdout.strip().splitlines()
    assert table[0].startswith("| row | lr, clip |") and len(table) == 3
    # 50 steps: one probe (step 50), none of the reported steps, far below the target.
    assert table[2] == "| now-avx2 | 0.001, 1 | 0, AVX2, 1 | – / – / – % | none (of 50) |"
