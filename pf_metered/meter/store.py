"""Where a stream's meter keeps its state: the contract every store honours, and the in-memory one.

Why a store holds only whole numbers: money is derived, never stored as a running float. A
release *intent* covers a range of units ``(units_from, units_to]`` and its amount is a pure
function of that range and the rate::

    batch intent:  floor(rate × units_to)   − floor(rate × units_from)
    final intent:  half_up(rate × units_to) − floor(rate × units_from)

so the sum of all intents telescopes to ``half_up(rate × units)`` exactly, sub-micro remainders
carry from batch to batch by construction, and a store that can only add integers (Redis Lua,
SQLite) can still keep the books exact. The idempotency key of an intent is derived from the
stream id and the intent's sequence number, so it is the same on every retry and after a crash.

Every operation here is atomic with respect to every other on the same stream. ``add_units``
checks the budget and counts in one step (no overspend however many threads or processes race);
``claim`` hands out at most one pending intent per stream (at most one release in flight).

What a store must never do: perform HTTP, compute money with floats, hand out a second intent
for units already claimed, or forget an intent it handed out before it is settled.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol, runtime_checkable

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.money import Rate, parse_rate

__all__ = [
    "Intent",
    "MemoryStore",
    "Store",
    "StreamConfig",
    "StreamState",
    "StreamStatus",
    "intent_amount_micro",
    "intent_key",
]

StreamStatus = Literal["new", "open", "closing", "closed"]
"""``new``: configured, escrow not yet locked. ``open``: counting. ``closing``: the final intent
was claimed; no unit may be added. ``closed``: final release and refund settled."""


@dataclass(frozen=True, slots=True)
class StreamConfig:
    """What a stream was opened with; fixed for its life."""

    stream_id: str
    to_agent_id: str
    rate: str
    budget_micro: int
    max_units: int
    memo: str = ""
    auto_release_hours: int | None = None
    batch_units: int | None = None
    every_seconds: str | None = None

    @property
    def parsed_rate(self) -> Rate:
        return parse_rate(self.rate)


@dataclass(frozen=True, slots=True)
class Intent:
    """A release the stream has decided to make, written down before it is sent."""

    stream_id: str
    seq: int
    units_from: int
    units_to: int
    final: bool

    @property
    def idempotency_key(self) -> str:
        return intent_key(self.stream_id, self.seq)


@dataclass(frozen=True, slots=True)
class StreamState:
    """A consistent snapshot of one stream as the store holds it."""

    config: StreamConfig
    status: StreamStatus
    escrow_id: str | None
    units: int
    claimed_units: int
    paid_micro: int
    releases: int
    pending: tuple[Intent, ...] = ()
    refunded_micro: int | None = None
    next_seq: int = 1
    settled: tuple[tuple[Intent, int], ...] = field(default=())


def intent_key(stream_id: str, seq: int) -> str:
    """The idempotency key of intent ``seq``: stable across retries, restarts and hosts."""
    return f"pfm-{stream_id}-r{seq}"


def intent_amount_micro(rate: Rate, intent: Intent) -> int:
    """What an intent pays, derived from its unit range (see the module docstring)."""
    end = rate.micro_half_up(intent.units_to) if intent.final else rate.micro_floor(intent.units_to)
    return end - rate.micro_floor(intent.units_from)


@runtime_checkable
class Store(Protocol):
    """The contract of a meter store. Every method is atomic per stream."""

    def create(self, config: StreamConfig) -> None:
        """Register a new stream (status ``new``); ``InvalidInput`` if the id exists."""

    def load(self, stream_id: str) -> StreamState | None:
        """The stream's current state, or ``None`` if unknown."""

    def set_escrow(self, stream_id: str, escrow_id: str) -> None:
        """Record the locked escrow and move ``new`` → ``open``."""

    def add_units(self, stream_id: str, units: int) -> int:
        """Count ``units`` if the total stays within ``max_units``; return the new total.

        Raises ``BudgetExhausted`` (counting nothing) when it would not, and ``StreamClosed``
        unless the stream is ``open``.
        """

    def claim(self, stream_id: str, *, min_units: int, final: bool = False) -> Intent | None:
        """Claim the unclaimed units as one intent, or ``None``.

        ``None`` when an intent is already pending, or (non-final) fewer than ``min_units`` are
        unclaimed. A final claim moves the stream to ``closing`` and always yields an intent
        (possibly covering no new units: the half-up rounding may still owe a micro-USDC).
        """

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        """Mark intent ``seq`` as paid; idempotent for an intent already settled."""

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        """Record the refund and move the stream to ``closed``; idempotent."""


class MemoryStore:
    """The default store: a dict and a lock. Fast, and gone when the process is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, StreamState] = {}

    def _get(self, stream_id: str) -> StreamState:
        state = self._streams.get(stream_id)
        if state is None:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        return state

    def create(self, config: StreamConfig) -> None:
        with self._lock:
            if config.stream_id in self._streams:
                raise InvalidInput("stream_id", f"already exists: {config.stream_id!r}")
            self._streams[config.stream_id] = StreamState(
                config=config, status="new", escrow_id=None, units=0, claimed_units=0,
                paid_micro=0, releases=0,
            )

    def load(self, stream_id: str) -> StreamState | None:
        with self._lock:
            return self._streams.get(stream_id)

    def set_escrow(self, stream_id: str, escrow_id: str) -> None:
        with self._lock:
            state = self._get(stream_id)
            if state.escrow_id not in (None, escrow_id):
                raise InvalidInput("escrow_id", "the stream is already bound to another escrow")
            status: StreamStatus = "open" if state.status == "new" else state.status
            self._streams[stream_id] = replace(state, escrow_id=escrow_id, status=status)

    def add_units(self, stream_id: str, units: int) -> int:
        with self._lock:
            state = self._get(stream_id)
            if state.status != "open":
                raise StreamClosed(f"stream {stream_id} is {state.status}; it takes no units")
            total = state.units + units
            if total > state.config.max_units:
                left = state.config.max_units - state.units
                raise BudgetExhausted(
                    f"{units} more units would exceed the budget; {left} left",
                    remaining_units=left,
                )
            self._streams[stream_id] = replace(state, units=total)
            return total

    def claim(self, stream_id: str, *, min_units: int, final: bool = False) -> Intent | None:
        with self._lock:
            state = self._get(stream_id)
            if state.pending or state.status in ("new", "closed"):
                return None
            if state.status == "closing" and not final:
                return None
            new_units = state.units - state.claimed_units
            if not final and (new_units < max(min_units, 1)):
                return None
            intent = Intent(stream_id, state.next_seq, state.claimed_units, state.units, final)
            self._streams[stream_id] = replace(
                state,
                status="closing" if final else state.status,
                claimed_units=state.units,
                pending=(intent,),
                next_seq=state.next_seq + 1,
            )
            return intent

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        with self._lock:
            state = self._get(stream_id)
            match = [i for i in state.pending if i.seq == seq]
            if not match:
                return
            self._streams[stream_id] = replace(
                state,
                pending=tuple(i for i in state.pending if i.seq != seq),
                paid_micro=state.paid_micro + amount_micro,
                releases=state.releases + (1 if amount_micro else 0),
                settled=(*state.settled, (match[0], amount_micro)),
            )

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        with self._lock:
            state = self._get(stream_id)
            if state.status == "closed":
                return
            self._streams[stream_id] = replace(
                state, status="closed", refunded_micro=refunded_micro
            )
