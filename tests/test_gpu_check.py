"""bench/gpu_check.py on CPU: the smoke kit end to end, and console-only training without mlflow.

The smoke run is the GPU kit with tiny sizes: every stage in its own process, the trainer on
CPU, torchrun with one gloo process. It runs once per module (about 25 s on 2 busy cores) with a
poisoned ``mlflow`` first on PYTHONPATH, so it also proves that the kit never imports mlflow (the
GPU machine has none). The helper tests build their inputs by hand.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
POISON = 'raise RuntimeError("mlflow was imported")\n'


@pytest.fixture(scope="module")
def kit(bench_script):
    yield from bench_script("gpu_check")


def poisoned_env(tmp: Path) -> dict[str, str]:
    """The environment with a ``mlflow`` package that raises on import first on PYTHONPATH."""
    (tmp / "poison" / "mlflow").mkdir(parents=True, exist_ok=True)
    (tmp / "poison" / "mlflow" / "__init__.py").write_text(POISON)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp / "poison"), str(REPO)])
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    out = tmp / "out" / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--workdir", str(tmp / "w")],
        capture_output=True,
        text=True,
        timeout=300,
        env=poisoned_env(tmp),
        cwd=tmp,
    )
    summary = json.loads(out.read_text()) if out.is_file() else {}
    return proc, summary


def test_smoke_run_every_stage_ok(kit, smoke) -> None:
    proc, summary = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert summary["mode"] == "smoke" and summary["device"] == "cpu"
    assert list(summary["stages"]) == list(kit.STAGES)
    failed = {k: v.get("error") for k, v in summary["stages"].items() if v["status"] != "ok"}
    assert not failed
    assert summary["all_ok"] is True
    assert any("NOT rcx's trainer" in note for note in summary["notes"])
    # The summary is printed at the end, too.
    assert "=== gpu_check summary ===" in proc.stdout


def test_smoke_environment_and_correction(smoke) -> None:
    env = smoke[1]["stages"]["environment"]
    assert env["missing_required"] == [] and env["torch"] and env["packages"]["pydantic"]
    corr = smoke[1]["stages"]["correction"]
    for run in (corr["device_run"], corr["cpu_reference"]):
        assert len(run["cases"]) == 2
        for case in run["cases"].values():
            assert case["median_ms"] > 0 and case["metric_count"] > 10
            assert 0 < case["ess"] <= 1


def test_smoke_trainer_reports_timings_and_mismatch(smoke) -> None:
    trainer = smoke[1]["stages"]["trainer"]
    assert trainer["status_of_run"] == "FINISHED" and trainer["steps"] == 2
    assert trainer["mlflow_imported"] is False
    assert trainer["model"]["parameters"] > 0 and trainer["model"]["vocab_size"] < 100
    assert {"gen", "update_actor", "step"} <= set(trainer["timing_s_median"])
    assert trainer["step_s_median"] > 0 and trainer["generated_tokens_per_s_median"] > 0
    mismatch = trainer["mismatch_last_step"]
    for key in ("kl", "rollout_rs_masked_fraction", "rollout_is_eff_sample_size"):
        assert math.isfinite(mismatch[key])
    assert "actor_rollout_ref.rollout.dtype=bfloat16" in trainer["overrides"]


def test_smoke_fsdp_runs_under_torchrun_with_gloo(smoke) -> None:
    fsdp = smoke[1]["stages"]["fsdp"]
    assert fsdp["backend"] == "gloo" and fsdp["world_size"] == 1
    assert len(fsdp["step_ms_each"]) == 2 and all(math.isfinite(x) for x in fsdp["loss_each"])
    # Tied embeddings come back under both names in the full state dict.
    assert fsdp["full_state_dict"]["elements"] >= fsdp["parameters"]


def test_console_only_train_never_imports_mlflow(tmp_path: Path) -> None:
    """`rcx train` with trainer.logger=["console"] runs with an mlflow that raises on import."""
    overrides = [
        "trainer.total_training_steps=1",
        "trainer.device=cpu",
        "trainer.num_threads=1",
        'trainer.logger=["console"]',
        "trainer.resume_mode=disable",
        f"trainer.default_local_dir={tmp_path / 'ckpt'}",
        "actor_rollout_ref.model.warm_start_steps=0",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.dtype=bfloat16",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "data.train_batch_size=2",
        "data.builtin.num_train=16",
        "data.builtin.num_val=4",
    ]
    code = "import sys; from rcx.cli import main; sys.argv[0] = 'rcx'; main()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "--preset", "grpo-multi-rs", *overrides],
        capture_output=True,
        text=True,
        timeout=120,
        env=poisoned_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FINISHED" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()


def test_poisoned_mlflow_really_raises(tmp_path: Path) -> None:
    """The poison works: a plain `import mlflow` fails under the same environment."""
    proc = subprocess.run(
        [sys.executable, "-c", "import mlflow"],
        capture_output=True,
        text=True,
        env=poisoned_env(tmp_path),
        timeout=60,
    )
    assert proc.returncode != 0 and "mlflow was imported" in proc.stderr


def test_summarise_training_by_hand(kit) -> None:
    # Steps 1..3; step 1 is warm-up, so medians are over steps 2 and 3.
    history = {
        "timing/step": [(1, 9.0), (2, 2.0), (3, 4.0)],  # median(2, 4) = 3
        "timing/gen": [(1, 5.0), (2, 1.0), (3, 2.0)],  # median(1, 2) = 1.5
        "timing/validation": [(3, 7.0)],  # not a step stage
        "response_length/mean": [(1, 10.0), (2, 10.0), (3, 30.0)],
    }
    last = {"rollout_corr/kl": 0.01, "timing/validation": 7.0, "actor/lr": 1e-3}
    out = kit.summarise_training(history, last, responses_per_step=8)
    assert out["steps"] == 3 and out["step_s_median"] == 3.0
    assert out["timing_s_median"] == {"gen": 1.5, "step": 3.0}
    # Generated tokens/s: step 2 = 10 * 8 / 1 = 80, step 3 = 30 * 8 / 2 = 120 -> median 100.
    assert out["generated_tokens_per_s_median"] == 100.0
    assert out["validation_s"] == 7.0
    assert out["rollout_corr_last_step"] == {"rollout_corr/kl": 0.01}
    assert out["mismatch_last_step"]["kl"] == 0.01


def test_synthetic_log_probs_mask_is_a_prefix_of_realistic_length(kit) -> None:
    train, rollout, mask = kit.synthetic_log_probs((64, 80), seed=0)
    lengths = mask.sum(-1)
    assert lengths.min() >= 10 and lengths.max() <= 80  # uniform in [T/8, T]
    # Valid tokens form a prefix: the mask never goes 0 -> 1 along a row.
    assert (mask[:, 1:] <= mask[:, :-1]).all()
    assert (rollout[mask == 1] <= 0).all() and (train[mask == 0] == 0).all()


def test_run_guarded_stops_the_whole_process_group(kit, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    start = time.perf_counter()
    assert kit.run_guarded([sys.executable, "-c", code], 3, os.environ) is None
    assert time.perf_counter() - start < 20
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not is_running(grandchild)


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may linger unreaped
    where PID 1 does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_failing_stage_is_reported_not_lost(tmp_path: Path) -> None:
    """--device cuda on a machine without CUDA: the environment stage fails, with the reason."""
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cuda", "--stages", "environment"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"),
    )
    assert proc.returncode == 1
    summary = json.loads(out.read_text())
    env = summary["stages"]["environment"]
    assert summary["all_ok"] is False and env["status"] == "failed"
    assert "no CUDA device" in env["error"] and env["torch"]


def test_device_command_fits_the_device_tool(kit) -> None:
    assert len(kit.DEVICE_COMMAND) <= 2000
    assert "--target /tmp/site .whl/*.whl" in kit.DEVICE_COMMAND
    assert "bench/gpu_check.sh" in kit.DEVICE_COMMAND
    assert (REPO / "bench" / "gpu_check.sh").is_file()
