"""``PaymentStream``: the thread-based driver of the meter (an ``EscrowClient`` does the HTTP).

Counting happens on the caller's thread with no I/O. A daemon worker thread sends releases
when the meter says a batch is due: woken by an ``Event`` when a unit total crosses the batch
threshold, and by its own wait timeout for ``every`` seconds. One sender lock makes sure at
most one thread (worker, ``flush`` or ``close``) talks to the escrow at a time; ``record``
never takes it.

What this module must never do: hold the sender lock or any meter lock in ``record``, send a
release the meter did not hand out, or swallow a permanent failure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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
    EscrowAPI,
    StreamBase,
    auto_released,
    is_transient,
    receipt_after,
    release_found,
)
from pf_metered.stream._tranches import adapt_client, adjust_receipt

if TYPE_CHECKING:
    from pf_metered.stream.clock import Clock

__all__ = ["PaymentStream"]

_BACKOFF_MAX = 30.0
_WAIT_MAX = 0.25


class PaymentStream(StreamBase):
    """Pay ``to_agent_id`` ``rate`` USDC per unit from an escrowed budget, in batches.

    ``with PaymentStream(client, "ag_B", "0.001", batch=100, budget="10") as s: s.record()``
    locks the budget on enter, releases every 100 units in the background, and on exit pays
    the last partial batch, refunds the rest and keeps the :class:`Receipt` (``s.receipt``).
    """

    def __init__(
        self,
        client: EscrowAPI,
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
        self._client: EscrowAPI = adapt_client(client, self._meter, is_async=False)
        self._send_lock = threading.RLock()
        self._close_lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None

    @property
    def client(self) -> EscrowAPI:
        return self._client

    @classmethod
    def resume(
        cls, store: StoreSpec, stream_id: str, client: EscrowAPI, **kw: Any
    ) -> PaymentStream:
        """Rebuild a stream from its durable store after a crash and finish what was started.

        Pending releases are settled with their SAME idempotency keys (or from the escrow's
        ``released`` figure), counted units are released, a closing stream is closed; never
        twice. See :mod:`pf_metered.stream._recovery`.
        """
        return _recovery.resume_sync(cls, store, stream_id, client, **kw)

    # ------------------------------------------------------------------ open
    def open(self) -> PaymentStream:
        """Lock the budget in escrow (idempotent: the key is derived from the stream id)."""
        with self._send_lock:
            if self._receipt is not None:
                raise StreamClosed(f"stream {self.stream_id} is closed; open a new one")
            if self._opened:
                return self
            action = self._meter.begin_open()
            if action is not None:
                escrow = self._client.create_escrow(
                    to_agent_id=action.to_agent_id,
                    amount=action.amount,
                    memo=action.memo,
                    auto_release_hours=action.auto_release_hours,
                    idempotency_key=action.idempotency_key,
                )
                self._meter.opened(escrow.escrow_id)
            self._opened = True
            _recovery.track(self)  # exit / SIGTERM: closed (memory store) or flushed, reported
            if self._background and (self.policy.units or self.policy.seconds):
                self._worker = threading.Thread(
                    target=self._run, name=f"pf-metered-{self.stream_id[:8]}", daemon=True
                )
                self._worker.start()
        return self

    def __enter__(self) -> PaymentStream:
        return self.open()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- sender
    def _wake(self) -> None:
        self._wakeup.set()

    def _run(self) -> None:
        """The background sender: wait for a due batch (or the timer), send, repeat."""
        delay = 0.0
        while not self._stop.is_set():
            if delay:
                if self._stop.wait(delay):
                    return
            else:
                self._wakeup.wait(self._meter.seconds_until_due())
            if self._stop.is_set():
                return
            self._wakeup.clear()
            self._woken = False
            try:
                with self._send_lock:
                    if self._stop.is_set():
                        return
                    self._drain()
                delay = 0.0
            except BaseException as exc:  # surfaced via record/flush/close
                self._background_failed(exc)
                if self._failure is not None:
                    return
                delay = min(_BACKOFF_MAX, max(0.05, delay * 2))

    def _drain(self, *, flush: bool = False, final: bool = False) -> None:
        while True:
            action = self._meter.next_release(flush=flush, final=final)
            if action is None:
                return
            self._send(action)
            if action.intent.final:
                return

    def _send(self, action: ReleaseDue) -> None:
        escrow_id = self._meter.escrow_id
        assert escrow_id is not None
        if action.adopted and release_found(
            self._client.get_escrow(escrow_id), action.memo, action.idempotency_key
        ):
            self._meter.settled(action)  # its first holder's send had landed
            return
        try:
            self._client.release_partial(
                escrow_id=escrow_id,
                amount=action.amount,
                memo=action.memo,
                idempotency_key=action.idempotency_key,
            )
        except PFMeteredError as exc:
            if not (is_transient(exc) or isinstance(exc, APIError)):
                raise
            # The answer was lost or refused: did the release land anyway?
            try:
                escrow: Escrow | None = self._client.get_escrow(escrow_id)
                assert escrow is not None
                seen = release_found(escrow, action.memo, action.idempotency_key)
            except PFMeteredError:
                escrow, seen = None, False
            if not seen and not auto_released(escrow):  # auto-release paid these units
                raise
        self._meter.settled(action)

    def pump(self) -> None:
        """Send whatever is due now, on this thread (for ``background=False`` drivers)."""
        with self._send_lock:
            self._drain()

    def flush(self) -> None:
        """Release every counted unit now and wait until it is settled.

        Raises the failure if a release cannot be made (the stream stays usable: the same
        release, with the same idempotency key, is tried again next time).
        """
        if not self._opened:
            return
        with self._send_lock:
            self._reset_failure()
            self._drain(flush=True)

    # ----------------------------------------------------------------- close
    def close(self) -> Receipt:
        """Pay the last partial batch (half-up), refund the rest, return the receipt.

        Closing twice returns the same receipt. If a request fails, the error propagates and
        ``close()`` may be called again: it resumes with the same idempotency keys. Waiting for
        the background sender (or another thread's flush) is bounded by ``close_wait``: past
        it, ``APITimeout`` says what is still pending and how to finish.
        """
        if self._receipt is not None:
            return self._receipt
        with self._close_lock:
            if self._receipt is not None:
                return self._receipt
            if self._opened:
                if self._wait_for_calls():
                    self._meter.wait_calls(self._close_wait)
                self._calls_waited()
            self._stop.set()
            self._wakeup.set()
            worker = self._worker
            if worker is not None and worker is not threading.current_thread():
                worker.join(self._close_wait)  # bounded: its send may hang at the service
                if worker.is_alive():
                    raise self._close_gave_up("the background sender")
            if not self._send_lock.acquire(timeout=self._close_wait):
                raise self._close_gave_up("another thread's flush() or pump()")
            try:
                if not self._opened:
                    self._receipt = self._empty_receipt()
                    return self._receipt
                self._reset_failure()
                stop_locking = getattr(self._client, "closing", None)  # tranche chain
                if stop_locking is not None:
                    stop_locking()  # close never locks a tranche it will not release
                self._drain(final=True)
                if not self._await_closer():
                    self._receipt = adjust_receipt(self._client, self._meter.finished_elsewhere())
                    return self._receipt
                refunded = self._refund()
                receipt = receipt_after(self._meter.finished(refunded), self._closing_escrow)
                self._receipt = adjust_receipt(self._client, receipt)
            finally:
                self._send_lock.release()
            return self._receipt

    def _await_closer(self) -> bool:
        """Until this stream is the closer (``True``: refund and close) or another worker
        has closed the stream (``False``: its receipt is in the store).

        Two workers closing one shared stream: the store's final claim picks one closer;
        the other waits here, never refunding, so no refund can overtake the final release.
        A closer that dies leaves its final intent to be taken over once stale.
        """
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
            time.sleep(delay)  # another worker's release or close is under way
            delay = min(delay * 2, _WAIT_MAX)
            self._drain(final=True)

    def _refund(self) -> int:
        finish = getattr(self._client, "finish", None)  # tranche chain: settle at close
        if finish is not None:
            return finish()  # type: ignore[no-any-return]
        action = self._meter.refund_action()
        if action is None:
            return 0
        escrow: Escrow
        try:
            escrow = self._client.refund(action.escrow_id, idempotency_key=action.idempotency_key)
        except PFMeteredError:
            escrow = self._client.get_escrow(action.escrow_id)
            if escrow.is_open:
                raise
        self._closing_escrow = escrow  # what the receipt reads: an auto-release, say
        return escrow.refunded_micro

    # ----------------------------------------------------------------- clock
    def clock(
        self,
        *,
        heartbeat: Callable[[], object] | None = None,
        every: float = 1.0,
        source: Callable[[], int] = time.monotonic_ns,
        background: bool = True,
    ) -> Clock:
        """Bill wall time while the returned clock runs (``with stream.clock(...):``).

        Needs a stream made with ``per="second"``/``"minute"``/``"hour"``. A heartbeat that
        returns falsy or raises stops billing and closes the stream.
        """
        from pf_metered.stream.clock import Clock

        return Clock(self, heartbeat=heartbeat, every=every, source=source, background=background)
