"""The fast lane: a one-unit metered call counted with C-level atomic steps, no lock.

Why: a lock taken twice per call (reserve before, commit after) costs more than the call it
meters. Here a call takes a *token* from a list before it runs (``list.pop``) and draws a
*commit index* after it returns (``next()`` on a range iterator), each one C call that runs no
Python code (atomic under the GIL), and takes the slow half under the owner's lock only when
the list is empty or the index is at or past a bound. The owner is the in-memory store's
record (``pf_metered.meter.store._Record``, which keeps the invariants below); every other
stream gets :func:`locked_parts`, which sends every call to the slow half (the stream's
public ``reserve`` / ``commit`` / ``cancel``).

The hot path, in this order::

    try: take()            except IndexError: admit()   # admit: under the lock, may raise
    result = fn(...)                                    # raised: cancel() under the lock
    c = next(commits);     if c >= mark: settle(c)      # late? due? a closer waiting?

**Never over budget.** The lease is a list of tokens the owner filled under its lock; a token
is removed exactly once, by a call (``pop`` succeeded: it may run) or by the owner taking the
lease back (it pops them one by one, counting). So the calls admitted without the lock are
at most the tokens lent and not taken back, and the owner's bound ``F = lent − taken back +
admitted under the lock − cancelled`` is never below what the lane's calls hold or spent.
With ``B`` the owner's locked units and reservations and ``M = max_units`` the owner keeps
``B + F ≤ M``: it lends ``k ≤ M − B − F``, lets ``B`` grow by ``n`` only if ``B + n + F ≤
M`` (else it takes the lease back first, which lowers ``F`` to what is really used) and
admits under the lock only if ``B + F + 1 ≤ M``. Hence spent ≤ ``B + F`` ≤ ``M`` at every
moment. This needs nothing but ``list.pop`` being atomic (it is without the GIL too).

**Exact at close.** ``C`` (the commit count) is read under the lock through the iterator's
``__length_hint__``; ``mark`` is a commit index, stored only under the lock, always
``mark = -1`` first and the count read after. The final claim stores ``mark = -1`` for good,
reads ``C = s`` and claims the locked units plus ``s``: an index below ``s`` was drawn before
the read (the final release pays it); one at or past ``s`` was drawn after ``mark = -1`` was
stored, so it compares with ``-1`` (the GIL orders every load after the store it follows),
takes the slow half and is *late* (``late_units``, not paid, ``on_late``). ``close`` first
takes the lease back and stores ``mark = -1`` (every commit or cancel from then on notifies
it), then waits on a condition until no call is in flight: admitted − ``C`` − cancelled, read
``C`` first (a call committed was admitted before), zero only when none is. Batches:
``mark`` is the commit index at which the total reaches ``due_at`` (capped a chunk ahead, so
the compare stays on small ints); it is lowered, ``-1`` first, whenever the locked units
grow, so the commit that reaches ``due_at`` is always looked at.

**Binding late.** A decorator's closure exists before its stream opens. Until bound its
``take`` pops an empty list and its ``admit`` binds the parts, then admits; rebinding stores
the commit side first, ``take`` after it and ``admit`` last, so a call that got a real token
(or a real admission) finds a real commit side.

**Without the GIL** (a free-threaded build running with the GIL disabled): ``list.pop`` and
``itertools.count``'s ``next`` are atomic there (3.13+, gh-117657), a range iterator's only
from 3.15 (gh-129068), and the commit argument also needs the store of ``mark`` ordered
before the owner's read of ``C`` and each commit's load of ``mark`` after its draw (a
store→load fence) that CPython does not promise. So there nothing is lent and ``mark``
stays ``-1``: every call takes the lock on both sides, as before this lane existed, and the
commit count is an ``itertools.count`` read from its ``repr``. No such build could be
installed here, so that mode is argued, not tested; :data:`LOCK_FREE` tells which runs.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, NamedTuple, Protocol

__all__ = [
    "LOCK_FREE",
    "SHUT",
    "TALLY_END",
    "Bounds",
    "LaneParts",
    "lane_call",
    "lane_call_async",
    "locked_parts",
    "tally",
]

if sys.version_info >= (3, 13):
    _gil = sys._is_gil_enabled()
else:
    _gil = True
LOCK_FREE: Final[bool] = _gil
"""Whether the owner may lend to the lock-free lane: the GIL is on (once on it is never
turned off again, so a decision made at import stays safe)."""

TALLY_END: Final = 1 << 62
"""A tally's count is ``TALLY_END - left()``."""


def tally() -> tuple[Iterator[int], Callable[[], int]]:
    """A shared count: the iterator whose ``next()`` is the atomic step, and ``left()``,
    with the count ``TALLY_END - left()``.

    Under the GIL a range iterator, whose ``__length_hint__`` is ``left`` (a C call of about
    25 ns, so a locked ``record(n)`` may read the count on every call); without the GIL an
    ``itertools.count`` (atomic there), read from its ``repr`` under the owner's lock.
    """
    if LOCK_FREE:
        it = iter(range(TALLY_END))
        return it, it.__length_hint__  # type: ignore[attr-defined]
    count = itertools.count()

    def left() -> int:
        return TALLY_END - int(repr(count)[6:-1])

    return count, left


class Bounds(Protocol):
    """What a commit compares with: the commit index from which it needs the slow half."""

    @property
    def mark(self) -> int: ...


class _Shut:
    """Bounds that send every commit to the slow half."""

    __slots__ = ()
    mark: Final = -1


SHUT: Final = _Shut()


class LaneParts(NamedTuple):
    """What a metered closure binds: the two atomic steps, the bound and the slow halves.

    ``take()`` removes a token of the lease (``IndexError`` when there is none: call
    ``admit()``, which admits under the lock or raises ``BudgetExhausted``, ``StreamClosed``
    or the stream's failure); ``commits`` yields commit indices, ``settle(index)`` finishes a
    commit at or past ``bounds.mark`` and returns the units not paid (``1`` when late);
    ``cancel()`` gives back the admission of a call that raised.
    """

    take: Callable[[], object]
    admit: Callable[[], None]
    commits: Iterator[int]
    bounds: Bounds
    settle: Callable[[int], int]
    cancel: Callable[[], None]


_EMPTY: Final[list[object]] = []  # never filled: its pop always raises IndexError


def _unbound_settle(index: int) -> int:  # pragma: no cover - no commit before admit binds
    raise AssertionError("a lane commits only after it was bound")


def _unbound_cancel() -> None:  # pragma: no cover - no cancel before admit binds
    raise AssertionError("a lane cancels only after it was bound")


def locked_parts(
    reserve: Callable[[int], int],
    commit: Callable[[int], int],
    cancel: Callable[[int], None],
    units: int,
    on_unpaid: Callable[[int], None] | None = None,
) -> LaneParts:
    """Parts over a stream's public counting API, ``units`` a call: every call is slow.

    For streams whose counter has no lock-free lane (SQLite, Redis, a store's own counter)
    and for calls of more than one unit; ``commit`` returns the units not paid.
    """

    def admit() -> None:
        try:
            reserve(units)
        except BaseException as refusal:
            raise refusal from None  # not "during handling of IndexError"

    def settle(index: int) -> int:
        unpaid = commit(units)
        if unpaid and on_unpaid is not None:
            on_unpaid(unpaid)
        return unpaid

    def give_back() -> None:
        cancel(units)

    return LaneParts(_EMPTY.pop, admit, itertools.repeat(0), SHUT, settle, give_back)


def lane_call(
    fn: Callable[..., Any],
    bind: Callable[[], LaneParts],
    *,
    charge: bool = False,
) -> Callable[..., Any]:
    """``fn`` metered on the lane ``bind()`` gives (called on the first call, under a lock).

    The returned closure is the whole hot path: no Python call between it and ``fn`` but a
    ``pop()`` and a ``next()``. A call that raises is cancelled (it costs nothing), or
    committed when ``charge``. A refusal is raised with its context suppressed.
    """
    take: Callable[[], object] = _EMPTY.pop
    commits: Iterator[int] = itertools.repeat(0)
    bounds: Bounds = SHUT
    settle: Callable[[int], int] = _unbound_settle
    cancel: Callable[[], None] = _unbound_cancel
    binding = threading.Lock()
    admit: Callable[[], None]

    def first() -> None:
        nonlocal take, commits, bounds, settle, cancel, admit
        with binding:
            if admit is first:
                try:
                    parts = bind()
                except BaseException as exc:
                    raise exc from None  # not "during handling of IndexError"
                commits, bounds = parts.commits, parts.bounds
                settle, cancel = parts.settle, parts.cancel
                take = parts.take  # after the commit side: see the module docstring
                admit = parts.admit
        admit()

    admit = first

    if charge:

        def metered_charged(*args: Any, **kwargs: Any) -> Any:
            try:
                take()
            except IndexError:
                admit()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                c = next(commits)
                if c >= bounds.mark:
                    settle(c)
                raise
            c = next(commits)
            if c >= bounds.mark:
                settle(c)
            return result

        return metered_charged

    def metered(*args: Any, **kwargs: Any) -> Any:
        try:
            take()
        except IndexError:
            admit()
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            cancel()
            raise
        c = next(commits)
        if c >= bounds.mark:
            settle(c)
        return result

    return metered


def lane_call_async(
    fn: Callable[..., Awaitable[Any]],
    bind: Callable[[], Awaitable[LaneParts]],
    *,
    charge: bool = False,
) -> Callable[..., Awaitable[Any]]:
    """:func:`lane_call` for a coroutine function: the same steps around ``await fn(...)``.

    The token is taken when the coroutine starts, before ``fn``'s coroutine is made, so a
    refused call never runs; nothing awaits between a step and its check.
    """
    take: Callable[[], object] = _EMPTY.pop
    commits: Iterator[int] = itertools.repeat(0)
    bounds: Bounds = SHUT
    settle: Callable[[int], int] = _unbound_settle
    cancel: Callable[[], None] = _unbound_cancel
    binding = threading.Lock()
    admit: Callable[[], Awaitable[None]]

    async def first() -> None:
        nonlocal take, commits, bounds, settle, cancel, admit
        if admit is first:
            try:
                parts = await bind()  # the stream's open (once), outside the lock
            except BaseException as exc:
                raise exc from None
            with binding:
                if admit is first:
                    commits, bounds = parts.commits, parts.bounds
                    settle, cancel = parts.settle, parts.cancel
                    take = parts.take
                    admit = _awaitable(parts.admit)
        await admit()

    admit = first

    if charge:

        async def metered_charged(*args: Any, **kwargs: Any) -> Any:
            try:
                take()
            except IndexError:
                await admit()
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                c = next(commits)
                if c >= bounds.mark:
                    settle(c)
                raise
            c = next(commits)
            if c >= bounds.mark:
                settle(c)
            return result

        return metered_charged

    async def metered(*args: Any, **kwargs: Any) -> Any:
        try:
            take()
        except IndexError:
            await admit()
        try:
            result = await fn(*args, **kwargs)
        except BaseException:
            cancel()
            raise
        c = next(commits)
        if c >= bounds.mark:
            settle(c)
        return result

    return metered


def _awaitable(admit: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def admit_async() -> None:
        admit()

    return admit_async
