"""``PaymentGate`` and ``AsyncPaymentGate``: the two drivers of :class:`~._core.GateCore`.

What this module is for: the reads, and nothing else. Every decision — what to read, whether to
admit, what is owed — is the core's; the sync driver reads with an ``EscrowClient`` while it
holds the stream's lock (so one read is in flight per stream), the async driver is the same
with ``await`` and an ``asyncio.Lock`` per stream.

What it must never do: decide anything itself, read an escrow the core did not ask for, or let a
client error escape as anything but a refusal (``unknown_escrow`` / ``unverifiable``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

from pf_metered.errors import InvalidInput, PFMeteredError
from pf_metered.models import Escrow
from pf_metered.money import format_usdc, parse_count
from pf_metered.provider._core import (
    DEFAULT_BATCH,
    DEFAULT_MAX_AGE,
    DEFAULT_MIN_INTERVAL,
    DEFAULT_READS_PER_MINUTE,
    AccountView,
    Admission,
    Claim,
    GateCore,
    PaymentRefused,
)

__all__ = [
    "AsyncPaymentGate",
    "GateBase",
    "PaymentGate",
    "PaymentRefused",
    "Reconciliation",
    "Served",
]


class Reconciliation:
    """The gate's count of a stream beside what its escrows show, after a fresh read.

    ``ok`` when every unit served was paid exactly: Σ released == ``half_up(rate × served)``.
    """

    def __init__(self, view: AccountView, cost_micro: int) -> None:
        self.view = view
        self.served = view.served
        self.paid_micro = view.paid_micro
        self.cost_micro = cost_micro
        self.ok = view.paid_micro == cost_micro and view.in_flight == 0

    def __repr__(self) -> str:
        return (
            f"Reconciliation(served={self.served}, cost={format_usdc(self.cost_micro)}, "
            f"paid={format_usdc(self.paid_micro)}, ok={self.ok})"
        )


class GateBase:
    """Arguments and the I/O-free face shared by both gates."""

    def __init__(
        self,
        client: Any,
        provider_id: str,
        rate: object,
        *,
        batch: int = DEFAULT_BATCH,
        credit: int | None = None,
        require_proof: bool = True,
        max_age: float = DEFAULT_MAX_AGE,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        reads_per_minute: int = DEFAULT_READS_PER_MINUTE,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] | None = None,
    ) -> None:
        if not callable(getattr(client, "get_escrow", None)):
            raise InvalidInput("client", "must be an EscrowClient / AsyncEscrowClient (get_escrow)")
        caps = getattr(client, "capabilities", None)
        self._client = client
        self._clock = clock
        self._sleep_fn = sleep
        self._core = GateCore(
            provider_id,
            rate,
            batch=batch,
            credit=credit,
            require_proof=require_proof,
            max_age=max_age,
            min_interval=min_interval,
            reads_per_minute=reads_per_minute,
            chain_holdback_micro=int(getattr(caps, "min_escrow_micro", 0) or 0),
            now=clock(),
        )

    @property
    def core(self) -> GateCore:
        return self._core

    @property
    def provider_id(self) -> str:
        return self._core.provider_id

    @property
    def credit(self) -> int:
        return self._core.credit

    def finish(self, admission: Admission, units: int | None = None) -> None:
        """Count the units served for an admitted request (default: what was admitted)."""
        self._core.finish(admission, units)

    def cancel(self, admission: Admission) -> None:
        """The work failed: count nothing for this admission."""
        self._core.cancel(admission)

    def accounts(self) -> list[AccountView]:
        """Every stream the gate has seen: served, paid, owed, status, refusals."""
        return self._core.views()

    def account(self, escrow_id: str) -> AccountView:
        return self._core.view(escrow_id)

    @staticmethod
    def claim_from(headers: Mapping[str, str]) -> Claim:
        return Claim.from_headers(headers)

    @staticmethod
    def _units(units: object) -> int:
        return parse_count(units, "units", allow_zero=False)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} provider={self._core.provider_id} rate={self._core.rate} "
            f"credit={self._core.credit}>"
        )


class PaymentGate(GateBase):
    """Serve only while the stream pays: the blocking gate (``EscrowClient``). Thread-safe.

    >>> gate = PaymentGate(client, "ag_me", rate="0.001", batch=100)   # doctest: +SKIP
    >>> with gate.serving(request.headers) as served:                 # doctest: +SKIP
    ...     answer = do_the_work()
    ...     served.units = answer.tokens                              # optional
    """

    def _sleep(self, seconds: float) -> None:
        (self._sleep_fn or time.sleep)(seconds)

    def admit(self, claim: Claim | Mapping[str, str], units: int = 1) -> Admission:
        """Verify the claim and admit ``units`` or raise :class:`PaymentRefused`."""
        units = self._units(units)
        if not isinstance(claim, Claim):
            claim = Claim.from_headers(claim)
        core = self._core
        acct = core.account(claim)
        with acct.lock:
            for eid in core.reads_needed(acct, claim, units, self._clock()):
                core.apply_read(acct, eid, self._read(eid), self._clock())
            wait = core.wait_before_refusing(acct, units, self._clock())
            if wait > 0:
                self._sleep(wait)
                for eid in core.reads_needed(acct, claim, units, self._clock()):
                    core.apply_read(acct, eid, self._read(eid), self._clock())
            return core.decide(acct, claim, units)

    def _read(self, escrow_id: str) -> Escrow | PFMeteredError:
        try:
            escrow: Escrow = self._client.get_escrow(escrow_id)
        except PFMeteredError as exc:
            return exc
        return escrow

    @contextlib.contextmanager
    def serving(self, claim: Claim | Mapping[str, str], units: int = 1) -> Iterator[Served]:
        """Admit, run the block, then count it (``served.units`` may change the count);
        a block that raises counts nothing."""
        admission = self.admit(claim, units)
        served = Served(admission)
        try:
            yield served
        except BaseException:
            self.cancel(admission)
            raise
        self.finish(admission, served.units)

    def reconcile(self, claim: Claim | Mapping[str, str] | str) -> Reconciliation:
        """Read every escrow of a stream afresh and compare its releases with what was served.

        Pass the consumer's headers after its close (``stream.provider_headers()``) on a
        tranche chain: the final tranche is locked and released at close, after the last
        request, and only a claim with the proof makes the gate count it.
        """
        core = self._core
        claim = _as_claim(claim)
        acct = core.account(claim)
        with acct.lock:
            for eid in _to_read(acct.reads, claim):
                core.apply_read(acct, eid, self._read(eid), self._clock())
            if claim.proof is not None:
                core.verify(acct, claim)
        view = core.view(claim.escrow_id)
        return Reconciliation(view, core.cost_micro(view.served))


class AsyncPaymentGate(GateBase):
    """The same gate over an ``AsyncEscrowClient``; use it from one event loop."""

    def __init__(self, client: Any, provider_id: str, rate: object, **kw: Any) -> None:
        super().__init__(client, provider_id, rate, **kw)
        self._alocks: dict[str, asyncio.Lock] = {}

    async def _sleep(self, seconds: float) -> None:
        if self._sleep_fn is None:
            await asyncio.sleep(seconds)
        else:
            result = self._sleep_fn(seconds)
            if asyncio.iscoroutine(result):
                await result

    def _alock(self, key: str) -> asyncio.Lock:
        lock = self._alocks.get(key)
        if lock is None:
            lock = self._alocks[key] = asyncio.Lock()
        return lock

    async def admit(self, claim: Claim | Mapping[str, str], units: int = 1) -> Admission:
        """Verify the claim and admit ``units`` or raise :class:`PaymentRefused`."""
        units = self._units(units)
        if not isinstance(claim, Claim):
            claim = Claim.from_headers(claim)
        core = self._core
        acct = core.account(claim)
        async with self._alock(acct.key):
            await self._refresh(acct, claim, units)
            with acct.lock:
                wait = core.wait_before_refusing(acct, units, self._clock())
            if wait > 0:
                await self._sleep(wait)
                await self._refresh(acct, claim, units)
            with acct.lock:
                return core.decide(acct, claim, units)

    async def _refresh(self, acct: Any, claim: Claim, units: int) -> None:
        core = self._core
        with acct.lock:
            wanted = core.reads_needed(acct, claim, units, self._clock())
        for eid in wanted:
            answer = await self._read(eid)
            with acct.lock:
                core.apply_read(acct, eid, answer, self._clock())

    async def _read(self, escrow_id: str) -> Escrow | PFMeteredError:
        try:
            escrow: Escrow = await self._client.get_escrow(escrow_id)
        except PFMeteredError as exc:
            return exc
        return escrow

    @contextlib.asynccontextmanager
    async def serving(
        self, claim: Claim | Mapping[str, str], units: int = 1
    ) -> AsyncIterator[Served]:
        """``async with gate.serving(headers) as served:`` — see :meth:`PaymentGate.serving`."""
        admission = await self.admit(claim, units)
        served = Served(admission)
        try:
            yield served
        except BaseException:
            self.cancel(admission)
            raise
        self.finish(admission, served.units)

    async def reconcile(self, claim: Claim | Mapping[str, str] | str) -> Reconciliation:
        """See :meth:`PaymentGate.reconcile`."""
        core = self._core
        claim = _as_claim(claim)
        acct = core.account(claim)
        async with self._alock(acct.key):
            for eid in _to_read(acct.reads, claim):
                answer = await self._read(eid)
                with acct.lock:
                    core.apply_read(acct, eid, answer, self._clock())
            if claim.proof is not None:
                with acct.lock:
                    core.verify(acct, claim)
        view = core.view(claim.escrow_id)
        return Reconciliation(view, core.cost_micro(view.served))


def _as_claim(claim: Claim | Mapping[str, str] | str) -> Claim:
    if isinstance(claim, Claim):
        return claim
    if isinstance(claim, str):
        return Claim.from_headers({"X-PF-Escrow": claim})
    return Claim.from_headers(claim)


def _to_read(reads: Mapping[str, object], claim: Claim) -> list[str]:
    return list(dict.fromkeys([*reads, *claim.escrow_ids()]))


class Served:
    """The handle of one admitted request: set ``units`` to what was really served."""

    __slots__ = ("admission", "units")

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.units: int = admission.units
