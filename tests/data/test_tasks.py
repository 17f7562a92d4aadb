"""Built-in tasks, deterministic splits and batches, and the verl parquet loader."""

from __future__ import annotations

import logging

import pandas as pd
import pytest

from rcx.data.rewards import RewardScorer
from rcx.data.tasks import (
    BuiltinTask,
    DataError,
    batch_indices,
    builtin_examples,
    chat_to_text,
    is_validation_problem,
    load_prompts,
)
from rcx.models.loading import build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def test_arith_examples_are_correct_sums_with_configured_digits():
    examples = builtin_examples(BuiltinTask("builtin:arith", digits=3, num_train=300), "train")
    assert len(examples) == 300
    for example in examples:
        a, b = example.prompt.removesuffix("=").split("+")
        assert int(a) + int(b) == int(example.ground_truth)
        assert 0 <= int(a) < 1000 and 0 <= int(b) < 1000
    assert max(int(e.prompt.split("+")[0]) for e in examples) >= 100  # 3 digits are used


def test_reverse_examples():
    examples = builtin_examples(BuiltinTask("builtin:reverse", length=4, num_val=50), "val")
    for example in examples:
        word = example.prompt.removeprefix("rev ").removesuffix("=")
        assert example.ground_truth == word[::-1] and len(word) == 4


@pytest.mark.parametrize("name", ["builtin:arith", "builtin:reverse"])
def test_splits_are_disjoint_and_deterministic(name):
    task = BuiltinTask(name, num_train=2000, num_val=200, seed=7)
    train = builtin_examples(task, "train")
    val = builtin_examples(task, "val")
    assert not {e.prompt for e in train} & {e.prompt for e in val}
    assert all(is_validation_problem(e.prompt) for e in val)
    assert builtin_examples(task, "train") == train
    reseeded = builtin_examples(BuiltinTask(name, num_train=2000, seed=8), "train")
    assert [e.prompt for e in reseeded] != [e.prompt for e in train]


def test_builtin_task_rejects_bad_settings():
    with pytest.raises(DataError, match="unknown built-in task"):
        BuiltinTask("builtin:sudoku")
    with pytest.raises(DataError, match="digits"):
        BuiltinTask(digits=0)
    with pytest.raises(DataError, match="length"):
        BuiltinTask("builtin:reverse", length=0)


def test_builtin_task_from_config():
    from types import SimpleNamespace

    cfg = SimpleNamespace(digits=3, num_train=10, num_val=4, seed=2, length=7)
    task = BuiltinTask.from_config("builtin:reverse", cfg)
    assert (task.name, task.digits, task.length, task.num_train) == ("builtin:reverse", 3, 7, 10)


def test_batch_indices_cover_each_epoch_once_and_are_reproducible():
    epoch = [i for step in range(5) for i in batch_indices(10, step, 2, seed=1)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(10, 3, 4, seed=1) == batch_indices(10, 3, 4, seed=1)
    assert batch_indices(10, 0, 10, seed=1) != batch_indices(10, 0, 10, seed=2)
    assert len(batch_indices(3, 0, 7, seed=0)) == 7  # batches larger than the data wrap


def test_load_builtin_prompts(tokenizer):
    data = load_prompts(
        "builtin:arith", "val", tokenizer, max_prompt_length=16, builtin=BuiltinTask(num_val=40)
    )
    assert len(data) == 40 and not data.skipped
    assert tokenizer.decode(data.prompt_ids[0]) == data.examples[0].prompt


@pytest.mark.parametrize("max_prompt_length", [16, 6, 5])
def test_builtin_prompts_tokenised_on_demand_are_those_of_the_eager_path(
    tokenizer, max_prompt_length, monkeypatch
):
    """16: every prompt provably fits, so none is tokenised up front; 6 and 5: the bound (6
    characters + 1) does not prove it and the eager path decides (5 skips "ab+cd=")."""
    import pickle

    from rcx.data import tasks

    task = BuiltinTask(num_train=300, num_val=40)
    lazy = load_prompts(
        "builtin:arith", "train", tokenizer, max_prompt_length=max_prompt_length, builtin=task
    )
    deferred = len(lazy.prompt_ids._texts)
    assert deferred == (len(lazy) if max_prompt_length == 16 else 0)
    monkeypatch.setattr(tasks, "fits_untokenised", lambda *args: False)
    eager = load_prompts(
        "builtin:arith", "train", tokenizer, max_prompt_length=max_prompt_length, builtin=task
    )
    assert lazy.examples == eager.examples and lazy.skipped == eager.skipped
    assert bool(eager.skipped) == (max_prompt_length == 5)
    order = batch_indices(len(lazy), 3, 7, seed=1)  # any order, twice: the cache answers the same
    for i in order + order:
        assert lazy.prompt_ids[i] == eager.prompt_ids[i]
    copy = pickle.loads(pickle.dumps(lazy.prompt_ids))  # a spawned worker gets a working copy
    assert [copy[i] for i in range(len(lazy))] == [eager.prompt_ids[i] for i in range(len(lazy))]


def write_parquet(path, rows):
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def verl_row(content, truth, source="openai/gsm8k", extra=None):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": extra or {"index": 0},
    }


def test_parquet_loader_reads_verl_rows_and_counts_skips(tmp_path, tokenizer, caplog):
    path = write_parquet(
        tmp_path / "train.parquet",
        [
            verl_row("1+2=", "3", extra={"index": 7}),
            verl_row("9" * 40, "1"),  # longer than max_prompt_length: skipped
            {**verl_row("2+2=", "4"), "reward_model": {"style": "rule", "ground_truth": None}},
            verl_row("3+3=", "6", source="builtin:arith"),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="rcx.data.tasks"):
        data = load_prompts(path, "train", tokenizer, max_prompt_length=16, scorer=RewardScorer())
    assert [e.prompt for e in data.examples] == ["1+2=", "3+3="]  # no chat template: contents
    assert data.examples[0].ground_truth == "3" and data.examples[0].extra_info == {"index": 7}
    assert data.examples[1].data_source == "builtin:arith"
    assert dict(data.skipped) == {"too_long": 1, "malformed": 1}
    assert "skipped 2 train row(s)" in caplog.text


def test_parquet_loader_applies_chat_template_when_present(tmp_path, tokenizer):
    templated = build_char_tokenizer()
    templated.chat_template = (
        "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}"
    )
    path = write_parquet(tmp_path / "t.parquet", [verl_row("1+2=", "3")])
    data = load_prompts(path, "train", templated, max_prompt_length=32)
    assert data.examples[0].prompt == "u:1+2=\na:"
    assert chat_to_text([{"role": "user", "content": "x"}], tokenizer) == "x"


def test_parquet_custom_prompt_key(tmp_path, tokenizer):
    row = verl_row("5+5=", "10")
    row["question"] = row.pop("prompt")
    path = write_parquet(tmp_path / "q.parquet", [row])
    with pytest.raises(DataError, match="data.prompt_key"):
        load_prompts(path, "train", tokenizer, max_prompt_length=16)
    data = load_prompts(path, "train", tokenizer, max_prompt_length=16, prompt_key="question")
    assert data.examples[0].prompt == "5+5="


def test_parquet_errors(tmp_path, tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.parquet"), "train", tokenizer, max_prompt_length=8)
    empty = write_parquet(
        tmp_path / "empty.parquet", {"prompt": [], "data_source": [], "reward_model": []}
    )
    with pytest.raises(DataError, match="no rows"):
        load_prompts(empty, "train", tokenizer, max_prompt_length=8)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_text("not parquet")
    with pytest.raises(DataError, match="not readable parquet"):
        load_prompts(str(garbage), "train", tokenizer, max_prompt_length=8)
    long_only = write_parquet(tmp_path / "long.parquet", [verl_row("9" * 40, "1")])
    with pytest.raises(DataError, match="no usable train prompts"):
        load_prompts(long_only, "train", tokenizer, max_prompt_length=8)


def test_parquet_text_that_is_not_utf8_is_a_clear_error(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = pa.array([b"\xff\xfe1+1=", b"2+2="], pa.binary()).view(pa.string())
    table = pa.table(
        {
            "prompt": prompts,
            "data_source": ["builtin:arith"] * 2,
            "reward_model": [{"ground_truth": "2"}, {"ground_truth": "4"}],
        }
    )
    path = tmp_path / "bad_text.parquet"
    pq.write_table(table, path)
    with pytest.raises(DataError, match=r"column 'prompt' holds text that is not valid UTF-8"):
        load_prompts(str(path), "train", tokenizer, max_prompt_length=16)


def test_unknown_data_source_without_custom_reward_is_an_error(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "u.parquet", [verl_row("1+1=", "2", source="mystery")])
    with pytest.raises(DataError, match="mystery"):
        load_prompts(path, "train", tokenizer, max_prompt_length=16, scorer=RewardScorer())
    hook = tmp_path / "hook.py"
    hook.write_text("def compute_score(d, s, g, e=None):\n    return 1.0\n")
    data = load_prompts(
        path,
        "train",
        tokenizer,
        max_prompt_length=16,
        scorer=RewardScorer(str(hook), "compute_score"),
    )
    assert len(data) == 1


def test_multiple_files_concatenate(tmp_path, tokenizer):
    a = write_parquet(tmp_path / "a.parquet", [verl_row("1+1=", "2")])
    data = load_prompts(
        [a, "builtin:arith"],
        "train",
        tokenizer,
        max_prompt_length=16,
        builtin=BuiltinTask(num_train=5),
    )
    assert len(data) == 6
