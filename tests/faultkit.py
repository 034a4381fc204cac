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
