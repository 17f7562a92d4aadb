"""One-step-off-policy rollout (``trainer.async_mode: one_step_off``, verl's name): a separate
rollout process generates batch k+1 while the trainer updates on batch k.

The worker is one process (``spawn``), with its own HF engine, its own copy of the weights and
one torch thread; it ignores SIGINT (the trainer stops it). The trainer talks to it through two
queues and one board of weights:

* requests (trainer -> worker): ``(step, prompts, seeds, sampling_mask)``, or None to stop;
* replies (worker -> trainer): ``("started", step, version)`` once the worker has loaded the
  weights it generates ``step`` with, ``("done", step, rollout)`` with the batch, or
  ``("error", step, traceback)`` just before it exits;
* the :class:`WeightBoard`: the rollout copy of the weights (cast and quantised as
  ``rollout.dtype``/``rollout.quantization`` say) in shared CPU memory, with its version and a
  lock. The trainer publishes into it after an update without stopping generation; the worker
  copies the newest published weights into its engine before it starts a batch.

Schedule (step s, 1-based; version v = the weights after v updates)::

    step s   wait until the worker started batch s, publish version s-1, wait for batch s,
             request batch s+1 (the worker loads version s-1), update on batch s

so batch s is generated from version s-2 and trained on at version s-1: a staleness of exactly
1 from step 2 on (step 1: 0, the initial weights). The staleness is 1 by construction, so
one_step_off has no staleness cap. The trainer publishes version s-1 only after the worker
acknowledged it started batch s: which version a batch sees never depends on timing, and since
sampling is seeded per prompt (:class:`rcx.rollout.hf.RowSeededSampler`) a batch is a pure
function of (seed, step, the weights of its version), exactly what the synchronous trainer would
draw from those weights.

Resume: a checkpoint after step r keeps the trainer's rollout copy, which then holds version
r-1 (the weights batch r+1 is being generated with); a resumed run publishes that copy first,
so batch r+1, and every batch after it, is the one an uninterrupted run generates.

The process lifecycle, the weight board and the failure reporting (:class:`RolloutProcesses`)
are shared with the fully-async pool (:mod:`rcx.train.fully_async`).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from rcx.errors import RcxError
from rcx.rollout import RolloutBatch, SamplingParams

#: How often (s) a trainer waiting on the worker checks that it is still alive.
POLL_S = 0.2
#: How long (s) a stopping worker may take to finish its batch before it is terminated.
STOP_GRACE_S = 5.0
#: Test hook: the worker raises when asked for this step (an integer), to test crash handling.
FAIL_AT_ENV = "RCX_TEST_ROLLOUT_WORKER_FAIL_AT"


class RolloutWorkerError(RcxError, RuntimeError):
    """The rollout worker process failed or died; the message carries its error."""


# ------------------------------------------------------------------------------ staleness ---


def staleness_bound(cfg: Any) -> int:
    """The most updates a trained sample can be old under ``cfg``: ``weight_sync_interval - 1``
    in sync mode, 1 in one_step_off, the cap in fully_async (what a trained sample stays
    within, whatever is dropped)."""
    mode = cfg.trainer.async_mode
    if mode == "fully_async":
        return int(cfg.trainer.max_off_policy_threshold)
    if mode == "one_step_off":
        return 1
    return int(cfg.actor_rollout_ref.rollout.weight_sync_interval) - 1


def staleness_metrics(
    weight_version: torch.Tensor, trainer_version: int, bound: int = 0
) -> dict[str, float]:
    """Per-step staleness of the samples a step trains on, under verl's names
    (``training/off_policy/trajectory_staleness/{mean,max,min}``) and rcx's ``rollout/staleness``
    (the mean): staleness = ``trainer_version`` (updates so far) - the version of the weights
    that generated each sample. ``weight_version`` is (B,) long.

    The histogram: ``rollout/staleness_share/<k>``, the share of the samples k updates old, for
    every k from 0 to ``bound`` (:func:`staleness_bound`: the same keys every step, so that every
    curve has a point at every step), or to the step's maximum if that is higher (rcx's names;
    verl logs no histogram)."""
    staleness = (trainer_version - weight_version).double()
    mean = float(staleness.mean())
    out = {
        "rollout/staleness": mean,
        "training/off_policy/trajectory_staleness/mean": mean,
        "training/off_policy/trajectory_staleness/max": float(staleness.max()),
        "training/off_policy/trajectory_staleness/min": float(staleness.min()),
    }
    counts = torch.bincount(staleness.long().clamp(min=0), minlength=bound + 1)
    for k, count in enumerate(counts.tolist()):
        out[f"rollout/staleness_share/{k}"] = count / staleness.numel()
    return out


# ------------------------------------------------------------------------------- weights ---


@dataclass
class WeightBoard:
    """The published rollout weights in shared CPU memory, their version (-1: none yet) and the
    lock that keeps a publish and a load from interleaving. Picklable into a spawned process
    (the tensors and the counter stay shared)."""

    weights: dict[str, torch.Tensor]
    version: Any  # multiprocessing Value('q')
    lock: Any  # multiprocessing Lock

    @classmethod
    def like(cls, state: Mapping[str, torch.Tensor], ctx: Any) -> WeightBoard:
        """An empty board shaped like the state dict ``state``."""
        weights = {k: torch.zeros_like(v, device="cpu").share_memory_() for k, v in state.items()}
        return cls(weights, ctx.Value("q", -1), ctx.Lock())

    def publish(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy ``state`` (same names and shapes) onto the board as ``version``."""
        with self.lock, torch.no_grad():
            for name, value in state.items():
                self.weights[name].copy_(value)
            self.version.value = version

    def load_into(self, model: torch.nn.Module, have: int) -> int:
        """Copy the board into ``model`` when it holds a version other than ``have``; return
        the version ``model`` now holds. Raises when nothing was published yet."""
        with self.lock, torch.no_grad():
            version = int(self.version.value)
            if version < 0:
                raise RuntimeError("the rollout worker started a batch before any weights")
            if version != have:
                own = model.state_dict()
                for name, value in self.weights.items():
                    own[name].copy_(value)
            return version


# -------------------------------------------------------------------------------- worker ---


def worker_main(engine: Any, board: WeightBoard, requests: Any, replies: Any) -> None:
    """The rollout process: one torch thread, SIGINT ignored; serve requests until None.

    ``engine`` arrives pickled with its weights in shared memory that nothing else writes: it
    is this process's own copy. Any exception is sent as ``("error", step, traceback)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    fail_at = int(os.environ.get(FAIL_AT_ENV, "0") or 0)
    parent, step = os.getppid(), 0
    try:
        while (request := next_request(requests, parent)) is not None:
            step, prompts, seeds, sampling, sampling_mask = request
            engine.weight_version = board.load_into(engine.model, engine.weight_version)
            replies.put(("started", step, engine.weight_version))
            if step == fail_at:
                raise RuntimeError(f"injected rollout worker failure at step {step}")
            extra = {"sampling_mask": True} if sampling_mask else {}
            rollout = engine.generate(prompts, sampling, seed=seeds, **extra)
            replies.put(("done", step, rollout))
    except BaseException:  # noqa: BLE001 - reported to the trainer, which fails the run
        report_and_linger(replies, requests, parent, step)


#: How long (s) a failed worker stays alive after reporting, at most (see report_and_linger).
LINGER_S = 30.0


def report_and_linger(replies: Any, requests: Any, parent: int, key: Any) -> None:
    """Send the current exception as ``("error", key, traceback)``, then stay alive until the
    trainer stops this process (a None request), the trainer is gone, or :data:`LINGER_S`.

    Why stay: tensors already sent travel as file descriptors this process shares on demand;
    were it to exit now, the trainer could not receive a batch still queued ahead of the error
    (``FileNotFoundError`` while unpickling) and would never see the error itself."""
    replies.put(("error", key, traceback.format_exc()))
    deadline = time.monotonic() + LINGER_S
    while time.monotonic() < deadline and os.getppid() == parent:
        try:
            if requests.get(timeout=0.5) is None:
                return
        except queue.Empty:
            continue


def next_request(requests: Any, parent: int) -> Any:
    """The next request, or None when the trainer process ``parent`` is gone (killed without
    stopping the worker: the worker must not outlive it)."""
    while True:
        try:
            return requests.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


@contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile: a spawned child inherits the disposition from its first
    instruction, so a Ctrl-C while it imports cannot kill it with a traceback."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --------------------------------------------------------------------------------- pool ---


class RolloutProcesses:
    """``count`` spawned rollout processes (``name``) around one :class:`WeightBoard`, one
    request queue they all read and one reply queue they all write: the lifecycle and failure
    reporting both async modes share.

    Each process runs ``target(engine, board, requests, replies, *args(i))`` with its own copy of
    ``engine`` (a clone whose storages pickle into shared memory; kept referenced here, and
    never written here, until the processes stop). A process stops on a None request; an
    error reply ``("error", key, traceback)`` or a death without one raises
    :class:`RolloutWorkerError` in :meth:`receive`.
    """

    def __init__(
        self,
        engine: Any,
        target: Callable[..., None],
        count: int = 1,
        args: Callable[[int], tuple[Any, ...]] = lambda i: (),
        name: str = "rcx-rollout",
    ) -> None:
        ctx = mp.get_context("spawn")
        self.board = WeightBoard.like(engine.model.state_dict(), ctx)
        self.requests, self.replies = ctx.Queue(), ctx.Queue()
        self._engines = [_clone_engine(engine) for _ in range(count)]
        self.processes = [
            ctx.Process(
                target=target,
                args=(own, self.board, self.requests, self.replies, *args(i)),
                name=name,
                daemon=True,
            )
            for i, own in enumerate(self._engines)
        ]
        with sigint_ignored():
            for process in self.processes:
                process.start()

    def close(self) -> None:
        """Stop the processes (each finishes its work, or is terminated after
        :data:`STOP_GRACE_S`) and release the queues. Safe to call more than once."""
        processes, self.processes = self.processes, []
        if not processes:
            return
        for process in processes:
            if process.is_alive():
                with suppress(OSError, ValueError):
                    self.requests.put(None)
        deadline = time.monotonic() + STOP_GRACE_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in processes:
            if process.is_alive():
                process.terminate()
                process.join(STOP_GRACE_S)
            if process.is_alive():
                process.kill()
                process.join()
        for q in (self.requests, self.replies):
            q.cancel_join_thread()
            q.close()
        self._engines = []

    def receive(self, what: Callable[[Any], str], wait: bool = True) -> tuple[str, Any, Any] | None:
        """The next reply ``(kind, key, payload)`` (None when ``wait`` is false and none is
        waiting); raises :class:`RolloutWorkerError` on an error reply (``what(key)`` says what
        the worker was generating) or when a process died without one."""
        while True:
            try:
                reply = self.replies.get(timeout=POLL_S) if wait else self.replies.get_nowait()
            except (OSError, EOFError) as exc:  # its tensors' sender is gone: it died
                codes = ", ".join(f"pid {p.pid}: {p.exitcode}" for p in self.processes)
                raise RolloutWorkerError(
                    f"a reply of the rollout worker could not be received ({exc}); a worker "
                    f"died before the trainer read its batch (exit codes: {codes})"
                ) from None
            except queue.Empty:
                dead = next((p for p in self.processes if not p.is_alive()), None)
                if dead is None:
                    if not wait:
                        return None
                    continue
                try:  # its last words may still be in the pipe
                    reply = self.replies.get(timeout=POLL_S)
                except queue.Empty:
                    raise RolloutWorkerError(
                        f"the rollout worker (pid {dead.pid}) died with exit code "
                        f"{dead.exitcode} and reported no error"
                    ) from None
            kind, key, payload = reply
            if kind == "error":
                raise RolloutWorkerError(
                    f"the rollout worker failed while generating {what(key)}:\n{payload}"
                )
            return kind, key, payload


# -------------------------------------------------------------------------------- driver ---

#: ``(step) -> (prompts, seeds)``: the prompts of a step and one sampling seed per prompt.
StepPrompts = Callable[[int], tuple[list[list[int]], list[int]]]


class OneStepOffRollout:
    """The trainer's side of the one-step-off rollout worker (see the module docstring).

    ``engine`` is the trainer's rollout copy (an :class:`rcx.rollout.hf.HFRolloutEngine`): it
    holds what was last published, so a checkpoint keeps the weights of the batch in flight.
    The worker starts on the first :meth:`rollout` and stops with :meth:`close`.
    """

    def __init__(
        self,
        engine: Any,
        sampling: SamplingParams,
        step_prompts: StepPrompts,
        total_steps: int,
        sampling_mask: bool = False,
    ) -> None:
        self.engine = engine
        self.sampling = sampling
        self.step_prompts = step_prompts
        self.total_steps = total_steps
        self.sampling_mask = sampling_mask
        self.requested: int | None = None  # the batch the worker was last asked for
        self.started: dict[int, int] = {}  # step -> the version the worker loaded for it
        self.pool: RolloutProcesses | None = None

    @property
    def process(self) -> Any:
        """The worker process (None before the first :meth:`rollout` and after :meth:`close`)."""
        return self.pool.processes[0] if self.pool is not None and self.pool.processes else None

    # ------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        self.pool = RolloutProcesses(self.engine, worker_main)
        self.board, self.requests = self.pool.board, self.pool.requests

    def close(self) -> None:
        """Stop the worker (it finishes its batch, or is terminated after
        :data:`STOP_GRACE_S`) and release the queues. Safe to call more than once."""
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    # ------------------------------------------------------------------ the trainer's view

    def prompt_indices(self, nominal: list[int]) -> list[int]:
        """The dataset indices of the prompts the last batch answers: the step's own."""
        return nominal

    def step_metrics(self) -> dict[str, float]:
        """Metrics of the last batch beyond staleness: none (nothing is ever dropped)."""
        return {}

    def state_dict(self) -> dict[str, Any] | None:
        """Nothing beyond the rollout copy, which the checkpoint keeps."""
        return None

    # ------------------------------------------------------------------ the schedule

    def rollout(self, step: int) -> RolloutBatch:
        """Batch ``step`` (generated from version ``step - 2``, ``step - 1`` on the first step
        of a session unless the engine holds the restored copy of version ``step - 2``); then
        ask for batch ``step + 1``, which the worker generates during this step's update."""
        if self.pool is None:
            self._start()
        if self.requested != step:
            self._first_request(step)
        else:
            self._wait_started(step)
            self._publish_from_trainer(step - 1)
        rollout = self._wait_done(step)
        if step < self.total_steps:
            self._request(step + 1)
        return rollout

    def _first_request(self, step: int) -> None:
        """Start a session at ``step``: publish the restored copy of version ``step - 2`` when
        the engine holds one (a resumed one-step-off run), else the trainer's weights of
        version ``step - 1``; ask for batch ``step``."""
        restored = step >= 2 and self.engine.weight_version == step - 2
        if not restored:
            self._publish_from_trainer(step - 1)
        else:
            self.board.publish(self.engine.model.state_dict(), step - 2)
        self._request(step)
        if restored:
            self._wait_started(step)
            self._publish_from_trainer(step - 1)

    def bind(self, model: torch.nn.Module) -> None:
        """The training model whose weights :meth:`rollout` publishes."""
        self.model = model

    def _publish_from_trainer(self, version: int) -> None:
        """Refresh the trainer's rollout copy from the training model (cast, quantised) and
        publish it as ``version``."""
        self.engine.sync_weights(self.model, version)
        self.board.publish(self.engine.model.state_dict(), version)

    def _request(self, step: int) -> None:
        prompts, seeds = self.step_prompts(step)
        self.requests.put((step, prompts, seeds, self.sampling, self.sampling_mask))
        self.requested = step

    def _wait_started(self, step: int) -> int:
        while step not in self.started:
            self._receive()
        return self.started.pop(step)

    def _wait_done(self, step: int) -> RolloutBatch:
        while True:
            kind, got, payload = self._receive()
            if kind == "done":
                if got != step:
                    raise RolloutWorkerError(f"rollout worker sent batch {got}, expected {step}")
                self.started.pop(step, None)
                return payload

    def _receive(self) -> tuple[str, int, Any]:
        """The next reply; raises :class:`RolloutWorkerError` on an error reply or when the
        worker died without one."""
        assert self.pool is not None
        reply = self.pool.receive(lambda step: f"batch {step}")
        assert reply is not None
        kind, step, payload = reply
        if kind == "started":
            self.started[step] = payload
        return kind, step, payload


def _clone_engine(engine: Any) -> Any:
    """A copy of ``engine`` with its own weights (the tokenizer is shared: read-only)."""
    import copy

    clone = copy.copy(engine)
    clone.model = copy.deepcopy(engine.model)
    return clone


def step_prompt_source(
    train_data: Any, batch_size: int, seed: int, derive: Callable[[int, str, int], int]
) -> StepPrompts:
    """``step -> (prompts, seeds)`` as the trainer draws them with one process: prompt order a
    pure function of (seed, step), one sampling seed per prompt from its place in the batch."""

    def prompts_of(step: int) -> tuple[list[list[int]], list[int]]:
        indices = train_data.batch(step - 1, batch_size, seed)
        prompts = [train_data.prompt_ids[i] for i in indices]
        seeds = [derive(seed, f"gen/{i}", step) for i in range(len(prompts))]
        return prompts, seeds

    return prompts_of


class AsyncRollout(Protocol):
    """What a step asks of an asynchronous rollout driver (one_step_off, fully_async)."""

    def rollout(self, step: int) -> RolloutBatch: ...

    def prompt_indices(self, nominal: list[int]) -> list[int]: ...

    def step_metrics(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


def make_async_rollout(cfg: Any, host: Any) -> AsyncRollout | None:
    """The asynchronous rollout for ``cfg`` (None in sync mode), bound to ``host``'s training
    model, rollout copy, sampling and data (a :class:`rcx.train.trainer.Trainer`); a resumed
    fully_async run continues from ``host.async_state`` (what the checkpoint kept)."""
    if cfg.trainer.async_mode == "sync":
        return None
    if cfg.trainer.async_mode == "fully_async":
        from rcx.train.fully_async import make_fully_async_rollout

        return make_fully_async_rollout(cfg, host)
    from rcx.train.setup import derive_seed

    driver = OneStepOffRollout(
        host.engine,
        host.sampling,
        step_prompt_source(
            host.train_data, cfg.data.train_batch_size, cfg.trainer.seed, derive_seed
        ),
        host.total_steps,
        sampling_mask=cfg.actor_rollout_ref.actor.sampling_mask_replay,
    )
    driver.bind(host.actor.model)
    return driver


def check_prompts_match(expected: Sequence[Sequence[int]], rollout: RolloutBatch) -> None:
    """Guard: the worker's batch answers the prompts the step drew (same count)."""
    answered = int(rollout.prompt_index.max()) + 1 if rollout.prompt_index.numel() else 0
    if answered != len(expected):
        raise RolloutWorkerError(
            f"the rollout worker answered {answered} prompts, the step drew {len(expected)}"
        )
