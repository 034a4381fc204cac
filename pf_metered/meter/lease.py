"""One lease engine for every store that leases budget to a process (SQLite group, Redis leased).

Why leases: a shared record (a SQLite file, a Redis hash) is the authority on a stream's
budget, but asking it for every unit costs an fsync or a round trip. So each process holds a
*lease* there: budget reserved for it and not yet counted. It consumes the lease in memory
with no I/O and now and then *pushes* what it consumed. The record keeps
``units + Σ leases ≤ max_units``, so however many processes race the fleet never overspends.

This module is the process's side of every lease, the same for every store:
:class:`LeasedCounter` holds per stream the free lease, the units held by running calls
(``reserve``), the units consumed and not yet pushed, the total last seen, whether the stream
is closed, and the one push whose answer was not seen yet. It decides when to push; the
store's :class:`LeaseBackend` does the push, atomically, with two methods:

``take(stream_id, push)``
    count ``push.used`` (out of the lease first), then top the lease up towards
    ``push.want`` (:func:`grant`: all or nothing for ``push.need``);
``give_back(stream_id, push)``
    count ``push.used``, then shrink the lease to ``push.want`` (what running calls hold).

Both answer a :class:`Grant` (the record's status, its total, this process's lease after, the
budget left in the pool, the lease's time to live). Used units the lease no longer covers
(it expired, or another process gave it back for us) are counted only if the budget still
has room; else the backend reports them lost.

Exactly once: every push carries a per-stream sequence number, and a push whose answer was not
seen (the backend raised) is re-sent verbatim, same sequence, before anything else. A backend
that can lose an answer after acting (Redis) remembers each sequence's reply and answers a
re-send with it; one whose failure means nothing happened (a rolled back SQLite transaction)
just applies it.

Bounds (what a killed process can take with it):

* it pushes before its unpushed units would pass ``chunk`` and at once when a single count
  passes it, so a kill loses at most one chunk of counted units (a lease's worth);
* its lease holds budget, never units: the record gets it back when it expires (Redis) or
  when a resume reclaims the leases of dead processes (SQLite).

What this module must never do: perform I/O itself (only the backend does), consume a unit
the record did not lease to this process, or drop a push it could not confirm.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed

__all__ = ["Grant", "LeaseBackend", "LeaseView", "LeasedCounter", "Push", "grant"]

log = logging.getLogger("pf_metered.meter.store")
"""The store layer's logger: the lease engine's, and any store's without one of its own (a new
store module logs here, so the redaction filter's list needs no new name)."""

_PLENTY = 1 << 62  # "enough": another thread topped the lease up while we waited
_SEQ_JUMP = 1_000_000  # a stale sequence (another process used the id): jump a second ahead
_MAX_ROUNDS = 10_000  # a count that another thread's push beat to the lease retries: a bound


@dataclass(frozen=True, slots=True)
class Push:
    """One exchange with the shared record, exactly as it is (re-)sent."""

    seq: int
    """Per stream and process, increasing: a re-send carries the same one."""
    used: int
    """Units consumed since the last acknowledged push: count them."""
    want: int
    """The lease wanted after (take: held + a chunk; give back: held)."""
    need: int
    """Units the lease must cover after a take, or the take grants nothing."""
    exact: bool = False
    """Take: also shrink a larger lease to ``want`` (no spare headroom; ``chunk=0``)."""


@dataclass(frozen=True, slots=True)
class Grant:
    """The record's answer to a push."""

    status: str
    """The stream's status (``open``; ``new``; ``closing``/``closed``: it takes no units)."""
    total: int
    """Units counted in the record after the push."""
    lease: int
    """This process's lease in the record after the push (free + held by running calls)."""
    available: int
    """Budget in the pool after the push: not counted, not leased to anyone."""
    ttl: float | None = None
    """Seconds the lease is good for (``None``: until given back or reclaimed)."""
    stale: bool = False
    """The record has seen a later sequence from this process: push again with a new one."""


@runtime_checkable
class LeaseBackend(Protocol):
    """The two calls a store makes for :class:`LeasedCounter`; each is one atomic step."""

    def take(self, stream_id: str, push: Push) -> Grant:
        """Count ``push.used``, then top this process's lease up (see :func:`grant`)."""

    def give_back(self, stream_id: str, push: Push) -> Grant:
        """Count ``push.used``, then shrink this process's lease to ``push.want``."""


def grant(lease: int, want: int, need: int, available: int, *, exact: bool = False) -> int:
    """The lease after a take: the rule every backend applies (Redis's Lua mirrors it).

    Up to ``want``; but near the end of the budget (``want`` more than half of what is left)
    only what is needed now, or half of what is left, so one process does not starve the
    others. All or nothing for ``need``: a grant the caller cannot use would only take
    headroom from the others. ``exact`` gives back what exceeds ``want``.
    """
    if lease < want:
        g = want - lease
        half = available // 2
        if g > half:
            g = max(need - lease, half)
        g = max(0, min(g, available))
        if lease + g < need:
            g = 0
        return lease + g
    if exact and lease > want:
        return want
    return lease


@dataclass(frozen=True, slots=True)
class LeaseView:
    """This process's side of one lease, for tests and status pages."""

    free: int
    held: int
    unpushed: int
    total: int
    closed: str | None


class _Lease:
    """One stream's side. ``mu`` guards the numbers (never held over I/O); ``io`` serialises
    the pushes (held over the backend call)."""

    __slots__ = (
        "acked",
        "active",
        "closed",
        "consumed",
        "counted",
        "crowd",
        "done",
        "expires",
        "expiry",
        "held",
        "inflight",
        "io",
        "mu",
        "pushing",
        "remaining",
        "seq",
        "total",
        "ttl",
        "unacked",
        "unacked_giving",
        "unacked_upto",
        "waiting",
    )

    def __init__(self) -> None:
        self.mu = threading.Lock()
        self.io = threading.Lock()
        # Notified when a push's answer came (or did not): its own lock, so waiters woken
        # together do not queue on ``mu`` behind the hot path. Guards ``pushing``.
        self.done = threading.Condition(threading.Lock())
        self.pushing = False  # a push is on its way to the record
        self.waiting = 0  # threads in ``LeasedCounter._await`` (guarded by ``done``)
        self.crowd = False  # two waiters were seen at once: hand pushes to the pusher
        self.remaining = 0  # free lease: neither held nor consumed
        self.held = 0  # reserved by calls still running
        self.consumed = 0  # counted here since the last push was sent
        self.counted = 0  # every unit ever consumed here (a watermark for ``wait``)
        self.acked = 0  # the watermark the last acknowledged push covered
        self.total = 0  # the record's total at the last answer
        self.closed: str | None = None  # the record's status once it takes no units
        self.expires = False  # the lease has a time to live
        self.expiry = 0.0  # consume nothing from it after this (monotonic)
        self.ttl = 0.0
        self.active = False  # consumed since the last tick
        self.unacked: Push | None = None
        self.inflight = 0  # the units of ``unacked`` (a push sent, its answer not seen yet)
        self.unacked_upto = 0
        self.unacked_giving = False
        # Sequences start at the clock in µs: a process that reuses an id (a worker name given
        # twice) still starts above what the record saw from the last one, so a re-send is
        # never mistaken for an old push.
        self.seq = time.time_ns() // 1000

    def unpushed(self) -> int:
        """Units counted here the record may not have: consumed, and in a push in doubt."""
        return self.consumed + self.inflight


class LeasedCounter:
    """The per-process side of every stream's lease in one store (see the module docstring).

    ``chunk``: the lease a take asks for beyond what running calls hold, and the most units
    left unpushed; ``0`` leases exactly what is held and pushes every commit. ``return_idle``:
    a background round gives back the lease of a stream nothing consumed from since the last
    round (Redis: other workers may need it; SQLite keeps it until ``close``). ``interval``:
    seconds between background rounds (:meth:`tick` on a daemon thread started with the first
    stream; ``None``: the store calls :meth:`tick` itself); ``on_start`` is called when that
    thread starts (a store registers for its exit flush then).
    """

    def __init__(
        self,
        backend: LeaseBackend,
        *,
        chunk: int,
        return_idle: bool = False,
        interval: float | None = None,
        name: str = "pf-metered-leases",
        on_start: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(backend, LeaseBackend):
            raise TypeError(f"not a LeaseBackend: {type(backend).__name__}")
        self._backend = backend
        self._chunk = chunk
        self._return_idle = return_idle
        self._clock = clock
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._ticker: threading.Thread | None = None
        self._interval = interval
        self._name = name
        self._on_start = on_start
        self._stopped = False
        self._stop = threading.Event()
        self._kick = threading.Event()

    # ------------------------------------------------------------------ hot path
    def add(self, stream_id: str, units: int, wait: bool = False) -> int:
        """Consume ``units`` out of the lease (topped up when short); the total as known here.

        ``wait``: return only once a push covering these units was acknowledged (concurrent
        waiters share one push). Raises ``StreamClosed`` / ``BudgetExhausted`` (or the backend's
        error) counting nothing; once counted, a failed push is logged, not raised (see
        ``commit``).
        """
        loc = self._leases.get(stream_id)
        if loc is not None and not wait:  # the fast path: no push due, no I/O
            with loc.mu:
                if (
                    loc.remaining >= units
                    and loc.consumed + loc.inflight + units <= self._chunk
                    and loc.closed is None
                    and (not loc.expires or self._clock() < loc.expiry)
                ):
                    loc.remaining -= units
                    loc.consumed += units
                    loc.counted += units
                    loc.active = True
                    return loc.total + loc.consumed
        return self._consume(stream_id, units, hold=False, wait=wait)

    def reserve(self, stream_id: str, units: int) -> None:
        """Hold ``units`` of the lease for a call still running (counted by ``commit``)."""
        loc = self._leases.get(stream_id)
        if loc is not None:  # the fast path
            with loc.mu:
                if (
                    loc.remaining >= units
                    and loc.closed is None
                    and (not loc.expires or self._clock() < loc.expiry)
                ):
                    loc.remaining -= units
                    loc.held += units
                    loc.active = True
                    return
        self._consume(stream_id, units, hold=True, wait=False)

    def commit(self, stream_id: str, units: int, wait: bool = False) -> int:
        """Count ``units`` held by ``reserve``; the total as known here.

        The call ran, so its units are counted even when the push this triggers fails: they
        stay unpushed (the failure is logged) and go out with the next push. Only ``wait``
        raises it (the units are not durable yet; they still go with the next push).
        """
        loc = self._lease(stream_id)
        chunk = self._chunk
        if not wait:
            with loc.mu:
                if loc.consumed + loc.inflight + units <= chunk:  # the fast path: no push due
                    loc.held -= units
                    loc.consumed += units
                    loc.counted += units
                    loc.active = True
                    return loc.total + loc.consumed
        with loc.mu:
            unpushed = loc.consumed + loc.inflight
            push_first = bool(chunk and unpushed and unpushed + units > chunk)
            seen = loc.counted
        if push_first:  # keep the unpushed units within a chunk
            self._push_after_count(stream_id, loc, seen)
        with loc.mu:
            loc.held -= units
            loc.consumed += units
            loc.counted += units
            mark = loc.counted
            loc.active = True
            total = loc.total + loc.consumed
            # no chunk: every commit goes out at once; else one call larger than a chunk
            push_now = not chunk or loc.consumed + loc.inflight > chunk
        if wait or push_now:  # else (the common case) no further call is made
            return self._send_counted(stream_id, loc, mark, total, wait=wait)
        return total

    def cancel(self, stream_id: str, units: int) -> None:
        """Give back ``units`` held by ``reserve`` (the call failed) to the free lease."""
        loc = self._lease(stream_id)
        with loc.mu:
            loc.held -= units
            if loc.closed is None:
                loc.remaining += units
        if not self._chunk:
            self._sync(stream_id, loc, need=0, release=False)  # give the headroom back now

    def _consume(self, stream_id: str, units: int, *, hold: bool, wait: bool) -> int:
        loc = self._lease(stream_id)
        chunk = self._chunk
        pushed = 0  # pushes of ours that left these units short (others took the lease)
        for _ in range(_MAX_ROUNDS):
            if pushed >= 8:
                raise BudgetExhausted(
                    f"could not reserve {units} units: other processes hold the rest of the budget",
                    remaining_units=0,
                )
            with loc.mu:
                if loc.closed is not None:
                    raise StreamClosed(f"stream {stream_id} is {loc.closed}; it takes no units")
                # Push first when these units would take the unpushed count past a chunk:
                # what a killed process loses is its unpushed count (a push in doubt
                # included), at most one chunk.
                unpushed = loc.consumed + loc.inflight
                push_first = not hold and unpushed and unpushed + units > chunk
                seen = loc.counted
                if (
                    not push_first
                    and loc.remaining >= units
                    and (not loc.expires or self._clock() < loc.expiry)
                ):
                    loc.remaining -= units
                    loc.active = True
                    if hold:
                        loc.held += units
                        return loc.total + loc.consumed
                    loc.consumed += units
                    loc.counted += units
                    total = loc.total + loc.consumed
                    mark = loc.counted
                    push_now = loc.consumed + loc.inflight > chunk
                    break
            if push_first:  # (a push under way that covers them is waited for, not repeated)
                if self._sync(stream_id, loc, need=0, release=False, until=seen) != _PLENTY:
                    pushed += 1
                continue
            avail, status = self._sync_status(stream_id, loc, need=units)
            if avail != _PLENTY:
                pushed += 1
            with loc.mu:
                if status == "new":
                    raise StreamClosed(f"stream {stream_id} is new; it takes no units")
                if loc.closed is None and loc.remaining < units and avail < units - loc.remaining:
                    left = loc.remaining + max(avail, 0)
                    raise BudgetExhausted(
                        f"{units} more units would exceed the budget; {left} left",
                        remaining_units=left,
                    )
        else:
            raise BudgetExhausted(
                f"could not reserve {units} units: other processes hold the rest of the budget",
                remaining_units=0,
            )
        if wait or push_now:  # else (the common case) no further call is made
            return self._send_counted(stream_id, loc, mark, total, wait=wait)
        return total

    # ------------------------------------------------------------------ pushes
    def _send_counted(
        self, stream_id: str, loc: _Lease, mark: int, total: int, *, wait: bool
    ) -> int:
        """Units counted up to ``mark`` that must go out now (``commit`` and ``consume``):
        waited for when the caller asked to (``wait``), else pushed; the total they return
        is then at least what the store holds."""
        if wait:
            self._await(stream_id, loc, mark)
        else:
            self._push_after_count(stream_id, loc, mark)
        with loc.mu:
            return max(total, loc.total)

    def _push_after_count(self, stream_id: str, loc: _Lease, mark: int) -> None:
        """A push due once units are counted here (a call that ran, a count past a chunk).

        Its failure is logged, not raised: the units are counted (unpushed, or in the push
        kept for re-sending) and go out with the next push, exactly once; raising would tell
        the caller they were not, and a retry would count them twice.
        """
        try:
            self._sync(stream_id, loc, need=0, release=False, until=mark)
        except Exception as exc:
            log.warning(
                "pf_metered: push for stream %s failed; its units stay counted here and go "
                "with the next push: %s",
                stream_id,
                exc,
            )

    def _await(self, stream_id: str, loc: _Lease, mark: int) -> None:
        """Return once a push covering ``mark`` was acknowledged (``wait=True``).

        Why the background thread pushes: waiters that each pushed in turn carried a unit or
        two per commit (each woke, pushed what little was there, and the rest queued behind
        it); one pusher kicked by every waiter takes all that accumulated during the last
        commit, so concurrent waiters share one fsync. If it does not answer within a second
        (it died, or the push keeps failing) the waiter pushes itself and sees the error.
        Until a second waiter was seen on the stream, a waiter pushes itself (no hand-over to
        another thread: one caller's fsync is its latency).
        """
        ticker = self._ticker
        with loc.done:
            if loc.waiting:
                loc.crowd = True
            crowd = loc.crowd
            loc.waiting += 1
        if not crowd:
            try:
                self._sync(stream_id, loc, need=0, release=False, until=mark)
            finally:
                with loc.done:
                    loc.waiting -= 1
            return
        with loc.done:
            loc.waiting -= 1
        if ticker is not None and not self._stopped:
            self._kick.set()
            with loc.done:
                loc.waiting += 1
                try:
                    while loc.acked < mark:
                        if not loc.done.wait(1.0):
                            break
                finally:
                    loc.waiting -= 1
                if loc.acked >= mark:
                    return
        self._sync(stream_id, loc, need=0, release=False, until=mark)

    def push(self, stream_id: str, *, release: bool = False) -> None:
        """Push what this process consumed on ``stream_id`` (and, with ``release``, give the
        free lease back). Returns once every unit consumed before the call is acknowledged."""
        loc = self._leases.get(stream_id)
        if loc is None:
            return
        with loc.mu:
            dirty = bool(loc.consumed or loc.unacked is not None or (release and loc.remaining))
            mark = loc.counted
        if dirty or mark > loc.acked:
            # ``until``: a push under way that carries our units is waited for, not repeated
            self._sync(stream_id, loc, need=0, release=release, until=None if release else mark)

    def push_all(self, *, release: bool = False) -> None:
        """:meth:`push` every stream (``sync``/``close``); the first error is raised after."""
        error: BaseException | None = None
        for sid in self.streams():
            try:
                self.push(sid, release=release)
            except Exception as exc:  # the others still get their push
                error = error or exc
        if error is not None:
            raise error

    def close_local(self, stream_id: str, status: str) -> None:
        """The stream takes no more units here (a final claim, a close): refuse locally."""
        loc = self._leases.get(stream_id)
        if loc is not None:
            with loc.mu:
                loc.closed = status

    def _sync(
        self, stream_id: str, loc: _Lease, *, need: int, release: bool, until: int | None = None
    ) -> int:
        return self._sync_status(stream_id, loc, need=need, release=release, until=until)[0]

    def _sync_status(
        self,
        stream_id: str,
        loc: _Lease,
        *,
        need: int,
        release: bool = False,
        until: int | None = None,
    ) -> tuple[int, str]:
        """One exchange with the record (or a re-send first); ``(pool available, status)``.

        Serialised per stream; an unacknowledged push is re-sent verbatim before anything
        else, so a lost answer never counts twice.
        """
        backend = self._backend
        avail, status = 0, "open"
        if until is not None:  # a push already under way may carry our units: wait for it
            with loc.done:
                while loc.acked < until and loc.pushing:
                    loc.done.wait()
                if loc.acked >= until:
                    return _PLENTY, "open"
        with loc.io:
            while True:
                with loc.mu:
                    if loc.unacked is not None:
                        push, upto, resend = loc.unacked, loc.unacked_upto, True
                        giving = loc.unacked_giving
                    else:
                        if until is not None and loc.acked >= until:
                            return _PLENTY, "open"  # a push by another thread covered it
                        if (
                            not release
                            and need
                            and loc.remaining >= need
                            and (not loc.expires or self._clock() < loc.expiry)
                            and loc.closed is None
                        ):
                            return _PLENTY, "open"  # another thread topped the lease up
                        loc.seq += 1
                        if release or loc.closed is not None:
                            want = loc.held if loc.closed is None else 0
                        else:  # the lease must cover the running calls, plus a chunk
                            want = loc.held + max(self._chunk, need)
                        push = Push(
                            seq=loc.seq,
                            used=loc.consumed,
                            want=want,
                            need=loc.held + need,
                            exact=not self._chunk,
                        )
                        upto = loc.counted
                        giving = release or loc.closed is not None
                        loc.consumed = 0
                        loc.unacked, loc.unacked_upto = push, upto
                        loc.inflight = push.used
                        loc.unacked_giving = giving
                        resend = False
                    t0 = self._clock()
                with loc.done:
                    loc.pushing = True
                # a re-send is the same call: the record answers it with the first's reply
                try:
                    answer = (
                        backend.give_back(stream_id, push)
                        if giving
                        else backend.take(stream_id, push)
                    )
                except InvalidInput:  # a definite no (an unknown stream): nothing was applied
                    with loc.mu:
                        loc.unacked = None
                        loc.inflight = 0
                        loc.consumed += push.used
                        empty = not (loc.consumed or loc.held or loc.remaining)
                    self._answered(loc)
                    if empty:
                        self.forget(stream_id)
                    raise
                except BaseException:  # in doubt: kept in ``unacked``, re-sent by the next push
                    self._answered(loc)
                    raise
                with loc.mu:
                    loc.unacked = None
                    loc.inflight = 0
                    if answer.stale:  # the record saw a later sequence: resend under a new one
                        loc.consumed += push.used
                        loc.seq += _SEQ_JUMP
                        again = True
                    else:
                        # after a re-send (an old push) comes ours
                        again = self._apply(loc, answer, upto, t0, release) or resend
                        status, avail = answer.status, answer.available
                self._answered(loc)
                if not again:
                    return avail, status
                release = release or loc.closed is not None

    @staticmethod
    def _apply(loc: _Lease, answer: Grant, upto: int, t0: float, more: bool) -> bool:
        """Take a push's answer in (under ``loc.mu``); whether to push again at once (units
        consumed meanwhile must follow a give-back or a close)."""
        loc.acked = max(loc.acked, upto)
        loc.total = answer.total
        if answer.status not in ("open", "new"):
            loc.closed = answer.status
        # units consumed while the push was in flight came out of the old lease
        loc.remaining = max(0, answer.lease - loc.consumed - loc.held)
        loc.expires = answer.ttl is not None
        if answer.ttl is not None:
            loc.ttl = answer.ttl
            # our clock starts before the record's: we stop consuming first
            margin = min(0.25 * answer.ttl, 0.5)
            loc.expiry = t0 + answer.ttl - margin if answer.lease > 0 else 0.0
        return loc.consumed > 0 and (loc.closed is not None or more)

    @staticmethod
    def _answered(loc: _Lease) -> None:
        """The push is over (answered or failed): wake whoever waits on it."""
        with loc.done:
            loc.pushing = False
            loc.done.notify_all()

    # ------------------------------------------------------------------ background
    def tick(self) -> None:
        """One background round: push consumption, renew expiring leases, return idle ones."""
        now = self._clock()
        work: list[tuple[str, _Lease, bool]] = []
        with self._lock:
            items = list(self._leases.items())
        for sid, loc in items:
            with loc.mu:
                if loc.consumed or loc.unacked is not None:
                    work.append((sid, loc, False))
                elif self._return_idle and loc.remaining and not loc.active and not loc.held:
                    work.append((sid, loc, True))
                elif (
                    loc.expires
                    and (loc.remaining or loc.held)
                    and loc.expiry - now < loc.ttl / 2
                    and loc.closed is None
                ):
                    work.append((sid, loc, False))
                loc.active = False
        for sid, loc, release in work:
            try:
                self._sync(sid, loc, need=0, release=release)
            except Exception as exc:  # keep pushing the other streams; retry next round
                log.warning("pf_metered: lease push for stream %s failed: %s", sid, exc)

    def start(self, interval: float, name: str) -> None:
        """Run :meth:`tick` every ``interval`` seconds on a daemon thread (once)."""
        if self._ticker is not None or self._stopped:  # the hot path's check: no lock
            return
        with self._lock:
            if self._ticker is not None or self._stopped:
                return
            self._stop = threading.Event()
            ref = weakref.ref(self)
            self._ticker = threading.Thread(
                target=_tick_loop,
                args=(ref, self._stop, self._kick, interval),
                name=name,
                daemon=True,
            )
            self._ticker.start()
        if self._on_start is not None:
            self._on_start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the background rounds for good (waits at most ``timeout`` for the current
        one); only :meth:`reset` lets :meth:`start` run them again."""
        self._stopped = True
        self._stop.set()
        self._kick.set()
        ticker = self._ticker
        if ticker is not None and ticker is not threading.current_thread():
            ticker.join(timeout)
        self._ticker = None

    def reset(self) -> None:
        """Forget every lease (a forked child: the parent's leases are the parent's)."""
        self._leases = {}
        self._lock = threading.Lock()
        self._ticker = None
        self._stopped = False
        self._stop = threading.Event()
        self._kick = threading.Event()

    def crowded(self) -> bool:
        """Whether several threads wait on one stream's push (``wait=True``): then the pusher
        lets the ones just woken count again before it pushes, so one fsync carries them all
        (with one waiter that yield would only add latency)."""
        return any(loc.waiting > 1 for loc in list(self._leases.values()))

    # ------------------------------------------------------------------ introspection
    def streams(self) -> list[str]:
        with self._lock:
            return list(self._leases)

    def holds(self, stream_id: str) -> bool:
        """Whether this process has a side of ``stream_id``'s lease (it counted there)."""
        return stream_id in self._leases

    def view(self, stream_id: str) -> LeaseView | None:
        loc = self._leases.get(stream_id)
        if loc is None:
            return None
        with loc.mu:
            return LeaseView(loc.remaining, loc.held, loc.unpushed(), loc.total, loc.closed)

    def forget(self, stream_id: str) -> None:
        """Drop a stream's local side (it holds nothing: pushed and given back)."""
        with self._lock:
            self._leases.pop(stream_id, None)

    def _lease(self, stream_id: str) -> _Lease:
        loc = self._leases.get(stream_id)
        if loc is None:
            with self._lock:
                loc = self._leases.get(stream_id)
                if loc is None:
                    loc = self._leases[stream_id] = _Lease()
            if self._interval is not None:
                self.start(self._interval, self._name)
        return loc


def _tick_loop(
    ref: weakref.ref[LeasedCounter],
    stop: threading.Event,
    kick: threading.Event,
    interval: float,
) -> None:
    while True:
        kicked = kick.wait(interval)  # every interval, or at once when a waiter needs a push
        kick.clear()
        if stop.is_set():
            return
        engine = ref()
        if engine is None:
            return
        if kicked and engine.crowded():
            time.sleep(0)  # let the waiters the last push woke count their next units first
        engine.tick()
        del engine
