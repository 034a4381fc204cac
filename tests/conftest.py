"""Shared fixtures. Each section belongs to the module whose tests use it; add, don't rewrite."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

# -- client (tests/test_client*.py) ------------------------------------------------------

CANARY_KEY = "pf_live_CANARY0123456789abcdefSECRETtail"
"""A key that must never appear in any repr, str, exception or log record."""

CLIENT_CALLS = (
    "create_escrow",
    "release_partial",
    "get_escrow",
    "list_escrows",
    "refund",
    "claim_faucet",
)


def escrow_json(**over: Any) -> dict[str, Any]:
    """A sound v1 escrow answer, overridable field by field."""
    base: dict[str, Any] = {
        "escrow_id": "esc_1",
        "status": "locked",
        "amount": "10.00",
        "released": "0.00",
        "remaining": "10.00",
        "refunded": "0.00",
        "to_agent_id": "agent_b",
        "from_agent_id": "agent_a",
        "memo": "",
        "releases": [],
    }
    base.update(over)
    return base


class Recorder:
    """An httpx.MockTransport handler that records every request it is given."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def idempotency_keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.requests]

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


class ClientFacade:
    """One blocking face over ``EscrowClient`` or ``AsyncEscrowClient``, so a test is written
    once and run against both drivers; ``sleeps`` records every backoff asked for."""

    def __init__(self, mode: str, **kw: Any) -> None:
        from pf_metered.client import AsyncEscrowClient, EscrowClient

        self.mode = mode
        self.sleeps: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client: Any
        if mode == "sync":
            self.client = EscrowClient(_sleep=self.sleeps.append, **kw)
        else:

            async def _sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            self._loop = asyncio.new_event_loop()
            self.client = AsyncEscrowClient(_sleep=_sleep, **kw)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if self._loop is not None and name in CLIENT_CALLS:
            loop = self._loop

            def call(*args: Any, **kwargs: Any) -> Any:
                return loop.run_until_complete(attr(*args, **kwargs))

            return call
        return attr

    def close(self) -> None:
        if self._loop is None:
            self.client.close()
        else:
            self._loop.run_until_complete(self.client.aclose())
            self._loop.close()


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., ClientFacade]]:
    """``make_client(transport=..., **kw)``: a :class:`ClientFacade`, sync and async in turn."""
    made: list[ClientFacade] = []

    def factory(**kw: Any) -> ClientFacade:
        kw.setdefault("api_key", CANARY_KEY)
        kw.setdefault("base_url", "http://localhost/api/v1")
        facade = ClientFacade(request.param, **kw)
        made.append(facade)
        return facade

    yield factory
    for facade in made:
        facade.close()
