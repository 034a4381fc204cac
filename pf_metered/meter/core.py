"""The meter: a sans-I/O state machine that decides what a payment stream must do next.

Like tenacity's ``BaseRetrying.iter()``, the meter never performs a request. It answers with
*actions* (:class:`OpenEscrow`, :class:`ReleaseDue`, :class:`RefundRest`) and is told what
happened (``opened``, ``settled``, ``finished``); the sync and async streams are the drivers
that do the HTTP. So one body of logic decides batching, pricing and budget for both.

Exactness: each release pays the amount its intent's unit range derives
(:func:`~pf_metered.meter.store.intent_amount_micro`), so batches pay
``floor(rate × units so far) − paid so far`` and the close settles ``half_up(rate × units)``.
The budget is enforced by the store before a unit is counted.

What the meter must never do: I/O, sleep, hold its lock while a driver sends, or hand out a
release for units another release already covers.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal

from pf_metered.errors import InvalidInput, StreamClosed
from pf_metered.meter.lane import LaneParts
from pf_metered.meter.policy import BatchPolicy, every, parse_seconds
from pf_metered.meter.receipt import Receipt, ReleaseRecord, StatusReport
from pf_metered.meter.store import (
    CallGate,
    FastLane,
    Intent,
    MemoryStore,
    Store,
    StreamConfig,
    UnitCounter,
    intent_amount_micro,
)
from pf_metered.money import (
    MAX_UNITS,
    AmountLike,
    Rate,
    format_usdc,
    parse_amount,
    parse_count,
    parse_rate,
)

__all__ = [
    "PER_QUANTA",
    "Meter",
    "OpenEscrow",
    "Per",
    "RefundRest",
    "ReleaseDue",
    "held_in_process",
    "plan_stream",
]

Per = Literal["unit", "second", "minute", "hour"]

PER_QUANTA: Final[dict[str, tuple[int, int]]] = {
    "unit": (0, 0),
    "second": (3, 1_000_000),  # 1 unit = 1 ms; rate per unit = rate per second × 10⁻³
    "minute": (4, 6_000_000),  # 1 unit = 6 ms; rate × 10⁻⁴
    "hour": (6, 3_600_000),  # 1 unit = 3.6 ms ("micro-hour"); rate × 10⁻⁶
}
"""Time billing in exact money: ``per -> (decimal places the rate shifts, ns per unit)``.

A rate per hour divided by 3600 is rarely a finite decimal ($0.50/h is 0.000138…/s), so time
is counted in quanta whose price *is* a finite decimal: milliseconds for a rate per second,
micro-hours (3.6 ms) for a rate per hour."""


@dataclass(frozen=True, slots=True)
class OpenEscrow:
    """Lock the stream's budget: ``client.create_escrow(...)`` with this key."""

    to_agent_id: str
    amount_micro: int
    memo: str
    auto_release_hours: int | None
    idempotency_key: str

    @property
    def amount(self) -> str:
        return format_usdc(self.amount_micro)


@dataclass(frozen=True, slots=True)
class ReleaseDue:
    """Release ``amount_micro`` from the escrow for ``intent``'s units, with its stable key."""

    intent: Intent
    amount_micro: int
    memo: str
    adopted: bool = False
    """Taken over from another holder (stale, or left by an earlier meter in this process):
    it may already have landed, so the driver reads the escrow back before sending it."""

    @property
    def amount(self) -> str:
        return format_usdc(self.amount_micro)

    @property
    def idempotency_key(self) -> str:
        return self.intent.idempotency_key


@dataclass(frozen=True, slots=True)
class RefundRest:
    """Give the unreleased rest back to the payer."""

    escrow_id: str
    idempotency_key: str


def _memo(intent: Intent) -> str:
    kind = "final" if intent.final else "batch"
    if intent.units_to == intent.units_from:
        return f"{kind}:rounding"
    return f"{kind}:units {intent.units_from + 1}-{intent.units_to}"


_ID_TEXT: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
"""What an agent or stream id may be: what the escrow service, the journal's keys, the
idempotency keys derived from a stream id (``pfm-<id>-open``) and a file name all accept."""


def _check_id(value: object, field: str, what: str) -> None:
    if (
        not isinstance(value, str)
        or not _ID_TEXT.fullmatch(value)
        or not any(c.isascii() and c.isalnum() for c in value)
    ):
        shown = repr(value[:40]) if isinstance(value, str) else type(value).__name__
        raise InvalidInput(
            field,
            f"must be {what}: 1..128 ASCII letters, digits and _ . : - (got {shown})",
        )


def plan_stream(
    to_agent_id: str,
    rate: AmountLike | Rate,
    *,
    batch: int | BatchPolicy | None = None,
    every_: float | int | str | Decimal | BatchPolicy | None = None,
    budget: AmountLike | None = None,
    max_units: int | None = None,
    auto_release_hours: int | None = None,
    memo: str | None = None,
    per: str = "unit",
    stream_id: str | None = None,
) -> tuple[StreamConfig, BatchPolicy]:
    """Validate a stream's arguments (naming the bad field) and build its config and policy.

    Why here: every argument is checked before anything is locked, so nothing is half-done.
    """
    _check_id(to_agent_id, "to_agent_id", "an agent id")
    if stream_id is not None:
        _check_id(stream_id, "stream_id", "a stream id")
    if per not in PER_QUANTA:
        raise InvalidInput("per", f"must be one of {sorted(PER_QUANTA)}, got {per!r}")
    shift = PER_QUANTA[per][0]
    if isinstance(rate, Rate):
        if shift:
            raise InvalidInput("rate", "a Rate object cannot be combined with per=")
        parsed = rate
    else:
        parsed = parse_rate(rate, "rate")
        if shift:
            # exact: Decimal's scaleb/normalize would round to the caller's context precision
            parsed = parse_rate(str(parsed.scaled_down(shift)), "rate")
    policy = BatchPolicy()
    if isinstance(batch, BatchPolicy):
        policy = policy | batch
    elif batch is not None:
        policy = policy | every(units=parse_count(batch, "batch", allow_zero=False))
    if isinstance(every_, BatchPolicy):
        policy = policy | every_
    elif every_ is not None:
        policy = policy | BatchPolicy(seconds=parse_seconds(every_, "every"))
    if budget is None and max_units is None:
        raise InvalidInput("budget", "or max_units is required (the escrow must be funded)")
    cap = parse_count(max_units, "max_units", allow_zero=False) if max_units is not None else None
    if budget is not None:
        budget_micro = parse_amount(budget, "budget")
        affordable = parsed.units_affordable(budget_micro)
        units_cap = affordable if cap is None else min(cap, affordable)
        if units_cap < 1:
            raise InvalidInput("budget", f"{budget} does not pay for one unit at rate {parsed}")
    else:
        assert cap is not None
        budget_micro = parsed.micro_half_up(cap)
        if budget_micro < 1:
            raise InvalidInput("max_units", "buys less than one micro-USDC at this rate")
        units_cap = cap
    if auto_release_hours is not None and (
        isinstance(auto_release_hours, bool)
        or not isinstance(auto_release_hours, int)
        or not 1 <= auto_release_hours <= 8760
    ):
        raise InvalidInput("auto_release_hours", "must be a whole number of hours, 1..8760")
    if memo is not None and (not isinstance(memo, str) or len(memo) > 500):
        raise InvalidInput("memo", "must be a str of at most 500 characters")
    sid = stream_id or uuid.uuid4().hex
    config = StreamConfig(
        stream_id=sid,
        to_agent_id=to_agent_id,
        rate=str(parsed),
        budget_micro=budget_micro,
        max_units=min(units_cap, MAX_UNITS),
        memo=memo if memo is not None else f"pf_metered:stream {sid[:12]}:rate={parsed}/{per}",
        auto_release_hours=auto_release_hours,
        batch_units=policy.units,
        every_seconds=str(policy.seconds) if policy.seconds is not None else None,
    )
    return config, policy


class _Gate:
    """A :class:`~pf_metered.meter.store.CallGate` around a store's plain ``UnitCounter``.

    Counts the units held by running calls (reserved, not yet committed or cancelled) so that
    ``close`` can wait for them, and the commits under way so that ``seal`` can let them land
    before the final claim. The store stays the authority on the budget: a commit it refuses
    because the stream closed is counted late too.
    """

    __slots__ = ("_c", "_committing", "_cond", "_held", "_state", "add", "late_units")

    def __init__(self, counter: UnitCounter) -> None:
        self._c = counter
        self.add = counter.add
        self._cond = threading.Condition(threading.Lock())
        self._held = 0
        self._committing = 0
        self._state = 0  # 0 open, 1 draining (no new reservation), 2 sealed (commits late)
        self.late_units = 0

    def reserve(self, units: int) -> None:
        with self._cond:
            if self._state:
                raise StreamClosed("the stream is closing; it takes no new calls")
            self._held += units
        try:
            self._c.reserve(units)
        except BaseException:
            self._done(units, 0)
            raise

    def commit(self, units: int) -> int:
        with self._cond:
            late = self._state == 2
            if not late:
                self._committing += 1
        if late:
            try:
                self._c.cancel(units)
            finally:
                self._done(units, 0, late=True)
            raise StreamClosed("the stream closed before this call finished")
        try:
            total = self._c.commit(units)
        except StreamClosed:
            self._done(units, 1, late=True)
            raise
        except BaseException:
            self._done(units, 1)
            raise
        self._done(units, 1)
        return total

    def cancel(self, units: int) -> None:
        try:
            self._c.cancel(units)
        finally:
            self._done(units, 0)

    def _done(self, units: int, committing: int, *, late: bool = False) -> None:
        with self._cond:
            self._held -= units
            self._committing -= committing
            if late:
                self.late_units += units
            if self._state and (not self._held or not self._committing):
                self._cond.notify_all()

    def stop_calls(self) -> None:
        with self._cond:
            self._state = max(self._state, 1)

    def wait_calls(self, timeout: float) -> int:
        with self._cond:
            self._cond.wait_for(lambda: not self._held, timeout)
            return self._held

    def seal(self, timeout: float) -> None:
        with self._cond:
            self._state = 2
            self._cond.wait_for(lambda: not self._committing, timeout)

    def units_left(self) -> int | None:
        return self._c.units_left()


def _not_open(units: int = 1) -> int:
    raise StreamClosed("the stream is not open: call open() (or use `with`) first")


def _not_open_none(units: int = 1) -> None:
    raise StreamClosed("the stream is not open: call open() (or use `with`) first")


_CLOSED_MESSAGE: Final = "the stream is closed and takes no more units: open a new stream"


def _closed(units: int = 1) -> int:
    raise StreamClosed(_CLOSED_MESSAGE)


def _closed_none(units: int = 1) -> None:
    raise StreamClosed(_CLOSED_MESSAGE)


_NEVER: Final = MAX_UNITS * 2

_ADOPT_EVERY: Final = 1.0
"""Seconds between attempts of a meter whose claims come back empty to take over a stale
intent (a dead worker's) — one store round trip each."""


class _Peers:
    """The meters of one stream bound to one store object in this process.

    They share one lock, so "is this pending intent being sent by a live meter here?" and
    "claim an intent and mark it in flight" are one step: a meter joining the stream never
    re-sends what a peer in the same process is sending (the store's owner is the same for
    both, so the store cannot tell them apart).
    """

    __slots__ = ("__weakref__", "lock", "meters")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.meters: weakref.WeakSet[Meter] = weakref.WeakSet()


_METERS: weakref.WeakSet[Meter] = weakref.WeakSet()
"""Every live meter of this process (``held_in_process`` looks through them)."""


def held_in_process(stream_id: str, seq: int) -> bool:
    """Whether a live meter in this process holds intent ``seq`` of the stream in flight
    (handed to its driver, not settled): it may be on the wire right now."""
    for meter in list(_METERS):
        action = meter._inflight
        if meter.stream_id == stream_id and action is not None and action.intent.seq == seq:
            return True
    return False


_PEERS: weakref.WeakKeyDictionary[object, dict[str, _Peers]] = weakref.WeakKeyDictionary()
_PEERS_LOCK = threading.Lock()


def _peers_of(store: Store, stream_id: str) -> _Peers:
    with _PEERS_LOCK:
        try:
            by_stream = _PEERS.setdefault(store, {})
        except TypeError:  # a store that takes no weak reference: no peers to coordinate
            return _Peers()
        peers = by_stream.get(stream_id)
        if peers is None:
            peers = by_stream[stream_id] = _Peers()
        return peers


class Meter:
    """One stream's decisions: what to lock, when a batch is due, what it pays, what is left.

    Hot path for drivers: ``meter.add`` / ``reserve`` / ``commit`` / ``cancel`` (bound to the
    store's counter at ``opened``) and the ``due_at`` threshold: when a returned total reaches
    it, a batch is due and the driver wakes its sender.
    """

    def __init__(
        self,
        store: Store,
        config: StreamConfig,
        policy: BatchPolicy,
        *,
        per: str = "unit",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(store, Store):  # the whole contract, checked once here
            raise InvalidInput("store", f"must be a Store, not {type(store).__name__}")
        self.store = store
        self.config = config
        self.policy = policy
        self.per = per
        self.stream_id = config.stream_id
        self.rate = config.parsed_rate
        self.escrow_id: str | None = None
        self._clock = clock
        self._batch = policy.units
        self._period = float(policy.seconds) if policy.seconds is not None else None  # ok: seconds
        self._peers = _peers_of(store, config.stream_id)
        self._peers.meters.add(self)
        _METERS.add(self)
        self._lock = self._peers.lock
        self._inflight: ReleaseDue | None = None
        self._handed = False  # the in-flight release was handed out at least once
        self._closer = False  # this meter holds (or held) the stream's final intent
        self.takeover = False
        """Set by ``resume``: finish a close another (dead) holder started, without waiting."""
        self._next_adopt_at = 0.0
        self._last_release_at = clock()
        self._memos: dict[int, str] = {}
        self._due_at: int = _NEVER
        self.add: Callable[[int], int] = _not_open
        self.reserve: Callable[[int], None] = _not_open_none
        self.commit: Callable[[int], int] = _not_open
        self.cancel: Callable[[int], None] = _not_open_none
        self.receipt: Receipt | None = None
        self.counter: CallGate | None = None

    # ----------------------------------------------------------------- open
    def begin_open(self) -> OpenEscrow | None:
        """Register the stream in the store (or find it there) and say what to lock.

        ``None`` when the stream is already open (resumed from its store).
        """
        state = self.store.load(self.stream_id)
        if state is None:
            self.store.create(self.config)
        elif state.escrow_id is not None:
            self._bind(state.escrow_id)
            return None
        cfg = self.config
        return OpenEscrow(
            to_agent_id=cfg.to_agent_id,
            amount_micro=cfg.budget_micro,
            memo=cfg.memo,
            auto_release_hours=cfg.auto_release_hours,
            idempotency_key=f"pfm-{self.stream_id}-open",
        )

    def opened(self, escrow_id: str) -> None:
        """The escrow is locked: bind it and start counting."""
        self.store.set_escrow(self.stream_id, escrow_id)
        self._bind(escrow_id)

    def _bind(self, escrow_id: str) -> None:
        self.escrow_id = escrow_id
        plain: UnitCounter = self.store.counter(self.stream_id)
        counter: CallGate = plain if isinstance(plain, CallGate) else _Gate(plain)
        state = self.store.load(self.stream_id)
        claimed = state.claimed_units if state else 0
        if state is not None and state.pending:
            # Claimed before: send it first, but only if it is ours to send (its holder is
            # gone, or it is this process's and no live meter here is sending it). Another
            # live worker's intent is left to that worker: re-sending it could pay twice.
            with self._lock:
                if self._inflight is None:
                    intent = self._adoptable(legacy=state.pending[0])
                    if intent is not None:
                        self._hold(intent, adopted=True)
        self.counter = counter
        self.due_at = claimed + self._batch if self._batch else _NEVER
        self._last_release_at = self._clock()
        self.add, self.reserve = counter.add, counter.reserve
        self.commit, self.cancel = counter.commit, counter.cancel

    @property
    def due_at(self) -> int:
        """The unit total at which a batch is due (the driver wakes its sender)."""
        return self._due_at

    @due_at.setter
    def due_at(self, value: int) -> None:
        self._due_at = value
        counter = self.counter
        if isinstance(counter, FastLane):
            counter.due_at = value  # the lane's own pre-check of "a batch is due"

    def block_calls(self, failure: BaseException | None) -> None:
        """Refuse new reservations with ``failure`` (the stream's permanent failure), or stop."""
        counter = self.counter
        if isinstance(counter, FastLane):
            counter.blocked = failure

    def lane(
        self, on_due: Callable[[int], None], on_late: Callable[[int], None]
    ) -> LaneParts | None:
        """The counter's lock-free lane when it has one (see ``FastLane``), else ``None``."""
        counter = self.counter
        return counter.lane_parts(on_due, on_late) if isinstance(counter, FastLane) else None

    # ------------------------------------------------------------- batching
    def seconds_until_due(self) -> float | None:
        """How long a sender may sleep before the time policy makes a batch due."""
        if self._period is None:
            return None
        return max(0.0, self._last_release_at + self._period - self._clock())

    def time_due(self) -> bool:
        return self._period is not None and self._clock() - self._last_release_at >= self._period

    def _held_by_peer(self, seq: int) -> bool:
        """Whether another live meter in this process has intent ``seq`` in flight (call
        under the shared lock)."""
        for peer in list(self._peers.meters):
            if (
                peer is not self
                and peer._inflight is not None
                and (peer._inflight.intent.seq == seq)
            ):
                return True
        return False

    def _adoptable(self, *, legacy: Intent | None = None) -> Intent | None:
        """A pending intent this meter may (re)send, or ``None`` (call under the lock).

        The store's ``take_over`` says which: one whose owner has not settled it within the
        store's intent lease (presumed dead), or one this process owns. A store without
        ``take_over`` has no owners: the pending intent found at bind (``legacy``) is taken,
        as before.
        """
        intent = self.store.take_over(self.stream_id)
        if intent is None or self._held_by_peer(intent.seq):
            return None
        if legacy is None or legacy.seq != intent.seq:
            # still pending? (a peer may have settled it before we looked at the peers)
            state = self.store.load(self.stream_id)
            if state is None or all(p.seq != intent.seq for p in state.pending):
                return None
        return intent

    def _hold(self, intent: Intent, *, adopted: bool = False) -> ReleaseDue:
        action = ReleaseDue(intent, intent_amount_micro(self.rate, intent), _memo(intent), adopted)
        self._inflight = action
        self._handed = False
        if intent.final:
            self._closer = True
        return action

    def _still_ours(self, action: ReleaseDue) -> bool:
        """Renew the claim on a release being retried; ``False`` if another worker took it
        over meanwhile (our lease ran out), so it must not be sent from here any more."""
        intent = self.store.take_over(self.stream_id)
        return intent is not None and intent.seq == action.intent.seq

    @property
    def is_closer(self) -> bool:
        """Whether this meter claimed (or took over) the stream's final release: it, and no
        other worker, refunds the rest and closes the stream."""
        return self._closer

    def next_release(self, *, flush: bool = False, final: bool = False) -> ReleaseDue | None:
        """The release to send now, or ``None`` when nothing is due.

        A release handed out and not yet settled is handed out again (same intent, same
        idempotency key) until it is: a failed send is retried, never re-claimed. Releases
        that would pay nothing (sub-micro remainders still carrying) are settled here
        without any request. Another worker's release in flight is never handed out: only
        one its holder left unsettled past the store's intent lease (see ``take_over``).

        ``final``: ``None`` also when another worker is closing the stream (see
        :attr:`is_closer`).
        """
        with self._lock:
            while True:
                action = self._inflight
                if action is not None:
                    if self._handed and not self._still_ours(action):
                        self._inflight = None  # its new holder settles it
                        continue
                    if action.amount_micro == 0:  # adopted, pays nothing: no request
                        self._settle_free(action.intent)
                        if action.intent.final:
                            return None
                        continue
                    self._handed = True
                    return action
                if self.escrow_id is None:
                    return None
                intent: Intent | None
                if final:
                    state = self.store.load(self.stream_id)
                    if state is None or state.status == "closed":
                        return None
                    adopt: Intent | None = None
                    intent = None
                    if state.status == "closing":
                        if self._closer or self.takeover:
                            self._closer = True
                            return None  # our final intent was claimed and settled
                        adopt = self._adoptable()  # another closer's, if it is stale
                    else:
                        intent = self.store.claim(self.stream_id, min_units=0, final=True)
                        if intent is None:
                            # Another worker's release is in flight, or one this process
                            # claimed and never recorded (stopped between the store's commit
                            # and ``_hold``): adopt it if it is ours to send, as ``_bind`` does.
                            adopt = self._adoptable()
                        elif not intent.final:
                            adopt, intent = intent, None  # a stale one the store took over
                    if adopt is not None:
                        self._hold(adopt, adopted=True)  # it may have landed: read back first
                        continue
                else:
                    timed = self.time_due()
                    if timed:
                        self._last_release_at = self._clock()
                    min_units = 1 if (flush or timed) else (self._batch or _NEVER)
                    intent = self.store.claim(self.stream_id, min_units=min_units)
                    if intent is None:
                        if self._batch and not (flush or timed):
                            # Nothing to claim (another worker claimed it, or its release
                            # is in flight): look again a batch later, not on every unit.
                            self.due_at += self._batch
                        now = self._clock()
                        if now >= self._next_adopt_at:
                            self._next_adopt_at = now + _ADOPT_EVERY
                            adopted = self._adoptable()
                            if adopted is not None:
                                self._hold(adopted, adopted=True)
                                continue
                        return None
                if intent is None:
                    return None
                if self._batch:
                    self.due_at = intent.units_to + self._batch
                amount = intent_amount_micro(self.rate, intent)
                if amount == 0:
                    self._settle_free(intent)
                    if intent.final:
                        return None
                    continue
                action = self._hold(intent)
                self._handed = True
                return action

    def _settle_free(self, intent: Intent) -> None:
        """Settle an intent that pays nothing (a sub-micro remainder carries): no request.
        Call under the lock."""
        self.store.settle(self.stream_id, intent.seq, 0)
        self._memos[intent.seq] = _memo(intent)
        if self._inflight is not None and self._inflight.intent.seq == intent.seq:
            self._inflight = None
        if intent.final:
            self._closer = True

    def settled(self, action: ReleaseDue) -> None:
        """The release reached the escrow (answered, or found there when reconciling)."""
        with self._lock:
            self.store.settle(self.stream_id, action.intent.seq, action.amount_micro)
            self._memos[action.intent.seq] = action.memo
            if self._inflight is not None and self._inflight.intent.seq == action.intent.seq:
                self._inflight = None
            self._last_release_at = self._clock()

    # ---------------------------------------------------------------- close
    def refund_action(self) -> RefundRest | None:
        """After the final release: give back what is left, if anything is."""
        state = self.store.load(self.stream_id)
        if state is None or state.escrow_id is None or state.status == "closed":
            return None
        if self.config.budget_micro - state.paid_micro <= 0:
            return None
        return RefundRest(state.escrow_id, f"pfm-{self.stream_id}-refund")

    def finished_elsewhere(self) -> Receipt:
        """Another worker closed the stream: the receipt from the store, nothing sent."""
        self.receipt = self.build_receipt()
        self._after_close()
        return self.receipt

    def _after_close(self) -> None:
        # ``commit``/``cancel`` stay bound to the gate: a call still running finds its
        # reservation given back and its unit counted late, never a confusing "not open".
        counter = self.counter
        if counter is not None:
            counter.stop_calls()
            counter.seal(0.0)
        self.add, self.reserve = _closed, _closed_none

    # ---------------------------------------------------- calls under way at close
    def stop_calls(self) -> None:
        """Close began: refuse new reservations (running calls still commit)."""
        if self.counter is not None:
            self.counter.stop_calls()

    def wait_calls(self, timeout: float) -> int:
        """Wait (at most ``timeout`` s) for running calls to commit or cancel; units still held."""
        return self.counter.wait_calls(timeout) if self.counter is not None else 0

    def seal(self, timeout: float) -> None:
        """From now on a commit is late (see :class:`~pf_metered.meter.store.CallGate`)."""
        if self.counter is not None:
            self.counter.seal(timeout)

    @property
    def late_units(self) -> int:
        """Units of calls that finished after the final claim (not counted, not paid)."""
        return self.counter.late_units if self.counter is not None else 0

    def units_left(self) -> int:
        """Units the budget still pays for (counted and held units subtracted)."""
        left = self.counter.units_left() if self.counter is not None else None
        if left is not None:
            return left
        state = self.store.load(self.stream_id)
        units = state.units if state is not None else 0
        if state is not None and state.status != "open":
            return 0
        return max(0, self.config.max_units - units)

    def close_state(self) -> Literal["mine", "closed", "refunding", "closing", "open"]:
        """For a driver whose ``next_release(final=True)`` gave nothing more: ``mine`` (this
        meter is the closer: refund the rest), ``closed`` (another worker finished the
        close), else the stream's state while another worker's release or close is under
        way (wait, then ask ``next_release(final=True)`` again): ``refunding`` when the
        final release is settled and only the closer's refund is left (a closer that died
        here leaves no intent to take over: ``resume`` finishes its close)."""
        if self._closer:
            return "mine"
        state = self.store.load(self.stream_id)
        if state is None or state.status == "closed":
            return "closed"
        if state.status == "closing":
            return "closing" if state.pending else "refunding"
        return "open"

    def finished(self, refunded_micro: int) -> Receipt:
        """The stream is settled: record the refund and build the receipt."""
        if self.store.load(self.stream_id) is not None:
            self.store.mark_closed(self.stream_id, refunded_micro)
        self.receipt = self.build_receipt()
        self._after_close()
        return self.receipt

    def build_receipt(self) -> Receipt:
        state = self.store.load(self.stream_id)
        cfg = self.config
        return Receipt(
            stream_id=self.stream_id,
            escrow_id=state.escrow_id if state else None,
            to_agent_id=cfg.to_agent_id,
            rate=self.rate.decimal,
            units=state.units if state else 0,
            releases=state.releases if state else 0,
            paid_micro=state.paid_micro if state else 0,
            refunded_micro=(state.refunded_micro or 0) if state else 0,
            budget_micro=cfg.budget_micro,
            per=self.per,
        )

    def status(self) -> StatusReport:
        state = self.store.load(self.stream_id)
        if state is None:
            return StatusReport(
                self.stream_id,
                "new",
                None,
                self.rate.decimal,
                0,
                0,
                0,
                self.config.budget_micro,
                (),
            )
        history = tuple(
            ReleaseRecord(
                i.seq,
                i.units_from,
                i.units_to,
                amt,
                i.final,
                self._memos.get(i.seq) or _memo(i),
            )
            for i, amt in state.settled
        )
        return StatusReport(
            stream_id=self.stream_id,
            state=state.status,
            escrow_id=state.escrow_id,
            rate=self.rate.decimal,
            units=state.units,
            released_micro=state.paid_micro,
            pending_units=state.units - sum(i.units_to - i.units_from for i, _ in state.settled),
            budget_micro=self.config.budget_micro,
            history=history,
        )


def default_store() -> Store:
    """A fresh in-memory store (each stream gets its own unless one is shared on purpose)."""
    return MemoryStore()
