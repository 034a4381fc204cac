"""Time billing: a clock that records a time-billed stream's units while the work runs.

A stream made with ``per="second"`` (or ``"minute"``/``"hour"``) prices one unit as one time
quantum (1 ms, 6 ms, 3.6 ms) so its money stays exact; the clock turns elapsed
``monotonic_ns`` into whole quanta, carrying the remainder, and records them. Every ``every``
seconds it asks the heartbeat whether the provider is still there: a falsy answer or an
exception stops billing at the last good beat and closes the stream (the rest is refunded).

The time source is injectable (``source=``, integer nanoseconds) and ``background=False``
lets a test drive ``tick()`` itself: tests never sleep to synchronise.

What this module must never do: bill time after a failed heartbeat, bill past the budget, or
hold its lock while the stream sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.core import PER_QUANTA

if TYPE_CHECKING:
    from pf_metered.stream._async import AsyncPaymentStream
    from pf_metered.stream._base import StreamBase
    from pf_metered.stream._sync import PaymentStream

__all__ = ["AsyncClock", "Clock", "check_ns_source"]


def check_ns_source(source: object, field: str) -> None:
    """Refuse a time source that does not count integer nanoseconds, naming ``field``.

    Why at construction: ``time.perf_counter`` and ``time.time`` answer float *seconds*; read
    as nanoseconds, a second of work is one nanosecond and bills nothing, silently. One call
    of the source tells them apart (a source is cheap and has no side effect).
    """
    if not callable(source):
        raise InvalidInput(
            field, f"must be a callable answering integer nanoseconds, not {type(source).__name__}"
        )
    sample = source()
    if isinstance(sample, bool) or not isinstance(sample, int):
        name = getattr(source, "__qualname__", type(source).__name__)
        raise InvalidInput(
            field,
            f"must answer integer nanoseconds (like time.perf_counter_ns or time.monotonic_ns);"
            f" {name} answered {type(sample).__name__} — float seconds would bill nothing",
        )


class _ClockCore:
    """The arithmetic both clocks share: elapsed nanoseconds → whole quanta → ``record``."""

    def __init__(self, stream: StreamBase, every: float, source: Callable[[], int]) -> None:
        if stream.per not in PER_QUANTA or stream.per == "unit":
            raise InvalidInput(
                "per", "a clock needs a time-billed stream (per='second', 'minute' or 'hour')"
            )
        if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
            raise InvalidInput("every", f"must be a positive number of seconds, got {every!r}")
        check_ns_source(source, "source")
        self._stream = stream
        self._quantum_ns = PER_QUANTA[stream.per][1]
        self._source = source
        self.every = float(every)  # ok: seconds, not money
        self._lock = threading.Lock()
        self._last_ns: int | None = None
        self._carry_ns = 0
        self.billed_units = 0
        self.stopped_reason: str | None = None
        """``None`` while running; ``"stopped"``, ``"heartbeat"`` or ``"budget"`` after."""

    @property
    def running(self) -> bool:
        return self._last_ns is not None and self.stopped_reason is None

    def _begin(self) -> None:
        with self._lock:
            if self._last_ns is None:
                self._last_ns = self._source()

    def _bill_to(self, now_ns: int) -> bool:
        """Record the quanta elapsed up to ``now_ns``; ``False`` once the budget is spent."""
        with self._lock:
            if self._last_ns is None or self.stopped_reason is not None:
                return False
            elapsed = max(0, now_ns - self._last_ns) + self._carry_ns
            units, self._carry_ns = divmod(elapsed, self._quantum_ns)
            self._last_ns = now_ns
            if not units:
                return True
            try:
                self._stream.record(units)
                self.billed_units += units
                return True
            except BudgetExhausted as exc:
                left = exc.remaining_units or 0
                if left:
                    self._stream.record(left)
                    self.billed_units += left
                self.stopped_reason = "budget"
                return False

    def _halt(self, reason: str) -> None:
        with self._lock:
            if self.stopped_reason is None:
                self.stopped_reason = reason


def _alive(answer: object) -> bool:
    return bool(answer)


class Clock(_ClockCore):
    """Bills a :class:`PaymentStream`'s time while it runs (``with`` or ``start``/``stop``)."""

    def __init__(
        self,
        stream: PaymentStream,
        *,
        heartbeat: Callable[[], object] | None = None,
        every: float = 1.0,
        source: Callable[[], int] = time.monotonic_ns,
        background: bool = True,
    ) -> None:
        super().__init__(stream, every, source)
        self._sync_stream = stream
        self._heartbeat = heartbeat
        self._background = background
        self._halted = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Clock:
        """Start billing now (and, with ``background=True``, ticking every ``every`` s)."""
        if not self._sync_stream.is_open:
            self._sync_stream.open()
        self._begin()
        if self._background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pf-metered-clock", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._halted.wait(self.every):
            if not self.tick():
                return

    def tick(self) -> bool:
        """Check the heartbeat and bill the time since the last tick; ``False`` once stopped."""
        if self.stopped_reason is not None:
            return False
        now = self._source()
        if self._heartbeat is not None:
            try:
                alive = _alive(self._heartbeat())
            except Exception:  # a heartbeat that fails is a dead provider
                alive = False
            if not alive:
                self._halt("heartbeat")
                self._sync_stream.close()
                return False
        return self._bill_to(now)

    def stop(self) -> None:
        """Bill up to now and stop (the stream stays open unless a heartbeat closed it)."""
        if self.running:
            with contextlib.suppress(StreamClosed):
                self._bill_to(self._source())
            self._halt("stopped")
        self._halted.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __enter__(self) -> Clock:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class AsyncClock(_ClockCore):
    """Bills an :class:`AsyncPaymentStream`'s time (``async with``); heartbeat may be async."""

    def __init__(
        self,
        stream: AsyncPaymentStream,
        *,
        heartbeat: Callable[[], object | Awaitable[object]] | None = None,
        every: float = 1.0,
        source: Callable[[], int] = time.monotonic_ns,
        background: bool = True,
    ) -> None:
        super().__init__(stream, every, source)
        self._async_stream = stream
        self._heartbeat = heartbeat
        self._background = background
        self._halted: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> AsyncClock:
        if not self._async_stream.is_open:
            await self._async_stream.open()
        self._begin()
        self._halted = asyncio.Event()
        if self._background and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        halted = self._halted
        assert halted is not None
        while True:
            try:
                await asyncio.wait_for(halted.wait(), self.every)
                return
            except asyncio.TimeoutError:
                pass
            if not await self.tick():
                return

    async def tick(self) -> bool:
        if self.stopped_reason is not None:
            return False
        now = self._source()
        if self._heartbeat is not None:
            try:
                answer = self._heartbeat()
                if inspect.isawaitable(answer):
                    answer = await answer
                alive = _alive(answer)
            except Exception:  # a heartbeat that fails is a dead provider
                alive = False
            if not alive:
                self._halt("heartbeat")
                await self._async_stream.close()
                return False
        return self._bill_to(now)

    async def stop(self) -> None:
        if self.running:
            with contextlib.suppress(StreamClosed):
                self._bill_to(self._source())
            self._halt("stopped")
        if self._halted is not None:
            self._halted.set()
        task = self._task
        if task is not None and task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> AsyncClock:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
