"""Rollout benchmarks: hf generation throughput on CPU and log-prob mismatch per knob.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/rollout.py            # defaults below
    .venv/bin/python bench/rollout.py --threads 2 --prompts 64 --n 8

What it measures, on the warm-started `builtin:tiny` (2-digit addition, cached warm start):

1. Warm start: time (or "cached") and sampled / greedy validation accuracy.
2. hf throughput: valid response tokens per second for a default-preset-sized rollout.
3. Mismatch per knob: the trainer model in float32 scores the rollout engine's samples;
   log r = lp_train - lp_rollout over valid tokens. Reported: mean |log r|, max |log r|,
   mean k3 = r - 1 - log r, and the share of tokens with r outside [0.5, 2] (and [0.8, 1.25]),
   over the samples of --measure-prompts validation prompts x n. Knobs:
   float32 synced (the zero baseline), bfloat16, float16, int8, fp8, and staleness s = 1, 4, 8:
   the engine keeps the weights of update 0 while the trainer takes s REINFORCE updates
   (group-mean baseline, AdamW, --lr) on batches the engine generates.
4. Sampling truncation and its replay (float32 rollout, in sync): with top_p = 0.8 (and top_k =
   5) the engine samples from a truncated, renormalised distribution. "full distribution" is how
   the trainer scores by default (temperature only); "sampling-mask replay" is how it scores with
   actor_rollout_ref.actor.sampling_mask_replay=true (renormalised over the rollout's kept token
   set per position). ``--truncation-only`` measures just these rows (seconds).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from rcx.data.rewards import exact_match_score  # noqa: E402
from rcx.data.tasks import BuiltinTask, builtin_examples  # noqa: E402
from rcx.models.loading import load_model_and_tokenizer  # noqa: E402
from rcx.rollout import SamplingParams, make_rollout_engine, token_log_probs  # noqa: E402
from rcx.train.pretrain import DEFAULT_WARM_START_STEPS, METADATA_FILE, ensure_warm_start  # noqa: E402

SAFETY = 20.0


def mismatch_stats(lp_train: torch.Tensor, lp_rollout: torch.Tensor, mask: torch.Tensor) -> dict:
    """mean/max |log r|, mean k3 and share outside [0.5, 2] over valid tokens; inputs (B, R)."""
    valid = mask.bool()
    log_r = (lp_train - lp_rollout).clamp(-SAFETY, SAFETY)[valid]  # (N,)
    ratio = log_r.exp()
    return {
        "mean_abs_log_r": log_r.abs().mean().item(),
        "max_abs_log_r": log_r.abs().max().item(),
        "k3": (ratio - 1 - log_r).mean().item(),
        "outside_0.5_2": ((ratio < 0.5) | (ratio > 2.0)).float().mean().item(),
        "outside_0.8_1.25": ((ratio < 0.8) | (ratio > 1.25)).float().mean().item(),
        "tokens": int(valid.sum()),
    }


def measure(engine, trainer_model, prompts, sampling, seed) -> dict:
    """Generate with `engine`, score with `trainer_model` (full distribution), compare."""
    batch = engine.generate(prompts, sampling, seed=seed)
    with torch.no_grad():
        lp_train = token_log_probs(
            trainer_model, batch.input_ids, batch.attention_mask, batch.response_length, sampling
        )
    return mismatch_stats(lp_train, batch.rollout_log_probs, batch.response_mask)


def truncation_rows(engine, model, prompts, n: int, max_new_tokens: int) -> list[tuple[str, dict]]:
    """Mismatch of truncated sampling, scored over the full distribution and replayed."""
    rows = []
    for label, knobs in [("top_p 0.8", {"top_p": 0.8}), ("top_k 5", {"top_k": 5})]:
        sampling = SamplingParams(n=n, max_new_tokens=max_new_tokens, **knobs)
        batch = engine.generate(prompts, sampling, seed=2, sampling_mask=True)
        scoring = SamplingParams(temperature=sampling.temperature)  # what the trainer applies
        args = (model, batch.input_ids, batch.attention_mask, batch.response_length, scoring)
        with torch.no_grad():
            full = token_log_probs(*args)
            replayed = token_log_probs(*args, batch.sampling_mask)
        for how, lp_train in (("full distribution", full), ("sampling-mask replay", replayed)):
            stats = mismatch_stats(lp_train, batch.rollout_log_probs, batch.response_mask)
            rows.append((f"{label}, trainer scores the {how}", stats))
    return rows


def reinforce_update(model, optimizer, engine, tokenizer, examples, sampling, seed) -> float:
    """One REINFORCE step (group-mean baseline) on a batch sampled by `engine`; mean reward."""
    prompts = [tokenizer(e.prompt)["input_ids"] for e in examples]
    batch = engine.generate(prompts, sampling, seed=seed)
    texts = tokenizer.batch_decode(batch.response_ids, skip_special_tokens=True)
    rewards = torch.tensor(
        [
            exact_match_score(t, examples[i].ground_truth)
            for t, i in zip(texts, batch.prompt_index.tolist(), strict=True)
        ]
    )
    groups = rewards.view(len(prompts), sampling.n)  # (P, n)
    advantages = (groups - groups.mean(dim=1, keepdim=True)).view(-1)  # (B,)
    model.train()
    log_probs = token_log_probs(
        model, batch.input_ids, batch.attention_mask, batch.response_length, sampling
    )  # (B, R)
    mask = batch.response_mask.float()
    loss = -(advantages[:, None] * log_probs * mask).sum() / mask.sum()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.eval()
    return rewards.mean().item()


def print_table(rows: list[tuple[str, dict]]) -> None:
    """The mismatch rows as a Markdown table."""
    print(
        "| knob | mean abs log r | max abs log r | mean k3 | outside [0.5, 2] "
        "| outside [0.8, 1.25] | tokens |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, s in rows:
        print(
            f"| {label} | {s['mean_abs_log_r']:.2e} | {s['max_abs_log_r']:.2e} | "
            f"{s['k3']:.2e} | {s['outside_0.5_2']:.2%} | {s['outside_0.8_1.25']:.2%} "
            f"| {s['tokens']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--warm-start-steps", type=int, default=DEFAULT_WARM_START_STEPS)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per rollout batch")
    parser.add_argument(
        "--measure-prompts", type=int, default=256, help="validation prompts per mismatch row"
    )
    parser.add_argument("--n", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-4, help="REINFORCE lr for staleness")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--truncation-only", action="store_true", help="measure only the truncation rows (item 4)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    task = BuiltinTask()
    started = time.perf_counter()
    path = ensure_warm_start(task, args.warm_start_steps, seed=args.seed)
    warm_seconds = time.perf_counter() - started
    metadata = json.loads((path / METADATA_FILE).read_text())
    model, tokenizer = load_model_and_tokenizer(str(path))
    val = builtin_examples(dataclasses.replace(task, num_val=args.measure_prompts), "val")
    prompts = [tokenizer(e.prompt)["input_ids"] for e in val]  # mismatch rows
    batch_prompts = prompts[: args.prompts]  # one default-preset rollout batch
    sampling = SamplingParams(n=args.n, max_new_tokens=args.max_new_tokens)

    engine = make_rollout_engine("hf", model, tokenizer)
    if args.truncation_only:
        print_table(truncation_rows(engine, model, prompts, args.n, args.max_new_tokens))
        return
    engine.generate(batch_prompts[:4], sampling, seed=0)  # warm-up
    started = time.perf_counter()
    batch = engine.generate(batch_prompts, sampling, seed=1)
    seconds = time.perf_counter() - started
    throughput = int(batch.response_mask.sum()) / seconds

    rows = [("float32, synced every step", measure(engine, model, prompts, sampling, 2))]
    rows += truncation_rows(engine, model, prompts, args.n, args.max_new_tokens)
    for label, knob in [
        ("bfloat16", {"dtype": "bfloat16"}),
        ("float16", {"dtype": "float16"}),
        ("int8 weights", {"quantization": "int8"}),
        ("fp8 weights", {"quantization": "fp8"}),
    ]:
        knob_engine = make_rollout_engine("hf", model, tokenizer, **knob)
        rows.append((label, measure(knob_engine, model, prompts, sampling, 2)))

    trainer = copy.deepcopy(model)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=args.lr)
    stale = make_rollout_engine("hf", trainer, tokenizer)  # never synced: ever staler
    train_examples = builtin_examples(task, "train")
    for update in range(1, 9):
        chunk = train_examples[(update - 1) * args.prompts : update * args.prompts]
        reinforce_update(trainer, optimizer, stale, tokenizer, chunk, sampling, seed=100 + update)
        if update in (1, 4, 8):
            rows.append(
                (
                    f"staleness {update} (lr {args.lr:g})",
                    measure(stale, trainer, prompts, sampling, 2),
                )
            )

    print(
        f"\nbuiltin:tiny warm start: {args.warm_start_steps} steps, "
        f"{metadata['seconds']:.1f} s to train ({'cached' if warm_seconds < 5 else 'trained now'}),"
        f" val sampled accuracy {metadata['val_sampled_accuracy']:.1%}, "
        f"greedy {metadata['val_greedy_accuracy']:.1%}"
    )
    print(
        f"hf engine throughput: {throughput:,.0f} response tokens/s "
        f"({len(batch_prompts)} prompts x n={args.n}, {args.threads} thread(s), CPU)\n"
    )
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"throughput": throughput, "warm_start": metadata, "rows": dict(rows)},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
