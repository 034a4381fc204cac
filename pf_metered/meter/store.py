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

The contract is code: :class:`Store` (a ``runtime_checkable`` Protocol: the whole contract;
nothing is probed with ``getattr``) and :class:`BaseStore` (a base class with the defaults of
every member beyond the seven core methods, so a new store writes only those seven).
``open_store`` and ``Meter`` accept an object only if ``isinstance(obj, Store)``. The members
beyond the core, and their defaults in ``BaseStore``:

* ``counter(stream_id) -> UnitCounter``: the hot path of one stream (``add`` / ``reserve`` /
  ``commit`` / ``cancel``). ``reserve(n)`` holds budget for a call that has not finished yet
  (so a metered call is refused *before* it runs, and a call that raises gives its
  reservation back); reserved units count against ``max_units`` but are never claimed.
  Default: :class:`AddUnitsCounter`, which reserves per process and counts with
  ``add_units``.
* owners: ``claim`` records the claiming process as the intent's owner; ``take_over(stream_id,
  *, lease_seconds=None)`` returns the pending intent if this store object owns it or its
  owner has not settled it within ``lease_seconds`` (default ``intent_lease``), making this
  one its owner with a fresh claim time; else ``None``. ``pending_owner`` says who holds the
  pending intent and for how long (``resume`` refuses to take over a live owner's), ``owner``
  is this store object's id (``host:pid:nonce``), ``reclaim`` gives back the budget leases of
  processes that are gone. Defaults: no owners (``take_over`` hands out the pending intent,
  ``pending_owner`` is ``None``, ``reclaim`` does nothing).
* ``close()``: give back what the process holds; default: nothing to do.
* ``location``: what ``open_store`` takes to open this store again (a path, a URL), for the
  messages that tell a user how to resume a stream; default ``None`` (not reopenable).

A store that leases budget to each process (SQLite group mode, Redis leased mode) keeps its
per-process side in :class:`~pf_metered.meter.lease.LeasedCounter` over a two-method backend.

``MemoryStore`` lives in one process, so it owns every intent it holds.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol, runtime_checkable

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.lane import LOCK_FREE, LaneParts
from pf_metered.money import Rate, parse_rate

__all__ = [
    "AddUnitsCounter",
    "BaseStore",
    "CallGate",
    "FastLane",
    "Intent",
    "MemoryStore",
    "Store",
    "StreamConfig",
    "StreamState",
    "StreamStatus",
    "UnitCounter",
    "intent_amount_micro",
    "intent_key",
    "new_owner_id",
    "owner_alive",
    "owner_in_this_process",
]

_NEVER_DUE: Final = 1 << 62  # no batch threshold
_LEASE: Final = 4096  # tokens lent to a lane at most at once (taking them back is a loop)
_TOKENS: Final[tuple[None, ...]] = (None,) * _LEASE

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


def new_owner_id() -> str:
    """A fresh owner id for intents and leases: ``host:pid:nonce``.

    Why host and pid in it: ``resume`` must tell a live owner (whose release may be on the
    wire right now) from a dead one (whose release it must finish) without waiting out a
    lease; on the owner's own host the pid answers that (:func:`owner_alive`).
    """
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_alive(owner: str) -> bool | None:
    """Whether the process behind an owner id is alive: ``True``/``False`` when it ran on this
    host (checked by pid), ``None`` when that cannot be told (another host, an id of an older
    version or one a user chose)."""
    host, sep, rest = owner.partition(":")
    pid_text, sep2, _nonce = rest.partition(":")
    if not (sep and sep2) or host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return None
    return True


def owner_in_this_process(owner: str) -> bool:
    """Whether an owner id was made in this process (another store object, maybe)."""
    host, _, rest = owner.partition(":")
    return host == socket.gethostname() and rest.partition(":")[0] == str(os.getpid())


def intent_amount_micro(rate: Rate, intent: Intent) -> int:
    """What an intent pays, derived from its unit range (see the module docstring)."""
    end = rate.micro_half_up(intent.units_to) if intent.final else rate.micro_floor(intent.units_to)
    return end - rate.micro_floor(intent.units_from)


@runtime_checkable
class Store(Protocol):
    """The whole contract of a meter store (see the module docstring). Every method is
    atomic per stream. Subclass :class:`BaseStore` to get the extensions' defaults."""

    @property
    def intent_lease(self) -> float:
        """Seconds after which an unsettled intent's owner is presumed gone."""

    @property
    def owner(self) -> str:
        """This store object's owner id on intents and leases (``""``: no owners)."""

    @property
    def location(self) -> str | None:
        """What ``open_store`` takes to open this store again, or ``None``."""

    def counter(self, stream_id: str) -> UnitCounter:
        """The stream's hot-path handle."""

    def take_over(self, stream_id: str, *, lease_seconds: float | None = None) -> Intent | None:
        """The pending intent if it is ours to send (see the module docstring), else ``None``."""

    def pending_owner(self, stream_id: str) -> tuple[str | None, float] | None:
        """``(owner, age in seconds)`` of the pending intent, or ``None``."""

    def reclaim(self, stream_id: str) -> None:
        """Give back the budget leases of processes that are gone."""

    def close(self) -> None:
        """Give back what this process holds (leases, connections); idempotent."""

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

        ``None`` when an intent is already pending, when the stream is already ``closing``
        (its one final intent was claimed: a second closer that raced past its own check must
        not get another, or it would refund too), or (non-final) fewer than ``min_units`` are
        unclaimed. A final claim on an ``open`` stream moves it to ``closing`` and always
        yields an intent (possibly covering no new units: the half-up rounding may still owe a
        micro-USDC).
        """

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        """Mark intent ``seq`` as paid; idempotent for an intent already settled."""

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        """Record the refund and move the stream to ``closed``; idempotent."""


@runtime_checkable
class UnitCounter(Protocol):
    """The hot path of one stream (``Store.counter``; see the module docstring).

    Every method is atomic with the store's other operations on the same stream.
    """

    def add(self, units: int) -> int:
        """Exactly ``Store.add_units`` for the bound stream: count, return the new total."""

    def reserve(self, units: int) -> None:
        """Hold ``units`` of budget (``BudgetExhausted``/``StreamClosed`` as ``add``)."""

    def commit(self, units: int) -> int:
        """Turn ``units`` held by ``reserve`` into counted units; return the new total."""

    def cancel(self, units: int) -> None:
        """Give back ``units`` held by ``reserve`` (the metered call failed)."""

    def units_left(self) -> int | None:
        """Units the budget still pays (counted and reserved subtracted) if this process can
        tell without asking the store, else ``None`` (the meter then loads the state)."""


@runtime_checkable
class CallGate(UnitCounter, Protocol):
    """A ``UnitCounter`` that also lets ``close`` wait for the calls holding a reservation.

    Why: a call reserved before close began must be paid (its body ran on the budget's
    promise), and a call that commits after the final claim must not count a unit no release
    will pay. The meter wraps a store's plain counter in one (:mod:`pf_metered.meter.core`);
    the in-memory record is one natively (its lane counts one-unit calls without the lock and
    takes it only for these phases: :mod:`pf_metered.meter.lane`).

    Phases: open → ``stop_calls`` (new reservations refused with ``StreamClosed``; running
    calls still commit) → ``wait_calls`` (bounded) → ``seal`` (a commit from now on is *late*:
    it gives its reservation back, is counted in ``late_units`` and raises ``StreamClosed``)
    → the final claim.
    """

    late_units: int

    def stop_calls(self) -> None:
        """Refuse new reservations from now on (``record``/``add`` still counts)."""

    def wait_calls(self, timeout: float) -> int:
        """Wait at most ``timeout`` seconds until no reservation is held; return what still is."""

    def seal(self, timeout: float) -> None:
        """Make every later commit late; wait (at most ``timeout``) for commits under way."""


@runtime_checkable
class FastLane(Protocol):
    """A gate with a lock-free lane for one-unit calls (the in-memory record).

    ``lane_parts(on_due, on_late)`` returns the :class:`~pf_metered.meter.lane.LaneParts` a
    metered closure binds (:func:`~pf_metered.meter.lane.lane_call`): a call is admitted
    before it runs (refused: ``blocked`` first, then ``StreamClosed`` / ``BudgetExhausted``),
    counted when it returns (``on_due(total)`` once the total reaches ``due_at``; when the
    stream closed while it ran, ``on_late(1)`` and it is not paid) and given back when it
    raises. Setting ``due_at`` or ``blocked`` takes effect for calls that start afterwards.
    """

    due_at: int
    blocked: BaseException | None

    def lane_parts(
        self, on_due: Callable[[int], None], on_late: Callable[[int], None]
    ) -> LaneParts:
        """The atomic steps and slow halves of the lane (see the class docstring)."""


class AddUnitsCounter:
    """The default ``UnitCounter``: reservations held here (per process), counts through the
    store's ``add_units``, which stays the authority on the budget."""

    __slots__ = ("_known", "_lock", "_max", "_reserved", "_sid", "_store")

    def __init__(self, store: Store, stream_id: str) -> None:
        state = store.load(stream_id)
        if state is None:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        self._store = store
        self._sid = stream_id
        self._max = state.config.max_units
        self._lock = threading.Lock()
        self._reserved = 0
        self._known = state.units

    def _check(self, units: int) -> None:
        left = self._max - self._known - self._reserved
        if units > left:
            raise BudgetExhausted(
                f"{units} more units would exceed the budget; {max(left, 0)} left",
                remaining_units=max(left, 0),
            )

    def add(self, units: int) -> int:
        with self._lock:
            self._check(units)
        total = self._store.add_units(self._sid, units)
        self._known = max(self._known, total)
        return total

    def reserve(self, units: int) -> None:
        with self._lock:
            self._check(units)
            self._reserved += units

    def commit(self, units: int) -> int:
        try:
            total = self._store.add_units(self._sid, units)
        finally:
            with self._lock:
                self._reserved -= units
        self._known = max(self._known, total)
        return total

    def cancel(self, units: int) -> None:
        with self._lock:
            self._reserved -= units

    def units_left(self) -> int | None:
        return None  # other processes may count too: only the store knows


class BaseStore:
    """The defaults of every extension of the :class:`Store` contract; subclass it and write
    the seven core methods (``create``, ``load``, ``set_escrow``, ``add_units``, ``claim``,
    ``settle``, ``mark_closed``). A store with owners overrides ``take_over``,
    ``pending_owner``, ``owner`` and ``claim`` together."""

    intent_lease: float = 30.0

    @property
    def owner(self) -> str:
        return ""

    @property
    def location(self) -> str | None:
        return None

    def load(self, stream_id: str) -> StreamState | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_units(self, stream_id: str, units: int) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def counter(self, stream_id: str) -> UnitCounter:
        return AddUnitsCounter(self, stream_id)  # type: ignore[arg-type]

    def take_over(self, stream_id: str, *, lease_seconds: float | None = None) -> Intent | None:
        """No owners: the pending intent, if any, is anyone's to send."""
        state = self.load(stream_id)
        return state.pending[0] if state is not None and state.pending else None

    def pending_owner(self, stream_id: str) -> tuple[str | None, float] | None:
        return None

    def reclaim(self, stream_id: str) -> None:
        return None

    def close(self) -> None:
        return None


class _Record:
    """One stream's mutable state in a :class:`MemoryStore`, guarded by its own lock.

    It is also the stream's :class:`CallGate` and :class:`FastLane` (the fast lane lives here,
    beside the state it is fast on). The locked part: ``units`` (counted by ``add`` and by
    commits of locked reservations), ``reserved`` (locked reservations), the close phases.
    The lock-free part (one-unit calls of the lane): two lists of tokens, one a call pops
    before it runs (admission), one after (commit). Why that never overspends and why "a
    call committed before the final claim is in it; one after is late" stays exact is argued
    in :mod:`pf_metered.meter.lane`; kept here, under the lock: ``units + reserved + _bound
    ≤ max_units`` and ``units + commits + tokens in _marks`` below the next batch threshold.

    Why mutable: the frozen ``StreamState`` + ``dataclasses.replace`` on every unit cost
    microseconds. Why the hot methods are written out: each Python call costs ~50 ns.
    """

    __slots__ = (
        "_blocked",
        "_bound",
        "_due_at",
        "_laned",
        "_lease",
        "_marks",
        "_marks_out",
        "_sealed",
        "_slow_done",
        "_told",
        "claimed_units",
        "cond",
        "config",
        "draining",
        "escrow_id",
        "late_units",
        "lock",
        "max_units",
        "next_seq",
        "paid_micro",
        "pending",
        "refunded_micro",
        "releases",
        "reserved",
        "settled",
        "status",
        "stream_id",
        "units",
    )

    def __init__(self, config: StreamConfig) -> None:
        self.config = config
        self.stream_id = config.stream_id
        self.max_units = config.max_units
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)  # a closer waits for the calls in flight
        self.status: StreamStatus = "new"
        self.escrow_id: str | None = None
        self.units = 0  # counted under the lock; the lane's commits: ``_n_committed()``
        self.reserved = 0
        self.draining = False  # close began: no new reservation
        self.late_units = 0
        self._blocked: BaseException | None = None  # a permanent failure: refuse calls
        self._due_at = _NEVER_DUE
        self._told = False  # a commit told the sender the total reached ``_due_at``
        self._laned = False  # a lane was handed out: calls may come without the lock
        self._lease: list[None] = []  # admission tokens: a call pops one before it runs
        # ``F`` of the lane docstring: admission tokens lent and not taken back, plus calls
        # admitted under the lock, less calls cancelled. Never below what lane calls hold.
        self._bound = 0
        self._marks: list[None] = []  # commit tokens: a call pops one when it returns
        self._marks_out = 0  # commit tokens lent and not taken back
        self._slow_done = 0  # lane commits counted under the lock
        self._sealed = False  # the final claim was made: every lane commit now is late
        self.claimed_units = 0
        self.paid_micro = 0
        self.releases = 0
        self.pending: Intent | None = None
        self.refunded_micro: int | None = None
        self.next_seq = 1
        self.settled: list[tuple[Intent, int]] = []

    # ------------------------------------------------ the lane's books (lock held)
    def _n_committed(self) -> int:
        """Lane calls committed (in time): tokens calls popped, plus commits under the lock."""
        return self._marks_out - len(self._marks) + self._slow_done

    def _lane_used(self) -> int:
        """The units the lane's calls hold or spent, exactly (tokens popped by calls)."""
        return self._bound - len(self._lease)

    @staticmethod
    def _take_back(tokens: list[None], most: int = _NEVER_DUE) -> int:
        """Pop up to ``most`` tokens back, counting each (a call may pop one meanwhile: it
        keeps it); return how many came back."""
        pop = tokens.pop
        taken = 0
        try:
            while taken < most:
                pop()
                taken += 1
        except IndexError:
            pass
        return taken

    def _lend(self) -> None:
        """Top the admission list up to half the room left (all of a last unit), at most a
        chunk."""
        if not LOCK_FREE or self.status != "open" or self.draining or self._blocked is not None:
            return
        room = self.max_units - self.units - self.reserved - self._bound
        lend = min(room - room // 2, _LEASE - len(self._lease))
        if lend > 0:
            self._lease.extend(_TOKENS if lend == _LEASE else _TOKENS[:lend])
            self._bound += lend

    def _fit_marks(self, total: int) -> None:
        """Lend commit tokens up to one below the next threshold past ``total`` (the units
        counted now): ``due_at`` or, once the sender was told it was reached, the next
        multiple of the batch past it (``due_at − claimed_units``), so the commits between a
        wake-up and the sender's claim stay fast and the next threshold is still seen. The
        invariant: ``units + commits + tokens in _marks ≤ threshold − 1``; what no longer fits
        is taken back; nothing is lent while closing or sealed."""
        threshold = self._due_at
        if total >= threshold and self._told:
            step = max(1, threshold - self.claimed_units)
            threshold += ((total - threshold) // step + 1) * step
        excess = self.units + self._marks_out + self._slow_done - threshold + 1
        if excess > 0:
            self._marks_out -= self._take_back(self._marks, excess)
        elif LOCK_FREE and self.status == "open" and not self.draining:
            lend = min(-excess, _LEASE - len(self._marks))
            if lend > 0:
                self._marks.extend(_TOKENS if lend == _LEASE else _TOKENS[:lend])
                self._marks_out += lend

    def _fits(self, units: int) -> bool:
        """Whether ``units`` more fit beside what is held and lent, taking the admission
        tokens back first when they do not fit beside them (the next lane call that finds
        the list empty lends again)."""
        if self.units + self.reserved + units + self._bound <= self.max_units:
            return True
        self._bound -= self._take_back(self._lease)
        return self.units + self.reserved + units + self._bound <= self.max_units

    def _count(self, units: int) -> int:
        """Count ``units`` under the lock (fits checked); return the total."""
        units += self.units
        self.units = units
        if not self._laned:
            return units
        total = units + self._n_committed()
        if total >= self._due_at:
            self._told = True  # the caller (the stream) wakes its sender on this total
        self._fit_marks(total)
        return total

    def snapshot_units(self) -> int:
        """Units counted (lock held): locked ones plus the lane's commits in time."""
        return self.units + self._n_committed()

    def _in_flight(self) -> int:
        """Units held by calls not finished: reservations and lane calls admitted and not
        committed or cancelled (commits read first: a call committed was admitted before)."""
        committed = self._n_committed()
        return self.reserved + self._lane_used() - committed

    def _refuse(self, units: int, *, call: bool = True) -> BudgetExhausted | StreamClosed:
        """Why ``units`` more are refused (``call``: for a new call, which closing refuses;
        ``add`` still counts while closing, so its refusal is the budget's)."""
        if self.status != "open":
            return StreamClosed(f"stream {self.stream_id} is {self.status}; it takes no units")
        if call and self.draining:
            return StreamClosed(f"stream {self.stream_id} is closing; it takes no new calls")
        left = max(0, self.max_units - self.units - self.reserved - self._lane_used())
        return BudgetExhausted(
            f"{units} more units would exceed the budget; {left} left", remaining_units=left
        )

    # ------------------------------------------------ UnitCounter: units under the lock
    # acquire()/release() rather than ``with``: the context manager protocol costs ~70 ns.
    def add(self, units: int) -> int:
        lock = self.lock
        lock.acquire()
        total = self.units + units
        if (self.status != "open" or total + self.reserved + self._bound > self.max_units) and (
            self.status != "open" or not self._fits(units)
        ):
            refusal = self._refuse(units, call=False)
            lock.release()
            raise refusal
        if self._laned:
            total = self._count(units)
        else:  # no lane out: nothing counts without the lock (``_count`` written out)
            self.units = total
        lock.release()
        return total

    def reserve(self, units: int) -> None:
        lock = self.lock
        lock.acquire()
        if (
            self.status != "open"
            or self.draining
            or (
                self.units + self.reserved + units + self._bound > self.max_units
                and not self._fits(units)
            )
        ):
            refusal = self._refuse(units)
            lock.release()
            raise refusal
        self.reserved += units
        lock.release()

    def commit(self, units: int) -> int:
        lock = self.lock
        lock.acquire()
        self.reserved -= units
        if self.status != "open":  # after the final claim: no release would pay it
            self.late_units += units
            if self.draining:
                self.cond.notify_all()
            lock.release()
            raise StreamClosed(f"stream {self.stream_id} closed before this call finished")
        total = self._count(units)
        if self.draining:
            self.cond.notify_all()
        lock.release()
        return total

    def cancel(self, units: int) -> None:
        lock = self.lock
        lock.acquire()
        self.reserved -= units
        if self.draining:
            self.cond.notify_all()
        lock.release()

    # ------------------------------------------- FastLane: the lock-free lane's slow halves
    def _admit(self) -> None:
        """No admission token was left: admit the call under the lock (and lend) or raise."""
        lock = self.lock
        lock.acquire()
        blocked = self._blocked
        refusal: BaseException | None = None
        if blocked is not None:
            refusal = blocked.with_traceback(None)
        elif self.status != "open" or self.draining or not self._fits(1):
            refusal = self._refuse(1)
        else:
            self._bound += 1
            self._lend()
        lock.release()
        if refusal is not None:
            raise refusal from None  # not "during handling of IndexError"

    def _settle(self) -> int:
        """No commit token was left: the total after this commit, or ``-1`` if it is late."""
        lock = self.lock
        lock.acquire()
        if self._sealed:  # no release pays it: its admission is given back, it counts late
            self._bound -= 1
            self.late_units += 1
            total = -1
        else:
            self._slow_done += 1
            total = self.units + self._n_committed()
            if total >= self._due_at:
                self._told = True  # ``settle`` tells the sender (``on_due``)
            self._fit_marks(total)  # a threshold or a chunk's end: lend up to the next
        if self.draining:
            self.cond.notify_all()
        lock.release()
        return total

    def _cancel_call(self) -> None:
        lock = self.lock
        lock.acquire()
        self._bound -= 1
        if self.draining:
            self.cond.notify_all()
        lock.release()

    def lane_parts(
        self, on_due: Callable[[int], None], on_late: Callable[[int], None]
    ) -> LaneParts:
        with self.lock:
            if not self._laned:
                self._laned = True
                self._fit_marks(self.snapshot_units())
        settle_locked = self._settle

        def settle() -> int:
            total = settle_locked()
            if total < 0:
                on_late(1)
                return 1
            if total >= self._due_at:
                on_due(total)
            return 0

        return LaneParts(self._lease.pop, self._admit, self._marks.pop, settle, self._cancel_call)

    @property
    def due_at(self) -> int:
        return self._due_at

    @due_at.setter
    def due_at(self, value: int) -> None:
        with self.lock:
            self._due_at = value
            self._told = False
            if self._laned:
                self._fit_marks(self.snapshot_units())

    @property
    def blocked(self) -> BaseException | None:
        return self._blocked

    @blocked.setter
    def blocked(self, failure: BaseException | None) -> None:
        with self.lock:
            self._blocked = failure
            if failure is not None:  # from now on every call is refused under the lock
                self._bound -= self._take_back(self._lease)

    # CallGate: close's phases (the final claim itself seals: ``seal_for_final_claim``).
    def stop_calls(self) -> None:
        with self.lock:
            self.draining = True  # nothing is lent from now on
            self._bound -= self._take_back(self._lease)  # every new call: refused, locked
            self._marks_out -= self._take_back(self._marks)  # every commit: notifies
            self.cond.notify_all()

    def wait_calls(self, timeout: float) -> int:
        with self.cond:
            self.cond.wait_for(lambda: not self._in_flight(), timeout)
            return self._in_flight()

    def seal(self, timeout: float) -> None:
        return None

    def seal_for_final_claim(self) -> int:
        """The final claim (lock held): later commits are late; return the units it covers."""
        self._bound -= self._take_back(self._lease)
        self._marks_out -= self._take_back(self._marks)
        self._sealed = True
        return self.units + self._n_committed()

    def units_left(self) -> int | None:
        with self.lock:
            return max(0, self.max_units - self.units - self.reserved - self._lane_used())

    def snapshot(self) -> StreamState:
        return StreamState(
            config=self.config,
            status=self.status,
            escrow_id=self.escrow_id,
            units=self.snapshot_units(),
            claimed_units=self.claimed_units,
            paid_micro=self.paid_micro,
            releases=self.releases,
            pending=(self.pending,) if self.pending else (),
            refunded_micro=self.refunded_micro,
            next_seq=self.next_seq,
            settled=tuple(self.settled),
        )


class MemoryStore(BaseStore):
    """The default store: one locked record per stream. Fast, and gone when the process is.

    Offers the ``counter`` extension: the meter counts straight into the stream's record, and
    the owners extension (``take_over``): this process owns every intent held here.
    """

    intent_lease: float = 30.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[str, _Record] = {}

    def _get(self, stream_id: str) -> _Record:
        rec = self._streams.get(stream_id)
        if rec is None:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        return rec

    def create(self, config: StreamConfig) -> None:
        with self._lock:
            if config.stream_id in self._streams:
                raise InvalidInput("stream_id", f"already exists: {config.stream_id!r}")
            self._streams[config.stream_id] = _Record(config)

    def load(self, stream_id: str) -> StreamState | None:
        rec = self._streams.get(stream_id)
        if rec is None:
            return None
        with rec.lock:
            return rec.snapshot()

    def counter(self, stream_id: str) -> CallGate:
        """The stream's hot-path handle (see :class:`CallGate`)."""
        return self._get(stream_id)

    def set_escrow(self, stream_id: str, escrow_id: str) -> None:
        rec = self._get(stream_id)
        with rec.lock:
            if rec.escrow_id not in (None, escrow_id):
                raise InvalidInput("escrow_id", "the stream is already bound to another escrow")
            rec.escrow_id = escrow_id
            if rec.status == "new":
                rec.status = "open"

    def add_units(self, stream_id: str, units: int) -> int:
        return self._get(stream_id).add(units)

    def claim(self, stream_id: str, *, min_units: int, final: bool = False) -> Intent | None:
        rec = self._get(stream_id)
        with rec.lock:
            if rec.pending is not None or rec.status in ("new", "closed"):
                return None
            if rec.status == "closing":  # one final intent per stream
                return None
            if final:
                units = rec.seal_for_final_claim()
                rec.status = "closing"
            else:
                units = rec.snapshot_units()
                if units - rec.claimed_units < max(min_units, 1):
                    return None
            intent = Intent(stream_id, rec.next_seq, rec.claimed_units, units, final)
            rec.claimed_units = units
            rec.pending = intent
            rec.next_seq += 1
            return intent

    def take_over(self, stream_id: str, *, lease_seconds: float | None = None) -> Intent | None:
        """The pending intent, if any: every intent of an in-memory store is this process's."""
        rec = self._get(stream_id)
        with rec.lock:
            return rec.pending

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        rec = self._get(stream_id)
        with rec.lock:
            intent = rec.pending
            if intent is None or intent.seq != seq:
                return
            rec.pending = None
            rec.paid_micro += amount_micro
            rec.releases += 1 if amount_micro else 0
            rec.settled.append((intent, amount_micro))

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        rec = self._get(stream_id)
        with rec.lock:
            if rec.status == "closed":
                return
            rec.status = "closed"
            rec.refunded_micro = refunded_micro
