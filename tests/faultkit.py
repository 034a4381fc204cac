"""Fault injection for the fault suite: a transport that loses answers after the server acted.

``FaultyTransport(inner, schedule)`` wraps ``sandbox.transport()``. For each request it asks
the schedule what to do:

* ``None`` — pass through;
* ``"refuse"`` — raise ``httpx.ConnectError`` *before* the server sees the request;
* ``"timeout"`` / ``"reset"`` — let the server apply the request, then raise
  ``httpx.ReadTimeout`` / ``httpx.RemoteProtocolError`` (the answer is lost);
* ``"500"`` — let the server apply the request, then answer a 500 ``internal_error``.

A :class:`SeededSchedule` draws these with a seeded RNG (``p`` per request, only for the
methods asked), so a failing seed replays exactly. Counters say what was injected.
"""

from __future__ import annotations

import contextlib
import json
import random
import threading
from collections import Counter
from collections.abc import Callable

import httpx

FAULTS = ("refuse", "timeout", "reset", "500")
AFTER_COMMIT = ("timeout", "reset", "500")


class SeededSchedule:
    """Inject a fault into a request with probability ``p`` (POSTs only by default)."""

    def __init__(
        self,
        seed: int,
        p: float = 0.3,
        *,
        kinds: tuple[str, ...] = FAULTS,
        methods: tuple[str, ...] = ("POST",),
        paths: tuple[str, ...] = (),
    ) -> None:
        self.rng = random.Random(seed)
        self.p = p
        self.kinds = kinds
        self.methods = methods
        self.paths = paths
        self.enabled = True
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> str | None:
        if not self.enabled or request.method not in self.methods:
            return None
        if self.paths and not any(p in request.url.path for p in self.paths):
            return None
        with self._lock:
            if self.rng.random() >= self.p:
                return None
            return self.rng.choice(self.kinds)


class FaultyTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """See the module docstring."""

    def __init__(self, inner: object, schedule: Callable[[httpx.Request], str | None]) -> None:
        self.inner = inner
        self.schedule = schedule
        self.injected: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def _decide(self, request: httpx.Request) -> str | None:
        fault = self.schedule(request)
        with self._lock:
            self.requests.append(
                (request.method, request.url.path, request.headers.get("idempotency-key"))
            )
            if fault:
                self.injected[fault] += 1
        return fault

    @staticmethod
    def _after(fault: str, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if fault == "timeout":
            raise httpx.ReadTimeout("injected: answer lost (timeout)", request=request)
        if fault == "reset":
            raise httpx.RemoteProtocolError("injected: connection reset", request=request)
        body = json.dumps({"error": "internal_error", "message": "injected"}).encode()
        return httpx.Response(
            500, headers={"content-type": "application/json"}, content=body, request=request
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._decide(request)
        if fault == "refuse":
            raise httpx.ConnectError("injected: refused", request=request)
        response = self.inner.handle_request(request)  # type: ignore[attr-defined]
        if fault is None:
            return response
        response.read()
        return self._after(fault, request, response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._decide(request)
        if fault == "refuse":
            raise httpx.ConnectError("injected: refused", request=request)
        response = await self.inner.handle_async_request(request)  # type: ignore[attr-defined]
        if fault is None:
            return response
        await response.aread()
        return self._after(fault, request, response)

    def posts(self, fragment: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "POST" and fragment in r[1]]

    def close(self) -> None:
        """The sandbox owns the inner transport."""

    async def aclose(self) -> None:
        """The sandbox owns the inner transport."""


# ------------------------------------------------------------------------ lost responses
def _client(sandbox: object, key: str, transport: FaultyTransport) -> object:
    return sandbox.client(key, transport=transport, _sleep=lambda s: None)  # type: ignore[attr-defined]


def run_lost_responses(seed: int, sandbox: object, *, p: float = 0.35) -> dict[str, int]:
    """One seeded schedule: a stream records, flushes and closes while answers are lost.

    Returns the figures the suite and ``scripts/reliability.py`` check: ``lost`` (units counted
    but not paid for, or paid for but not counted — in micro-USDC), ``doubled`` (releases
    applied more than once), ``budget_gap`` (released + refunded − budget).
    """
    from pf_metered.errors import PFMeteredError
    from pf_metered.money import parse_rate
    from pf_metered.stream import PaymentStream

    rng = random.Random(seed)
    payer = sandbox.add_agent(balance="50")  # type: ignore[attr-defined]
    provider = sandbox.add_agent()  # type: ignore[attr-defined]
    schedule = SeededSchedule(seed, p)
    transport = FaultyTransport(sandbox.transport(), schedule)  # type: ignore[attr-defined]
    client = _client(sandbox, payer.api_key, transport)
    rate = rng.choice(["0.0000013", "0.001", "0.0000001", "0.37", "0.0123457"])
    budget = "20"
    stream = PaymentStream(
        client, provider.agent_id, rate, batch=rng.randint(1, 40), budget=budget,  # type: ignore[arg-type]
        background=False,
    )
    for _ in range(100):
        try:
            stream.open()
            break
        except PFMeteredError:
            continue
    units = 0
    for _ in range(rng.randint(1, 30)):
        n = rng.randint(0, 25)
        try:
            stream.record(n)
            units += n
        except PFMeteredError:
            pass
        with contextlib.suppress(PFMeteredError):
            stream.flush() if rng.random() < 0.3 else stream.pump()
    receipt = None
    for _ in range(200):
        try:
            receipt = stream.close()
            break
        except PFMeteredError:
            continue
    assert receipt is not None, f"seed {seed}: close never succeeded"
    escrow = sandbox.escrow(stream.escrow_id)  # type: ignore[attr-defined]
    expected = parse_rate(rate).micro_half_up(units)
    memos = [r.memo for r in escrow.releases]
    return {
        "units": units,
        "injected": sum(transport.injected.values()),
        "lost": abs(escrow.released_micro - expected) + abs(receipt.units - units),
        "doubled": len(memos) - len(set(memos)),
        "budget_gap": escrow.released_micro + escrow.refunded_micro - escrow.amount_micro,
        "receipt_gap": abs(receipt.paid_micro - escrow.released_micro),
    }
