"""Client-side rate limiting: a log of send times per request path, so a busy stream slows
down instead of drawing 429s.

Why a log per *path*: the deployed escrow service counts requests in a fixed 60-second window
per path (``/escrow/create`` is one path; ``/escrow/release/esc_1`` and ``/escrow/release/esc_2``
are two) and per client address, and it counts failed requests too. Its window opens at the
first request it sees and is renewed once more than 60 s have passed. A client that never
sends more than ``limit`` requests in *any* interval of 60 s plus a guard can never exceed the
limit in one of those windows, wherever it starts; a log of the last ``limit`` send times
enforces exactly that, so the client uses the whole limit (20 creates a minute, not the 10
to 15 a token bucket that must also cap its burst would allow).

When a 429 is drawn anyway (another process shares the address, or the limit is lower than
configured), the server sends no ``Retry-After``: the path is paused with capped exponential
backoff and jitter, and what the client allows itself per window is halved (multiplicative
decrease), creeping back to the limit on each success (additive increase).

This module is sans-I/O: it computes how long to wait and never sleeps, never performs a
request, and never blocks while holding its lock. The sync client sleeps with ``time.sleep``, the
async client with ``asyncio.sleep``; tests inject a clock.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pf_metered.errors import InvalidInput

__all__ = [
    "DEFAULT_DEPLOYED_LIMITS",
    "PathRateLimiter",
    "RateLimit",
    "TokenBucket",
    "WindowLog",
    "limiter_for",
]

WINDOW_SECONDS = 60.0
"""The deployed service's fixed rate window."""

WINDOW_GUARD_SECONDS = 0.5
"""Sends are spread so that no interval of the window *plus* this guard holds more than the
limit: the server opens its window at the first request it sees and renews it only once more
than 60 s have passed, and it sees our requests a little later than we send them — by a
network delay that varies. Half a second covers that jitter and float rounding at the edge."""

BACKOFF_BASE = 1.0
"""First pause after a 429 (seconds); doubled on each consecutive 429 of the same path."""

BACKOFF_CAP = WINDOW_SECONDS
"""A fixed window has surely rolled over after this long: no pause is ever longer."""

_IDLE_PRUNE = 4 * WINDOW_SECONDS
"""Logs idle this long are empty again and are forgotten (release paths are one-shot)."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A limit of ``per_minute`` requests in any 60 s window of the server's.

    ``margin`` requests of the limit are kept in reserve (default 0: the service's own number;
    the window guard already covers clock skew). ``burst``, when given, caps how many may go
    out in any window below the usable limit (the default is the whole usable limit: a fixed
    window server does not care how they are spread inside it).
    """

    per_minute: int
    burst: int | None = None
    margin: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.per_minute, bool) or not isinstance(self.per_minute, int):
            raise InvalidInput("per_minute", "must be a whole number of requests")
        if self.per_minute < 1:
            raise InvalidInput("per_minute", f"must be at least 1, got {self.per_minute}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, int) or self.margin < 0:
            raise InvalidInput("margin", "must be a whole number ≥ 0")
        if self.burst is not None and not 1 <= self.burst <= self.usable:
            raise InvalidInput("burst", f"must be in 1..{self.usable}")

    @property
    def usable(self) -> int:
        """Requests a minute this client allows itself (the margin never takes the last one)."""
        return max(1, self.per_minute - self.margin)

    @property
    def capacity(self) -> int:
        """Requests that may go out in one window."""
        return self.burst if self.burst is not None else self.usable

    @property
    def window_seconds(self) -> float:
        return WINDOW_SECONDS + WINDOW_GUARD_SECONDS

    @property
    def sustained_per_minute(self) -> float:
        """Requests a minute this limit sustains, window after window."""
        return self.capacity * WINDOW_SECONDS / self.window_seconds


DEFAULT_DEPLOYED_LIMITS: Mapping[str, RateLimit] = {
    r"^/escrow/create$": RateLimit(20),
    r"^/escrow/release/[^/]+$": RateLimit(30),
    r"^/escrow/complete/[^/]+$": RateLimit(30),
    r"^/escrow/dispute/[^/]+$": RateLimit(10),
    r"^/api/v1/auth/register$": RateLimit(10),
    r"^/faucet/claim$": RateLimit(5),
}
"""What the deployed services allow per concrete path and client address in a 60 s window
(measured on their public code): 20 creates, 30 releases or completes of one escrow, 10
disputes of one escrow, 10 registrations, 5 faucet claims. Reads are not limited."""


class WindowLog:
    """One path's log of send times. ``reserve()`` books the earliest slot at which a request
    keeps every window (plus guard) at or under the limit, and says how long to wait for it.

    Slots are booked in order, possibly in the future: concurrent callers are spaced out
    fairly rather than all waking at once and racing.
    """

    __slots__ = ("_pause_until", "_streak", "allowed", "limit", "sent", "updated", "window")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit.capacity
        self.allowed = self.limit
        self.window = limit.window_seconds
        self.sent: deque[float] = deque()
        self.updated = now
        self._pause_until = now
        self._streak = 0

    def _forget(self, now: float) -> None:
        while self.sent and self.sent[0] <= now - self.window:
            self.sent.popleft()

    def reserve(self, now: float) -> float:
        """Book one send; return the seconds to wait before it (0 when it may go now)."""
        self._forget(now)
        self.updated = max(self.updated, now)
        slot = max(now, self._pause_until)
        if self.sent:
            slot = max(slot, self.sent[-1])
        if len(self.sent) >= self.allowed:
            slot = max(slot, self.sent[-self.allowed] + self.window)
        self.sent.append(slot)
        return slot - now

    def penalise(self, now: float, jitter: float) -> float:
        """A 429 was drawn: halve what this client allows itself a window, pause; return the
        pause."""
        self._streak += 1
        pause = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(self._streak - 1, 16)) * (1.0 + jitter)
        pause = min(pause, BACKOFF_CAP)
        self.allowed = max(1, self.allowed // 2)
        self._pause_until = max(self._pause_until, now + pause)
        return pause

    def succeeded(self) -> None:
        """An answer that was not a 429: forget the streak and creep back towards the limit."""
        self._streak = 0
        if self.allowed < self.limit:
            self.allowed += 1

    def idle_and_full(self, now: float) -> bool:
        self._forget(now)
        return not self.sent and now >= self._pause_until and self._streak == 0


TokenBucket = WindowLog
"""The name this class had when it was a token bucket (kept for callers of it)."""


def limiter_for(capabilities: object, rate_limits: object) -> PathRateLimiter | None:
    """A client's limiter: ``rate_limits`` ``False`` (none), a :class:`PathRateLimiter` to
    share between clients, a ``{path regex: RateLimit}`` dict, or ``None`` / ``True`` — the
    dialect's declared limits (``capabilities.limits``, requests per 60 s), if any."""
    if rate_limits is False:
        return None
    if isinstance(rate_limits, PathRateLimiter):
        return rate_limits
    if isinstance(rate_limits, dict):
        return PathRateLimiter(rate_limits)
    declared = getattr(capabilities, "limits", None) or {}
    if declared:
        return PathRateLimiter({p: RateLimit(int(n)) for p, n in declared.items()})
    return PathRateLimiter() if rate_limits is True else None


class PathRateLimiter:
    """A token bucket per concrete path, with limits chosen by the first matching pattern.

    Thread-safe (one lock held only for arithmetic). Shared by every request of one client, so
    a stream's background releases and the user's own calls are paced together.
    """

    def __init__(
        self,
        limits: Mapping[str, RateLimit] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] | None = None,
    ) -> None:
        given = DEFAULT_DEPLOYED_LIMITS if limits is None else limits
        self._patterns: list[tuple[re.Pattern[str], RateLimit]] = []
        for pattern, limit in given.items():
            if not isinstance(limit, RateLimit):
                raise InvalidInput("rate_limits", f"{pattern!r} must map to a RateLimit")
            self._patterns.append((re.compile(pattern), limit))
        self._clock = clock
        self._rng = rng if rng is not None else random.random
        self._lock = threading.Lock()
        self._buckets: dict[str, WindowLog] = {}
        self._last_prune = clock()
        self.drawn_429 = 0
        """How many 429s this limiter has been told about (for tests and status)."""

    def limit_for(self, path: str) -> RateLimit | None:
        """The limit that governs ``path``, or ``None`` if no pattern matches (unlimited)."""
        for pattern, limit in self._patterns:
            if pattern.search(path):
                return limit
        return None

    def _bucket(self, path: str, now: float) -> WindowLog | None:
        bucket = self._buckets.get(path)
        if bucket is None:
            limit = self.limit_for(path)
            if limit is None:
                return None
            bucket = self._buckets[path] = WindowLog(limit, now)
        return bucket

    def _prune(self, now: float) -> None:
        if now - self._last_prune < _IDLE_PRUNE:
            return
        self._last_prune = now
        for path in [p for p, b in self._buckets.items() if now - b.updated >= _IDLE_PRUNE]:
            if self._buckets[path].idle_and_full(now):
                del self._buckets[path]

    def acquire(self, path: str) -> float:
        """Reserve a slot for one request to ``path``; return the seconds to sleep first."""
        with self._lock:
            now = self._clock()
            self._prune(now)
            bucket = self._bucket(path, now)
            return 0.0 if bucket is None else bucket.reserve(now)

    def rate_limited(self, path: str) -> float:
        """Record a 429 on ``path``; return how long to pause before the retry's ``acquire``."""
        with self._lock:
            now = self._clock()
            self.drawn_429 += 1
            bucket = self._bucket(path, now)
            if bucket is None:
                return min(BACKOFF_CAP, BACKOFF_BASE * 2)
            return bucket.penalise(now, jitter=0.25 * self._rng())

    def succeeded(self, path: str) -> None:
        """Record an answer other than 429 on ``path``."""
        with self._lock:
            bucket = self._buckets.get(path)
            if bucket is not None:
                bucket.succeeded()

    def tracked_paths(self) -> int:
        with self._lock:
            return len(self._buckets)
