"""Every ``rcx ...`` line of the README runs as written and shows what it claims.

The lines are read from the README's ```bash blocks (continuation lines joined, comments
dropped) and run in-process with Typer's CliRunner, from a scratch folder that sees the
repository's ``examples/`` (the README's commands run from the repository root). Each line is
in exactly one group:

* fast (this tier): ``validate``, ``presets``, ``keys``, ``sweep --dry-run``, ``whatif`` and
  ``calibrate``; the last two read a synthetic dump (:func:`rcx.store.dumps.write_synthetic_dumps`)
  written where the README's dumping ``rcx train`` line puts its dumps.
* slow: the whole README in order, as a new user pastes it, the training lines included (each
  with :data:`SHRINK` appended, so a run takes seconds, not minutes; nothing else is changed):
  the dumps ``whatif`` and ``calibrate`` read are then the real ones.
* templates: lines with placeholders (a model directory, run ids), never run: :data:`TEMPLATES`.

The finding-code table is checked too: every example triggers its code, and a warning's example
is valid (it triggers no error alongside).
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcx.cli import app
from rcx.config import validate_sources

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RC = "algorithm.rollout_correction"
#: Where the README's dumping `rcx train` line writes its dumps (its checkpoint folder).
DUMPS = Path("checkpoints/rollout_corr_multi_rs/grpo-multi-rs-dumps/log_probs")
#: Appended to every training line in the slow tier: 2 small steps, no warm start.
SHRINK = (
    "trainer.total_training_steps=2",
    "trainer.test_freq=0",
    "trainer.save_freq=0",
    "trainer.num_threads=1",
    "actor_rollout_ref.model.warm_start_steps=0",
    "actor_rollout_ref.rollout.n=4",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
    "data.train_batch_size=4",
    "data.val_batch_size=8",
    "data.builtin.num_train=64",
    "data.builtin.num_val=8",
)

runner = CliRunner()


@dataclass(frozen=True)
class Expect:
    """What a README line must show: its exit codes and text that must (not) be in its output."""

    shows: tuple[str, ...]
    absent: tuple[str, ...] = ()
    exit_codes: tuple[int, ...] = (0,)


#: What a sweep says before it runs when its grid keys cannot change training.
SWEEP_NOTES = ("cannot change training", "no mismatch source")
#: Fast lines, keyed by a piece of the line that picks out exactly one of them.
FAST: dict[str, Expect] = {
    "validate examples/config.yaml --explain": Expect(
        ("Mode: decoupled", "IS: sequence-level", "valid (0 errors, 0 warnings)")
    ),
    "validate --preset grpo-multi-rs": Expect(("RCX-W002", "valid (0 errors, 1 warning)")),
    "presets list": Expect(("rloo-seq-is", "grpo-multi-rs", "gae-seq-is-rs", "grpo-rs-only")),
    "presets show gae-seq-is-rs": Expect(("rollout_rs_threshold: 0.5_2.0  # RS bounds",)),
    "keys algorithm.rollout_correction": Expect(
        (f"{RC}.rollout_rs_threshold = null  # RS bounds", f"{RC}.bypass_mode = false")
    ),
    "--name is-cap": Expect(
        ("sweep is-cap: 4 trials", "dry run: 4 valid trials"), absent=SWEEP_NOTES
    ),
    "--name rs-bounds": Expect(
        ("sweep rs-bounds: 2 trials", "0.8_1.25,1.0", "dry run: 2 valid trials"),
        absent=SWEEP_NOTES,
    ),
    "--sweep examples/sweep.yaml --dry-run": Expect(
        ("sweep rs-bounds: 2 trials", "dry run: 2 valid trials"), absent=SWEEP_NOTES
    ),
    "--name is-metrics-only": Expect(
        (f"--grid {RC}.rollout_is_threshold cannot change training here", "RCX-W002", *SWEEP_NOTES)
    ),
    "whatif": Expect(("dump file(s)", "what-if, overall", "#5")),
    "--max-masked 0.05": Expect(("overrides:", f"{RC}.rollout_rs_threshold="), exit_codes=(0, 1)),
    "--by-staleness": Expect(("by staleness", "overrides:"), exit_codes=(0, 1)),
}
#: Lines that train, keyed the same way; what they show once they ran.
SLOW: dict[str, Expect] = {
    "train --preset grpo-multi-rs\n": Expect(("FINISHED after 2 steps",)),
    "train --preset gae-seq-is-rs": Expect(("FINISHED after 2 steps",)),
    # The ranks print to the terminal, not to this in-process runner: exit 0 is the check here
    # (tests/train/test_distributed.py checks what the ranks train).
    "trainer.n_gpus_per_node=2": Expect(("starting 2 processes",)),
    "train examples/config.yaml\n": Expect(("FINISHED after 2 steps", "decoupled mode")),
    "trainer.dump_log_probs=true": Expect(("FINISHED after 2 steps",)),
    "trainer.async_mode=one_step_off": Expect(("FINISHED after 2 steps",)),
    "trainer.async_mode=fully_async": Expect(("FINISHED after 2 steps",)),
    'trainer.logger=["console","mlflow","wandb","tensorboard"]': Expect(
        ("FINISHED after 2 steps", "tensorboard --logdir")
    ),
    "sweep --preset rloo-seq-is --name is-cap actor_rollout_ref.rollout.weight_sync_interval=4 "
    "--grid algorithm.rollout_correction.rollout_is_threshold=1.5,2,3,5\n": Expect(
        ("ranked by val/reward_mean", "FINISHED", "parent run:")
    ),
    "--sweep examples/sweep.yaml\n": Expect(("ranked by val/reward_mean", "FINISHED")),
    "--sweep examples/sweep.yaml --resume": Expect(("t00 already FINISHED, not rerun",)),
}
#: Lines with placeholders: shown to be adapted, never run.
TEMPLATES = ("actor_rollout_ref.model.path=/models/", "runs compare RUN_ID")


def readme_commands() -> list[list[str]]:
    """The arguments of each ``rcx`` line of the README's bash blocks, in order, as the shell
    hands them to ``rcx`` (continuation lines joined, comments dropped)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for logical in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(logical, comments=True)
            if argv and argv[0] == "rcx":
                out.append(argv[1:])
    return out


def line_of(argv: list[str]) -> str:
    """The line a key is looked for in: the arguments joined by spaces, then a newline (so that
    a key can pin the end of a line)."""
    return " ".join(argv) + "\n"


def group_of(line: str) -> tuple[str, str | None]:
    """("fast" | "slow" | "template", the key of its expectation)."""
    if any(t in line for t in TEMPLATES):
        return "template", None
    fast = [k for k in FAST if k in line]
    slow = [k for k in SLOW if k in line]
    if "--dry-run" in line or not (line.startswith("train") or line.startswith("sweep")):
        assert len(fast) == 1, f"README line {line!r} matches {fast} of FAST: give it one key"
        return "fast", fast[0]
    assert len(slow) == 1, f"README line {line!r} matches {slow} of SLOW: give it one key"
    return "slow", slow[0]


COMMANDS = readme_commands()
LINES = [line_of(argv) for argv in COMMANDS]
FAST_LINES = [line for line in LINES if group_of(line)[0] == "fast"]


def test_every_readme_line_is_in_one_group_and_every_key_is_used():
    groups = [group_of(line) for line in LINES]
    used = {key for _, key in groups}
    assert set(FAST) <= used, f"FAST keys matching no README line: {set(FAST) - used}"
    assert set(SLOW) <= used, f"SLOW keys matching no README line: {set(SLOW) - used}"
    assert sum(g == "template" for g, _ in groups) == len(TEMPLATES)
    assert len(FAST_LINES) >= 10


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working folder like a fresh clone's root: ``examples/`` and nothing else."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def write_dumps(folder: Path) -> None:
    """A few synthetic steps of dumps, with the rollout correction of the dumping run."""
    from rcx.config import load_config
    from rcx.store.dumps import write_synthetic_dumps

    rc = load_config(preset="grpo-multi-rs").algorithm.rollout_correction
    write_synthetic_dumps(
        folder,
        steps=3,
        batch=64,
        log_ratio_std=0.1,
        rollout_correction=rc.model_dump(),
        sync_interval=2,  # the dumping line's weight_sync_interval
    )


def run_line(line: str, extra: tuple[str, ...] = ()) -> str:
    """Run a README line in-process; check its expectation; return its output."""
    group, key = group_of(line)
    expect = (FAST if group == "fast" else SLOW)[key]
    result = runner.invoke(app, [*COMMANDS[LINES.index(line)], *extra])
    output = result.output
    assert result.exit_code in expect.exit_codes, f"{line}exit {result.exit_code}:\n{output}"
    for text in expect.shows:
        assert text in output, f"{line}does not show {text!r}:\n{output}"
    for text in expect.absent:
        assert text not in output, f"{line}shows {text!r}:\n{output}"
    return output


@pytest.mark.parametrize("line", FAST_LINES, ids=lambda line: line.strip()[:60])
def test_fast_readme_line(line: str, scratch: Path) -> None:
    write_dumps(scratch / DUMPS)
    run_line(line)


@pytest.mark.slow
def test_the_whole_readme_in_order(scratch: Path) -> None:
    """A new user's session: every runnable line in order, in one folder (training shrunk)."""
    for line in LINES:
        group, _ = group_of(line)
        if group == "template":
            continue
        run_line(line, SHRINK if group == "slow" else ())
        if "trainer.dump_log_probs=true" in line:
            assert sorted(p.name for p in (scratch / DUMPS).iterdir()) == [
                "step_000001.pt",
                "step_000002.pt",
            ]


# ------------------------------------------------------------------- the finding-code table ---


def finding_table() -> list[tuple[str, str]]:
    """(code, example column) of every row of the README's finding-code table."""
    rows = re.findall(r"^\| (RCX-[EW]\d{3}) \|.*\| (.*) \|$", README.read_text(), flags=re.M)
    assert len(rows) >= 24
    return rows


def example_overrides(example: str) -> list[list[str]]:
    """Each backticked ``KEY=VALUE ...`` example of a table cell as an override list, with
    ``rollout_*``, ``bypass_mode`` and ``loss_type`` under ``algorithm.rollout_correction.`` (as
    the README says)."""
    out = []
    for span in re.findall(r"`([^`]*)`", example):
        if "=" not in span or span.startswith("rcx "):
            continue
        out.append([f"{RC}.{o}" if o.startswith(SHORT_KEYS) else o for o in span.split(" ")])
    return out


#: Keys the table writes without their ``algorithm.rollout_correction.`` prefix.
SHORT_KEYS = ("rollout_", "bypass_mode=", "loss_type=")
#: Rows whose example is not a KEY=VALUE list: how the test reproduces them.
SPECIAL_ROWS = {
    "RCX-W002": lambda: validate_sources(preset="grpo-multi-rs"),
}


@pytest.mark.parametrize("code,example", finding_table(), ids=lambda v: v[:40])
def test_finding_table_example_triggers_its_code(
    code: str, example: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if code == "RCX-E014":  # "without the wandb extra": hide the installed package
        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "wandb" else real(name, *a),
        )
    reports = [validate_sources(overrides=o) for o in example_overrides(example)]
    if code in SPECIAL_ROWS:
        reports.append(SPECIAL_ROWS[code]())
    commands = [shlex.split(c)[1:] for c in re.findall(r"`(rcx [^`]*)`", example)]
    assert reports or commands, f"{code}: no runnable example in {example!r}"
    for report in reports:
        codes = [f.code for f in report.findings]
        assert code in codes, f"{code}: {example!r} gives {codes}"
        if code.startswith("RCX-W"):
            assert not report.errors, f"{code}: {example!r} also gives {report.errors}"
    for argv in commands:
        result = runner.invoke(app, argv)
        assert code in result.output, result.output


def test_the_key_without_a_value_hints_at_key_value():
    result = runner.invoke(app, ["validate", "trainer.seed"])
    assert result.exit_code == 1
    assert "RCX-E011" in result.output and "KEY=VALUE, e.g. trainer.seed=1" in result.output
