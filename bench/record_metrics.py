"""Record every metric of a short training run, and compare two recordings.

    python bench/record_metrics.py record --out OUT.json --preset gae-seq-is-rs KEY=VALUE ...
    python bench/record_metrics.py compare BASE.json NEW.json [--rtol 0]

``record`` validates the config exactly as ``rcx train`` does, trains it in this process with
tracking and checkpoints wherever the overrides put them, and writes every logged metric (all
steps, all keys, floats as JSON round-trip reprs) plus, when ``trainer.dump_log_probs`` is on,
a SHA-256 of each tensor of each log-prob dump. ``compare`` lists every key, step or value that
differs and exits 1 if any does; wall-clock metrics (``timing/``, ``perf/``) are left out of the
comparison, since they differ between any two runs.

It proves a refactoring changed nothing (same command before and after, bit-for-bit on CPU) and
that N ranks reproduce one.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

#: Metrics that measure wall time or memory: recorded, never compared.
VOLATILE_PREFIXES = ("timing/", "perf/")


def load_train() -> Any:
    """The trainer's entry point ``train(cfg, console=...) -> TrainResult``."""
    from rcx.train.trainer import train

    return train


def dump_digests(dump_dir: Path) -> dict[str, dict[str, str]]:
    """``{file: {field: sha256 of the tensor bytes, or repr of a plain value}}`` per dump."""
    import torch

    out: dict[str, dict[str, str]] = {}
    for path in sorted(dump_dir.glob("step_*.pt")):
        payload = torch.load(path, weights_only=True)
        fields = {}
        for key, value in sorted(payload.items()):
            if torch.is_tensor(value):
                data = value.contiguous().cpu().numpy().tobytes()
                fields[key] = (
                    f"{value.dtype} {tuple(value.shape)} {hashlib.sha256(data).hexdigest()}"
                )
            else:
                fields[key] = repr(value)
        out[path.name] = fields
    return out


def record(out: Path, preset: str | None, overrides: list[str]) -> None:
    from rich.console import Console

    from rcx.config import load_config

    cfg = load_config(preset=preset, overrides=overrides)
    result = load_train()(cfg, console=Console(file=io.StringIO(), highlight=False))
    if result.status != "FINISHED":
        sys.exit(f"run ended {result.status} at step {result.step}")
    payload: dict[str, Any] = {
        "command": {"preset": preset, "overrides": overrides},
        "steps": result.step,
        "metrics": {k: [[s, repr(float(v))] for s, v in pts] for k, pts in result.history.items()},
    }
    if cfg.trainer.dump_log_probs:
        payload["dumps"] = dump_digests(Path(cfg.checkpoint_dir()) / "log_probs")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    print(f"{out}: {len(payload['metrics'])} metrics over {result.step} steps")


def same(a: float, b: float, rtol: float) -> bool:
    """Equal to the bit (NaN equals NaN), or within ``rtol`` relative when it is > 0."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return True
    return rtol > 0 and abs(a - b) <= rtol * max(abs(a), abs(b))


def differences(base: dict[str, Any], new: dict[str, Any], rtol: float) -> list[str]:
    """Every difference between two recordings, one line each (volatile metrics left out)."""
    out: list[str] = []
    b_metrics, n_metrics = base["metrics"], new["metrics"]
    for key in sorted(set(b_metrics) | set(n_metrics)):
        if key.startswith(VOLATILE_PREFIXES):
            continue
        if key not in n_metrics or key not in b_metrics:
            out.append(f"{key}: only in {'base' if key in b_metrics else 'new'}")
            continue
        b_points = {s: float(v) for s, v in b_metrics[key]}
        n_points = {s: float(v) for s, v in n_metrics[key]}
        if b_points.keys() != n_points.keys():
            out.append(f"{key}: steps {sorted(b_points)} vs {sorted(n_points)}")
            continue
        for step, value in sorted(b_points.items()):
            if not same(value, n_points[step], rtol):
                out.append(f"{key} step {step}: {value!r} vs {n_points[step]!r}")
    if base.get("dumps") != new.get("dumps"):
        out.append("log-prob dumps differ")
    return out


def compare(base_path: Path, new_path: Path, rtol: float) -> int:
    base, new = json.loads(base_path.read_text()), json.loads(new_path.read_text())
    found = differences(base, new, rtol)
    compared = sum(1 for k in base["metrics"] if not k.startswith(VOLATILE_PREFIXES))
    for line in found:
        print(line)
    verdict = "identical" if rtol == 0 else f"equal within rtol {rtol:g}"
    print(
        f"{new_path.name}: {len(found)} differences"
        if found
        else f"{new_path.name}: {verdict} ({compared} metrics, {base['steps']} steps)"
    )
    return 1 if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train and write every logged metric to a JSON file")
    rec.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    rec.add_argument("--preset", default=None)
    rec.add_argument("overrides", nargs="*", help="KEY=VALUE overrides, as for rcx train")
    cmp = sub.add_parser("compare", help="list the differences between two recordings")
    cmp.add_argument("base", type=Path)
    cmp.add_argument("new", type=Path)
    cmp.add_argument("--rtol", type=float, default=0.0, help="relative tolerance (default: exact)")
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.preset, args.overrides)
    else:
        sys.exit(compare(args.base, args.new, args.rtol))


if __name__ == "__main__":
    main()
