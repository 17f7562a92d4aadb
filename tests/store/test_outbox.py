"""The background writer: order kept, transient failures retried, refusals skipped, memory
bounded, a bounded wait at the end."""

from __future__ import annotations

import time

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

from rcx.store.outbox import Operation, Outbox, is_transient


def test_transient_failures_are_those_a_later_attempt_can_fix() -> None:
    import requests

    assert is_transient(MlflowException("API request failed: Connection refused"))  # HTTP 500
    assert is_transient(MlflowException("busy", TEMPORARILY_UNAVAILABLE))  # 503
    assert is_transient(requests.ConnectionError("refused"))
    assert not is_transient(MlflowException("bad value", INVALID_PARAMETER_VALUE))  # 400
    assert not is_transient(FileNotFoundError("metrics.png"))
    assert not is_transient(TypeError("a bug"))


def test_writes_go_out_in_order_retried_until_they_succeed_refusals_skipped() -> None:
    sent: list[str] = []
    failures = {"b": 3}  # b fails 3 times (server away), then succeeds

    def send(name: str) -> None:
        if failures.get(name, 0) > 0:
            failures[name] -= 1
            raise MlflowException("Connection refused")
        if name == "c":
            raise MlflowException("bad value", INVALID_PARAMETER_VALUE)
        sent.append(name)

    outbox = Outbox(retry_delays_s=(0.01,))
    for step, name in enumerate("abcd", start=1):
        assert outbox.put(Operation(name, lambda name=name: send(name), step=step))
    assert outbox.flush(5)
    assert sent == ["a", "b", "d"]
    assert [r.operation.what for r in outbox.rejected] == ["c"]
    assert outbox.last_written_step == 4 and outbox.failure is None
    assert outbox.close() == []


def test_a_full_buffer_drops_new_writes_but_never_the_essential_one() -> None:
    outbox = Outbox(max_items=4, retry_delays_s=(0.01,))

    def down() -> None:
        raise MlflowException("Connection refused")

    assert outbox.put(Operation("metrics of step 1", down, 1, size=3))
    assert not outbox.put(Operation("metrics of step 2", down, 2, size=3))
    assert outbox.put(Operation("status FINISHED", down), essential=True)
    assert outbox.dropped == 1 and outbox.first_dropped == "metrics of step 2"
    started = time.monotonic()
    assert not outbox.flush(0.2)  # the server never answers: the wait ends on time
    assert time.monotonic() - started < 1
    assert isinstance(outbox.failure, MlflowException)
    assert [o.what for o in outbox.close()] == ["metrics of step 1", "status FINISHED"]
