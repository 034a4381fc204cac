"""Client-side rate limiting: a token bucket per request path, so a busy stream slows down
instead of drawing 429s.

Why a bucket per *path*: the deployed escrow service counts requests in a fixed 60-second window
per path (``/escrow/create`` is one path; ``/escrow/release/esc_1`` and ``/escrow/release/esc_2``
are two) and per client address, and it counts failed requests too. A bucket whose burst
``capacity`` and refill ``rate`` satisfy ``capacity + 60 × rate ≤ limit`` can never send more than
``limit`` requests in *any* 60-second interval, so in particular never more than ``limit`` in one
of the server's fixed windows, wherever that window happens to start.

When a 429 is drawn anyway (another process shares the address, or the limit is lower than
configured), the server sends no ``Retry-After``: the bucket is emptied, the path is paused with
capped exponential backoff and jitter, and its refill rate is halved (multiplicative decrease),
creeping back to the configured rate on each success (additive increase).

This module is sans-I/O: it computes how long to wait and never sleeps, never performs a
request, and never blocks while holding its lock. The sync client sleeps with ``time.sleep``, the
async client with ``asyncio.sleep``; tests inject a clock.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pf_metered.errors import InvalidInput

__all__ = [
    "DEFAULT_DEPLOYED_LIMITS",
    "PathRateLimiter",
    "RateLimit",
    "TokenBucket",
]

WINDOW_SECONDS = 60.0
"""The deployed service's fixed rate window."""

WINDOW_GUARD_SECONDS = 0.01
"""Refill is spread over the window plus this guard: at exactly 60 s the last token would land on
the window's edge, where float rounding (59.9999999999998 s) or the server's clock can put it
inside the window the first request opened."""

BACKOFF_BASE = 1.0
"""First pause after a 429 (seconds); doubled on each consecutive 429 of the same path."""

BACKOFF_CAP = WINDOW_SECONDS
"""A fixed window has surely rolled over after this long: no pause is ever longer."""

_IDLE_PRUNE = 4 * WINDOW_SECONDS
"""Buckets idle this long are full again and are forgotten (release paths are one-shot)."""


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A limit of ``per_minute`` requests in any 60 s, spent as a burst then a steady trickle.

    ``burst`` is how many requests may go out at once from a rested bucket (default a quarter
    of the limit, at least 1); the refill rate is what is left of the limit spread over a
    minute, so ``burst + 60 × rate == per_minute``. ``margin`` requests of the limit are kept
    in reserve (default 1) for the reads a reconciliation may need and for clock skew.
    """

    per_minute: int
    burst: int | None = None
    margin: int = 1

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
        if self.burst is not None:
            return self.burst
        return max(1, self.usable // 4)

    @property
    def refill_per_second(self) -> float:
        """What is left of the usable limit after the burst, spread over the window.

        With ``capacity + 60 × rate == usable`` a bucket sends at most ``usable`` requests in
        any 60 s interval (the token refilled at the window's very end falls outside it)."""
        return max(self.usable - self.capacity, 1) / (WINDOW_SECONDS + WINDOW_GUARD_SECONDS)

    @property
    def sustained_per_minute(self) -> float:
        """Requests a minute this bucket sustains once its burst is spent."""
        return self.refill_per_second * WINDOW_SECONDS


DEFAULT_DEPLOYED_LIMITS: Mapping[str, RateLimit] = {
    r"^/escrow/create$": RateLimit(10),
    r"^/auth/register$": RateLimit(10),
    r"^/api/v1/auth/register$": RateLimit(10),
    r"^/faucet/claim$": RateLimit(10),
    r".*": RateLimit(30),
}
"""What the deployed service's public code was seen to allow: 10–30 requests a minute per path.
The scarce path is ``/escrow/create`` (one per tranche), so it gets the low end."""


class TokenBucket:
    """One path's bucket. ``reserve()`` takes a token now and says how long to wait for it.

    Tokens may go negative: each caller reserves its own future slot, so concurrent callers are
    spaced out fairly rather than all waking at once and racing.
    """

    __slots__ = ("_pause_until", "_streak", "capacity", "nominal_rate", "rate", "tokens", "updated")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.capacity = float(limit.capacity)  # ok: seconds, not money
        self.nominal_rate = limit.refill_per_second
        self.rate = self.nominal_rate
        self.tokens = self.capacity
        self.updated = now
        self._pause_until = now
        self._streak = 0

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def reserve(self, now: float) -> float:
        """Take one token; return the seconds to wait before sending (0 when one is at hand)."""
        self._refill(now)
        self.tokens -= 1.0
        wait = 0.0 if self.tokens >= 0 else -self.tokens / self.rate
        return max(wait, self._pause_until - now, 0.0)

    def penalise(self, now: float, jitter: float) -> float:
        """A 429 was drawn: empty the bucket, halve the rate, pause; return the pause."""
        self._refill(now)
        self._streak += 1
        pause = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(self._streak - 1, 16)) * (1.0 + jitter)
        pause = min(pause, BACKOFF_CAP)
        self.tokens = min(self.tokens, 0.0)
        self.rate = max(self.rate / 2, 1 / WINDOW_SECONDS)
        self._pause_until = max(self._pause_until, now + pause)
        return pause

    def succeeded(self) -> None:
        """An answer that was not a 429: forget the streak and creep back towards the limit."""
        self._streak = 0
        if self.rate < self.nominal_rate:
            self.rate = min(self.nominal_rate, self.rate + self.nominal_rate / 10)

    def idle_and_full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity and now >= self._pause_until and self._streak == 0


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
        self._buckets: dict[str, TokenBucket] = {}
        self._last_prune = clock()
        self.drawn_429 = 0
        """How many 429s this limiter has been told about (for tests and status)."""

    def limit_for(self, path: str) -> RateLimit | None:
        """The limit that governs ``path``, or ``None`` if no pattern matches (unlimited)."""
        for pattern, limit in self._patterns:
            if pattern.search(path):
                return limit
        return None

    def _bucket(self, path: str, now: float) -> TokenBucket | None:
        bucket = self._buckets.get(path)
        if bucket is None:
            limit = self.limit_for(path)
            if limit is None:
                return None
            bucket = self._buckets[path] = TokenBucket(limit, now)
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
