"""Every finding code: one config that triggers it and one that does not."""

import importlib.util

import pytest

from rcx.config import CODES, validate_sources


@pytest.fixture(autouse=True)
def _wandb_absent(monkeypatch):
    """RCX-E014's trigger: wandb looks uninstalled in this module (it may well be installed;
    tests/store/test_loggers.py covers both cases)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )


RC = "algorithm.rollout_correction"
BYPASS = [f"{RC}.bypass_mode=true"]
THRESHOLD = f"{RC}.rollout_rs_threshold"


def rs(criteria: str, threshold: str) -> list[str]:
    """The overrides that set rollout_rs and rollout_rs_threshold."""
    return [f"{RC}.rollout_rs={criteria}", f"{RC}.rollout_rs_threshold={threshold}"]


# code -> (overrides that trigger it, overrides that do not, path it names)
CASES = {
    "RCX-W001": (
        [*BYPASS, "actor_rollout_ref.actor.ppo_epochs=2"],
        [*BYPASS, "actor_rollout_ref.actor.ppo_epochs=1"],
        "actor_rollout_ref.actor.ppo_epochs",
    ),
    "RCX-W002": (
        [*BYPASS, f"{RC}.rollout_is=token", f"{RC}.loss_type=cispo"],
        [*BYPASS, f"{RC}.rollout_is=token", f"{RC}.loss_type=reinforce"],
        f"{RC}.rollout_is",
    ),
    "RCX-W003": (
        [f"{RC}.rollout_is_batch_normalize=true"],
        [f"{RC}.rollout_is_batch_normalize=true", f"{RC}.rollout_is=sequence"],
        f"{RC}.rollout_is_batch_normalize",
    ),
    "RCX-W004": (
        [f"{RC}.loss_type=reinforce"],
        [*BYPASS, f"{RC}.loss_type=reinforce"],
        f"{RC}.loss_type",
    ),
    "RCX-W005": (rs("geometric", "0.9_1.1"), rs("seq_mean_k1", "0.9_1.1"), f"{RC}.rollout_rs"),
    "RCX-W006": (rs("token_k1", "1.1_2"), rs("token_k1", "0.9_2"), THRESHOLD),
    "RCX-W007": (rs("token_k1", "0.995_1.005"), rs("token_k1", "0.8_1.25"), THRESHOLD),
    "RCX-W008": (rs("seq_max_k2", "100"), rs("seq_max_k2", "2.5"), THRESHOLD),
    "RCX-W009": (
        [
            "data.train_files=/nonexistent/train.parquet",
            "actor_rollout_ref.model.warm_start_steps=0",
        ],
        ["data.train_files=builtin:reverse"],
        "data.train_files",
    ),
    "RCX-W010": (
        ["data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=12"],
        ["data.train_batch_size=32", "actor_rollout_ref.actor.ppo_mini_batch_size=16"],
        "actor_rollout_ref.actor.ppo_mini_batch_size",
    ),
    "RCX-W011": (
        [f"{THRESHOLD}=0.995_1.005"],
        rs("token_k1", "0.8_1.25"),
        THRESHOLD,
    ),
    "RCX-W012": (
        [f"{RC}.loss_type=gspo"],
        [f"{RC}.loss_type=gspo", "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean"],
        "actor_rollout_ref.actor.loss_agg_mode",
    ),
    "RCX-W013": (
        [*BYPASS, *rs("seq_sum_k1", "0.5_2"), f"{RC}.baseline_includes_rejected=false"],
        [*rs("seq_sum_k1", "0.5_2"), f"{RC}.baseline_includes_rejected=false"],
        f"{RC}.baseline_includes_rejected",
    ),
    "RCX-W014": (
        [f"{RC}.loss_denominator=generated"],
        [*rs("token_k1", "0.5_2"), f"{RC}.loss_denominator=generated"],
        f"{RC}.loss_denominator",
    ),
    "RCX-W015": (
        ["actor_rollout_ref.actor.sampling_mask_replay=true"],
        [
            "actor_rollout_ref.actor.sampling_mask_replay=true",
            "actor_rollout_ref.rollout.top_p=0.8",
        ],
        "actor_rollout_ref.actor.sampling_mask_replay",
    ),
    "RCX-W016": (
        ["trainer.max_off_policy_strategy=wait"],
        ["trainer.async_mode=fully_async", "trainer.max_off_policy_strategy=wait"],
        "trainer.max_off_policy_strategy",
    ),
    "RCX-E001": (["trainer.project=x"], ["trainer.project_name=x"], "trainer.project"),
    "RCX-E002": (rs("token_k5", "2"), rs("token_k2", "2"), f"{RC}.rollout_rs"),
    "RCX-E003": (
        rs("token_k1,seq_max_k2", "0.5_2,2,3"),
        rs("token_k1,seq_max_k2", "0.5_2,2"),
        THRESHOLD,
    ),
    "RCX-E004": (rs("seq_max_k2", "0.5_2"), rs("seq_max_k2", "2"), THRESHOLD),
    "RCX-E005": (
        [f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold=1.0"],
        [f"{RC}.rollout_is=token", f"{RC}.rollout_is_threshold=1.01"],
        f"{RC}.rollout_is_threshold",
    ),
    "RCX-E006": (
        [f"{RC}.rollout_is=token", "actor_rollout_ref.rollout.calculate_log_probs=false"],
        ["actor_rollout_ref.rollout.calculate_log_probs=false"],
        "actor_rollout_ref.rollout.calculate_log_probs",
    ),
    "RCX-E007": (
        ["algorithm.adv_estimator=rloo", "actor_rollout_ref.rollout.n=1"],
        ["algorithm.adv_estimator=reinforce_plus_plus", "actor_rollout_ref.rollout.n=1"],
        "actor_rollout_ref.rollout.n",
    ),
    "RCX-E008": (
        ["algorithm.adv_estimator=gae", "critic.enable=false"],
        ["algorithm.adv_estimator=gae", "critic.enable=null"],
        "critic.enable",
    ),
    "RCX-E009": (["algorithm.gamma=1.5"], ["algorithm.gamma=0.99"], "algorithm.gamma"),
    "RCX-E010": (
        [f"{RC}.rollout_token_veto_threshold=1e-4"],
        rs("seq_max_k2", "2.5"),
        f"{RC}.rollout_token_veto_threshold",
    ),
    "RCX-E011": (["trainer.seed"], ["trainer.seed=2"], "trainer.seed"),
    "RCX-E012": (
        ["trainer.default_local_dir=/dev/null/x"],
        ["trainer.default_local_dir=null"],
        "trainer.default_local_dir",
    ),
    "RCX-E013": (
        ["data.builtin.num_train=1000000000000"],
        ["data.builtin.num_train=1000"],
        "data.builtin.num_train",
    ),
    "RCX-E014": (
        ['trainer.logger=["console","wandb"]'],
        ['trainer.logger=["console","mlflow"]'],
        "trainer.logger",
    ),
    "RCX-E015": (
        [
            "actor_rollout_ref.actor.sampling_mask_replay=true",
            "actor_rollout_ref.rollout.name=vllm",
        ],
        ["actor_rollout_ref.actor.sampling_mask_replay=true", "actor_rollout_ref.rollout.top_k=5"],
        "actor_rollout_ref.actor.sampling_mask_replay",
    ),
    "RCX-E016": (
        ["trainer.n_gpus_per_node=3", "data.train_batch_size=32"],
        ["trainer.n_gpus_per_node=2", "data.train_batch_size=32"],
        "data.train_batch_size",
    ),
    "RCX-E017": (
        ["trainer.async_mode=one_step_off", "trainer.n_gpus_per_node=2"],
        ["trainer.async_mode=one_step_off"],
        "trainer.n_gpus_per_node",
    ),
}


def codes(overrides):
    return [f.code for f in validate_sources(overrides=overrides).findings]


def test_every_documented_code_is_tested():
    assert set(CASES) == set(CODES)


@pytest.mark.parametrize("code", sorted(CASES))
def test_code_triggers(code):
    trigger, _, path = CASES[code]
    report = validate_sources(overrides=trigger)
    hits = [f for f in report.findings if f.code == code]
    assert hits, report.findings
    assert hits[0].path == path
    assert hits[0].message
    assert report.valid == code.startswith("RCX-W")


@pytest.mark.parametrize("code", sorted(CASES))
def test_code_does_not_trigger(code):
    _, clean, _ = CASES[code]
    assert code not in codes(clean)


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("actor_rollout_ref.actor.ppo_epochs=0", "actor_rollout_ref.actor.ppo_epochs"),
        ("actor_rollout_ref.actor.optim.lr=-1e-4", "actor_rollout_ref.actor.optim.lr"),
        ("actor_rollout_ref.actor.clip_ratio_c=1.0", "actor_rollout_ref.actor.clip_ratio_c"),
        ("actor_rollout_ref.rollout.temperature=0", "actor_rollout_ref.rollout.temperature"),
        ('trainer.logger=["console","neptune"]', "trainer.logger[1]"),
        (f"{RC}.rollout_is=tokens", f"{RC}.rollout_is"),
        (f"{RC}.loss_type=ppo", f"{RC}.loss_type"),
        ("data.train_batch_size=abc", "data.train_batch_size"),
        ("algorithm.adv_estimator=ppo", "algorithm.adv_estimator"),
        ("actor_rollout_ref.rollout.dtype=fp16", "actor_rollout_ref.rollout.dtype"),
        ("actor_rollout_ref.actor.optim.betas=[0.9,1.5]", "actor_rollout_ref.actor.optim.betas"),
    ],
)
def test_invalid_values_are_e009_with_path(override, path):
    report = validate_sources(overrides=[override])
    assert not report.valid
    e009 = [f for f in report.findings if f.code == "RCX-E009"]
    assert [f.path for f in e009] == [path]
    assert "got" in e009[0].message


def test_a_builtin_warm_start_without_a_builtin_task_is_refused_at_validate():
    report = validate_sources(overrides=["data.train_files=/data/mine.parquet"])
    e009 = [f for f in report.findings if f.code == "RCX-E009"]
    assert [f.path for f in e009] == ["actor_rollout_ref.model.warm_start_steps"]
    assert "warm_start_steps=0" in e009[0].message
    untrained = validate_sources(
        overrides=[
            "data.train_files=/data/mine.parquet",
            "actor_rollout_ref.model.warm_start_steps=0",
        ]
    )
    assert not [f for f in untrained.findings if f.code == "RCX-E009"]


def test_all_errors_listed_at_once_even_with_a_bad_field():
    # A type error elsewhere must not hide the threshold error or the group-size error.
    found = codes(
        [
            "algorithm.gamma=2",
            "actor_rollout_ref.rollout.n=1",
            f"{RC}.rollout_rs=token_k1",
            f"{RC}.rollout_rs_threshold=2_1",
        ]
    )
    assert {"RCX-E009", "RCX-E007", "RCX-E004"} <= set(found)


def test_every_malformed_threshold_entry_is_reported():
    found = codes(rs("token_k1,seq_max_k2,token_k3", "2_1,0.5_2,x"))
    assert found.count("RCX-E004") == 3


def test_unknown_key_suggestions():
    def msg(o):
        return validate_sources(overrides=[o]).findings[0].message

    assert "did you mean 'algorithm.rollout_correction.rollout_is'" in msg(
        "algorithm.rollout_is=token"
    )
    assert "did you mean 'trainer.project_name'" in msg("trainer.projekt_name=x")
    assert "did you mean 'actor_rollout_ref.actor.ppo_epochs'" in msg(
        "actor_rollout_ref.ppo_epochs=2"
    )


def test_removed_key_says_what_replaced_it():
    (f,) = validate_sources(overrides=[f"{RC}.rollout_is_self_norm=true"]).findings
    assert f.code == "RCX-E010" and "rollout_is_batch_normalize" in f.message
    (f,) = validate_sources(overrides=[f"{RC}.rollout_rs_threshold_lower=0.5"]).findings
    assert f.code == "RCX-E010" and "L_U" in f.message


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.name"),
        (
            "actor_rollout_ref.rollout.weight_sync_interval=2",
            "actor_rollout_ref.rollout.weight_sync_interval",
        ),
    ],
)
def test_one_step_off_refuses_the_vllm_engine_and_a_sync_interval(override, path):
    report = validate_sources(overrides=["trainer.async_mode=one_step_off", override])
    assert [f.path for f in report.findings if f.code == "RCX-E017"] == [path]
    assert "RCX-E017" not in codes([override])


@pytest.mark.parametrize(
    "override",
    [
        "trainer.n_gpus_per_node=2",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.weight_sync_interval=2",
    ],
)
def test_fully_async_refuses_what_one_step_off_refuses(override):
    path = override.split("=")[0]
    for mode in ("one_step_off", "fully_async"):
        report = validate_sources(overrides=[f"trainer.async_mode={mode}", override])
        (finding,) = [f for f in report.findings if f.code == "RCX-E017"]
        assert finding.path == path and f"async_mode={mode}" in finding.message


def test_fully_async_settings_are_ignored_elsewhere():
    keys = [
        "trainer.max_off_policy_threshold=2",
        "trainer.max_off_policy_strategy=wait",
        "trainer.rollout_workers=2",
    ]
    for mode in ("sync", "one_step_off"):
        report = validate_sources(overrides=[f"trainer.async_mode={mode}", *keys])
        found = sorted(f.path for f in report.findings if f.code == "RCX-W016")
        assert found == sorted(k.split("=")[0] for k in keys), mode
        assert all(mode in f.message for f in report.findings if f.code == "RCX-W016")
    assert "RCX-W016" not in codes(["trainer.async_mode=fully_async", *keys])
    assert "RCX-W016" not in codes(["trainer.async_mode=one_step_off"])  # defaults: silent
