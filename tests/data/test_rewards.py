"""Rule rewards on hand cases, selection by data_source, and the custom reward hook."""

from __future__ import annotations

import pytest

from rcx.data.rewards import (
    RewardError,
    RewardScorer,
    exact_match_score,
    gsm8k_score,
    last_boxed,
    math_score,
    rule_for,
)


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        ("so 3+4=7\n#### 7", "7", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("#### $56.", "56", 1.0),
        ("#### 5 then #### 6", "6", 1.0),  # the last answer counts
        ("#### 8", "7", 0.0),
        ("the answer is 7", "7", 0.0),  # no #### marker
        ("#### -3", "-3", 1.0),
    ],
)
def test_gsm8k_score(response, truth, expected):
    assert gsm8k_score(response, truth) == expected


def test_last_boxed_handles_nested_braces():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unclosed") is None


@pytest.mark.parametrize(
    ("response", "truth", "expected"),
    [
        (r"so \boxed{\dfrac{1}{2}}", r"\frac{1}{2}", 1.0),
        (r"\boxed{ 42 }", "42", 1.0),
        (r"\boxed{42}", r"\boxed{42}", 1.0),
        (r"\boxed{\left( 1,2 \right)}", "(1,2)", 1.0),
        (r"\boxed{41}", "42", 0.0),
        ("42", "42", 0.0),  # unboxed answers score 0
    ],
)
def test_math_score(response, truth, expected):
    assert math_score(response, truth) == expected


def test_exact_match_strips_whitespace_only():
    assert exact_match_score(" 46 ", "46") == 1.0
    assert exact_match_score("046", "46") == 0.0


def test_rule_selection_by_data_source():
    assert rule_for("openai/gsm8k") is gsm8k_score
    assert rule_for("my-gsm8k-copy") is gsm8k_score
    assert rule_for("HuggingFaceH4/MATH-500") is math_score
    assert rule_for("builtin:arith") is exact_match_score
    assert rule_for("mystery") is None


def test_scorer_refuses_unknown_data_source_with_hint():
    scorer = RewardScorer()
    assert not scorer.supports("mystery")
    with pytest.raises(RewardError, match="custom_reward_function.path"):
        scorer.score("mystery", "x", "x")


def write_hook(tmp_path, body: str):
    path = tmp_path / "my_reward.py"
    path.write_text(body)
    return str(path)


def test_custom_hook_float_and_dict(tmp_path):
    path = write_hook(
        tmp_path,
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return float(len(solution_str) == len(ground_truth))\n"
        "def rich(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    return {'score': 0.5, 'format': 1, 'note': 'x'}\n",
    )
    scorer = RewardScorer(path, "compute_score")
    assert scorer.supports("mystery")  # the hook covers every data_source
    assert scorer.score("mystery", "abc", "xyz") == (1.0, {})
    assert RewardScorer(path, "rich").score("s", "a", "b") == (0.5, {"format": 1.0})


def test_custom_hook_default_name_is_compute_score(tmp_path):
    path = write_hook(tmp_path, "def compute_score(d, s, g, e=None):\n    return 2.0\n")
    assert RewardScorer(path, None).score("d", "s", "g")[0] == 2.0


@pytest.mark.parametrize(
    ("body", "name", "message"),
    [
        ("def f(d, s, g, e=None):\n    return 1.0\n", "missing", "not a function"),
        ("raise RuntimeError('boom')\n", "f", "failed to import"),
    ],
)
def test_custom_hook_load_errors(tmp_path, body, name, message):
    with pytest.raises(RewardError, match=message):
        RewardScorer(write_hook(tmp_path, body), name)


def test_custom_hook_missing_file(tmp_path):
    with pytest.raises(RewardError, match="no such file"):
        RewardScorer(str(tmp_path / "nope.py"), "f")


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ("'yes'", "expected a number"),
        ("float('nan')", "non-finite"),
        ("{'format': 1.0}", "without a 'score'"),
        ("1 / 0", "raised ZeroDivisionError"),
    ],
)
def test_custom_hook_bad_return_values(tmp_path, returned, message):
    path = write_hook(tmp_path, f"def f(d, s, g, e=None):\n    return {returned}\n")
    with pytest.raises(RewardError, match=message):
        RewardScorer(path, "f").score("d", "s", "g")


def test_score_responses_batches_scores_and_extras(tmp_path):
    from rcx.data.rewards import score_responses
    from rcx.data.tasks import Example

    examples = [Example("1+2=", "3", "builtin:arith"), Example("q", "4", "openai/gsm8k")]
    scores, extras = score_responses(RewardScorer(), ["3", "#### 5"], examples)
    assert scores.tolist() == [1.0, 0.0] and extras == {}
    path = write_hook(
        tmp_path,
        "def f(d, s, g, e=None):\n    return {'score': 1.0, 'len': len(s)} if s else 0.0\n",
    )
    scores, extras = score_responses(RewardScorer(path, "f"), ["abc", ""], examples)
    assert scores.tolist() == [1.0, 0.0] and extras["len"].tolist() == [3.0, 0.0]
    with pytest.raises(ValueError, match="2 examples"):
        score_responses(RewardScorer(), ["x"], examples)


HANGING_HOOK = "import time\ndef f(d, s, g, e=None):\n    time.sleep(3600)\n    return 1.0\n"


def test_a_custom_reward_that_never_returns_times_out_with_a_clear_error(tmp_path):
    import time

    from rcx.data.rewards import RewardTimeoutError, score_responses
    from rcx.data.tasks import Example

    scorer = RewardScorer(write_hook(tmp_path, HANGING_HOOK), "f", timeout_s=0.3)
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"did not return within .*timeout_s=0.3 s"):
        score_responses(scorer, ["x"], [Example("q", "1", "builtin:arith")])
    assert time.monotonic() - start < 3


def test_errors_of_a_timed_hook_reach_the_caller(tmp_path):
    from rcx.data.rewards import score_responses
    from rcx.data.tasks import Example

    hook = write_hook(tmp_path, "def f(d, s, g, e=None):\n    raise KeyError('boom')\n")
    with pytest.raises(RewardError, match="raised KeyError"):
        score_responses(RewardScorer(hook, "f", timeout_s=5), ["x"], [Example("q", "1", "a")])


@pytest.mark.slow
def test_a_process_with_a_hung_reward_still_exits_promptly(tmp_path):
    import subprocess
    import sys
    import time

    hook = write_hook(tmp_path, HANGING_HOOK)
    script = (
        "from rcx.data.rewards import RewardScorer, RewardTimeoutError, score_responses\n"
        "from rcx.data.tasks import Example\n"
        f"scorer = RewardScorer({str(hook)!r}, 'f', timeout_s=0.2)\n"
        "try:\n"
        "    score_responses(scorer, ['x'], [Example('q', '1', 'a')])\n"
        "except RewardTimeoutError:\n"
        "    raise SystemExit(3)\n"
    )
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
    assert done.returncode == 3, done.stderr.decode()[-2000:]
    assert time.monotonic() - start < 30
