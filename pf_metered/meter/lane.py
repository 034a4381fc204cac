"""The fast lane: a one-unit metered call counted with two atomic C steps, no lock.

Why: a lock taken twice per call (reserve before, commit after) costs more than the call it
meters. Here a call pops a token from one list before it runs (its *admission*) and from
another after it returns (its *commit*): ``list.pop`` is one C call that runs no Python code,
so it is atomic, and it allocates nothing. Only an empty list sends the call to the slow
half, under its owner's lock. The owner is the in-memory store's record
(``pf_metered.meter.store._Record``), which fills and empties both lists under that lock;
every other stream gets :func:`locked_parts`, whose lists are always empty (every call goes
to the stream's public ``reserve`` / ``commit`` / ``cancel``).

The hot path::

    try: take()   except IndexError: admit()    # admit: under the lock, may refuse (raise)
    result = fn(...)                             # raised: cancel() under the lock
    try: done()   except IndexError: settle()   # settle: late? a batch due? a closer?

**Why it is safe: every token is removed exactly once**, either by a call (``pop``
succeeded) or by the owner taking the list back (it pops the tokens one by one, counting
them). So under the lock the owner knows exactly how many calls took a token: the tokens it
put in, less those it took back, less those still in the list (``len``).

* *Never over budget.* Admission tokens are lent only within the budget: with ``B`` the
  record's locked units and reservations, ``M = max_units`` and ``F`` = admission tokens lent
  and not taken back + calls admitted under the lock − calls cancelled (never below what the
  lane's calls hold or spent: a token still in the list counts as spent), the owner keeps
  ``B + F ≤ M``. It lends ``k ≤ M − B − F``; lets ``B`` grow by ``n`` only if ``B + n + F ≤
  M``, taking the list back first when that fails (which lowers ``F`` to what calls really
  took); admits under the lock only if ``B + F + 1 ≤ M``. Spent ≤ ``B + F`` ≤ ``M``, always.
* *Exact commits.* The commit count is commit tokens lent − taken back − ``len`` + commits
  made under the lock. The final claim takes both lists back (after which every commit finds
  its list empty), then claims the locked units plus that count: a commit that popped a token
  is in the claim; every later one takes the slow half, is *late* (``late_units``, not paid,
  ``on_late``; its admission is given back) and counts nowhere else.
* *Batches.* Commit tokens are lent only up to one below the next batch threshold: ``units
  + commits + tokens in the list ≤ threshold − 1`` (a sum the owner knows without reading
  the list: a commit moves one from the list to the count). So the commit that reaches
  ``due_at`` finds the list empty and wakes the sender; past it the threshold is the next
  batch (``due_at − claimed`` further), so the calls between the wake-up and the sender's
  claim stay fast. When the locked units grow, the owner takes back what no longer fits.
* *Close.* ``close`` takes both lists back (every new call is refused under the lock, every
  commit or cancel notifies), then waits on a condition until no call is in flight: admitted
  − committed − cancelled, the commit list read before the admission list (a call that
  committed had taken its admission first), so it is never negative and zero means none.

**Binding late.** A decorator's closure exists before its stream opens. Until bound both its
lists are an always-empty one and its ``admit`` binds the parts, then admits. Rebinding
stores the commit side first, ``take`` after it and ``admit`` last, so a call admitted with a
real token or by a real ``admit`` finds a real commit side.

**Without the GIL** (a free-threaded build running with the GIL disabled): ``list.pop`` is
still atomic (each list has its own lock there), so the two bullets above still hold, but
the close-time read of two lists' lengths without their locks is not promised to be ordered,
so "zero in flight" could be read early. There nothing is lent: every call takes the lock on
both sides, as before this lane existed. No such build could be installed on the machine
this was written on, so that mode is argued, not tested; :data:`LOCK_FREE` tells which runs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Final, NamedTuple

__all__ = [
    "LOCK_FREE",
    "LaneParts",
    "lane_call",
    "lane_call_async",
    "locked_parts",
]

if sys.version_info >= (3, 13):
    _gil = sys._is_gil_enabled()
else:
    _gil = True
LOCK_FREE: Final[bool] = _gil
"""Whether an owner may lend tokens to the lane: the GIL is on (once on, it is never turned
off again, so a decision made at import stays safe)."""


class LaneParts(NamedTuple):
    """What a metered closure binds: the two atomic steps and the slow halves.

    ``take()`` removes an admission token (``IndexError`` when there is none: then
    ``admit()`` admits under the lock or raises ``BudgetExhausted``, ``StreamClosed`` or the
    stream's failure, its context suppressed); ``done()`` removes a commit token
    (``IndexError``: then ``settle()`` counts the commit and returns the units not paid,
    ``1`` when it was late); ``cancel()`` gives back the admission of a call that raised.
    ``locked``: both steps always fail (parts over a stream's locked counting API).
    """

    take: Callable[[], object]
    admit: Callable[[], None]
    done: Callable[[], object]
    settle: Callable[[], int]
    cancel: Callable[[], None]
    locked: bool = False


_EMPTY: Final[list[object]] = []  # never filled: its pop always raises IndexError


def _unbound_settle() -> int:  # pragma: no cover - no commit before admit binds
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

    def settle() -> int:
        unpaid = commit(units)
        if unpaid and on_unpaid is not None:
            on_unpaid(unpaid)
        return unpaid

    def give_back() -> None:
        cancel(units)

    return LaneParts(_EMPTY.pop, admit, _EMPTY.pop, settle, give_back, locked=True)


def lane_call(
    fn: Callable[..., Any],
    bind: Callable[[], LaneParts],
    *,
    charge: bool = False,
) -> Callable[..., Any]:
    """``fn`` metered on the lane ``bind()`` gives (called on the first call, under a lock).

    The returned closure is the whole hot path: no Python call between it and ``fn`` but
    two ``pop()``. A call that raises is cancelled (it costs nothing), or committed when
    ``charge``. :func:`lane_call_async` repeats these closures around ``await fn(...)``, kept
    apart on purpose (see there).
    """
    take: Callable[[], object] = _EMPTY.pop
    done: Callable[[], object] = _EMPTY.pop
    settle: Callable[[], int] = _unbound_settle
    cancel: Callable[[], None] = _unbound_cancel
    binding = threading.Lock()
    admit: Callable[[], None]

    def first() -> None:
        nonlocal take, done, settle, cancel, admit
        with binding:
            if admit is first:
                try:
                    parts = bind()
                except BaseException as exc:
                    raise exc from None  # not "during handling of IndexError"
                done, settle, cancel = parts.done, parts.settle, parts.cancel
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
                try:
                    done()
                except IndexError:
                    settle()
                raise
            try:
                done()
            except IndexError:
                settle()
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
        try:
            done()
        except IndexError:
            settle()
        return result

    return metered


def lane_call_async(
    fn: Callable[..., Awaitable[Any]],
    bind: Callable[[], Awaitable[LaneParts]],
    *,
    charge: bool = False,
) -> Callable[..., Awaitable[Any]]:
    """:func:`lane_call` for a coroutine function: the same steps around ``await fn(...)``.

    The admission is taken when the coroutine starts, before ``fn``'s coroutine is made, so a
    refused call never runs; no step awaits.

    Its closures repeat :func:`lane_call`'s line for line on purpose: a helper shared by the
    two would put a Python call into every metered call (the hot path has none but the two
    ``pop()``), and the sync closures cannot hold an ``await``. Change both together.
    """
    take: Callable[[], object] = _EMPTY.pop
    done: Callable[[], object] = _EMPTY.pop
    settle: Callable[[], int] = _unbound_settle
    cancel: Callable[[], None] = _unbound_cancel
    binding = threading.Lock()
    admit: Callable[[], Awaitable[None]]

    async def first() -> None:
        nonlocal take, done, settle, cancel, admit
        if admit is first:
            try:
                parts = await bind()  # the stream's open (once), outside the lock
            except BaseException as exc:
                raise exc from None
            with binding:
                if admit is first:
                    done, settle, cancel = parts.done, parts.settle, parts.cancel
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
                try:
                    done()
                except IndexError:
                    settle()
                raise
            try:
                done()
            except IndexError:
                settle()
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
        try:
            done()
        except IndexError:
            settle()
        return result

    return metered


def _awaitable(admit: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def admit_async() -> None:
        admit()

    return admit_async
