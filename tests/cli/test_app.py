"""The command line, in-process: help for every command, exit codes, output formats."""

import importlib.util
import json
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from rcx.cli import app

runner = CliRunner()
RC = "algorithm.rollout_correction"


def all_command_paths(group, prefix=()) -> list[tuple[str, ...]]:
    paths = []
    for name, cmd in group.commands.items():
        paths.append((*prefix, name))
        if getattr(cmd, "commands", None):
            paths += all_command_paths(cmd, (*prefix, name))
    return paths


COMMANDS = all_command_paths(typer.main.get_command(app))


def test_commands_registered():
    assert {("validate",), ("presets", "list"), ("presets", "show"), ("keys",)} <= set(COMMANDS)


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda p: " ".join(p) or "rcx")
def test_help_works_for_every_command(path):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_validate_valid_preset_exit_0_and_warning_shown():
    result = runner.invoke(app, ["validate", "--preset", "grpo-multi-rs"])
    assert result.exit_code == 0, result.output
    assert "RCX-W002" in result.output and "valid (0 errors, 1 warning)" in result.output


def test_validate_strict_fails_on_warnings():
    assert runner.invoke(app, ["validate", "--preset", "grpo-multi-rs", "--strict"]).exit_code == 1
    assert runner.invoke(app, ["validate", "--preset", "rloo-seq-is", "--strict"]).exit_code == 0


def test_validate_invalid_exit_1_lists_every_error_without_traceback():
    result = runner.invoke(
        app,
        [
            "validate",
            "trainer.sed=1",
            f"{RC}.rollout_rs=token_k1",
            f"{RC}.rollout_rs_threshold=3_1",
            f"{RC}.rollout_is_self_norm=true",
        ],
    )
    assert result.exit_code == 1
    for code in ("RCX-E001", "RCX-E004", "RCX-E010"):
        assert code in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_validate_positional_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "algorithm:\n  rollout_correction:\n    rollout_rs: token_k1\n    rollout_rs_threshold: 0.5_2\n"
    )
    result = runner.invoke(app, ["validate", str(path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["config"]["algorithm"]["rollout_correction"]["rollout_rs_threshold"] == "0.5_2"
    assert data["explain"]["rs"][0]["lower"] == 0.5


def test_two_config_files_is_a_usage_error(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("{}\n")
    b.write_text("{}\n")
    result = runner.invoke(app, ["validate", str(a), str(b)])
    assert result.exit_code == 2
    assert "one config file at most" in result.output


def test_validate_json_shape():
    result = runner.invoke(app, ["validate", "--preset", "grpo-multi-rs", "--format", "json"])
    data = json.loads(result.output)
    assert set(data) == {"valid", "config", "findings", "explain"}
    assert data["valid"] is True
    assert (
        data["config"]["algorithm"]["rollout_correction"]["rollout_rs_threshold"] == "0.6_1.6,2.5"
    )
    assert data["findings"] == [
        {"code": "RCX-W002", "level": "warning", "path": f"{RC}.rollout_is",
         "message": data["findings"][0]["message"]}
    ]  # fmt: skip
    assert set(data["explain"]) >= {"mode", "loss", "is", "rs"}
    assert set(data["explain"]["rs"][0]) == {
        "criterion", "level", "statistic", "lower", "upper", "ratio_lower", "ratio_upper"
    }  # fmt: skip


def test_validate_json_invalid_exit_1():
    result = runner.invoke(app, ["validate", "--format", "json", "algorithm.gamma=7"])
    assert result.exit_code == 1
    data = json.loads(result.output)
    assert data["valid"] is False and data["findings"][0]["code"] == "RCX-E009"
    assert data["explain"] is None


def test_explain_prints_mode_loss_and_intervals():
    result = runner.invoke(app, ["validate", "--preset", "grpo-multi-rs", "--explain"])
    out = result.output
    assert "Mode: bypass (two policies)" in out
    assert "Loss: PPO-clip on pi_theta / pi_rollout" in out
    assert "r in [0.107, 9.36]" in out


SEED_1 = [
    "data.train_files=data/train.parquet", "data.val_files=data/test.parquet",
    "data.max_prompt_length=2048", "data.max_response_length=4096", "data.train_batch_size=128",
    "algorithm.adv_estimator=rloo", "algorithm.gamma=1.0", f"{RC}.rollout_is=sequence",
    f"{RC}.rollout_is_threshold=2.0", f"{RC}.rollout_is_batch_normalize=true",
    f"{RC}.rollout_rs=null", f"{RC}.bypass_mode=true", f"{RC}.loss_type=reinforce",
    "actor_rollout_ref.model.path=Qwen/Qwen2.5-7B", "actor_rollout_ref.actor.optim.lr=5e-7",
    "actor_rollout_ref.actor.ppo_mini_batch_size=32", "actor_rollout_ref.actor.ppo_epochs=1",
    "actor_rollout_ref.rollout.calculate_log_probs=True", 'trainer.logger=["console","mlflow"]',
    "trainer.project_name=rollout_corr_rloo", "trainer.total_epochs=10",
]  # fmt: skip
SEED_2 = [
    *[a for a in SEED_1 if not a.startswith(("algorithm", "trainer.project", "trainer.total"))],
    "algorithm.adv_estimator=grpo", "algorithm.gamma=1.0", f"{RC}.rollout_is=token",
    f"{RC}.rollout_is_threshold=2.0", f"{RC}.rollout_is_batch_normalize=false",
    f"{RC}.rollout_rs=token_k1,seq_max_k2", f"{RC}.rollout_rs_threshold=0.6_1.6,2.5",
    f"{RC}.bypass_mode=true", f"{RC}.loss_type=ppo_clip", "actor_rollout_ref.actor.optim.lr=3e-6",
    "trainer.project_name=rollout_corr_multi_rs", "trainer.total_epochs=5",
]  # fmt: skip


def test_seed_example_1_validates_with_only_missing_file_warnings():
    data = json.loads(runner.invoke(app, ["validate", "--format", "json", *SEED_1]).output)
    assert data["valid"] is True
    assert {f["code"] for f in data["findings"]} == {"RCX-W009"}  # data files, 7B model not here
    assert data["explain"]["is"]["applied"] == "loss"


def test_seed_example_2_validates_with_metrics_only_warning():
    data = json.loads(runner.invoke(app, ["validate", "--format", "json", *SEED_2]).output)
    assert data["valid"] is True
    assert {f["code"] for f in data["findings"]} == {"RCX-W009", "RCX-W002"}


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("wandb", "tensorboard")),
    reason="needs the wandb and tensorboard extras (make setup installs them)",
)
@pytest.mark.parametrize(
    ("seed", "logger"),
    [(SEED_1, '["console","wandb"]'), (SEED_2, '["console","wandb","tensorboard"]')],
)
def test_seed_logger_lines_validate_as_written(seed, logger):
    args = [a if not a.startswith("trainer.logger") else f"trainer.logger={logger}" for a in seed]
    as_written = json.loads(runner.invoke(app, ["validate", "--format", "json", *args]).output)
    with_mlflow = json.loads(runner.invoke(app, ["validate", "--format", "json", *seed]).output)
    assert as_written["valid"] is True
    assert as_written["findings"] == with_mlflow["findings"]


def test_presets_list_and_show():
    result = runner.invoke(app, ["presets", "list"])
    assert result.exit_code == 0
    for name in ("rloo-seq-is", "grpo-multi-rs", "gae-seq-is-rs", "grpo-rs-only"):
        assert name in result.output
    shown = runner.invoke(app, ["presets", "show", "grpo-multi-rs"])
    assert shown.exit_code == 0
    assert "rollout_rs_threshold: 0.6_1.6,2.5  # RS bounds" in shown.output
    assert "# Run:  rcx train --preset grpo-multi-rs" in shown.output
    missing = runner.invoke(app, ["presets", "show", "nope"])
    assert missing.exit_code == 1 and "RCX-E011" in missing.output


def test_keys_lists_descriptions():
    result = runner.invoke(app, ["keys", "algorithm.rollout_correction"])
    assert result.exit_code == 0
    assert (
        "algorithm.rollout_correction.rollout_is_threshold = 2.0  # IS bound: a number C > 1"
        in result.output
    )
    assert "trainer.seed" not in result.output


def test_validate_path_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from rcx.cli import app; "
        "r = CliRunner().invoke(app, ['validate', '--preset', 'gae-seq-is-rs', '--explain']); "
        "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


TINY_RUN = [
    "actor_rollout_ref.model.warm_start_steps=0",
    "trainer.total_training_steps=1",
    "data.train_batch_size=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "actor_rollout_ref.rollout.n=2",
    "data.builtin.num_val=4",
    'trainer.logger=["console"]',
    "trainer.val_before_train=false",
]


def test_train_refuses_an_invalid_config_before_loading_anything(tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "--preset",
            "grpo-multi-rs",
            f"trainer.default_local_dir={tmp_path}",
            "algorithm.gamma=3",
        ],
    )
    assert result.exit_code == 1
    assert "RCX-E009" in result.output and "nothing was started" in result.output
    assert not any(tmp_path.iterdir())


def test_train_runs_a_step_and_checkpoints(tmp_path):
    args = [
        "train",
        "--preset",
        "grpo-multi-rs",
        *TINY_RUN,
        f"trainer.default_local_dir={tmp_path}",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "FINISHED" in result.output
    assert (tmp_path / "global_step_1" / "meta.json").is_file()


def test_train_user_error_is_one_line_exit_1(tmp_path):
    args = [
        "train", *TINY_RUN, f"trainer.default_local_dir={tmp_path}",
        f"actor_rollout_ref.model.path={tmp_path / 'no-such-model'}",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "RCX-W009" in result.output  # validate warned first
    assert "error" in result.output and "no-such-model" in result.output
    assert "Traceback" not in result.output


def test_pretrain_has_nothing_to_do_for_a_local_model():
    result = runner.invoke(app, ["pretrain", "actor_rollout_ref.model.warm_start_steps=0"])
    assert result.exit_code == 0 and "nothing to do" in result.output


@pytest.mark.parametrize("reached", [True, False])
def test_pretrain_fails_loudly_when_the_warm_start_missed_its_target(
    monkeypatch, tmp_path, reached
):
    import rcx.train.pretrain

    metadata = {
        "steps": 2000,
        "steps_run": 2000 if not reached else 350,
        "probes": [[350, 0.34 if reached else 0.117]],
        "target_accuracy": 0.3,
        "reached_target": reached,
        "val_greedy_accuracy": 0.227,
    }
    (tmp_path / "warm_start.json").write_text(json.dumps(metadata))
    monkeypatch.setattr(rcx.train.pretrain, "ensure_warm_start", lambda *a, **k: tmp_path)
    result = runner.invoke(app, ["pretrain"])
    if reached:
        assert result.exit_code == 0 and "reached_target: True" in result.output
    else:
        assert result.exit_code == 1
        assert "BELOW its target" in result.output and "11.7%" in result.output
