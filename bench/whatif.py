"""Benchmark: ``rcx whatif`` with 100 configs over 100 dumped steps of the default preset.

Target: under 10 s on 2 cores (wall time; CPU time is printed too, as it is robust to
other processes sharing the cores), end to end (reading the dumps, validating every config,
replaying them, the per-step and overall statistics). The dumps are synthetic but have the default
preset's shape: 32 prompts x 8 responses = 256 sequences of up to 8 response tokens per step,
written in the trainer's ``dump_log_probs`` format.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/whatif.py [--steps 100] [--threads 2]

The grid: token IS with 5 caps x token_k1 with 5 bounds x seq_max_k2 with 4 bounds = 100 configs
(20 distinct threshold strings, so the per-criterion cache is exercised but not trivially).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from rcx.experiments.whatif import build_settings, replay
    from rcx.store.dumps import load_dumps, write_synthetic_dumps

    caps = [1.2, 1.5, 2.0, 3.0, 5.0]
    k1 = ["0.5_2.0", "0.6_1.6", "0.7_1.4", "0.8_1.25", "0.9_1.1"]
    k2 = ["0.5", "1.0", "2.5", "5.0"]
    grid = [
        ("rollout_is", ["token"]),
        ("rollout_is_threshold", caps),
        ("rollout_rs", ["token_k1,seq_max_k2"]),
        ("rollout_rs_threshold", [f"{a},{b}" for a in k1 for b in k2]),
    ]
    with tempfile.TemporaryDirectory() as folder:
        write_synthetic_dumps(folder, steps=args.steps, batch=256, length=8, seed=0)
        start, cpu_start = time.perf_counter(), time.process_time()
        stack = load_dumps([folder])
        t_load = time.perf_counter() - start
        configs, invalid = build_settings({}, grid)
        t_validate = time.perf_counter() - start - t_load
        results = replay(stack, configs)
        total = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    assert not invalid and len(results) == len(configs)
    print(
        f"whatif: {len(configs)} configs x {stack.num_steps} steps "
        f"({stack.response_mask.shape[0]} sequences x {stack.response_mask.shape[1]} tokens), "
        f"{args.threads} threads: {total:.2f} s wall, {cpu:.2f} s CPU "
        f"(load {t_load:.2f} s, validate {t_validate:.2f} s, replay {total - t_load - t_validate:.2f} s)"
    )


if __name__ == "__main__":
    main()
