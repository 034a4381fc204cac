"""What the sync and async payment streams share: arguments, the hot path, status, failures.

Like httpx's ``BaseClient``, everything that is not I/O lives here once; ``PaymentStream`` and
``AsyncPaymentStream`` repeat only the methods that send requests (open, the background
sender, flush, close). The decisions themselves are the meter's (sans-I/O actions).

What this module must never do: perform a request, sleep, or take a lock that a sender holds
while it waits on the network. ``record`` touches only the store's counter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from typing import Any, Final, Protocol

from pf_metered.client._base import memo_tag
from pf_metered.errors import (
    AmbiguousOutcome,
    APIConnectionError,
    APITimeout,
    BudgetExhausted,
    InvalidInput,
    RateLimited,
    ServerError,
    StoreError,
    StreamClosed,
)
from pf_metered.meter.core import Meter, plan_stream
from pf_metered.meter.lane import LaneParts, lane_call, locked_parts
from pf_metered.meter.open import StoreSpec, open_store
from pf_metered.meter.policy import BatchPolicy
from pf_metered.meter.receipt import Receipt, StatusReport
from pf_metered.meter.store import Store, StreamConfig
from pf_metered.models import Escrow
from pf_metered.money import MAX_UNITS, AmountLike, Rate, format_usdc, micro_to_decimal, parse_count
from pf_metered.stream import _provider_auth

__all__ = [
    "CLOSE_WAIT",
    "AsyncEscrowAPI",
    "EscrowAPI",
    "StreamBase",
    "auto_released",
    "is_transient",
    "receipt_after",
]

log = logging.getLogger("pf_metered.stream")

CLOSE_WAIT: Final = 60.0
"""Seconds ``close()`` waits for others before it goes on (``close_wait=`` per stream): for
metered calls still running on this stream to commit or cancel (their units are then paid by
the final release; a call finishing later keeps its result, its unit is counted in
``late_units``, not paid, and logged), and, as a second closer of a shared stream, for the
closer's refund after the final release settled (then ``StreamClosed``)."""

_TRANSIENT = (APIConnectionError, RateLimited, ServerError, AmbiguousOutcome)


def is_transient(exc: BaseException) -> bool:
    """Whether a failed send may succeed if tried again later with the same key.

    Also a store that could not be reached (``transient = True`` on its error, as the Redis
    store's ``StoreUnavailable``): a restart or a dropped connection must not stop the sender.
    """
    return isinstance(exc, _TRANSIENT) or (isinstance(exc, StoreError) and exc.transient)


class EscrowAPI(Protocol):
    """The four calls a stream needs from ``EscrowClient`` (structural, for typing)."""

    def create_escrow(
        self,
        to_agent_id: str,
        amount: AmountLike,
        memo: str = ...,
        auto_release_hours: int | None = ...,
        idempotency_key: str | None = ...,
    ) -> Escrow: ...

    def release_partial(
        self,
        escrow_id: str,
        amount: AmountLike,
        memo: str = ...,
        idempotency_key: str | None = ...,
    ) -> Escrow: ...

    def get_escrow(self, escrow_id: str) -> Escrow: ...

    def refund(self, escrow_id: str, idempotency_key: str | None = ...) -> Escrow: ...


class AsyncEscrowAPI(Protocol):
    """The same four calls on ``AsyncEscrowClient``."""

    async def create_escrow(
        self,
        to_agent_id: str,
        amount: AmountLike,
        memo: str = ...,
        auto_release_hours: int | None = ...,
        idempotency_key: str | None = ...,
    ) -> Escrow: ...

    async def release_partial(
        self,
        escrow_id: str,
        amount: AmountLike,
        memo: str = ...,
        idempotency_key: str | None = ...,
    ) -> Escrow: ...

    async def get_escrow(self, escrow_id: str) -> Escrow: ...

    async def refund(self, escrow_id: str, idempotency_key: str | None = ...) -> Escrow: ...


def release_found(escrow: Escrow, memo: str, idempotency_key: str) -> bool:
    """Whether an escrow's release history shows the release with this memo or key.

    Memos name the units they pay for (``batch:units 101-200``), so they are unique within a
    stream: reading one back settles a release whose answer was lost. A client that does not
    count on the server honouring idempotency keys sends the memo with the key appended
    (`` [idem:KEY]``, :func:`~pf_metered.client._base.memo_tag`); the key is unique too.
    """
    tag = memo_tag(idempotency_key)
    return any(r.memo == memo or r.memo.endswith(tag) for r in escrow.releases)


def auto_released(escrow: Escrow | None) -> bool:
    """Whether the service released all of ``escrow`` to the provider on its own (its
    ``auto_release_hours`` passed): a release still due then was paid by that, not refused."""
    return escrow is not None and escrow.status == "released" and escrow.remaining_micro == 0


def receipt_after(receipt: Receipt, escrow: Escrow | None) -> Receipt:
    """The receipt, told what the escrow says at close: money the service auto-released to
    the provider beyond what the counted units cost (nothing of it was refunded)."""
    if escrow is None:
        return receipt
    extra = escrow.released_micro - receipt.paid_micro
    if extra <= 0:
        return receipt
    note = (
        f"the escrow auto-released at its timeout: {format_usdc(extra)} USDC beyond what the "
        "counted units cost went to the provider, and nothing was refunded"
    )
    return replace(receipt, auto_released_micro=extra, notes=(*receipt.notes, note))


def _check_escrow_minimum(client: object, budget_micro: int, *, given: bool) -> None:
    """Refuse, at construction, a budget the service would refuse at ``open()``.

    Only where the whole budget is one escrow (partial releases); a chain of tranches sizes its
    own escrows. Without this the error came from ``open()`` naming ``amount``, a field the
    user never set.
    """
    caps = getattr(client, "capabilities", None)
    minimum = getattr(caps, "min_escrow_micro", 0)
    if not getattr(caps, "supports_partial_release", False) or budget_micro >= minimum:
        return
    what = format_usdc(budget_micro) + ("" if given else " (rate × max_units)")
    raise InvalidInput(
        "budget",
        f"must be at least {format_usdc(minimum)}, the escrow service's minimum; got {what}",
    )


class StreamBase:
    """Shared state and the hot path of a payment stream (see the module docstring)."""

    def __init__(
        self,
        to_agent_id: str,
        rate: AmountLike | Rate,
        *,
        batch: int | BatchPolicy | None = None,
        every: float | int | str | Decimal | BatchPolicy | None = None,
        budget: AmountLike | None = None,
        max_units: int | None = None,
        auto_release_hours: int | None = None,
        memo: str | None = None,
        store: StoreSpec = None,
        per: str = "unit",
        background: bool = True,
        clock: Callable[[], float] = time.monotonic,
        stream_id: str | None = None,
        close_wait: float = CLOSE_WAIT,
        client: object = None,
    ) -> None:
        if (
            isinstance(close_wait, bool)
            or not isinstance(close_wait, int | float)
            or not 0 < close_wait <= 86_400
        ):
            raise InvalidInput("close_wait", "must be a number of seconds in (0, 86400]")
        config, policy = plan_stream(
            to_agent_id,
            rate,
            batch=batch,
            every_=every,
            budget=budget,
            max_units=max_units,
            auto_release_hours=auto_release_hours,
            memo=memo,
            per=per,
            stream_id=stream_id,
        )
        _check_escrow_minimum(client, config.budget_micro, given=budget is not None)
        config, self._proof = _provider_auth.with_proof(config)  # for provider gates
        self._store: Store = open_store(store)  # None, a path, a redis:// URL or a Store
        self._meter = Meter(self._store, config, policy, per=per, clock=clock)
        self._background = background
        self._opened = False
        self._receipt: Receipt | None = None
        self._failure: BaseException | None = None
        self._last_error: BaseException | None = None
        self._woken = False
        self._close_wait = float(close_wait)  # ok: seconds
        self._closing_escrow: Escrow | None = None  # the escrow as the refund left it

    # ------------------------------------------------------------ identity
    @property
    def stream_id(self) -> str:
        return self._meter.stream_id

    @property
    def escrow_id(self) -> str | None:
        return self._meter.escrow_id

    @property
    def rate(self) -> Decimal:
        """The price of one unit (for ``per="second"``: of one millisecond)."""
        return self._meter.rate.decimal

    @property
    def per(self) -> str:
        return self._meter.per

    @property
    def policy(self) -> BatchPolicy:
        return self._meter.policy

    @property
    def budget(self) -> Decimal:
        return micro_to_decimal(self._meter.config.budget_micro)  # exact, in any context

    @property
    def max_units(self) -> int:
        return self._meter.config.max_units

    @property
    def store(self) -> Store:
        return self._store

    @property
    def meter(self) -> Meter:
        return self._meter

    @property
    def is_open(self) -> bool:
        return self._opened and self._receipt is None

    @property
    def closed(self) -> bool:
        return self._receipt is not None

    @property
    def last_error(self) -> BaseException | None:
        """The most recent background send failure (transient ones are retried)."""
        return self._last_error

    # ------------------------------------------------------- counting API
    # The one public way every layer counts on a stream (the decorator, the LangChain
    # handler, the tools, recovery): reserve before the work, commit or cancel after.
    def can_pay(self, units: int = 1) -> bool:
        """Whether the budget still pays for ``units`` more (a hint: ``reserve`` decides)."""
        return self.is_open and units <= self._meter.units_left()

    @property
    def units_left(self) -> int:
        """Units the budget still pays for (counted and reserved units subtracted)."""
        return self._meter.units_left() if self._opened else self.max_units

    @property
    def batch_due(self) -> bool:
        """Whether the counted units have reached the next batch (the sender is woken)."""
        return self._woken

    def reserve(self, units: int = 1) -> int:
        """Hold ``units`` of budget for work about to run; return the token for commit/cancel.

        Raises ``BudgetExhausted`` (holding nothing) when the budget cannot pay for them,
        ``StreamClosed`` when the stream is not open or its close began, and the background
        sender's permanent failure, if any. Nothing is counted until ``commit``.
        """
        if self._failure is not None:
            self._raise_failure()
        if units.__class__ is not int or units < 1 or units > MAX_UNITS:
            units = parse_count(units, "units", allow_zero=False)
        self._meter.reserve(units)
        return units

    def commit(self, token: int, units: int | None = None) -> int:
        """The work ``token`` was reserved for succeeded: count it; return the units NOT paid.

        ``units`` (default: what was reserved) is what the work really cost, known only now
        (tokens in an answer, wall time): the reservation is given back and ``units`` paid as
        far as the budget goes. A finished call is never failed here: what cannot be paid
        (budget spent, or the stream closed while the call ran past ``close_wait``) is logged
        and returned, and the next call is refused before it runs.
        """
        meter = self._meter
        if units is None or units == token:
            try:
                total = meter.commit(token)
            except StreamClosed:
                log.warning(
                    "stream %s: %d unit(s) of a call that finished after close were not paid "
                    "(close_wait=%g s)",
                    self.stream_id[:12],
                    token,
                    self._close_wait,
                )
                return token
            if total >= meter.due_at and not self._woken:
                self._woken = True
                self._wake()
            return 0
        meter.cancel(token)
        if units.__class__ is not int or units < 0 or units > MAX_UNITS:
            units = parse_count(units, "units")
        return self.record_up_to(units)

    def cancel(self, token: int) -> None:
        """The work ``token`` was reserved for failed: give the budget back, count nothing."""
        self._meter.cancel(token)

    def lane_parts(
        self, units: int = 1, *, on_unpaid: Callable[[int], None] | None = None
    ) -> LaneParts:
        """What a metered closure binds to pay ``units`` a call (see :mod:`pf_metered.meter.lane`).

        On the in-memory store, for one unit, the record's lock-free lane; elsewhere parts
        over :meth:`reserve`, :meth:`commit` and :meth:`cancel`. ``on_unpaid(n)`` hears of a
        call that finished after close (its units not paid). Bind them while the stream is
        open: before, every call is refused as :meth:`reserve` refuses it.
        """
        if self._opened and units == 1:

            def late(n: int) -> None:
                self._lane_late(n)
                if on_unpaid is not None:
                    on_unpaid(n)

            parts = self._meter.lane(self._lane_due, late)
            if parts is not None:
                return parts
        return locked_parts(self.reserve, self.commit, self.cancel, units, on_unpaid)

    def lane(
        self,
    ) -> tuple[Callable[[int], int], Callable[[int], int], Callable[[int], None]]:
        """The counting API's fast lane: ``(reserve, commit, cancel)`` for plain calls.

        Same semantics as :meth:`reserve`, :meth:`commit` (without ``units``) and
        :meth:`cancel`, as three callables bound once; a token goes back to the lane that
        gave it. On the in-memory store a one-unit token is a ticket of the record's
        lock-free lane (see :meth:`lane_parts`); others are this stream's methods.
        """
        take, admit, done, settle, give_back, locked = self.lane_parts(1)
        if locked:  # no lock-free lane here
            return self.reserve, self.commit, self.cancel
        reserve_n, commit_n, cancel_n = self.reserve, self.commit, self.cancel

        def reserve(units: int = 1) -> int:
            if units.__class__ is not int or units != 1:
                return reserve_n(units)
            try:
                take()
            except IndexError:
                admit()
            return 1

        def commit(token: int) -> int:
            if token != 1:
                return commit_n(token)
            try:
                done()
            except IndexError:
                return settle()
            return 0

        def cancel(token: int) -> None:
            if token != 1:
                cancel_n(token)
            else:
                give_back()

        return reserve, commit, cancel

    def wrap_call(
        self,
        fn: Callable[..., Any],
        units: int,
        *,
        charge: bool = False,
        on_unpaid: Callable[[int], None] | None = None,
    ) -> Callable[..., Any]:
        """``fn`` metered: reserve ``units`` before it runs (refused: it does not run), commit
        after it returns (or when it raises, if ``charge``), cancel when it raises.
        ``on_unpaid(units)`` hears of a call that finished after close.

        One closure over :meth:`lane_parts` (:func:`~pf_metered.meter.lane.lane_call`): on
        the in-memory store, for one unit, no lock and no call between it and ``fn``.
        """
        parts = self.lane_parts(units, on_unpaid=on_unpaid)
        return lane_call(fn, lambda: parts, charge=charge)

    def _lane_due(self, total: int) -> None:
        if total >= self._meter.due_at and not self._woken:
            self._woken = True
            self._wake()

    def _lane_late(self, units: int) -> None:
        log.warning(
            "stream %s: %d unit(s) of a call that finished after close were not paid "
            "(close_wait=%g s)",
            self.stream_id[:12],
            units,
            self._close_wait,
        )

    def _reset_failure(self) -> None:
        """A flush or close tries again: calls are no longer refused for the old failure."""
        self._failure = None
        self._meter.block_calls(None)

    def record_up_to(self, units: int) -> int:
        """Count ``units`` of work already done, as far as the budget goes; return the rest.

        Why not all-or-nothing: the work happened. Paying what the budget covers (and
        reporting the rest) is fairer to the provider than paying nothing, and never
        exceeds the budget.
        """
        left = units
        while left > 0:
            try:
                self.record(left)
                return 0
            except BudgetExhausted as exc:
                fits = exc.remaining_units or 0
                if fits <= 0 or fits >= left:
                    break
                try:
                    self.record(fits)
                    left -= fits
                except BudgetExhausted:
                    continue
            except StreamClosed:
                break
        log.warning(
            "stream %s: %d of %d unit(s) of finished work could not be paid (budget spent or "
            "stream closed); further calls will be refused",
            self.stream_id[:12],
            left,
            units,
        )
        return left

    @property
    def late_units(self) -> int:
        """Units of calls that finished after close had waited ``close_wait`` s (not paid)."""
        return self._meter.late_units

    def _wait_for_calls(self) -> bool:
        """Close, step one: refuse new calls; ``True`` if some still run (then wait)."""
        meter = self._meter
        meter.stop_calls()
        held = meter.wait_calls(0.0)
        if held:
            log.info(
                "stream %s: close waits for %d running call(s) (at most %g s, close_wait)",
                self.stream_id[:12],
                held,
                self._close_wait,
            )
        return bool(held)

    def _calls_waited(self) -> None:
        """Close, step two: after the wait, a commit is late; log what is still running."""
        meter = self._meter
        held = meter.wait_calls(0.0)
        if held:
            log.warning(
                "stream %s: %d unit(s) of running calls still held after %g s; closing "
                "without them (they will not be paid)",
                self.stream_id[:12],
                held,
                self._close_wait,
            )
        meter.seal(self._close_wait)

    # ------------------------------------------------------------ hot path
    def record(self, units: int = 1) -> int:
        """Count ``units`` (no I/O, never waits on a request); return the stream's total.

        Raises ``BudgetExhausted`` (counting nothing) past the budget, ``StreamClosed`` when
        the stream is not open, and the background sender's permanent failure, if any.
        """
        if self._failure is not None:
            self._raise_failure()
        if units.__class__ is not int or units < 0 or units > MAX_UNITS:
            units = parse_count(units, "units")
        meter = self._meter
        total = meter.add(units)
        if total >= meter.due_at and not self._woken:
            self._woken = True
            self._wake()
        return total

    def _committed(self, total: int) -> None:
        """After a reservation was committed (decorator path): wake the sender if due."""
        if total >= self._meter.due_at and not self._woken:
            self._woken = True
            self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def _raise_failure(self) -> None:
        failure = self._failure
        assert failure is not None
        raise failure.with_traceback(None)

    # ------------------------------------------------------------- resume
    def adopt_stored(
        self, config: StreamConfig, *, per: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """Count on ``config`` exactly as the store holds it (``resume``, before ``open``).

        Why: the stored config is the truth (rate already per unit, budget as locked); the
        constructor's arguments only rebuilt its shape. The new meter finishes a close that
        dead holders started without waiting for them.
        """
        if self._opened:
            raise StreamClosed("adopt_stored() is for a stream that is not open yet")
        self._meter = Meter(self._store, config, self._meter.policy, per=per, clock=clock)
        self._meter.takeover = True

    def note_transient(self, exc: BaseException) -> None:
        """Remember a failure that a later send retries with the same key (``last_error``)."""
        self._last_error = exc

    def _background_failed(self, exc: BaseException) -> None:
        self._last_error = exc
        if not is_transient(exc):
            self._failure = exc
            self._meter.block_calls(exc)

    def _closer_gone(self, state: str, since: float | None) -> float | None:
        """While waiting for another worker's close: when the wait for its refund began
        (``None`` while it is not at that step); past ``close_wait`` seconds there, raise.

        Why a deadline only there: before the final release settles the closer holds an
        intent the store's lease lets us take over if it dies; after, there is nothing to
        take over, and a closer that died before refunding would be waited for forever.
        """
        if state != "refunding":
            return None
        now = time.monotonic()
        if since is None:
            return now
        if now - since >= self._close_wait:
            raise StreamClosed(
                f"stream {self.stream_id}: another worker paid the final release but has not "
                f"refunded the rest within {self._close_wait:g} s (close_wait). If it is gone, "
                "finish the close with PaymentStream.resume(store, stream_id, client) (or "
                "AsyncPaymentStream.resume); the refund's key is stable, so it is never made twice"
            )
        return since

    # ------------------------------------------------------- paying providers
    def provider_headers(self) -> dict[str, str]:
        """Headers telling a provider's payment gate which stream pays (``X-PF-Escrow``...)."""
        return _provider_auth.stream_headers(
            self.escrow_id, getattr(self, "client", None), self._proof
        )

    def auth(self) -> _provider_auth.PaymentAuth:
        """An ``httpx.Auth`` adding :meth:`provider_headers` to each request: ``auth=s.auth()``."""
        return _provider_auth.PaymentAuth(self)

    # --------------------------------------------------------------- views
    def status(self) -> StatusReport:
        """Units, released, pending, remaining and the release history, right now."""
        return self._meter.status()

    @property
    def receipt(self) -> Receipt | None:
        return self._receipt

    def _close_gave_up(self, waiting_for: str) -> APITimeout:
        """What ``close()`` raises when it stops waiting (``close_wait``): what is pending, and
        how to finish. Nothing is lost: counted units stay counted, a release in flight keeps
        its idempotency key, and the next ``close()`` (or ``resume``) picks both up."""
        st = self._meter.status()
        return APITimeout(
            f"stream {self.stream_id}: close() gave up after {self._close_wait:g} s "
            f"(close_wait) waiting for {waiting_for}, whose release to escrow {st.escrow_id} "
            f"may still be in flight; {st.units} units counted, "
            f"{format_usdc(st.released_micro)} USDC released so far, {st.pending_units} units "
            "not yet settled, the rest of the budget still locked. Nothing is lost: call "
            "close() again to finish (the same idempotency keys are reused), or from a durable "
            "store PaymentStream.resume(store, stream_id, client)"
        )

    def _empty_receipt(self) -> Receipt:
        return self._meter.build_receipt()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("open" if self._opened else "new")
        return (
            f"<{type(self).__name__} {self.stream_id[:12]} to={self._meter.config.to_agent_id} "
            f"rate={self._meter.rate} {state}>"
        )
