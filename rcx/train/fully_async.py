"""Fully asynchronous rollout (``trainer.async_mode: fully_async``, after verl's fully-async
trainer): a pool of rollout processes generates prompt groups continuously while the trainer
updates, within a staleness cap.

The stream. The prompts form one deterministic stream: position ``p = (k-1)*B + i`` is prompt
``i`` of step k's batch as the synchronous trainer draws it (B = ``data.train_batch_size``),
sampled with that prompt's seed ``derive_seed(seed, f"gen/{i}", k)``. A *group* is one prompt
with its n responses. Sampling is seeded per prompt (:class:`rcx.rollout.hf.RowSeededSampler`),
so a group is a pure function of (seed, p, the weights version that generated it).

The pool. ``trainer.rollout_workers`` spawned processes (each its own hf engine copy, one torch
thread, SIGINT ignored: :class:`rcx.train.async_rollout.RolloutProcesses`, shared with
one_step_off) read one request queue of groups ``(p, prompt, seed)``. A worker takes the groups
waiting now (at most ``B // rollout_workers``, at least one), loads the newest published
weights from the :class:`~rcx.train.async_rollout.WeightBoard` once, generates them in one
engine call and sends each group back with its position and that version. Partial rollouts:
a group is always finished on the weights it started with, and labelled with that version,
even when newer weights are published meanwhile (the worker loads new weights only between
chunks); its rollout log-probs are therefore exactly those weights' log-probs, which is what
the correction (bypass and decoupled) needs.

The trainer (version v = the weights after v updates). At step k it publishes version k-1
(without stopping generation), tops the request queue up so that at most
``(cap + 1) * B`` groups are outstanding (requested and not yet consumed, cap =
``trainer.max_off_policy_threshold``), and needs B groups. The staleness of a group consumed at
step k is ``(k-1) - its version``. Requests are topped up when a version is published (and when
a group is dropped), so a group requested at step j starts on version >= j-1 and, consumed in
stream order, is never older than the cap: only a straggler (a group overtaken by later ones
from other workers) can be.

``trainer.max_off_policy_strategy`` (verl's name):

* ``drop``: the trainer takes arrived groups oldest stream position first; a group whose
  staleness is over the cap is dropped (never trained on; it counts as consumed) and later
  groups are taken instead. Logged: ``training/off_policy/dropped_samples`` (sequences dropped
  this step; 0 when none) and, when any, ``training/off_policy/dropped_samples_staleness/
  {mean,max,min}`` (verl's names).
* ``wait``: the trainer consumes in stream order (step k takes positions (k-1)B .. kB-1), and a
  worker does not start group p before the board holds version >= ``p // B - cap``
  (:func:`wait_gate`), so every group is trained on within the cap and none is dropped. No
  deadlock: the groups step k needs have gates <= k-1, published before the trainer waits.
  (With the top-up above the gate is already met when a group is requested; the workers check
  it anyway.)

Resume (``resume_mode: auto``): the checkpoint keeps the stream state (:meth:`GroupScheduler
.state_dict`: the lowest position not consumed, the positions consumed above it, the groups
dropped so far). A resumed run publishes its restored weights as version r (r = the
checkpoint's step), skips every group consumed before the checkpoint, and regenerates the ones
that were in flight or had arrived untaken, from version r on. It does not replay an
uninterrupted run exactly (which versions generate which groups depends on timing).
"""

from __future__ import annotations

import os
import queue
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

import torch

from rcx.rollout import RolloutBatch, SamplingParams, concat_rollouts
from rcx.train.async_rollout import (
    FAIL_AT_ENV,
    RolloutProcesses,
    WeightBoard,
    next_request,
    report_and_linger,
)

#: Test hook ``"P:V"``: the worker whose chunk holds stream position P loads its weights, then
#: waits until version V is published before it generates (a straggler, for the drop tests).
HOLD_ENV = "RCX_TEST_ROLLOUT_WORKER_HOLD"
#: How often (s) a worker waiting for a weight version looks at the board.
GATE_POLL_S = 0.02

DROPPED = "training/off_policy/dropped_samples"
DROPPED_STALENESS = "training/off_policy/dropped_samples_staleness"


def wait_gate(position: int, batch_size: int, cap: int) -> int:
    """The oldest weight version group ``position`` may start on in ``wait`` mode: it is
    consumed at step ``position // batch_size + 1``, whose trainer holds version
    ``position // batch_size``, so starting on ``>= position // batch_size - cap`` keeps its
    staleness within ``cap``."""
    return position // batch_size - cap


# ------------------------------------------------------------------------------ scheduler ---


@dataclass
class Taken:
    """One step's groups: their stream positions, versions and payloads (in the order the
    batch holds them), and the staleness of each group dropped since the previous batch."""

    positions: list[int]
    versions: list[int]
    payloads: list[Any]
    dropped_staleness: list[int] = field(default_factory=list)


class GroupScheduler:
    """Which stream positions to request, and which arrived groups a step takes or drops: the
    trainer's bookkeeping, no processes (see the module docstring).

    ``state`` is what :meth:`state_dict` returned at a checkpoint: the stream continues after
    every group consumed before it; in-flight groups are requested again.
    """

    def __init__(
        self,
        batch_size: int,
        cap: int,
        strategy: Literal["drop", "wait"],
        total_steps: int,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.batch_size, self.cap, self.strategy = batch_size, cap, strategy
        self.total_steps = total_steps
        state = state or {}
        self.frontier = int(state.get("frontier", 0))  # the lowest position not consumed
        self.consumed_above: set[int] = {int(p) for p in state.get("consumed_above", [])}
        self.dropped = int(state.get("dropped", 0))  # groups dropped over the whole run
        self.next_position = self.frontier
        self.outstanding: set[int] = set()  # requested, not consumed
        self.arrived: dict[int, tuple[int, Any]] = {}  # position -> (version, payload)
        self._dropped_now: list[int] = []  # staleness of the groups dropped for the next batch

    @property
    def window(self) -> int:
        """At most this many groups are outstanding: ``(cap + 1) * B``."""
        return (self.cap + 1) * self.batch_size

    def requests(self) -> list[int]:
        """The positions to request now (the window's free places; none past what the run
        still needs: every step's B groups plus one for each group dropped)."""
        limit = self.total_steps * self.batch_size + self.dropped
        out = []
        while len(self.outstanding) < self.window and self.next_position < limit:
            position = self.next_position
            self.next_position += 1
            if position in self.consumed_above:  # consumed before a checkpoint
                continue
            self.outstanding.add(position)
            out.append(position)
        return out

    def arrive(self, position: int, version: int, payload: Any = None) -> None:
        """Group ``position`` came back, generated by ``version`` (ignored when it is not
        outstanding)."""
        if position in self.outstanding:
            self.arrived[position] = (version, payload)

    def take(self, step: int) -> Taken | None:
        """Step ``step``'s B groups when they have arrived (None: not yet); in drop mode every
        arrived group older than the cap is dropped on the way."""
        trainer_version = step - 1
        if self.strategy == "wait":
            chosen = list(range(self.frontier, self.frontier + self.batch_size))
            if any(p not in self.arrived for p in chosen):
                return None
        else:
            chosen = []
            for position in sorted(self.arrived):
                staleness = trainer_version - self.arrived[position][0]
                if staleness > self.cap:
                    self._consume(position)
                    self.dropped += 1
                    self._dropped_now.append(staleness)
                elif len(chosen) < self.batch_size:
                    chosen.append(position)
            if len(chosen) < self.batch_size:
                return None
        groups = [self.arrived[p] for p in chosen]
        for position in chosen:
            self._consume(position)
        dropped, self._dropped_now = self._dropped_now, []
        return Taken(chosen, [v for v, _ in groups], [g for _, g in groups], dropped)

    def _consume(self, position: int) -> None:
        self.outstanding.discard(position)
        self.arrived.pop(position, None)
        self.consumed_above.add(position)
        while self.frontier in self.consumed_above:
            self.consumed_above.remove(self.frontier)
            self.frontier += 1

    def state_dict(self) -> dict[str, Any]:
        """The stream state a checkpoint keeps (in-flight and untaken groups are not kept)."""
        return {
            "frontier": self.frontier,
            "consumed_above": sorted(self.consumed_above),
            "dropped": self.dropped,
            "consumed": self.frontier + len(self.consumed_above),
        }


# -------------------------------------------------------------------------------- worker ---


@dataclass(frozen=True)
class GroupPlan:
    """What every worker of the pool needs to know (pickled into each)."""

    sampling: SamplingParams
    batch_size: int
    cap: int
    wait: bool  # max_off_policy_strategy == "wait": gate each group (wait_gate)
    chunk: int  # at most this many groups per engine call
    sampling_mask: bool = False

    def gate(self, position: int) -> int:
        """The oldest version group ``position`` may start on (0 in drop mode: any)."""
        return max(0, wait_gate(position, self.batch_size, self.cap)) if self.wait else 0

    def step_of(self, position: int) -> int:
        return position // self.batch_size + 1


def group_worker_main(
    engine: Any, board: WeightBoard, requests: Any, replies: Any, plan: GroupPlan
) -> None:
    """A pool process: one torch thread, SIGINT ignored; serve groups until a None request."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    fail_at = int(os.environ.get(FAIL_AT_ENV, "0") or 0)
    hold = (
        tuple(int(x) for x in os.environ[HOLD_ENV].split(":")) if HOLD_ENV in os.environ else None
    )
    serve_groups(engine, board, requests, replies, plan, os.getppid(), fail_at, hold)


def serve_groups(
    engine: Any,
    board: WeightBoard,
    requests: Any,
    replies: Any,
    plan: GroupPlan,
    parent: int,
    fail_at: int = 0,
    hold: tuple[int, int] | None = None,
) -> None:
    """The worker loop: take the groups waiting (``(position, prompt, seed)``, each its own
    request or several in a list request), load the newest
    weights (after each group's gate), generate, reply ``("chunk", positions, batch)`` per chunk.
    Any exception is sent as ``("error", position, traceback)``; returns on a None request or
    when the trainer process ``parent`` is gone."""
    pending, position = None, -1
    waiting: deque[Any] = deque()  # groups of a list request not started yet

    def next_group(block: bool) -> Any:
        """The next group request (a list request is unpacked), or None to stop; raises
        queue.Empty when not ``block`` and none is waiting."""
        if not waiting:
            got = next_request(requests, parent) if block else requests.get_nowait()
            if got is None:
                return None
            waiting.extend(got if isinstance(got, list) else [got])
        return waiting.popleft()

    try:
        while True:
            first = pending if pending is not None else next_group(block=True)
            pending, stop = None, False
            if first is None:
                return
            position = first[0]
            if not _wait_for_version(board, plan.gate(position), parent):
                return
            engine.weight_version = board.load_into(engine.model, engine.weight_version)
            chunk = [first]
            while len(chunk) < plan.chunk:
                try:
                    item = next_group(block=False)
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                if plan.gate(item[0]) > engine.weight_version:  # starts with the next chunk
                    pending = item
                    break
                chunk.append(item)
            positions = [p for p, _, _ in chunk]
            if fail_at and any(plan.step_of(p) == fail_at for p in positions):
                raise RuntimeError(f"injected rollout worker failure at step {fail_at}")
            if hold is not None and hold[0] in positions:
                _wait_for_version(board, hold[1], parent)
            extra = {"sampling_mask": True} if plan.sampling_mask else {}
            rollout = engine.generate(
                [prompt for _, prompt, _ in chunk],
                plan.sampling,
                seed=[seed for _, _, seed in chunk],
                **extra,
            )
            # One reply per chunk: each tensor crosses as a file descriptor with its own
            # handshake, so a reply per group cost the trainer ~0.1 s a step to receive.
            replies.put(("chunk", positions, rollout))
            if stop:
                return
    except BaseException:  # noqa: BLE001 - reported to the trainer, which fails the run
        report_and_linger(replies, requests, parent, position)


def _wait_for_version(board: WeightBoard, version: int, parent: int) -> bool:
    """Wait until the board holds ``version`` or newer; False when the trainer is gone."""
    last_check = time.monotonic()
    while int(board.version.value) < version:
        time.sleep(GATE_POLL_S)
        if time.monotonic() - last_check > 1.0:
            if os.getppid() != parent:
                return False
            last_check = time.monotonic()
    return True


# -------------------------------------------------------------------------------- driver ---

#: ``position -> (dataset index, prompt ids, sampling seed)``: the prompt stream.
PromptStream = Callable[[int], tuple[int, list[int], int]]


def prompt_stream(
    train_data: Any, batch_size: int, seed: int, derive: Callable[[int, str, int], int]
) -> PromptStream:
    """Position ``p = (k-1)*B + i`` -> prompt i of step k's batch as the synchronous trainer
    draws it, with its per-prompt seed."""

    @lru_cache(maxsize=64)
    def batch_of(step: int) -> list[int]:
        return train_data.batch(step - 1, batch_size, seed)

    def at(position: int) -> tuple[int, list[int], int]:
        step, i = position // batch_size + 1, position % batch_size
        index = batch_of(step)[i]
        return index, train_data.prompt_ids[index], derive(seed, f"gen/{i}", step)

    return at


class FullyAsyncRollout:
    """The trainer's side of the fully-async pool (see the module docstring). The pool starts
    on the first :meth:`rollout` and stops with :meth:`close`."""

    def __init__(
        self,
        engine: Any,
        sampling: SamplingParams,
        stream: PromptStream,
        total_steps: int,
        batch_size: int,
        cap: int = 4,
        strategy: Literal["drop", "wait"] = "drop",
        workers: int = 1,
        sampling_mask: bool = False,
        state: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.stream = stream
        self.workers = workers
        self.scheduler = GroupScheduler(batch_size, cap, strategy, total_steps, state)
        self.plan = GroupPlan(
            sampling,
            batch_size,
            cap,
            wait=strategy == "wait",
            chunk=max(1, batch_size // workers),
            sampling_mask=sampling_mask,
        )
        self.pool: RolloutProcesses | None = None
        self.last: Taken | None = None
        self._indices: list[int] = []

    def bind(self, model: torch.nn.Module) -> None:
        """The training model whose weights :meth:`rollout` publishes."""
        self.model = model

    @property
    def processes(self) -> list[Any]:
        return [] if self.pool is None else list(self.pool.processes)

    def close(self) -> None:
        """Stop the pool (groups in flight are discarded). Safe to call more than once."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    # ------------------------------------------------------------------ the step

    def rollout(self, step: int) -> RolloutBatch:
        """Publish version ``step - 1``, top the requests up, and return B groups (concatenated,
        one weight version per sample)."""
        if self.pool is None:
            self.pool = RolloutProcesses(
                self.engine, group_worker_main, self.workers, args=lambda i: (self.plan,)
            )
        self.engine.sync_weights(self.model, step - 1)
        self.pool.board.publish(self.engine.model.state_dict(), step - 1)
        self._request()
        while (reply := self.pool.receive(self._what, wait=False)) is not None:
            self._arrive(reply)
        while (taken := self.scheduler.take(step)) is None:
            self._request()  # a drop frees a place in the window
            self._arrive(self.pool.receive(self._what))
        self.last = taken
        self._indices = [self.stream(p)[0] for p in taken.positions]
        return concat_rollouts(taken.payloads, self.engine.pad_token_id)

    def _request(self) -> None:
        """Send the positions to request now, in lists of up to one chunk: a worker gets its
        chunk in one message (sent one by one, the groups trickled in and the worker, draining
        what had arrived, generated them a few at a time)."""
        assert self.pool is not None
        items = [(p, *self.stream(p)[1:]) for p in self.scheduler.requests()]
        for start in range(0, len(items), self.plan.chunk):
            self.pool.requests.put(items[start : start + self.plan.chunk])

    def _arrive(self, reply: tuple[str, Any, Any] | None) -> None:
        """A worker's chunk ``("chunk", positions, batch)``, split into its groups."""
        assert reply is not None
        kind, positions, batch = reply
        if kind == "chunk":
            n = self.plan.sampling.n
            for j, position in enumerate(positions):
                group = batch.groups(j, 1, n)
                self.scheduler.arrive(position, int(group.weight_version), group)

    def _what(self, position: int) -> str:
        b = self.scheduler.batch_size
        return f"group {position} (prompt {position % b} of step {position // b + 1})"

    # ------------------------------------------------------------------ the trainer's view

    def prompt_indices(self, nominal: list[int]) -> list[int]:
        """The dataset indices of the prompts the last batch answers, in its order (groups may
        come from other steps' batches than the nominal one)."""
        return list(self._indices)

    def step_metrics(self) -> dict[str, float]:
        """The last batch's drops, under verl's names."""
        dropped = [] if self.last is None else self.last.dropped_staleness
        out = {DROPPED: float(len(dropped) * self.plan.sampling.n)}
        if dropped:
            staleness = torch.tensor(dropped, dtype=torch.float64)
            out[f"{DROPPED_STALENESS}/mean"] = float(staleness.mean())
            out[f"{DROPPED_STALENESS}/max"] = float(staleness.max())
            out[f"{DROPPED_STALENESS}/min"] = float(staleness.min())
        return out

    def state_dict(self) -> dict[str, Any]:
        """The stream state a checkpoint keeps (:meth:`GroupScheduler.state_dict`)."""
        return self.scheduler.state_dict()


def make_fully_async_rollout(cfg: Any, host: Any) -> FullyAsyncRollout:
    """The fully-async driver for ``cfg``, bound to ``host``'s training model, rollout copy,
    sampling and data; a resumed run continues from ``host.async_state``."""
    from rcx.train.setup import derive_seed

    t = cfg.trainer
    driver = FullyAsyncRollout(
        host.engine,
        host.sampling,
        prompt_stream(host.train_data, cfg.data.train_batch_size, t.seed, derive_seed),
        host.total_steps,
        cfg.data.train_batch_size,
        cap=t.max_off_policy_threshold,
        strategy=t.max_off_policy_strategy,
        workers=t.rollout_workers,
        sampling_mask=cfg.actor_rollout_ref.actor.sampling_mask_replay,
        state=getattr(host, "async_state", None),
    )
    driver.bind(host.actor.model)
    return driver
