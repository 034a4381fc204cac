"""``AsyncPaymentStream``: the asyncio driver of the meter (an ``AsyncEscrowClient`` sends).

The same decisions as :class:`~pf_metered.stream.PaymentStream` (they are the meter's); only
the I/O differs: the background sender is a task on the loop that opened the stream, woken by
an ``asyncio.Event`` (set thread-safely when a unit is recorded from another thread), and the
sender lock is an ``asyncio.Lock``. ``record`` stays a plain method: counting never awaits.

What this module must never do: await inside ``record``, block the loop on a thread lock held
across I/O, or swallow a permanent failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pf_metered.errors import APIError, PFMeteredError, StreamClosed
from pf_metered.meter.core import ReleaseDue
from pf_metered.meter.open import StoreSpec
from pf_metered.meter.policy import BatchPolicy
from pf_metered.meter.receipt import Receipt
from pf_metered.models import Escrow
from pf_metered.money import AmountLike, Rate
from pf_metered.stream import _recovery
from pf_metered.stream._base import (
    CLOSE_WAIT,
    AsyncEscrowAPI,
    StreamBase,
    auto_released,
    is_transient,
    receipt_after,
    release_found,
)
from pf_metered.stream._tranches import adapt_client, adjust_receipt

if TYPE_CHECKING:
    from pf_metered.stream.clock import AsyncClock

__all__ = ["AsyncPaymentStream"]

_BACKOFF_MAX = 30.0
_WAIT_MAX = 0.25


class AsyncPaymentStream(StreamBase):
    """The asyncio twin of ``PaymentStream``: same arguments, ``async with``, ``await close()``."""

    def __init__(
        self,
        client: AsyncEscrowAPI,
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
    ) -> None:
        super().__init__(
            to_agent_id,
            rate,
            batch=batch,
            every=every,
            budget=budget,
            max_units=max_units,
            auto_release_hours=auto_release_hours,
            memo=memo,
            store=store,
            per=per,
            background=background,
            clock=clock,
            stream_id=stream_id,
            close_wait=close_wait,
            client=client,
        )
        # full-release dialect: a chain of tranches behind the same face (_tranches.py)
        self._client: AsyncEscrowAPI = adapt_client(client, self._meter, is_async=True)
        self._send_lock: asyncio.Lock | None = None
        self._close_lock: asyncio.Lock | None = None
        self._wakeup: asyncio.Event | None = None
        self._stop_evt: asyncio.Event | None = None
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._worker: asyncio.Task[None] | None = None

    @property
    def client(self) -> AsyncEscrowAPI:
        return self._client

    @classmethod
    async def resume(
        cls, store: StoreSpec, stream_id: str, client: AsyncEscrowAPI, **kw: Any
    ) -> AsyncPaymentStream:
        """The async twin of ``PaymentStream.resume`` (see :mod:`pf_metered.stream._recovery`)."""
        return await _recovery.resume_async(cls, store, stream_id, client, **kw)

    def _bind_loop(self) -> asyncio.Lock:
        if self._send_lock is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._send_lock = asyncio.Lock()
            self._close_lock = asyncio.Lock()
            self._wakeup = asyncio.Event()
            self._stop_evt = asyncio.Event()
        return self._send_lock

    # ------------------------------------------------------------------ open
    async def open(self) -> AsyncPaymentStream:
        """Lock the budget in escrow (idempotent: the key is derived from the stream id)."""
        async with self._bind_loop():
            if self._receipt is not None:
                raise StreamClosed(f"stream {self.stream_id} is closed; open a new one")
            if self._opened:
                return self
            action = self._meter.begin_open()
            if action is not None:
                escrow = await self._client.create_escrow(
                    to_agent_id=action.to_agent_id,
                    amount=action.amount,
                    memo=action.memo,
                    auto_release_hours=action.auto_release_hours,
                    idempotency_key=action.idempotency_key,
                )
                self._meter.opened(escrow.escrow_id)
            self._opened = True
            _recovery.track(self)  # exit: closed (memory store) or flushed and reported
            if self._background and (self.policy.units or self.policy.seconds):
                self._worker = asyncio.get_running_loop().create_task(
                    self._run(), name=f"pf-metered-{self.stream_id[:8]}"
                )
        return self

    async def __aenter__(self) -> AsyncPaymentStream:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- sender
    def _wake(self) -> None:
        event, loop = self._wakeup, self._loop
        if event is None or loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            event.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone: close() drains
                loop.call_soon_threadsafe(event.set)

    async def _run(self) -> None:
        event, lock, stop = self._wakeup, self._send_lock, self._stop_evt
        assert event is not None and lock is not None and stop is not None
        delay = 0.0
        while not self._stopping:
            waiter = stop.wait() if delay else event.wait()
            timeout = delay or self._meter.seconds_until_due()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, timeout)
            if self._stopping:
                return
            event.clear()
            self._woken = False
            try:
                async with lock:
                    if self._stopping:
                        return
                    await self._drain()
                delay = 0.0
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # surfaced via record/flush/close
                self._background_failed(exc)
                if self._failure is not None:
                    return
                delay = min(_BACKOFF_MAX, max(0.05, delay * 2))

    async def _drain(self, *, flush: bool = False, final: bool = False) -> None:
        while True:
            action = self._meter.next_release(flush=flush, final=final)
            if action is None:
                return
            await self._send(action)
            if action.intent.final:
                return

    async def _send(self, action: ReleaseDue) -> None:
        escrow_id = self._meter.escrow_id
        assert escrow_id is not None
        if action.adopted and release_found(
            await self._client.get_escrow(escrow_id), action.memo, action.idempotency_key
        ):
            self._meter.settled(action)  # its first holder's send had landed
            return
        try:
            await self._client.release_partial(
                escrow_id=escrow_id,
                amount=action.amount,
                memo=action.memo,
                idempotency_key=action.idempotency_key,
            )
        except PFMeteredError as exc:
            if not (is_transient(exc) or isinstance(exc, APIError)):
                raise
            try:
                escrow: Escrow | None = await self._client.get_escrow(escrow_id)
                assert escrow is not None
                seen = release_found(escrow, action.memo, action.idempotency_key)
            except PFMeteredError:
                escrow, seen = None, False
            if not seen and not auto_released(escrow):  # auto-release paid these units
                raise
        self._meter.settled(action)

    async def pump(self) -> None:
        """Send whatever is due now (for ``background=False`` drivers)."""
        async with self._bind_loop():
            await self._drain()

    async def flush(self) -> None:
        """Release every counted unit now and wait until it is settled."""
        if not self._opened:
            return
        async with self._bind_loop():
            self._reset_failure()
            await self._drain(flush=True)

    # ----------------------------------------------------------------- close
    async def close(self) -> Receipt:
        """Pay the last partial batch (half-up), refund the rest, return the receipt.

        Waiting for the background sender (or another task's flush) is bounded by
        ``close_wait``: past it, ``APITimeout`` says what is still pending and how to finish.
        """
        if self._receipt is not None:
            return self._receipt
        send_lock = self._bind_loop()
        assert self._close_lock is not None
        async with self._close_lock:
            if self._receipt is not None:
                return self._receipt
            if self._opened:
                if self._wait_for_calls():
                    # Calls on this loop must run to commit: wait off the loop.
                    await asyncio.get_running_loop().run_in_executor(
                        None, self._meter.wait_calls, self._close_wait
                    )
                self._calls_waited()
            self._stopping = True
            if self._wakeup is not None and self._stop_evt is not None:
                self._wakeup.set()
                self._stop_evt.set()
            worker = self._worker
            if worker is not None and worker is not asyncio.current_task():
                # bounded: its send may hang at the service (shielded: never cancelled here)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(worker), self._close_wait)
                if not worker.done():
                    raise self._close_gave_up("the background sender")
            try:
                await asyncio.wait_for(send_lock.acquire(), self._close_wait)
            except asyncio.TimeoutError:
                raise self._close_gave_up("another task's flush()") from None
            try:
                if not self._opened:
                    self._receipt = self._empty_receipt()
                    return self._receipt
                self._reset_failure()
                stop_locking = getattr(self._client, "closing", None)  # tranche chain
                if stop_locking is not None:
                    stop_locking()  # close never locks a tranche it will not release
                await self._drain(final=True)
                if not await self._await_closer():
                    self._receipt = adjust_receipt(self._client, self._meter.finished_elsewhere())
                    return self._receipt
                refunded = await self._refund()
                receipt = receipt_after(self._meter.finished(refunded), self._closing_escrow)
                self._receipt = adjust_receipt(self._client, receipt)
            finally:
                send_lock.release()
            return self._receipt

    async def _await_closer(self) -> bool:
        """The twin of ``PaymentStream._await_closer``: ``True`` when this stream closes."""
        meter = self._meter
        delay = 0.002
        refunding_since: float | None = None
        while True:
            state = meter.close_state()
            if state == "mine":
                return True
            if state == "closed":
                return False
            refunding_since = self._closer_gone(state, refunding_since)
            await asyncio.sleep(delay)  # another worker's release or close is under way
            delay = min(delay * 2, _WAIT_MAX)
            await self._drain(final=True)

    async def _refund(self) -> int:
        finish = getattr(self._client, "finish", None)  # tranche chain: settle at close
        if finish is not None:
            return await finish()  # type: ignore[no-any-return]
        action = self._meter.refund_action()
        if action is None:
            return 0
        escrow: Escrow
        try:
            escrow = await self._client.refund(
                action.escrow_id, idempotency_key=action.idempotency_key
            )
        except PFMeteredError:
            escrow = await self._client.get_escrow(action.escrow_id)
            if escrow.is_open:
                raise
        self._closing_escrow = escrow  # what the receipt reads: an auto-release, say
        return escrow.refunded_micro

    # ----------------------------------------------------------------- clock
    def clock(
        self,
        *,
        heartbeat: Callable[[], object | Awaitable[object]] | None = None,
        every: float = 1.0,
        source: Callable[[], int] = time.monotonic_ns,
        background: bool = True,
    ) -> AsyncClock:
        """Bill wall time while the clock runs (``async with stream.clock(...):``)."""
        from pf_metered.stream.clock import AsyncClock

        return AsyncClock(
            self, heartbeat=heartbeat, every=every, source=source, background=background
        )
