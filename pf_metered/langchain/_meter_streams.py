"""Where ``MeteredMiddleware``'s stream comes from, who owns it, and each run's bill.

Three sources, exactly one per middleware:

* **given** (``stream=``): one stream the program opened; every run counts on it. The program
  owns it and closes it; the middleware never does.
* **context** (``context_field=``): the stream is a field of the run's ``runtime.context``
  (``create_agent(..., context_schema=Ctx)``, ``agent.invoke(..., context=Ctx(stream=s))``),
  so each run (each user, each tenant) can bring its own. The program owns it too.
* **opened** (``open_stream=factory``): the middleware calls ``factory(key)`` for an unopened
  stream, opens it and owns it. ``budget_per="run"`` (default): one stream per run, closed by
  ``after_agent``, its receipt put in the agent state. ``budget_per="thread"``: one stream per
  ``thread_id``, kept open across the thread's runs and closed when the program asks
  (``close_thread``/``close_all``, or their async twins).

Why a thread's stream stays open between runs: a thread's budget is the conversation's, and a
conversation is many runs (one per user turn). Closing after every run would lock a new
escrow and refund the old one per turn (two requests, and on the deployed dialect a minimum
escrow and a commission each time), and would hand every turn a fresh budget, which is no
thread budget at all. What stays open is listed by ``open_streams()`` and closed by
``close_all()``; each run's state still shows what it cost and what is left. An
``AsyncPaymentStream`` lives on the event loop that opened it: a thread's async stream serves
runs on that loop, and ``aclose_all()`` must be awaited there.

A run that never reaches ``after_agent`` (an exception out of ``invoke``, a consumer that
stops iterating ``stream()``) leaves its per-run stream open: the middleware cannot tell a
run that died from one an outer middleware will retry. It stays listed by ``open_streams()``
and ``close_all()`` settles it (counted work paid, the rest refunded). A payer whose balance
cannot lock the budget ends the run before the model runs (``exit_behavior="end"``), with a
message saying so; nothing is locked.

A run's **bill** (:class:`RunBill`) lives in memory under a key that ``before_agent`` writes
into the state, so concurrent runs on one middleware never share one; ``after_agent`` removes
it. What this module must never do: read a stream's private attributes, count units (that is
the middleware's job, through the public counting API), or close a stream it does not own.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from typing import Any, Literal

from pf_metered.errors import InsufficientFunds
from pf_metered.langchain._meter_pricing import MeterConfigError
from pf_metered.meter.receipt import Receipt
from pf_metered.money import MICRO, format_usdc
from pf_metered.stream import AsyncPaymentStream, PaymentStream

__all__ = ["BudgetPer", "RunBill", "StreamFactory", "StreamSource", "receipt_view"]

Stream = PaymentStream | AsyncPaymentStream
StreamFactory = Callable[[str], Stream]
"""``factory(key) -> stream``: ``key`` is the thread id (per thread) or the run's key."""
BudgetPer = Literal["run", "thread"]
Source = Literal["given", "context", "opened"]


@dataclass(slots=True)
class RunBill:
    """What one run counted (units paid on the stream through this middleware)."""

    key: str
    stream: Stream
    owned: bool
    thread_id: str | None
    model_calls: int = 0
    tool_calls: int = 0
    units: int = 0
    unpaid_units: int = 0
    stopped: str | None = None
    """Why the run was ended early (the message the run ended with), if it was."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paid(self, units: int, unpaid: int, *, tool: bool) -> None:
        with self.lock:
            self.units += units - unpaid
            self.unpaid_units += unpaid
            if tool:
                self.tool_calls += 1
            else:
                self.model_calls += 1


def receipt_view(receipt: Receipt) -> dict[str, Any]:
    """A closed stream's receipt as plain, checkpointable data (money as exact strings)."""
    return {
        "stream_id": receipt.stream_id,
        "escrow_id": receipt.escrow_id,
        "rate": str(receipt.rate),
        **receipt.figures(),
    }


def _cost(stream: Stream, units: int) -> str:
    """``rate × units`` exactly, as USDC's wire text when it is whole micro-USDC (the stream
    rounds once, at close, to the micro-USDC; a sub-micro cost is shown unrounded)."""
    with localcontext() as ctx:
        ctx.prec = 80
        exact = stream.rate * units * MICRO
    if exact == exact.to_integral_value():
        return format_usdc(int(exact))
    return format(exact.scaleb(-6).normalize(), "f")


def _thread_id(runtime: Any) -> str | None:
    info = getattr(runtime, "execution_info", None)
    thread = getattr(info, "thread_id", None)
    if thread is None:
        try:
            from langgraph.config import get_config

            thread = get_config().get("configurable", {}).get("thread_id")
        except RuntimeError:  # outside a graph run
            thread = None
    return None if thread is None else str(thread)


class StreamSource:
    """Finds or opens the stream for each run; keeps the bills and the streams it owns."""

    def __init__(
        self,
        stream: Stream | None,
        context_field: str | None,
        open_stream: StreamFactory | None,
        budget_per: object,
        rate: Decimal | None,
    ) -> None:
        given = [n for n, v in (("stream", stream), ("context_field", context_field),
                                ("open_stream", open_stream)) if v is not None]  # fmt: skip
        if len(given) != 1:
            raise MeterConfigError(
                "stream",
                "give exactly one of stream= (a stream the program opened), context_field= "
                "(the runtime context's field holding one) or open_stream= (a factory the "
                f"middleware opens and closes); got {', '.join(given) or 'none'}",
            )
        if stream is not None and not isinstance(stream, PaymentStream | AsyncPaymentStream):
            raise MeterConfigError("stream", "must be a PaymentStream or an AsyncPaymentStream")
        if context_field is not None and (not isinstance(context_field, str) or not context_field):
            raise MeterConfigError("context_field", "must be the name of a context field")
        if open_stream is not None and not callable(open_stream):
            raise MeterConfigError("open_stream", "must be a callable factory(key) -> stream")
        if budget_per not in ("run", "thread"):
            raise MeterConfigError("budget_per", f"must be 'run' or 'thread', got {budget_per!r}")
        if budget_per == "thread" and open_stream is None:
            raise MeterConfigError(
                "budget_per",
                "'thread' needs open_stream= (one stream per thread, opened by the middleware); "
                "a given or context stream's budget is the program's to scope",
            )
        self.source: Source = (
            "given" if stream is not None else "context" if context_field else "opened"
        )
        self.budget_per: BudgetPer = "thread" if budget_per == "thread" else "run"
        self.given = stream
        self.context_field = context_field
        self.factory = open_stream
        self.rate = rate
        self._bills: dict[str, RunBill] = {}
        self._threads: dict[str, Stream] = {}
        self._runs: dict[str, Stream] = {}  # per-run streams still open (a crashed run's too)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ a run starts
    def _find(self, runtime: Any, key: str) -> tuple[Stream, bool, bool, str | None]:
        """``(stream, owned, needs_open, thread_id)`` for a starting run (no I/O)."""
        thread = _thread_id(runtime)
        if self.given is not None:
            return self.given, False, False, thread
        if self.context_field is not None:
            return self._checked(self._from_context(runtime)), False, False, thread
        assert self.factory is not None
        if self.budget_per == "thread":
            if thread is None:
                raise MeterConfigError(
                    "budget_per",
                    "'thread' needs a thread_id: run the agent with a checkpointer and "
                    "config={'configurable': {'thread_id': ...}}",
                )
            with self._lock:
                stream = self._threads.get(thread)
                if stream is None or stream.closed:
                    stream = self._threads[thread] = self._make(thread)
            return stream, True, not stream.is_open, thread
        stream = self._make(key)
        with self._lock:
            self._runs[key] = stream
        return stream, True, not stream.is_open, thread

    def _make(self, key: str) -> Stream:
        assert self.factory is not None
        stream = self.factory(key)
        if not isinstance(stream, PaymentStream | AsyncPaymentStream):
            raise MeterConfigError(
                "open_stream", f"must return a PaymentStream or AsyncPaymentStream, not {stream!r}"
            )
        if stream.closed:
            raise MeterConfigError("open_stream", f"returned a closed stream ({stream!r})")
        return self._checked(stream)

    def _checked(self, stream: Stream) -> Stream:
        """Prices given as money were turned into units at ``rate``: the stream must agree."""
        if self.rate is not None and stream.rate != self.rate:
            raise MeterConfigError(
                "rate",
                f"is {self.rate}, but the run's stream {stream.stream_id[:12]} is priced "
                f"{stream.rate} a unit; prices were converted to units at rate=, so they "
                "would be wrong",
            )
        return stream

    def _from_context(self, runtime: Any) -> Stream:
        name = self.context_field
        assert name is not None
        context = getattr(runtime, "context", None)
        found = context.get(name) if isinstance(context, Mapping) else getattr(context, name, None)
        if not isinstance(found, PaymentStream | AsyncPaymentStream):
            raise MeterConfigError(
                "context_field",
                f"{name!r}: the run's context ({type(context).__name__}) holds no payment "
                f"stream there (found {type(found).__name__}); pass "
                f"context=... with a PaymentStream or AsyncPaymentStream in {name!r}",
            )
        return found

    def start(self, runtime: Any, *, end_if_unfunded: bool) -> RunBill:
        """A run starts on a sync graph: find or open its stream, begin its bill.

        ``end_if_unfunded``: when the payer's balance cannot lock an opened stream's budget
        (``InsufficientFunds``), the bill says so in ``stopped`` (the run ends before the
        model runs) instead of the error leaving ``invoke``.
        """
        key = uuid.uuid4().hex
        stream, owned, needs_open, thread = self._find(runtime, key)
        if needs_open:
            if isinstance(stream, AsyncPaymentStream):
                self._forget(key, stream)
                raise MeterConfigError(
                    "open_stream",
                    "returned an AsyncPaymentStream, which opens only on an event loop: run "
                    "the agent with ainvoke/astream, or return a PaymentStream",
                )
            try:
                stream.open()
            except InsufficientFunds as exc:
                return self._unfunded(key, stream, thread, exc, end_if_unfunded)
            except BaseException:
                self._forget(key, stream)
                raise
        return self._begin(key, stream, owned, thread)

    async def astart(self, runtime: Any, *, end_if_unfunded: bool) -> RunBill:
        """Async twin of :meth:`start` (a sync stream opens on a worker thread)."""
        key = uuid.uuid4().hex
        stream, owned, needs_open, thread = self._find(runtime, key)
        if needs_open:
            try:
                if isinstance(stream, AsyncPaymentStream):
                    await stream.open()
                else:
                    await asyncio.to_thread(stream.open)
            except InsufficientFunds as exc:
                return self._unfunded(key, stream, thread, exc, end_if_unfunded)
            except BaseException:
                self._forget(key, stream)
                raise
        return self._begin(key, stream, owned, thread)

    def _unfunded(
        self, key: str, stream: Stream, thread: str | None, exc: InsufficientFunds, end: bool
    ) -> RunBill:
        self._forget(key, stream)  # nothing was locked; the next run tries again
        if not end:
            raise exc
        bill = self._begin(key, stream, True, thread)
        bill.stopped = (
            f"No payment stream could be opened: the payer's balance cannot lock its budget "
            f"of {format_usdc(int(stream.budget * MICRO))} USDC ({exc}); the run ended before "
            "the model ran. Top up the payer's balance, or give the stream a smaller budget."
        )
        return bill

    def _begin(self, key: str, stream: Stream, owned: bool, thread: str | None) -> RunBill:
        bill = RunBill(key, stream, owned, thread)
        with self._lock:
            self._bills[key] = bill
        return bill

    def bill(self, key: object) -> RunBill | None:
        return self._bills.get(key) if isinstance(key, str) else None

    # ------------------------------------------------------------------- a run ends
    def _closes_at_end(self, bill: RunBill) -> bool:
        return bill.owned and self.budget_per == "run" and bill.stream.is_open

    def finish(self, bill: RunBill) -> dict[str, Any]:
        """The run ended (sync): close what it opened; its view for the state."""
        receipt = None
        if self._closes_at_end(bill):
            stream = bill.stream
            if isinstance(stream, AsyncPaymentStream):  # pragma: no cover - start() refuses
                raise MeterConfigError("open_stream", "an AsyncPaymentStream closes on its loop")
            receipt = stream.close()
        return self._end(bill, receipt)

    async def afinish(self, bill: RunBill) -> dict[str, Any]:
        """Async twin of :meth:`finish`."""
        receipt = None
        if self._closes_at_end(bill):
            stream = bill.stream
            if isinstance(stream, AsyncPaymentStream):
                receipt = await stream.close()
            else:
                receipt = await asyncio.to_thread(stream.close)
        return self._end(bill, receipt)

    def _end(self, bill: RunBill, receipt: Receipt | None) -> dict[str, Any]:
        with self._lock:
            self._bills.pop(bill.key, None)
            if receipt is not None:
                self._runs.pop(bill.key, None)
        return self.view(bill, receipt)

    def _forget(self, key: str, stream: Stream) -> None:
        with self._lock:
            self._runs.pop(key, None)
            for thread, held in list(self._threads.items()):
                if held is stream:
                    del self._threads[thread]

    def view(self, bill: RunBill, receipt: Receipt | None) -> dict[str, Any]:
        """What the state shows about a run: its bill, the stream, the receipt if closed."""
        stream = bill.stream
        return {
            "stream_id": stream.stream_id,
            "escrow_id": stream.escrow_id,
            "source": self.source,
            "budget_per": self.budget_per,
            "thread_id": bill.thread_id,
            "model_calls": bill.model_calls,
            "tool_calls": bill.tool_calls,
            "units": bill.units,
            "cost": _cost(stream, bill.units),
            "unpaid_units": bill.unpaid_units,
            "units_left": stream.units_left if stream.is_open else 0,
            "stopped": bill.stopped,
            "closed": stream.closed,
            "receipt": None if receipt is None else receipt_view(receipt),
        }

    # ------------------------------------------------------------ what stays open
    def open_streams(self) -> dict[str, Stream]:
        """Streams the middleware opened and has not closed: ``{thread id or run key: s}``."""
        with self._lock:
            held = {**self._runs, **self._threads}
        return {key: s for key, s in held.items() if not s.closed}

    def take(self, thread_id: str | None) -> list[Stream]:
        """Remove and return what to close: one thread's stream, or (``None``) all of them."""
        with self._lock:
            if thread_id is not None:
                found = self._threads.pop(thread_id, None)
                return [found] if found is not None and not found.closed else []
            held = [*self._runs.values(), *self._threads.values()]
            self._runs.clear()
            self._threads.clear()
        return [s for s in held if not s.closed]

    def put_back(self, streams: list[Stream]) -> None:
        """Streams :meth:`take` returned that could not be closed here stay listed."""
        with self._lock:
            for stream in streams:
                self._runs[stream.stream_id] = stream
