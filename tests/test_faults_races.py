"""Fault suite 4: many threads and thousands of asyncio tasks record while the count-triggered
and timer-triggered flushes race. Exact totals, and never two releases of one stream in flight.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.sandbox import Sandbox
from pf_metered.stream import AsyncPaymentStream, PaymentStream

RATE = "0.0000313"


class InFlight(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Counts release-partial requests in flight per escrow; remembers the maximum."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.max = 0
        self.releases = 0

    def _enter(self, request: httpx.Request) -> str | None:
        if not request.url.path.endswith("release-partial"):
            return None
        escrow = request.url.path.split("/")[-2]
        with self.lock:
            self.now[escrow] = self.now.get(escrow, 0) + 1
            self.max = max(self.max, self.now[escrow])
            self.releases += 1
        return escrow

    def _leave(self, escrow: str | None) -> None:
        if escrow is not None:
            with self.lock:
                self.now[escrow] -= 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        escrow = self._enter(request)
        try:
            return self.inner.handle_request(request)  # type: ignore[attr-defined]
        finally:
            self._leave(escrow)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        escrow = self._enter(request)
        try:
            return await self.inner.handle_async_request(request)  # type: ignore[attr-defined]
        finally:
            self._leave(escrow)


@pytest.mark.parametrize("store", ["memory", "sqlite-group", "sqlite"])
def test_threads_race_count_and_timer_flushes(tmp_path: Path, store: str) -> None:
    threads, per_thread = 32, (20 if store == "sqlite" else 500)
    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="100"), sb.add_agent()
        wire = InFlight(sb.transport())
        client = sb.client(payer.api_key, transport=wire)
        st = {
            "memory": None,
            "sqlite": SQLiteStore(tmp_path / "j.db"),
            "sqlite-group": SQLiteStore(tmp_path / "g.db", durability="group"),
        }[store]
        stream = PaymentStream(
            client, provider.agent_id, RATE, batch=37, every="0.001", budget="10", store=st
        )
        start = threading.Barrier(threads + 1)

        def work() -> None:
            start.wait()
            for i in range(per_thread):
                stream.record(1 + i % 2)
                if i % 97 == 0:
                    stream.flush()  # a caller's flush races the worker's

        with stream:
            pool = [threading.Thread(target=work) for _ in range(threads)]
            for t in pool:
                t.start()
            start.wait()
            for t in pool:
                t.join()
        units = threads * sum(1 + i % 2 for i in range(per_thread))
        receipt = stream.receipt
        assert receipt is not None and receipt.units == units
        escrow = sb.escrow(stream.escrow_id)
        assert escrow.released_micro == stream.meter.rate.micro_half_up(units)
        assert escrow.released_micro + escrow.refunded_micro == escrow.amount_micro
        assert wire.max == 1
        assert wire.releases > 3


def test_thousands_of_tasks_race(tmp_path: Path) -> None:
    async def go() -> None:
        with Sandbox() as sb:
            payer, provider = sb.add_agent(balance="100"), sb.add_agent()
            wire = InFlight(sb.transport())
            client = sb.async_client(payer.api_key, transport=wire)
            stream = AsyncPaymentStream(
                client, provider.agent_id, RATE, batch=50, every="0.001", budget="10"
            )
            async with stream:

                async def task(i: int) -> None:
                    for j in range(5):
                        stream.record(1 + (i + j) % 3)
                        await asyncio.sleep(0)
                        if (i + j) % 701 == 0:
                            await stream.flush()

                await asyncio.gather(*(task(i) for i in range(3000)))
            units = sum(1 + (i + j) % 3 for i in range(3000) for j in range(5))
            assert stream.receipt is not None and stream.receipt.units == units
            escrow = sb.escrow(stream.escrow_id)
            assert escrow.released_micro == stream.meter.rate.micro_half_up(units)
            assert escrow.released_micro + escrow.refunded_micro == escrow.amount_micro
            assert wire.max == 1
            await client.aclose()

    asyncio.run(go())
