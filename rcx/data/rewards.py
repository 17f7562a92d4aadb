"""Verifiable rewards: rule rewards chosen by `data_source`, and a custom reward hook.

Rule rewards (1.0 correct, 0.0 otherwise):

- GSM8K (`openai/gsm8k`, or any data_source containing "gsm8k"): the number after the last
  `####` in the response, commas and `$` removed, equals the ground truth.
- MATH (`lighteval/MATH`, `DigitalLearningGmbH/MATH-lighteval`, `HuggingFaceH4/MATH-500`, or any
  data_source containing "math"): the content of the last `\\boxed{...}` equals the ground truth
  (itself boxed or plain) after light normalisation (spaces, `\\left`/`\\right`, `dfrac`).
- exact match (the built-in tasks, `exact_match`): stripped response equals stripped truth.

A custom hook (`custom_reward_function.path` + `.name`) takes precedence over the rules and has
verl's signature `compute_score(data_source, solution_str, ground_truth, extra_info=None)`,
returning a float or a dict with a `"score"` key (other numeric keys are reported as extras).
"""

from __future__ import annotations

import importlib.util
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rcx.errors import RcxError

ScoreFn = Callable[..., Any]


class RewardError(RcxError, ValueError):
    """A reward that cannot be computed: unknown data_source, broken hook, bad return value."""


def gsm8k_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the number after the last `####` equals `ground_truth`, else 0.0."""
    matches = re.findall(r"####\s*(-?[0-9.,$]+)", solution_str)
    if not matches:
        return 0.0
    answer = matches[-1].replace(",", "").replace("$", "").rstrip(".")
    truth = str(ground_truth).replace(",", "").replace("$", "").strip()
    return 1.0 if answer == truth else 0.0


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces) in `text`, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i]
    return None


def normalize_math_answer(answer: str) -> str:
    """A light canonical form for comparing MATH answers."""
    answer = answer.strip()
    for old, new in (
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("dfrac", "frac"),
        ("tfrac", "frac"),
        ("$", ""),
        (" ", ""),
    ):
        answer = answer.replace(old, new)
    return answer.rstrip(".")


def math_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the last `\\boxed{}` answer equals the ground truth after normalisation."""
    answer = last_boxed(solution_str)
    if answer is None:
        return 0.0
    truth = last_boxed(str(ground_truth))
    truth = str(ground_truth) if truth is None else truth
    return 1.0 if normalize_math_answer(answer) == normalize_math_answer(truth) else 0.0


def exact_match_score(solution_str: str, ground_truth: str) -> float:
    """1.0 if the stripped response equals the stripped ground truth."""
    return 1.0 if solution_str.strip() == str(ground_truth).strip() else 0.0


RULES: dict[str, Callable[[str, str], float]] = {
    "openai/gsm8k": gsm8k_score,
    "lighteval/MATH": math_score,
    "DigitalLearningGmbH/MATH-lighteval": math_score,
    "HuggingFaceH4/MATH-500": math_score,
    "exact_match": exact_match_score,
    "builtin:arith": exact_match_score,
    "builtin:reverse": exact_match_score,
}


def rule_for(data_source: str) -> Callable[[str, str], float] | None:
    """The rule reward for `data_source` (exact name, then "gsm8k"/"math" substring), or None."""
    if data_source in RULES:
        return RULES[data_source]
    lowered = data_source.lower()
    if "gsm8k" in lowered:
        return gsm8k_score
    if "math" in lowered:
        return math_score
    return None


def load_custom_reward(path: str | Path, name: str = "compute_score") -> ScoreFn:
    """Import function `name` from the Python file at `path` (custom_reward_function.*)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardError(f"custom_reward_function.path={str(path)!r}: no such file")
    spec = importlib.util.spec_from_file_location(f"rcx_custom_reward_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise RewardError(f"custom_reward_function.path={str(path)!r} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # a user's file: report any import failure as a config error
        raise RewardError(
            f"custom_reward_function.path={str(path)!r} failed to import: "
            f"{type(err).__name__}: {err}"
        ) from err
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(
            f"custom_reward_function.name={name!r} is not a function in {str(path)!r}"
        )
    return fn


class RewardScorer:
    """Scores responses: the custom hook when configured, else the rule for the data_source."""

    def __init__(
        self,
        custom_path: str | None = None,
        custom_name: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.custom: ScoreFn | None = None
        self.custom_label = ""
        self.timeout_s = timeout_s  # per batch, custom hook only (see score_responses)
        if custom_path:
            name = custom_name or "compute_score"
            self.custom = load_custom_reward(custom_path, name)
            self.custom_label = f"{custom_path}:{name}"

    def supports(self, data_source: str) -> bool:
        """Whether a reward exists for `data_source`."""
        return self.custom is not None or rule_for(data_source) is not None

    def score(
        self,
        data_source: str,
        solution_str: str,
        ground_truth: Any,
        extra_info: dict | None = None,
    ) -> tuple[float, dict[str, float]]:
        """`(score, extras)` for one response; extras are the hook's other numeric dict keys."""
        if self.custom is None:
            rule = rule_for(data_source)
            if rule is None:
                raise RewardError(unknown_source_message([data_source]))
            return rule(solution_str, ground_truth), {}
        try:
            result = self.custom(data_source, solution_str, ground_truth, extra_info)
        except Exception as err:  # the user's code: name it in the error
            raise RewardError(
                f"custom reward {self.custom_label} raised {type(err).__name__}: {err} "
                f"(data_source={data_source!r})"
            ) from err
        return parse_score(result, self.custom_label)


def score_responses(
    scorer: RewardScorer, texts: list[str], examples: list[Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score decoded responses against their examples (`data_source`, `ground_truth`,
    `extra_info` attributes, e.g. `rcx.data.tasks.Example`); one example per text.

    Returns `(scores (B,) float32, extras)`; an extra key missing for some response is 0 there.
    """
    if len(texts) != len(examples):
        raise ValueError(f"{len(texts)} responses but {len(examples)} examples")

    def score_all() -> list[tuple[float, dict[str, float]]]:
        return [
            scorer.score(example.data_source, text, example.ground_truth, example.extra_info)
            for text, example in zip(texts, examples, strict=True)
        ]

    timeout = getattr(scorer, "timeout_s", None) if getattr(scorer, "custom", None) else None
    results = score_all() if timeout is None else call_with_timeout(score_all, timeout, scorer)
    scores = [score for score, _ in results]
    extras = [extra for _, extra in results]
    keys = sorted({k for extra in extras for k in extra})
    columns = {k: torch.tensor([e.get(k, 0.0) for e in extras]) for k in keys}
    return torch.tensor(scores, dtype=torch.float32), columns


class RewardTimeoutError(RewardError):
    """The custom reward did not return within ``custom_reward_function.timeout_s``."""


def call_with_timeout(fn: Callable[[], Any], timeout_s: float, scorer: Any) -> Any:
    """``fn()`` in a daemon worker thread; :class:`RewardTimeoutError` if it has not returned
    after ``timeout_s`` seconds. A thread cannot be killed: a hung hook keeps its thread until
    the process exits (the caller ends the run), but it never blocks the exit."""
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="rcx-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeoutError(
            f"custom reward {scorer.custom_label} did not return within "
            f"custom_reward_function.timeout_s={timeout_s:g} s for a batch of responses; "
            f"fix the hook (a loop, a network call) or raise the timeout"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def parse_score(result: Any, label: str) -> tuple[float, dict[str, float]]:
    """Check a hook's return value: a finite number, or a dict with a finite `"score"`."""
    extras: dict[str, float] = {}
    if isinstance(result, dict):
        if "score" not in result:
            raise RewardError(f"custom reward {label} returned a dict without a 'score' key")
        extras = {
            k: float(v)
            for k, v in result.items()
            if k != "score" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        result = result["score"]
    if isinstance(result, bool) or not isinstance(result, (int, float)):
        raise RewardError(
            f"custom reward {label} returned {type(result).__name__}, expected a number"
        )
    if not math.isfinite(float(result)):
        raise RewardError(f"custom reward {label} returned a non-finite score {result}")
    return float(result), extras


def unknown_source_message(data_sources: list[str]) -> str:
    """The error for data sources with no rule reward and no custom hook."""
    return (
        f"no reward for data_source {sorted(set(data_sources))}: built-in rules cover "
        f"{sorted(RULES)} (and names containing 'gsm8k' or 'math'); set "
        "custom_reward_function.path and custom_reward_function.name for others"
    )
