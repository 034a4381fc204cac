"""close() while a metered call is running: the call's unit is paid, on every store.

Issue 13.1. Each test holds a ``@metered`` call inside its body (reserved, not committed),
starts ``close()`` on another thread, waits until close announces that it waits for running
calls (a log record: no sleep), lets the call finish, and checks that the receipt counts the
call's unit and pays exactly rate × units. No timing is asserted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pf_metered import PaymentStream, metered
from pf_metered.errors import StreamClosed
from pf_metered.meter.store import MemoryStore, Store

RATE = "0.25"
RATE_MICRO = 250_000


class _Announced(logging.Handler):
    """Sets ``event`` when close says it is waiting for running calls."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waits for" in record.getMessage() and "running call" in record.getMessage():
            self.event.set()


@pytest.fixture
def announced() -> Iterator[_Announced]:
    handler = _Announced()
    logger = logging.getLogger("pf_metered.stream")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


def _run_close_during_call(agents: Any, store: Store | str, announced: _Announced) -> None:
    stream = PaymentStream(
        agents.client, agents.provider.agent_id, RATE, batch=2, budget="10", store=store
    ).open()
    inside = threading.Event()
    leave = threading.Event()

    @metered(stream=stream)
    def work(x: int) -> int:
        if x == 21:  # the call held open while close() runs
            inside.set()
            assert leave.wait(30), "the test never let the call finish"
        return x * 2

    for i in range(5):  # five units counted before the held call
        assert work(i) == i * 2
    results: list[object] = []
    receipts: list[object] = []
    caller = threading.Thread(target=lambda: results.append(work(21)))
    caller.start()
    assert inside.wait(30)
    closer = threading.Thread(target=lambda: receipts.append(stream.close()))
    closer.start()
    assert announced.event.wait(10), "close() did not wait for the running call"
    with pytest.raises(StreamClosed):  # a new call is refused while close drains
        work(0)
    leave.set()
    caller.join(30)
    closer.join(30)
    assert results == [42]
    receipt = stream.receipt
    assert receipt is not None and receipts == [receipt]
    assert receipt.units == 6
    assert receipt.paid_micro == 6 * RATE_MICRO
    assert receipt.paid_micro + receipt.refunded_micro == receipt.budget_micro
    escrow = agents.escrow(stream.escrow_id)
    assert escrow.released_micro == receipt.paid_micro


def test_memory_store(agents: Any, announced: _Announced) -> None:
    _run_close_during_call(agents, MemoryStore(), announced)


def test_sqlite_per_record(agents: Any, announced: _Announced, tmp_path: Path) -> None:
    _run_close_during_call(agents, str(tmp_path / "m.db"), announced)


def test_sqlite_group(agents: Any, announced: _Announced, tmp_path: Path) -> None:
    _run_close_during_call(agents, str(tmp_path / "m.db") + "?durability=group", announced)


def _redis(redis_url: str, redis_prefix: str, **kw: Any) -> Callable[[], Store]:
    from pf_metered.meter.redis_store import RedisStore

    return lambda: RedisStore(redis_url, prefix=redis_prefix, **kw)


@pytest.mark.redis
def test_redis_direct(
    agents: Any, announced: _Announced, redis_url: str, redis_prefix: str
) -> None:
    store = _redis(redis_url, redis_prefix)()
    try:
        _run_close_during_call(agents, store, announced)
    finally:
        store.close()  # type: ignore[attr-defined]


@pytest.mark.redis
def test_redis_leased(
    agents: Any, announced: _Announced, redis_url: str, redis_prefix: str
) -> None:
    store = _redis(redis_url, redis_prefix, chunk=32)()
    try:
        _run_close_during_call(agents, store, announced)
    finally:
        store.close()  # type: ignore[attr-defined]


def test_call_finishing_after_the_wait_is_logged_not_raised(
    agents: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``close_wait`` close goes on; the late call keeps its result, its unit is not
    counted (the receipt and the escrow agree) and a warning says so."""
    stream = PaymentStream(
        agents.client, agents.provider.agent_id, RATE, budget="10", close_wait=0.05
    ).open()
    inside = threading.Event()
    leave = threading.Event()

    @metered(stream=stream)
    def work() -> str:
        inside.set()
        assert leave.wait(30)
        return "done"

    results: list[object] = []
    caller = threading.Thread(target=lambda: results.append(work()))
    caller.start()
    assert inside.wait(30)
    receipt = stream.close()  # waits 0.05 s, then closes without the call
    leave.set()
    caller.join(30)
    assert results == ["done"]
    assert receipt.units == 0 and receipt.paid_micro == 0
    assert stream.late_units == 1
    assert any("after close" in r.getMessage() for r in caplog.records)


def test_async_stream_close_waits_for_a_running_coroutine(
    agents: Any, announced: _Announced
) -> None:
    """The async twin: the running coroutine is on the same loop as close(), so close waits
    off the loop; the coroutine then finishes and its unit is paid."""
    import asyncio

    from pf_metered import AsyncPaymentStream

    async def main() -> None:
        stream = await AsyncPaymentStream(
            agents.aclient, agents.provider.agent_id, RATE, batch=2, budget="10"
        ).open()
        inside, leave = asyncio.Event(), asyncio.Event()

        @metered(stream=stream)
        async def work(x: int) -> int:
            if x == 21:
                inside.set()
                await leave.wait()
            return x * 2

        for i in range(5):
            assert await work(i) == i * 2
        call = asyncio.ensure_future(work(21))
        await inside.wait()
        closing = asyncio.ensure_future(stream.close())
        loop = asyncio.get_running_loop()  # the loop runs close() while this waits
        assert await loop.run_in_executor(None, announced.event.wait, 10)
        leave.set()
        assert await call == 42
        receipt = await closing
        assert receipt.units == 6 and receipt.paid_micro == 6 * RATE_MICRO
        escrow = agents.escrow(stream.escrow_id)
        assert escrow.released_micro == receipt.paid_micro

    asyncio.run(main())
