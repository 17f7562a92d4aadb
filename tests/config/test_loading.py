"""Sources and precedence: defaults < preset < config file < KEY=VALUE overrides."""

import pytest

from rcx.config import ConfigError, list_presets, load_config, validate_sources
from rcx.config.loading import all_key_paths, field_descriptions, parse_override

RC = "algorithm.rollout_correction"


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_alone_are_valid():
    cfg = load_config()
    assert cfg.actor_rollout_ref.model.path == "builtin:tiny"
    assert cfg.critic.enable is False  # grpo: no critic


def test_critic_enable_defaults_to_on_exactly_for_gae():
    assert load_config(overrides=["algorithm.adv_estimator=gae"]).critic.enable is True
    assert load_config(overrides=["algorithm.adv_estimator=rloo"]).critic.enable is False


def test_precedence_preset_then_file_then_overrides(tmp_path):
    # The preset sets lr 3e-4 and n 8; the file overrides lr; the override beats the file.
    path = write(
        tmp_path,
        "actor_rollout_ref:\n  actor:\n    optim:\n      lr: 1.0e-5\n  rollout:\n    n: 4\n",
    )
    cfg = load_config("grpo-multi-rs", path, ["actor_rollout_ref.rollout.n=6"])
    assert cfg.actor_rollout_ref.actor.optim.lr == 1e-5  # file beats preset
    assert cfg.actor_rollout_ref.rollout.n == 6  # override beats file
    assert cfg.algorithm.rollout_correction.rollout_rs == "token_k1,seq_max_k2"  # from preset
    assert cfg.trainer.seed == 1  # built-in default


def test_preset_beats_defaults():
    assert load_config("rloo-seq-is").algorithm.adv_estimator == "rloo"
    assert load_config().algorithm.adv_estimator == "grpo"


def test_file_threshold_string_stays_verbatim(tmp_path):
    path = write(
        tmp_path,
        "algorithm:\n  rollout_correction:\n    rollout_rs: token_k1\n    rollout_rs_threshold: 0.5_2\n",
    )
    cfg = load_config(config_file=path)
    assert cfg.algorithm.rollout_correction.rollout_rs_threshold == "0.5_2"


def test_override_threshold_string_taken_as_typed():
    cfg = load_config(overrides=[f"{RC}.rollout_rs=token_k1", f"{RC}.rollout_rs_threshold=0.5_2"])
    assert cfg.algorithm.rollout_correction.rollout_rs_threshold == "0.5_2"
    cfg = load_config(overrides=[f"{RC}.rollout_rs=seq_max_k2", f"{RC}.rollout_rs_threshold=2.0"])
    assert cfg.algorithm.rollout_correction.rollout_rs_threshold == "2.0"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('trainer.logger=["console","mlflow"]', ["console", "mlflow"]),
        ("a.b=null", None),
        ("a.b=true", True),
        ("a.b=True", True),
        ("a.b=3", 3),
        ("a.b=3e-4", 3e-4),
        ("a.b=hello", "hello"),
        ("a.b=", None),
        (f"{RC}.rollout_rs_threshold='0.6_1.6,2.5'", "0.6_1.6,2.5"),
        (f"{RC}.rollout_rs_threshold=null", None),
        (f"{RC}.rollout_rs=token_k1,seq_max_k2", "token_k1,seq_max_k2"),
    ],
)
def test_override_values(text, expected):
    assert parse_override(text)[1] == expected


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override_is_e011(bad):
    report = validate_sources(overrides=[bad])
    assert not report.valid
    assert [f.code for f in report.findings] == ["RCX-E011"]


def test_missing_and_broken_files_are_e011(tmp_path):
    assert validate_sources(config_file=tmp_path / "nope.yaml").findings[0].code == "RCX-E011"
    broken = write(tmp_path, "a: [1, 2\n")
    assert validate_sources(config_file=broken).findings[0].code == "RCX-E011"
    listy = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    assert "mapping" in validate_sources(config_file=listy).findings[0].message


def test_unknown_preset_suggests():
    report = validate_sources(preset="grpo-multi")
    assert report.findings[0].code == "RCX-E011"
    assert "grpo-multi-rs" in report.findings[0].message


def test_load_config_raises_with_every_error():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["trainer.sed=1", "actor_rollout_ref.actor.ppo_epochs=0"])
    codes = {f.code for f in info.value.findings}
    assert codes == {"RCX-E001", "RCX-E009"}
    assert "trainer.sed" in str(info.value)


def test_every_key_has_a_description():
    desc = field_descriptions()
    assert set(desc) == set(all_key_paths())
    assert all(desc[k].strip() for k in desc), [k for k in desc if not desc[k].strip()]


def test_seed_command_line_keys_all_exist():
    # Every key of the seed's example command lines (entry point replaced by rcx validate).
    seed_keys = [
        "data.train_files", "data.val_files", "data.max_prompt_length", "data.max_response_length",
        "data.train_batch_size", "algorithm.adv_estimator", "algorithm.gamma", "algorithm.lam",
        f"{RC}.rollout_is", f"{RC}.rollout_is_threshold", f"{RC}.rollout_is_batch_normalize",
        f"{RC}.rollout_rs", f"{RC}.rollout_rs_threshold", f"{RC}.bypass_mode", f"{RC}.loss_type",
        "actor_rollout_ref.model.path", "actor_rollout_ref.actor.optim.lr",
        "actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_epochs",
        "actor_rollout_ref.rollout.calculate_log_probs", "trainer.logger", "trainer.project_name",
        "trainer.total_epochs",
    ]  # fmt: skip
    assert set(seed_keys) <= set(all_key_paths())


def test_presets_are_the_four_seed_configurations_and_the_frontier_ones():
    assert list_presets() == [
        "gae-seq-is-rs",
        "grpo-bypass-cispo",
        "grpo-bypass-pg-token-icepop",
        "grpo-gspo",
        "grpo-multi-rs",
        "grpo-rs-only",
        "grpo-token-icepop",
        "rloo-seq-is",
    ]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_valid_with_no_errors(name):
    report = validate_sources(preset=name)
    assert report.valid, report.findings
    assert report.config.trainer.experiment_name == name


def test_dotted_helpers_read_and_flatten_trees():
    from rcx.config.loading import flatten_tree, get_dotted

    tree = {"a": {"b": {"c": 1}, "e": {}}, "d": [1, 2]}
    assert get_dotted(tree, "a.b.c") == 1
    assert get_dotted(tree, "a.x.c") is None and get_dotted(tree, "d.0") is None
    assert flatten_tree(tree) == {"a.b.c": 1, "a.e": {}, "d": [1, 2]}
