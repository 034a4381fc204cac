"""``AsyncEscrowClient``: the asyncio driver of the shared operations in ``_base``.

What this module is for: the I/O and nothing else — send a request with httpx, read at most
1 MiB of the answer, sleep when told to. Every decision (what to send, whether to retry, how
long to wait, what to believe) is made in ``_base``; this is ``_sync.py`` with ``await``.

What it must never do: decide anything about retries or answers itself, follow redirects, or
hold the API key anywhere but the base's :class:`~pf_metered.client._secrets.Secret`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

import httpx

from pf_metered.errors import ConfigError
from pf_metered.models import Escrow, FaucetClaim, Release, ReleasePage

from ._base import HISTORY_PAGE, Answer, BaseEscrowClient, BodyCollector, Op, Outcome, Sleep
from ._dialect import Dialect, RequestSpec
from ._retry import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    CallDeadline,
    check_total_timeout,
)
from ._secrets import trust_env_for

__all__ = ["AsyncEscrowClient"]

T = TypeVar("T")


class AsyncEscrowClient(BaseEscrowClient):
    """An asyncio client of the Purple Flea escrow API (v1). Use as ``async with``.

    >>> async with AsyncEscrowClient() as client:          # doctest: +SKIP
    ...     escrow = await client.create_escrow("agent_b", "10.00")
    ...     await client.release_partial(escrow.escrow_id, "0.25")
    ...     await client.refund(escrow.escrow_id)
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        total_timeout: float = DEFAULT_TOTAL_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        server_honours_idempotency: bool | None = None,
        dialect: Dialect | str | None = None,
        rate_limits: Any = None,
        _sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(
            api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=max_retries,
            server_honours_idempotency=server_honours_idempotency,
            dialect=dialect,
            rate_limits=rate_limits,
        )
        if transport is not None and not isinstance(transport, httpx.AsyncBaseTransport):
            raise ConfigError(
                "AsyncEscrowClient needs an async httpx transport (httpx.AsyncBaseTransport)"
            )
        self._total_timeout = check_total_timeout(total_timeout)
        self._timeout_seconds = float(timeout)  # ok: seconds; validated by the base
        self._sleep: Callable[[float], Awaitable[None]] = _sleep or asyncio.sleep
        self._real_sleep = _sleep is None
        self._transport_arg = transport
        self._probe_shared = transport is None  # a client of its own transport probes alone
        self._http = self._new_pool()
        self._http_loop: asyncio.AbstractEventLoop | None = None

    def _new_pool(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=self._transport_arg,
            timeout=self._timeout,
            trust_env=trust_env_for(self._base_url),  # never a proxy for http or loopback
            follow_redirects=False,
            headers=self._default_headers(),
        )

    def _pool(self) -> httpx.AsyncClient:
        """The HTTP pool for the running loop.

        Why per loop: httpx's pooled connections belong to the loop that opened them, and a
        request from another loop fails on them ("Event loop is closed") — say the client is
        used in one ``asyncio.run`` and a stream is closed in the next. A new loop gets a new
        pool; the old one is left to its loop (it cannot be closed from this one).
        """
        loop = asyncio.get_running_loop()
        if self._http_loop is None:
            self._http_loop = loop
        elif loop is not self._http_loop:
            self._http_loop = loop
            self._http = self._new_pool()
        return self._http

    # -- the driver ----------------------------------------------------------------------

    @property
    def total_timeout(self) -> float:
        """Seconds one call may take in all (attempts, read-backs and waits)."""
        return self._total_timeout

    async def _run(self, op: Op[T]) -> T:
        clock = CallDeadline(self._total_timeout, real_sleep=self._real_sleep)
        outcome: Outcome = None
        try:
            while True:
                action = op.send(outcome)
                if isinstance(action, Sleep):
                    if clock.may_wait(action.seconds):
                        await self._sleep(action.seconds)
                    outcome = None
                else:
                    outcome = clock.refusal() or await self._send(action.spec, clock.at)
        except StopIteration as done:
            result: T = done.value
            return result

    async def _send(self, spec: RequestSpec, at: float) -> Answer | Exception:
        left = max(at - time.monotonic(), 0.001)
        request = self._pool().build_request(
            spec.method,
            self._url(spec),
            headers=self._headers(spec),
            content=spec.body,
            timeout=httpx.Timeout(min(self._timeout_seconds, left)),
        )
        try:
            # the whole exchange, however the server paces its bytes, within what is left
            return await asyncio.wait_for(self._exchange_io(request), left)
        except asyncio.TimeoutError:
            return httpx.ReadTimeout(
                "the call's total deadline (total_timeout) passed during the exchange",
                request=request,
            )

    async def _exchange_io(self, request: httpx.Request) -> Answer | Exception:
        try:
            response = await self._pool().send(request, stream=True)
            try:
                body = BodyCollector(response.headers)
                if not body.too_large:
                    async for chunk in response.aiter_bytes():
                        if not body.add(chunk):
                            break
            finally:
                await response.aclose()
        except httpx.RequestError as exc:
            return exc
        return body.answer(response)

    def _resolve_blocking(self) -> None:
        """Probe from a property (``capabilities``), where nothing can be awaited: one
        blocking read over a sync client of the same transport. ``await
        resolve_dialect()`` first avoids blocking the loop."""
        from ._sync import EscrowClient

        transport = self._transport_arg
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise ConfigError(
                "the dialect is not known yet and this transport is async only: "
                "await client.resolve_dialect() first, or pass dialect="
            )
        with EscrowClient(
            self._secret.reveal(), transport=transport, timeout=self._timeout.read or 30.0
        ) as probe:
            probe._probe_shared = self._probe_shared
            probe._probe_host = self._probe_host
            dialect = probe._run(probe._resolve_gen())
            self._adopt(dialect, probe.base_url)

    # -- the API -------------------------------------------------------------------------

    async def resolve_dialect(self) -> str:
        """The dialect this client speaks (``"deployed"``, ``"v1"``): given, named by the
        base URL, or — with neither — asked of the host once (a read, no money moved)."""
        return (await self._run(self._resolve_gen())).name

    async def create_escrow(
        self,
        to_agent_id: str,
        amount: str | int | Decimal,
        memo: str = "",
        auto_release_hours: int | None = None,
        idempotency_key: str | None = None,
    ) -> Escrow:
        """Lock ``amount`` USDC for ``to_agent_id``; the escrow as created."""
        return await self._run(
            self._create_op(to_agent_id, amount, memo, auto_release_hours, idempotency_key)
        )

    async def release_partial(
        self,
        escrow_id: str,
        amount: str | int | Decimal,
        memo: str = "",
        idempotency_key: str | None = None,
    ) -> Escrow:
        """Release ``amount`` USDC of the escrow to its provider; the escrow afterwards."""
        return await self._run(self._release_op(escrow_id, amount, memo, idempotency_key))

    async def get_escrow(self, escrow_id: str) -> Escrow:
        """The escrow with its most recent releases (``releases``, oldest first) and the
        total count (``release_count``); the whole history is :meth:`iter_releases`."""
        return await self._run(self._get_op(escrow_id))

    async def list_releases(
        self, escrow_id: str, offset: int = 0, limit: int = HISTORY_PAGE
    ) -> ReleasePage:
        """One page of the escrow's release history, oldest first."""
        return await self._run(self._releases_op(escrow_id, offset, limit))

    async def iter_releases(
        self, escrow_id: str, page_size: int = HISTORY_PAGE
    ) -> AsyncIterator[Release]:
        """Every release of the escrow, oldest first, read one page at a time."""
        offset = 0
        while True:
            page = await self.list_releases(escrow_id, offset, page_size)
            for release in page.releases:
                yield release
            offset += len(page.releases)
            if not page.releases or offset >= page.release_count:
                return

    async def list_escrows(self) -> list[Escrow]:
        """The caller's escrows, as payer or provider."""
        return await self._run(self._list_op())

    async def refund(self, escrow_id: str, idempotency_key: str | None = None) -> Escrow:
        """Return the unreleased rest to the payer and close the escrow."""
        return await self._run(self._refund_op(escrow_id, idempotency_key))

    async def release(
        self, escrow_id: str, memo: str = "", idempotency_key: str | None = None
    ) -> Escrow:
        """Release *all* that remains of the escrow to its provider (either dialect; on the
        deployed one this is its only kind of release)."""
        return await self._run(self._release_whole_op(escrow_id, memo, idempotency_key))

    async def complete(self, escrow_id: str) -> Escrow:
        """Deployed dialect: the counterparty marks the work done."""
        return await self._run(self._deployed_op(escrow_id, "complete"))

    async def dispute(self, escrow_id: str, reason: str = "") -> Escrow:
        """Deployed dialect: either party disputes; the money stays locked."""
        return await self._run(self._deployed_op(escrow_id, "dispute", reason))

    async def claim_faucet(self) -> FaucetClaim:
        """Claim the faucet's one-time credit for a new agent."""
        return await self._run(self._faucet_op())

    # -- lifetime ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connection pool (of this loop). The client cannot be used afterwards."""
        if self._http_loop is None or self._http_loop is asyncio.get_running_loop():
            await self._http.aclose()

    async def __aenter__(self) -> AsyncEscrowClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
