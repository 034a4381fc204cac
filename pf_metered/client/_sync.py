"""``EscrowClient``: the blocking driver of the shared operations in ``_base``.

What this module is for: the I/O and nothing else — send a request with httpx, read at most
1 MiB of the answer, sleep when told to. Every decision (what to send, whether to retry, how
long to wait, what to believe) is made in ``_base``; ``_async.py`` is this file with ``await``.

What it must never do: decide anything about retries or answers itself, follow redirects, or
hold the API key anywhere but the base's :class:`~pf_metered.client._secrets.Secret`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

import httpx

from pf_metered.errors import ConfigError
from pf_metered.models import Escrow, FaucetClaim, Release, ReleasePage

from ._base import HISTORY_PAGE, Answer, BaseEscrowClient, BodyCollector, Op, Outcome, Sleep
from ._deadline import deadline, transport_for
from ._dialect import Dialect, RequestSpec
from ._retry import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    CallDeadline,
    check_total_timeout,
)
from ._secrets import trust_env_for

__all__ = ["EscrowClient"]

T = TypeVar("T")


class EscrowClient(BaseEscrowClient):
    """A blocking client of the Purple Flea escrow API (v1). Thread-safe; use as ``with``.

    >>> with EscrowClient() as client:                     # doctest: +SKIP
    ...     escrow = client.create_escrow("agent_b", "10.00")
    ...     client.release_partial(escrow.escrow_id, "0.25")
    ...     client.refund(escrow.escrow_id)
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
        _sleep: Callable[[float], None] | None = None,
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
        if transport is not None and not isinstance(transport, httpx.BaseTransport):
            raise ConfigError("EscrowClient needs a sync httpx transport (httpx.BaseTransport)")
        self._total_timeout = check_total_timeout(total_timeout)
        self._timeout_seconds = float(timeout)  # ok: seconds; validated by the base
        self._sleep: Callable[[float], None] = _sleep or time.sleep
        self._real_sleep = _sleep is None
        self._probe_shared = transport is None  # a client of its own transport probes alone
        trust_env = trust_env_for(self._base_url)  # never a proxy for http or loopback
        if transport is None:  # every socket operation bounded by the call's deadline
            transport = transport_for(self._base_url, trust_env=trust_env)
        self._http = httpx.Client(
            transport=transport,
            timeout=self._timeout,
            trust_env=trust_env,
            follow_redirects=False,
            headers=self._default_headers(),
        )

    # -- the driver ----------------------------------------------------------------------

    @property
    def total_timeout(self) -> float:
        """Seconds one call may take in all (attempts, read-backs and waits)."""
        return self._total_timeout

    def _run(self, op: Op[T]) -> T:
        clock = CallDeadline(self._total_timeout, real_sleep=self._real_sleep)
        outcome: Outcome = None
        try:
            while True:
                action = op.send(outcome)
                if isinstance(action, Sleep):
                    if clock.may_wait(action.seconds):
                        self._sleep(action.seconds)
                    outcome = None
                else:
                    outcome = clock.refusal() or self._send(action.spec, clock.at)
        except StopIteration as done:
            result: T = done.value
            return result

    def _send(self, spec: RequestSpec, at: float) -> Answer | Exception:
        left = at - time.monotonic()
        request = self._http.build_request(
            spec.method,
            self._url(spec),
            headers=self._headers(spec),
            content=spec.body,
            timeout=httpx.Timeout(min(self._timeout_seconds, max(left, 0.001))),
        )
        try:
            with deadline(at):  # every socket operation bounded by what is left
                response = self._http.send(request, stream=True)
                try:
                    body = BodyCollector(response.headers)
                    if not body.too_large:
                        for chunk in response.iter_bytes():
                            if not body.add(chunk):
                                break
                            if time.monotonic() >= at:  # any transport: a drip ends here
                                raise httpx.ReadTimeout(
                                    "the call's total deadline (total_timeout) passed while "
                                    "the answer was being read",
                                    request=request,
                                )
                finally:
                    response.close()
        except httpx.RequestError as exc:
            return exc
        return body.answer(response)

    def _resolve_blocking(self) -> None:
        self._run(self._resolve_gen())

    # -- the API -------------------------------------------------------------------------

    def resolve_dialect(self) -> str:
        """The dialect this client speaks (``"deployed"``, ``"v1"``): given, named by the
        base URL, or — with neither — asked of the host once (a read, no money moved)."""
        return self._run(self._resolve_gen()).name

    def create_escrow(
        self,
        to_agent_id: str,
        amount: str | int | Decimal,
        memo: str = "",
        auto_release_hours: int | None = None,
        idempotency_key: str | None = None,
    ) -> Escrow:
        """Lock ``amount`` USDC for ``to_agent_id``; the escrow as created."""
        return self._run(
            self._create_op(to_agent_id, amount, memo, auto_release_hours, idempotency_key)
        )

    def release_partial(
        self,
        escrow_id: str,
        amount: str | int | Decimal,
        memo: str = "",
        idempotency_key: str | None = None,
    ) -> Escrow:
        """Release ``amount`` USDC of the escrow to its provider; the escrow afterwards."""
        return self._run(self._release_op(escrow_id, amount, memo, idempotency_key))

    def get_escrow(self, escrow_id: str) -> Escrow:
        """The escrow with its most recent releases (``releases``, oldest first) and the
        total count (``release_count``); the whole history is :meth:`iter_releases`."""
        return self._run(self._get_op(escrow_id))

    def list_releases(
        self, escrow_id: str, offset: int = 0, limit: int = HISTORY_PAGE
    ) -> ReleasePage:
        """One page of the escrow's release history, oldest first."""
        return self._run(self._releases_op(escrow_id, offset, limit))

    def iter_releases(self, escrow_id: str, page_size: int = HISTORY_PAGE) -> Iterator[Release]:
        """Every release of the escrow, oldest first, read one page at a time."""
        offset = 0
        while True:
            page = self.list_releases(escrow_id, offset, page_size)
            yield from page.releases
            offset += len(page.releases)
            if not page.releases or offset >= page.release_count:
                return

    def list_escrows(self) -> list[Escrow]:
        """The caller's escrows, as payer or provider."""
        return self._run(self._list_op())

    def refund(self, escrow_id: str, idempotency_key: str | None = None) -> Escrow:
        """Return the unreleased rest to the payer and close the escrow."""
        return self._run(self._refund_op(escrow_id, idempotency_key))

    def release(self, escrow_id: str, memo: str = "", idempotency_key: str | None = None) -> Escrow:
        """Release *all* that remains of the escrow to its provider (either dialect; on the
        deployed one this is its only kind of release)."""
        return self._run(self._release_whole_op(escrow_id, memo, idempotency_key))

    def complete(self, escrow_id: str) -> Escrow:
        """Deployed dialect: the counterparty marks the work done."""
        return self._run(self._deployed_op(escrow_id, "complete"))

    def dispute(self, escrow_id: str, reason: str = "") -> Escrow:
        """Deployed dialect: either party disputes; the money stays locked."""
        return self._run(self._deployed_op(escrow_id, "dispute", reason))

    def claim_faucet(self) -> FaucetClaim:
        """Claim the faucet's one-time credit for a new agent."""
        return self._run(self._faucet_op())

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool. The client cannot be used afterwards."""
        self._http.close()

    def __enter__(self) -> EscrowClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
