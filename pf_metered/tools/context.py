"""What every tool call runs against: the clients, the operator's caps and the open streams.

Why one object: tools are stateless descriptions; the state an agent builds up while it works
(the streams it opened, how much it has locked) lives here, shared by the LangChain tools and the
MCP server of one session. Stream ids handed to the model are short and sequential (``s1``,
``s2``) because models copy short ids faithfully; each stream keeps its own unique id inside.

Bookkeeping of what is locked is reserved *before* any I/O under one lock and given back if
the call fails, so parallel tool calls cannot together exceed ``max_total`` or
``max_open_streams``. A create whose answer was lost (``AmbiguousOutcome``: the escrow may
exist) is *not* a failure: its reservation stays, and it is remembered as a
:class:`PendingCreate` until :meth:`ToolContext.settle_pending` (run by ``close_all``)
reconciles it by its idempotency key — closing the stream, refunding the escrow — or says
why it cannot (a service with no listing and no refund hands such an escrow back by itself
at its timeout).

An async stream's I/O runs on an event loop, never in sync code: a sync caller (``close_all``,
a sync ``stream_close``) hands its close to the loop that opened it when that loop is running in
another thread, or — the loop is gone, as after ``asyncio.run(agent.ainvoke(...))`` — runs it on
a private loop in a worker thread (:func:`run_async_close`). Only a sync close on the very loop
that opened the stream is refused: it would wait on itself.

What this module must never do: hold a lock across I/O, expose the API key (``repr`` names
no secret), or block the event loop that opened a stream on that stream's own close.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pf_metered.errors import AmbiguousOutcome, ConfigError, NotFound, PFMeteredError
from pf_metered.money import Rate, format_usdc
from pf_metered.tools.caps import Caps
from pf_metered.tools.errors import ToolError, offers, provider_not_allowed, unknown_provider
from pf_metered.tools.state import Book, ToolState

if TYPE_CHECKING:
    from pf_metered.client import AsyncEscrowClient, EscrowClient
    from pf_metered.meter.receipt import Receipt
    from pf_metered.meter.store import Store
    from pf_metered.models import Escrow
    from pf_metered.stream import AsyncPaymentStream, PaymentStream

__all__ = ["PendingCreate", "StreamEntry", "ToolContext", "require_a_client", "run_async_close"]

log = logging.getLogger("pf_metered.tools")

T = TypeVar("T")


def require_a_client(who: str, client: object, async_client: object) -> None:
    """Refuse a ``who`` (:class:`ToolContext`, :class:`~pf_metered.tools.contexts.ToolContexts`)
    made with no client at all: its tools could make no call, sync or async."""
    if client is None and async_client is None:
        raise ConfigError(f"{who} needs a client, an async_client, or both")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


@dataclass(slots=True, eq=False)
class StreamEntry:
    """One stream opened through the tools, under the short id the model knows it by."""

    handle: str
    stream: PaymentStream | AsyncPaymentStream
    provider: str
    rate: Rate
    budget_micro: int
    max_units: int | None
    is_async: bool
    receipt: Receipt | None = None
    closing: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    loop: asyncio.AbstractEventLoop | None = None
    """The event loop an async stream was opened on (its sender task lives there)."""

    @property
    def escrow_id(self) -> str | None:
        return self.stream.escrow_id


def run_async_close(
    loop: asyncio.AbstractEventLoop | None, make: Callable[[], Awaitable[T]], *, what: str
) -> T:
    """Run ``make()`` — the close of ``what``, an async stream opened on ``loop`` — to its end
    from sync code, and return its result.

    On the stream's own loop when that loop runs in another thread (its sender task and locks
    live there); on a private loop in a worker thread when it is gone or idle (the usual case:
    ``asyncio.run(agent.ainvoke(...))`` returned, then ``close_all()``). Called on the stream's
    own running loop it raises ``ConfigError``: waiting there would wait on itself.
    """
    here = _running_loop()
    if loop is not None and loop is here:
        raise ConfigError(
            f"{what} was opened on the event loop this sync call runs on; a sync close would "
            "block that loop on itself: await aclose_all() (or call the tool async) there"
        )
    if loop is not None and loop.is_running() and not loop.is_closed():

        async def on_its_loop() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(on_its_loop(), loop).result()
    outcome: list[T] = []
    failure: list[BaseException] = []

    def private_loop() -> None:
        async def run() -> T:
            return await make()

        try:
            outcome.append(asyncio.run(run()))
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    worker = threading.Thread(target=private_loop, name="pf-metered-async-close")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return outcome[0]


async def await_on_loop(
    loop: asyncio.AbstractEventLoop | None, make: Callable[[], Awaitable[T]]
) -> T:
    """Await ``make()`` — the close of an async stream opened on ``loop`` — from async code on
    any loop: on the stream's own loop when that one runs in another thread, else right here."""
    here = asyncio.get_running_loop()
    if loop is not None and loop is not here and loop.is_running() and not loop.is_closed():

        async def on_its_loop() -> T:
            return await make()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(on_its_loop(), loop))
    return await make()


@dataclass(slots=True, eq=False)
class PendingCreate:
    """A create whose answer was lost: its money may be locked, so its reservation is kept.

    ``tool`` is ``escrow_create`` or ``stream_open``; ``stream`` the stream that was being
    opened (``open()`` again uses the same key, so it finds the escrow, never a second one);
    ``problem`` why the last attempt to settle it failed.
    """

    tool: Literal["escrow_create", "stream_open"]
    provider: str
    amount_micro: int
    idempotency_key: str | None
    stream: PaymentStream | AsyncPaymentStream | None = None
    memo: str = ""
    auto_release_hours: int | None = None
    problem: str = ""

    def describe(self) -> str:
        what = "stream budget" if self.tool == "stream_open" else "escrow"
        return (
            f"{self.tool}: a {what} of {format_usdc(self.amount_micro)} USDC for "
            f"{self.provider} may be locked (its answer was lost; key {self.idempotency_key})"
        )


class _Attempt:
    """What :meth:`ToolContext.locking` needs to remember a create that ended ambiguous."""

    __slots__ = ("auto_release_hours", "memo", "stream")

    def __init__(self) -> None:
        self.stream: PaymentStream | AsyncPaymentStream | None = None
        self.memo = ""
        self.auto_release_hours: int | None = None


class ToolContext:
    """The clients, caps and stream registry behind one agent's tools.

    ``client`` serves sync tool calls and ``async_client`` async ones; give either or both.
    With only a sync client, async calls run the sync work in a thread. ``store`` and
    ``auto_release_hours`` are passed to every stream the tools open (and to every escrow
    ``escrow_create`` makes without hours of its own). ``book`` is where the escrows and streams
    made are written down and where ``max_locked`` / ``max_spend`` are counted
    (:mod:`pf_metered.tools.state`; default: a throwaway in-memory one).
    """

    def __init__(
        self,
        client: EscrowClient | None = None,
        async_client: AsyncEscrowClient | None = None,
        *,
        caps: Caps | None = None,
        store: Store | None = None,
        auto_release_hours: int | None = None,
        book: Book | None = None,
    ) -> None:
        require_a_client("ToolContext", client, async_client)
        self.client = client
        self.async_client = async_client
        self.caps = caps if caps is not None else Caps()
        self.store = store
        self.auto_release_hours = auto_release_hours
        self.book = book if book is not None else ToolState().book("local")
        self._lock = threading.Lock()
        self._ids = itertools.count(self.book.last_handle_number() + 1)  # never reuse an id
        self._streams: dict[str, StreamEntry] = {}
        self._created_escrows: set[str] = set()
        self._escrow_counted: dict[str, int] = {}
        """What each escrow ``escrow_create`` made here counts against ``max_total`` now:
        its amount less what came back (paid and still-locked money stay counted)."""
        self._locked_micro = 0
        self._opening = 0
        self._pending: list[PendingCreate] = []

    def __repr__(self) -> str:
        locked = self.book.figures().locked_micro  # what is locked now, not what was paid
        return (
            f"ToolContext(streams={len(self._streams)}, locked={format_usdc(locked)}, "
            f"counted={format_usdc(self._locked_micro)}, caps={self.caps.describe()!r})"
        )

    @property
    def dialect(self) -> str | None:
        """The API dialect the clients speak (``"v1"``, ``"deployed"``), or ``None`` while
        it is not known: a client that finds its dialect by asking the host has not asked yet,
        and describing a tool must never send a request."""
        for client in (self.client, self.async_client):
            if client is not None:
                if not getattr(client, "dialect_resolved", True):
                    return None
                return client.capabilities.dialect
        return None  # pragma: no cover - the constructor requires a client

    # -- money at risk -------------------------------------------------------------------

    @property
    def locked_micro(self) -> int:
        """What ``max_total`` counts, in micro-USDC: everything the tools of this context took
        from the payer and did not get back — money locked now *and* money already paid. What
        comes back counts back: an escrow refunded (:meth:`escrow_seen`), a stream's unused
        budget at close (:meth:`closed`); a payment does not. For what is locked right now,
        read ``book.figures().locked_micro`` (what ``stream_list`` reports)."""
        return self._locked_micro

    def reserve(self, amount_micro: int, *, what: str, provider: str, stream: bool) -> None:
        """Check the caps for locking ``amount_micro`` and hold it; raise ``ToolError`` if not."""
        caps = self.caps
        if caps.allowed_providers is not None and provider not in caps.allowed_providers:
            tool_name = "stream_open" if stream else "escrow_create"
            raise provider_not_allowed(provider, caps.allowed_providers, tool_name=tool_name)
        if caps.max_budget_micro is not None and amount_micro > caps.max_budget_micro:
            raise ToolError(
                f"Cap exceeded: {what} {format_usdc(amount_micro)} USDC is above the operator's "
                f"maximum of {format_usdc(caps.max_budget_micro)} USDC. Use a smaller amount.",
                kind="cap_exceeded",
            )
        with self._lock:
            room = None
            if caps.max_total_micro is not None:
                room = caps.max_total_micro - self._locked_micro
            if room is None or amount_micro <= room:
                self._hold(amount_micro, caps, what=what, stream=stream)
                return
        raise self._total_exceeded(amount_micro, room, stream=stream)

    def _hold(self, amount_micro: int, caps: Caps, *, what: str, stream: bool) -> None:
        """The rest of :meth:`reserve` once ``max_total`` has room, under ``self._lock``:
        ``max_open_streams``, the global caps (the book), then the hold itself."""
        if stream and caps.max_open_streams is not None:
            open_now = self._opening + sum(1 for e in self._streams.values() if e.receipt is None)
            if open_now >= caps.max_open_streams:
                raise ToolError(
                    f"Cap exceeded: at most {caps.max_open_streams} stream"
                    f"{'' if caps.max_open_streams == 1 else 's'} may be open at once.",
                    next_step="Close one you are done with (stream_close) first."
                    if offers("stream_close")
                    else "Pay through a stream already open, or ask the user to have the "
                    "operator raise max_open_streams.",
                    kind="cap_exceeded",
                )
        self.book.hold(amount_micro, caps, what=what)  # max_locked, max_spend
        self._locked_micro += amount_micro
        if stream:
            self._opening += 1

    def _total_exceeded(self, amount_micro: int, room: int, *, stream: bool) -> ToolError:
        """The refusal of a lock that would pass ``max_total``, with the next steps that exist
        now (built outside the lock: it reads the registry and the book)."""
        cap = self.caps.max_total_micro
        assert cap is not None  # only called when max_total refused
        return ToolError(
            f"Cap exceeded: locking {format_usdc(amount_micro)} USDC more would pass the "
            f"operator's total of {format_usdc(cap)} USDC (max_total: money paid or still "
            f"locked counts, money refunded comes back; {format_usdc(max(room, 0))} USDC left).",
            next_step=self._total_next(
                room, tool_name="stream_open" if stream else "escrow_create"
            ),
            kind="cap_exceeded",
        )

    def _total_next(self, room: int, *, tool_name: str) -> str:
        """What the model can do when ``max_total`` has no room: only steps that give money
        back to the count (closing an open stream, refunding an open escrow made here) or fit
        the room; otherwise the limit is reached and only the operator can raise it."""
        steps = []
        if room > 0:
            steps.append(f"use at most {format_usdc(room)} USDC")
        with self._lock:
            streams = [
                e.handle for e in self._streams.values() if e.receipt is None and not e.closing
            ]
            counted = set(self._escrow_counted)
            pending = len(self._pending)
            held = {
                e.handle: e.receipt.still_locked
                for e in self._streams.values()
                if e.receipt is not None and e.receipt.still_locked
            }
        if streams and offers("stream_close"):
            steps.append(
                f"close a stream you are done with (stream_close: {', '.join(streams[-5:])}): "
                "its unused budget comes back"
            )
        escrows = [
            e.escrow_id
            for e in self.book.escrows(open_only=True)
            if e.escrow_id in counted and e.remaining_micro > 0
        ]
        if escrows and offers("escrow_refund"):
            steps.append(
                "give back an escrow you no longer need (escrow_refund: "
                f"{', '.join(escrows[-3:])}): what it still holds comes back"
            )
        cap = format_usdc(self.caps.max_total_micro or 0)
        notes = ""
        if pending:
            notes += (
                f" {pending} create(s) whose answer was lost stay counted until this session "
                "settles them."
            )
        if held and offers("stream_status"):
            times = sorted(h.until for hs in held.values() for h in hs if h.until)
            first = f"; the first comes back after {times[0]}" if times else ""
            locked = format_usdc(sum(h.amount_micro for hs in held.values() for h in hs))
            notes += (
                f" {locked} USDC is still locked by closed streams "
                f"({', '.join(list(held)[-5:])}{first}): stream_status on them after that gives "
                "back the room of what came back."
            )
        if escrows and self.dialect == "deployed" and offers("escrow_status"):
            notes += (
                " This escrow service hands an escrow that was not released back at its "
                "timeout, less its 1%: escrow_status after that gives the room back."
            )
        if not steps:
            until = " until then" if notes else ""
            return (
                f"The operator's max_total of {cap} USDC is reached.{notes} Do not call "
                f"{tool_name} again{until}; tell the user the limit is reached and only the "
                "operator can raise it."
            )
        steps.append("ask the user to have the operator raise max_total")
        return "Next: " + "; or ".join(steps) + f".{notes}"

    def unreserve(self, amount_micro: int, *, stream: bool) -> None:
        """Give back a reservation whose lock failed (or an amount a close refunded)."""
        with self._lock:
            self._locked_micro -= amount_micro
            if stream:
                self._opening -= 1
        self.book.unhold(amount_micro)

    @contextlib.contextmanager
    def locking(
        self, amount_micro: int, *, stream: bool, provider: str, tool_name: str
    ) -> Iterator[_Attempt]:
        """While a reservation's money is being locked for ``provider`` (sync or async body):
        a failure gives the reservation back, and a ``NotFound`` means the provider agent is
        unknown (the only id the request carries), not some escrow. An ambiguous outcome
        keeps the reservation and remembers the create (the body sets ``attempt.stream``, and
        for an escrow its memo and hours, so it can be settled later)."""
        attempt = _Attempt()
        try:
            yield attempt
        except NotFound as exc:
            self.unreserve(amount_micro, stream=stream)
            raise unknown_provider(exc, provider=provider, tool_name=tool_name) from None
        except AmbiguousOutcome as exc:
            pending = PendingCreate(
                "stream_open" if stream else "escrow_create",
                provider,
                amount_micro,
                exc.idempotency_key,
                attempt.stream,
                attempt.memo,
                attempt.auto_release_hours,
            )
            with self._lock:
                self._pending.append(pending)
            log.warning("%s; kept against the caps until it is settled", pending.describe())
            raise ToolError(
                f"{tool_name} may or may not have locked {format_usdc(amount_micro)} USDC for "
                f"{provider}: its answer was lost. The amount stays counted against the "
                "operator's limits until this session reconciles it (an escrow found then is "
                "refunded, a stream closed).",
                next_step=f"Do NOT call {tool_name} again for this payment; tell the user it is "
                "in doubt, and carry on without it.",
                kind="ambiguous",
            ) from None
        except BaseException:
            self.unreserve(amount_micro, stream=stream)
            raise

    def check_rate(self, rate: Rate) -> None:
        """Refuse a rate above the operator's ``max_rate``."""
        cap = self.caps.max_rate
        if cap is not None and rate.decimal > cap.decimal:
            raise ToolError(
                f"Cap exceeded: rate {rate} USDC per unit is above the operator's maximum of "
                f"{cap} USDC per unit. Use a lower rate.",
                kind="cap_exceeded",
            )

    # -- escrows created through the tools -----------------------------------------------

    def add_created_escrow(self, escrow_id: str) -> None:
        """Remember that ``escrow_create`` made escrow ``escrow_id`` (it may be released)."""
        with self._lock:
            self._created_escrows.add(escrow_id)

    def escrow_made(self, escrow: Escrow, *, provider: str, amount_micro: int) -> None:
        """``escrow_create`` locked ``escrow``: remember it (here and in the book, where its
        hold of ``amount_micro`` becomes the escrow's own figures)."""
        with self._lock:
            self._created_escrows.add(escrow.escrow_id)
            self._escrow_counted[escrow.escrow_id] = amount_micro
        self.book.escrow_made(escrow, provider=provider, held_micro=amount_micro)
        self.escrow_seen(escrow)  # an answer that already shows a refund (it never should)

    def escrow_seen(self, escrow: Escrow) -> int:
        """Keep the book's figures of ``escrow`` from a fresh answer (release, refund, status)
        and give back to ``max_total`` what came back to the payer since it was last seen;
        returns that amount (micro-USDC).

        Why here and not in the book: ``max_total`` is this context's count. Only escrows
        ``escrow_create`` made through this context are in it; a refund of one is given back
        once, however often it is seen (the count only goes down to amount less returned).
        """
        self.book.escrow_seen(escrow)
        counts_now = escrow.amount_micro - escrow.returned_micro
        with self._lock:
            before = self._escrow_counted.get(escrow.escrow_id)
            if before is None or counts_now >= before:
                return 0
            self._escrow_counted[escrow.escrow_id] = counts_now
            self._locked_micro -= before - counts_now
        return before - counts_now

    def created_escrow(self, escrow_id: str) -> bool:
        """Whether escrow ``escrow_id`` was made by ``escrow_create`` through this context."""
        with self._lock:
            if escrow_id in self._created_escrows:
                return True
        return self.book.owns_escrow(escrow_id)  # made by an earlier run of this server

    # -- the stream registry -------------------------------------------------------------

    def register(
        self,
        stream: PaymentStream | AsyncPaymentStream,
        *,
        provider: str,
        rate: Rate,
        budget_micro: int,
        max_units: int | None,
        is_async: bool,
        handle: str | None = None,
    ) -> StreamEntry:
        """Add an opened stream under a new short id (its reservation becomes a real lock);
        ``handle``: the id it had before a restart (the book keeps it)."""
        with self._lock:
            if handle is None:
                handle = f"s{next(self._ids)}"
            entry = StreamEntry(handle, stream, provider, rate, budget_micro, max_units, is_async)
            entry.loop = _running_loop() if is_async else None
            self._streams[handle] = entry
            self._opening -= 1
        self.book.stream_opened(
            handle=handle,
            stream_id=stream.stream_id,
            provider=provider,
            rate=str(rate),
            budget_micro=budget_micro,
            max_units=max_units,
            held_micro=budget_micro,
        )
        return entry

    def adopt(
        self,
        stream: PaymentStream | AsyncPaymentStream,
        *,
        handle: str,
        provider: str,
        rate: Rate,
        budget_micro: int,
        max_units: int | None,
        is_async: bool,
    ) -> StreamEntry:
        """Take back, under its old ``handle``, a stream an earlier run of this server opened
        (resumed from its journal by :mod:`pf_metered.tools.restore`); the book has its row."""
        with self._lock:
            entry = StreamEntry(handle, stream, provider, rate, budget_micro, max_units, is_async)
            entry.loop = _running_loop() if is_async else None
            self._streams[handle] = entry
            self._locked_micro += budget_micro
        return entry

    def entry(self, stream_id: str) -> StreamEntry:
        """The stream the model calls ``stream_id``, or a ``ToolError`` listing the known ones."""
        with self._lock:
            found = self._streams.get(stream_id.strip())
            known = sorted(self._streams, key=lambda h: (len(h), h))
        if found is None:
            if known:
                listing, step = ", ".join(known[-10:]), "Call the tool again with one of them."
            else:
                listing = "none yet"
                step = (
                    "Open one with stream_open first."
                    if offers("stream_open")
                    else "Ask the user which stream to use."
                )
            raise ToolError(
                f"Unknown stream {stream_id!r}: no stream of that id was opened in this "
                f"conversation. Known streams: {listing}.",
                next_step=step,
                kind="unknown_stream",
            )
        return found

    def entries(self) -> list[StreamEntry]:
        """Every stream opened through this context, oldest first."""
        with self._lock:
            return list(self._streams.values())

    def stream_for(self, provider: str) -> StreamEntry | None:
        """The newest open stream paying ``provider``, for tools that are paid per call."""
        with self._lock:
            for entry in reversed(list(self._streams.values())):
                if entry.provider == provider and entry.receipt is None and not entry.closing:
                    return entry
        return None

    def owner_of_escrow(self, escrow_id: str) -> StreamEntry | None:
        """The open stream whose budget is escrow ``escrow_id``, if any."""
        with self._lock:
            for entry in self._streams.values():
                if entry.receipt is None and entry.escrow_id == escrow_id:
                    return entry
        return None

    # -- creates whose answer was lost ---------------------------------------------------

    def pending_creates(self) -> list[PendingCreate]:
        """Creates that ended ambiguous and are not settled yet (their money may be locked)."""
        with self._lock:
            return list(self._pending)

    def _settled(self, pending: PendingCreate, debited_micro: int) -> None:
        with self._lock:
            if pending in self._pending:
                self._pending.remove(pending)
                self._locked_micro -= pending.amount_micro - debited_micro
                if pending.tool == "stream_open":
                    self._opening -= 1
            else:
                return
        self.book.unhold(pending.amount_micro)  # the create is settled: its hold goes

    def _unsettled(self, pending: PendingCreate, exc: BaseException) -> None:
        pending.problem = str(exc)
        log.warning("%s; not settled: %s", pending.describe(), pending.problem)

    def settle_pending(self) -> list[PendingCreate]:
        """Reconcile every ambiguous create by its idempotency key; returns those left.

        A stream is opened again (the same key finds its escrow) and closed: what it did not
        use is refunded. An escrow is looked up the same way and refunded (the agent never
        learned of it, so it would otherwise go to the provider at auto-release). An async
        stream is settled on a private loop (:func:`run_async_close`).
        """
        for pending in self.pending_creates():
            try:
                stream = pending.stream
                if stream is not None:
                    from pf_metered.stream import AsyncPaymentStream

                    if isinstance(stream, AsyncPaymentStream):

                        async def settle(s: AsyncPaymentStream = stream) -> Receipt:
                            await s.open()
                            return await s.close()

                        what = f"the {pending.tool} for {pending.provider}"
                        receipt = run_async_close(None, settle, what=what)
                    else:
                        stream.open()
                        receipt = stream.close()
                    self._settled(pending, receipt.debited_micro)
                elif self.client is not None:
                    escrow = self.client.create_escrow(
                        pending.provider,
                        format_usdc(pending.amount_micro),
                        memo=pending.memo,
                        auto_release_hours=pending.auto_release_hours,
                        idempotency_key=pending.idempotency_key,
                    )
                    refunded = self.client.refund(escrow.escrow_id).refunded_micro
                    self._settled(pending, pending.amount_micro - refunded)
            except PFMeteredError as exc:
                self._unsettled(pending, exc)
        return self.pending_creates()

    async def asettle_pending(self) -> list[PendingCreate]:
        """:meth:`settle_pending` for async code (sync and async streams alike)."""
        for pending in self.pending_creates():
            try:
                stream = pending.stream
                if stream is not None:
                    from pf_metered.stream import AsyncPaymentStream

                    if isinstance(stream, AsyncPaymentStream):
                        await stream.open()
                        receipt = await stream.close()
                    else:
                        await asyncio.to_thread(stream.open)
                        receipt = await asyncio.to_thread(stream.close)
                    self._settled(pending, receipt.debited_micro)
                elif self.async_client is not None:
                    escrow = await self.async_client.create_escrow(
                        pending.provider,
                        format_usdc(pending.amount_micro),
                        memo=pending.memo,
                        auto_release_hours=pending.auto_release_hours,
                        idempotency_key=pending.idempotency_key,
                    )
                    answer = await self.async_client.refund(escrow.escrow_id)
                    self._settled(pending, pending.amount_micro - answer.refunded_micro)
                else:
                    await asyncio.to_thread(self.settle_pending)
                    break
            except PFMeteredError as exc:
                self._unsettled(pending, exc)
        return self.pending_creates()

    def closed(self, entry: StreamEntry, receipt: Receipt) -> None:
        """Record a stream's receipt; from now on it holds what it took from the payer.

        The stream's reservation was its budget; what it really took is the receipt's
        ``debited`` (paid, plus any money still locked or kept by the service). The difference
        goes back to the ``max_total`` room — on the deployed dialect the unused budget never
        left the payer, and a tranche still locked keeps its place until it comes back.
        """
        with self._lock:
            if entry.receipt is None:
                entry.receipt = receipt
                self._locked_micro -= entry.budget_micro - receipt.debited_micro
        self.book.stream_closed(
            entry.handle,
            paid_micro=receipt.released_micro,
            refunded_micro=receipt.refunded_micro,
            still_locked_micro=receipt.still_locked_micro,
        )

    def still_locked_seen(self, entry: StreamEntry, escrows: Iterable[Escrow]) -> int:
        """A closed stream's still-locked escrows read back (``escrows``): those the service
        has since handed back or released leave the receipt's ``still_locked``; what came back
        to the payer is given back to ``max_total``. Returns that amount (micro-USDC).

        Why: on the deployed dialect a stream's unused tranche stays locked after close and
        comes back, less the service's 1%, at its timeout; until it is seen to, it counts (it
        may yet be released). Each escrow leaves ``still_locked`` once, so a second read gives
        nothing twice.
        """
        seen = {e.escrow_id: e for e in escrows}
        with self._lock:
            receipt = entry.receipt
            if receipt is None:
                return 0
            held, returned, kept, released, notes = [], 0, 0, 0, []
            for h in receipt.still_locked:
                escrow = seen.get(h.escrow_id)
                if escrow is None or escrow.is_open:
                    held.append(h)
                    continue
                back = escrow.returned_micro
                returned += back
                kept += h.amount_micro - back - escrow.released_micro
                released += escrow.released_micro
                notes.append(
                    f"escrow {h.escrow_id} ({format_usdc(h.amount_micro)} USDC, {h.why}) "
                    f"later {escrow.status}: {format_usdc(back)} USDC came back"
                )
            if not notes:
                return 0
            entry.receipt = replace(
                receipt,
                still_locked=tuple(held),
                refunded_micro=receipt.refunded_micro + returned,
                kept_by_service_micro=receipt.kept_by_service_micro + kept,
                auto_released_micro=receipt.auto_released_micro + released,
                notes=receipt.notes + tuple(notes),
            )
            self._locked_micro -= returned
            updated = entry.receipt
        self.book.stream_closed(
            entry.handle,
            paid_micro=updated.released_micro,
            refunded_micro=updated.refunded_micro,
            still_locked_micro=updated.still_locked_micro,
        )
        return returned

    def close_all(self) -> list[Receipt]:
        """Close every stream the agent left open (pay what it used, refund the rest).

        Call it when the agent's session ends: an escrow left locked would otherwise go to the
        provider whole at auto-release. Streams opened asynchronously are closed too, on their
        own loop or a private one (:func:`run_async_close`); creates that ended ambiguous on an
        async stream are settled the same way.
        """
        from pf_metered.tools.streams import STREAM_CLOSE

        receipts = []
        for entry in self.entries():
            if entry.receipt is None:
                STREAM_CLOSE.call(self, {"stream_id": entry.handle})
            if entry.receipt is not None:
                receipts.append(entry.receipt)
        self.settle_pending()  # what is left is logged, and kept in pending_creates()
        return receipts

    async def aclose_all(self) -> list[Receipt]:
        """:meth:`close_all` for async code (closes sync and async streams alike; an async
        stream whose loop runs in another thread is closed on that loop)."""
        from pf_metered.tools.streams import STREAM_CLOSE

        receipts = []
        for entry in self.entries():
            if entry.receipt is None:
                await STREAM_CLOSE.acall(self, {"stream_id": entry.handle})
            if entry.receipt is not None:
                receipts.append(entry.receipt)
        await self.asettle_pending()
        return receipts

    def streams_summary(self) -> dict[str, Any]:
        """How many streams are open and how much is locked (for stream_list)."""
        with self._lock:
            open_n = sum(1 for e in self._streams.values() if e.receipt is None)
        summary: dict[str, Any] = {"open_streams": open_n, **self.book.figures().as_answer()}
        pending = self.pending_creates()
        if pending:
            summary["unsettled_creates"] = len(pending)
        return summary
