"""Benchmark of rcx.algos.correction.compute_rollout_correction against a straightforward reference.

Run with ``make bench`` (or ``python bench/correction.py [--quick]``). Two threads,
``OMP_WAIT_POLICY=PASSIVE``; float32 inputs of shape (256, 2048) and (1024, 4096):

1. token IS (C=2) + RS ``token_k1,seq_max_k2`` with ``0.5_2.0,2.5``
2. sequence IS (C=2) + batch normalisation

Time: median of >= 7 runs after a warm-up, rcx and the reference interleaved in one process;
wall-clock ms, and CPU ms of the process (less disturbed when other processes share the cores).
Peak extra memory: in a fresh subprocess (after a warm-up call on smaller inputs), VmHWM after
resetting it through ``/proc/self/clear_refs`` minus VmRSS before the call, outputs included, with
``MALLOC_MMAP_THRESHOLD_`` fixed so that RSS tracks the live tensor buffers.

The reference below computes the same metrics the obvious way: one full pass and one host sync
(``.item()``) per metric. It is also the oracle of the agreement test in tests/test_correction.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from rcx.algos.correction import compute_rollout_correction  # noqa: E402
from rcx.algos.losses import LOG_RATIO_BOUND  # noqa: E402
from rcx.config import parse_rs_thresholds  # noqa: E402

THREADS = 2
SHAPES = [(256, 2048), (1024, 4096)]
CASES = {
    "token IS + token_k1,seq_max_k2": dict(
        rollout_is="token",
        rollout_is_threshold=2.0,
        rollout_rs="token_k1,seq_max_k2",
        rollout_rs_threshold="0.5_2.0,2.5",
    ),
    "sequence IS + batch norm": dict(
        rollout_is="sequence", rollout_is_threshold=2.0, rollout_is_batch_normalize=True
    ),
}
# verl's rollout_corr_helper on this machine (ms), measured once and kept for comparison.
VERL_MS = {
    ((256, 2048), "token IS + token_k1,seq_max_k2"): "57",
    ((256, 2048), "sequence IS + batch norm"): "18",
    ((1024, 4096), "token IS + token_k1,seq_max_k2"): "620-710",
}


# ----------------------------------------------------------------------------- the reference


def reference_correction(
    train_log_probs: torch.Tensor,
    rollout_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    rollout_is: str | None = None,
    rollout_is_threshold: float = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """The same math as compute_rollout_correction, one pass and one sync per metric."""
    criteria = parse_rs_thresholds(rollout_rs, rollout_rs_threshold)
    dtype = torch.promote_types(train_log_probs.dtype, rollout_log_probs.dtype)
    dtype = torch.float64 if dtype == torch.float64 else torch.float32
    train, rollout = train_log_probs.to(dtype), rollout_log_probs.to(dtype)
    raw = train - rollout
    given = response_mask.bool()
    valid = given & torch.isfinite(raw)
    m = valid.to(dtype)
    log_r = torch.where(valid, raw, 0.0).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    r = torch.exp(log_r)
    n = m.sum(-1)
    seq_ok = n > 0
    n1 = n.clamp_min(1.0)

    def tmean(x: torch.Tensor) -> float:  # mean over valid tokens
        return ((x * m).sum() / m.sum()).item()

    def tstd(x: torch.Tensor) -> float:  # population std over valid tokens
        return math.sqrt(tmean((x - tmean(x)) ** 2))

    def tmax(x: torch.Tensor) -> float:
        return x[valid].max().item()

    def tmin(x: torch.Tensor) -> float:
        return x[valid].min().item()

    def smean(v: torch.Tensor) -> float:  # mean over valid sequences
        return v[seq_ok].double().mean().item()

    def sstd(v: torch.Tensor) -> float:
        v = v[seq_ok].double()
        return v.std().item() if v.numel() > 1 else 0.0

    def smax(v: torch.Tensor) -> float:
        return v[seq_ok].max().item()

    def smin(v: torch.Tensor) -> float:
        return v[seq_ok].min().item()

    def per_seq(x: torch.Tensor) -> torch.Tensor:  # (B,) mean over each sequence's tokens
        return (x * m).sum(-1) / n1

    metrics: dict[str, float] = {}
    seq_sum = (log_r * m).sum(-1)
    s_clamped = seq_sum.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    train_mean = torch.where(valid, train, 0.0).sum(-1).double() / n1.double()
    rollout_mean = torch.where(valid, rollout, 0.0).sum(-1).double() / n1.double()
    diff = per_seq(-log_r)
    metrics["kl"] = tmean(-log_r)
    metrics["k3_kl"] = tmean(r - 1 - log_r)
    metrics["training_ppl"] = smean(torch.exp(-train_mean))
    metrics["training_log_ppl"] = smean(-train_mean)
    metrics["rollout_ppl"] = smean(torch.exp(-rollout_mean))
    metrics["rollout_log_ppl"] = smean(-rollout_mean)
    metrics["log_ppl_diff"] = smean(diff)
    metrics["log_ppl_abs_diff"] = smean(diff.abs())
    metrics["log_ppl_diff_max"] = smax(diff)
    metrics["log_ppl_diff_min"] = smin(diff)
    metrics["ppl_ratio"] = smean(torch.exp(diff.double()))
    metrics["chi2_token"] = tmean(r.double() ** 2) - 1.0
    metrics["chi2_seq"] = smean(torch.exp(2.0 * s_clamped.double())) - 1.0
    metrics["nonfinite_fraction"] = ((given & ~valid).sum() / given.sum()).item()

    keep = valid.clone()
    if criteria:
        stats = {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": r - 1 - log_r}
        for c in criteria:
            p = f"rollout_rs_{c.criterion}"
            k1 = c.statistic == "k1"
            lo, hi = (-math.log(c.upper), -math.log(c.lower)) if k1 else (0.0, c.upper)
            s = stats[c.statistic]
            if c.level == "token":
                if k1:
                    ok = (log_r >= math.log(c.lower)) & (log_r <= math.log(c.upper))
                    high, low = log_r > math.log(c.upper), log_r < math.log(c.lower)
                else:
                    ok, high, low = s <= c.upper, s > c.upper, torch.zeros_like(valid)
                metrics[p + "_mean"] = tmean(s)
                metrics[p + "_max"] = tmax(s)
                metrics[p + "_min"] = tmin(s)
                metrics[p + "_std"] = tstd(s.clamp(lo, hi))
                metrics[p + "_fraction_high"] = tmean(high.to(dtype))
                metrics[p + "_fraction_low"] = tmean(low.to(dtype))
                metrics[p + "_masked_fraction"] = tmean((~ok).to(dtype))
                metrics[p + "_seq_masked_fraction"] = smean((~ok & valid).any(-1).to(dtype))
                v = per_seq(s)
            else:
                if c.aggregation == "max":
                    v = torch.where(valid, s, -math.inf).amax(-1).clamp_min(0.0)  # k >= 0
                elif k1 and c.aggregation == "sum":
                    v = -s_clamped
                elif c.aggregation == "sum":
                    v = (s * m).sum(-1)
                else:
                    v = per_seq(s)
                seq_ok_keep = (v >= lo) & (v <= hi) if k1 else v <= hi
                ok = seq_ok_keep[:, None].expand_as(valid)
                vt = v[:, None].expand_as(log_r)
                metrics[p + "_mean"] = tmean(vt)
                metrics[p + "_max"] = smax(v)
                metrics[p + "_min"] = smin(v)
                metrics[p + "_std"] = tstd(vt.clamp(lo, hi))
                high_v = v < lo if k1 else v > hi
                metrics[p + "_fraction_high"] = smean(high_v.to(dtype))
                metrics[p + "_fraction_low"] = smean((v > hi).to(dtype)) if k1 else 0.0
                metrics[p + "_masked_fraction"] = tmean((~ok).to(dtype))
                metrics[p + "_seq_masked_fraction"] = smean((~seq_ok_keep).to(dtype))
            metrics[p + "_seq_mean"] = smean(v)
            metrics[p + "_seq_std"] = sstd(v)
            metrics[p + "_seq_max"] = smax(v)
            metrics[p + "_seq_min"] = smin(v)
            metrics[p + "_seq_max_deviation"] = v[seq_ok].abs().max().item()
            high_v = v < lo if k1 else v > hi
            metrics[p + "_seq_fraction_high"] = smean(high_v.to(dtype))
            if k1:
                metrics[p + "_seq_fraction_low"] = smean((v > hi).to(dtype))
            keep = keep & ok
        kept = keep.to(dtype)
        metrics["rollout_rs_masked_fraction"] = 1.0 - tmean(kept)
        metrics["rollout_rs_seq_masked_fraction"] = smean((kept.sum(-1) < n).to(dtype))

    weights = None
    if rollout_is is not None:
        c_max = rollout_is_threshold
        if rollout_is == "token":
            raw_w = r
            seq_w = per_seq(r)
            metrics["rollout_is_max"] = tmax(r)
            metrics["rollout_is_min"] = tmin(r)
            metrics["rollout_is_ratio_fraction_high"] = tmean((r > c_max).to(dtype))
            metrics["rollout_is_ratio_fraction_low"] = tmean((r < 1 / c_max).to(dtype))
            weights = r.clamp(max=c_max) * m
        else:
            e = torch.exp(s_clamped)
            raw_w = e[:, None].expand_as(r)
            seq_w = e
            metrics["rollout_is_max"] = smax(e)
            metrics["rollout_is_min"] = smin(e)
            metrics["rollout_is_ratio_fraction_high"] = smean((e > c_max).to(dtype))
            metrics["rollout_is_ratio_fraction_low"] = smean((e < 1 / c_max).to(dtype))
            weights = e.clamp(max=c_max)[:, None] * m
        metrics["rollout_is_mean"] = tmean(raw_w)
        metrics["rollout_is_std"] = tstd(raw_w)
        w_mean = tmean(weights)
        metrics["rollout_is_eff_sample_size"] = 1.0 / tmean((weights / w_mean) ** 2)
        metrics["rollout_is_seq_mean"] = smean(seq_w)
        metrics["rollout_is_seq_std"] = sstd(seq_w)
        metrics["rollout_is_seq_max"] = smax(seq_w)
        metrics["rollout_is_seq_min"] = smin(seq_w)
        metrics["rollout_is_seq_max_deviation"] = (seq_w[seq_ok] - 1).abs().max().item()
        metrics["rollout_is_seq_fraction_high"] = smean((seq_w > c_max).to(dtype))
        metrics["rollout_is_seq_fraction_low"] = smean((seq_w < 1 / c_max).to(dtype))
        if rollout_is_batch_normalize:
            factor = w_mean if rollout_is == "token" else smean(e.clamp(max=c_max))
            if factor > 1e-8:
                weights = weights / factor
            else:
                factor = 1.0
            metrics["rollout_is_batch_norm_factor"] = factor

    mask = torch.where(keep, response_mask, torch.zeros((), dtype=response_mask.dtype))
    return weights, mask, {f"rollout_corr/{k}": v for k, v in metrics.items()}


# -------------------------------------------------------------------------------- measurement


def make_inputs(
    batch: int, length: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of a bf16-vs-fp32-like mismatch, ragged response lengths, a float32 mask."""
    g = torch.Generator().manual_seed(seed)
    train = -torch.rand(batch, length, generator=g).mul_(3.0)
    rollout = train + torch.randn(batch, length, generator=g).mul_(0.15)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).to(torch.float32)
    return train, rollout, mask


def time_ms(fn, inputs: tuple[torch.Tensor, ...], kwargs: dict) -> tuple[float, float]:
    """Wall time and CPU time (all threads of this process) of one call, in ms.

    CPU time is the less disturbed figure when other processes compete for the cores.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*inputs, **kwargs)
    return (time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_mib(impl: str, shape: tuple[int, int], case: str) -> float:
    """Run one call in a fresh interpreter; VmHWM (reset first) minus VmRSS before, in MiB."""
    # A fixed mmap threshold makes glibc map every tensor buffer on allocation and unmap it on
    # free, so RSS follows the live tensors instead of the heap's reuse and fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps([impl, list(shape), case])],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _memory_child(spec: str) -> None:
    impl, shape, case = json.loads(spec)
    torch.set_num_threads(THREADS)
    fn = compute_rollout_correction if impl == "rcx" else reference_correction
    # Large enough to start the OpenMP workers: kernels, threads and arenas outside the peak.
    warm = make_inputs(64, 1024, seed=1)
    fn(*warm, **CASES[case])
    del warm
    inputs = make_inputs(*shape)
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    result = fn(*inputs, **CASES[case])
    peak = _status_kib("VmHWM")
    del result
    print((peak - before) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9, help="timed runs per case (>= 7)")
    parser.add_argument("--quick", action="store_true", help="only the (256, 2048) shape")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child)
        return
    if args.runs < 7:
        parser.error("--runs must be at least 7")
    torch.set_num_threads(THREADS)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, median of {args.runs} runs, "
        f"load average before: {load} (other processes slow both columns alike)"
    )
    header = (
        f"{'shape':>12}  {'case':<31} {'rcx ms':>7} {'ref ms':>7} {'ref/rcx':>7} "
        f"{'verl ms':>8} {'verl/rcx':>9} {'rcx cpu':>7} {'ref cpu':>7} {'ref/rcx':>7} "
        f"{'rcx+MiB':>7} {'ref+MiB':>7} {'in MiB':>6} {'rcx/in':>6}"
    )
    print(header)
    print("-" * len(header))
    shapes = SHAPES[:1] if args.quick else SHAPES
    for shape in shapes:
        inputs = make_inputs(*shape)
        input_mib = sum(t.numel() * t.element_size() for t in inputs) / 2**20
        for case, kwargs in CASES.items():
            for _ in range(2):  # warm-up
                compute_rollout_correction(*inputs, **kwargs)
                reference_correction(*inputs, **kwargs)
            rcx_times, ref_times = [], []
            for _ in range(args.runs):  # interleaved
                rcx_times.append(time_ms(compute_rollout_correction, inputs, kwargs))
                ref_times.append(time_ms(reference_correction, inputs, kwargs))
            rcx_ms, rcx_cpu = (statistics.median(t) for t in zip(*rcx_times, strict=True))
            ref_ms, ref_cpu = (statistics.median(t) for t in zip(*ref_times, strict=True))
            verl = VERL_MS.get((shape, case), "-")
            verl_ratio = "-"
            if verl != "-":
                verl_ratio = "/".join(f"{float(v) / rcx_ms:.1f}" for v in verl.split("-")) + "x"
            rcx_mem = peak_extra_mib("rcx", shape, case)
            ref_mem = peak_extra_mib("ref", shape, case)
            print(
                f"{str(shape):>12}  {case:<31} {rcx_ms:7.2f} {ref_ms:7.2f} {ref_ms / rcx_ms:6.2f}x "
                f"{verl:>8} {verl_ratio:>9} {rcx_cpu:7.2f} {ref_cpu:7.2f} {ref_cpu / rcx_cpu:6.2f}x "
                f"{rcx_mem:7.1f} {ref_mem:7.1f} {input_mib:6.1f} {rcx_mem / input_mib:5.2f}x"
            )
    print(
        "targets: >= 3x faster than verl (2x / 2.8x faster than the reference for "
        "case 1 / 2), peak extra memory <= 2x the inputs"
    )


if __name__ == "__main__":
    main()
