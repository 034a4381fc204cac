"""The sandbox's sense of time: a clock that tests can move forward.

Why its own clock: auto-release happens ``auto_release_hours`` after an escrow is created, and
rate-limit windows last a minute. A test must be able to reach those moments at once, without
sleeping, and an example should still print real timestamps. Both clocks here keep time as
integer microseconds so that advancing by 0.1 s ten thousand times lands exactly where it should.

What this module must never do: sleep, read the wall clock more than once per call, or let
time run backwards (``advance`` refuses negative steps).
"""

from __future__ import annotations

import math
import threading
import time
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

from pf_metered.errors import InvalidInput

__all__ = ["Clock", "ManualClock", "SandboxClock", "isoformat_us"]

_US = 1_000_000


@runtime_checkable
class Clock(Protocol):
    """Anything that tells the sandbox the time, in integer microseconds since the epoch."""

    def now_us(self) -> int:
        """The current time in microseconds since 1970-01-01T00:00:00Z."""
        ...


def _step_us(seconds: float | int) -> int:
    """A non-negative step in whole microseconds; refuses bools, negatives and non-numbers."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidInput("seconds", f"must be a number, not {type(seconds).__name__}")
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise InvalidInput("seconds", f"must be finite, got {seconds!r}")
    if seconds < 0:
        raise InvalidInput("seconds", f"must be finite and not negative, got {seconds!r}")
    if isinstance(seconds, int):
        return seconds * _US
    return round(seconds * _US)


class SandboxClock:
    """Wall-clock time plus an offset that tests (and demos) can push forward.

    The default clock: timestamps look real in examples, and ``advance`` still jumps over an
    auto-release deadline without waiting for it.
    """

    def __init__(self) -> None:
        self._offset_us = 0
        self._lock = threading.Lock()

    def now_us(self) -> int:
        with self._lock:
            return time.time_ns() // 1000 + self._offset_us

    def advance(self, seconds: float | int) -> None:
        """Move time forward by ``seconds`` (never backwards)."""
        step = _step_us(seconds)
        with self._lock:
            self._offset_us += step

    def __repr__(self) -> str:
        return f"SandboxClock(offset={self._offset_us / _US}s)"


class ManualClock:
    """A clock that stands still until told to move: fully deterministic tests.

    ``start`` is seconds since the epoch (default 2026-01-01T00:00:00Z).
    """

    DEFAULT_START = 1_767_225_600

    def __init__(self, start: float | int = DEFAULT_START) -> None:
        self._now_us = _step_us(start)
        self._lock = threading.Lock()

    def now_us(self) -> int:
        with self._lock:
            return self._now_us

    def advance(self, seconds: float | int) -> None:
        """Move time forward by ``seconds`` (never backwards)."""
        step = _step_us(seconds)
        with self._lock:
            self._now_us += step

    def __repr__(self) -> str:
        return f"ManualClock(now={isoformat_us(self.now_us())})"


def isoformat_us(us: int) -> str:
    """An RFC 3339 UTC timestamp with milliseconds, as the wire carries times."""
    seconds, micro = divmod(us, _US)
    dt = datetime.fromtimestamp(seconds, tz=timezone.utc).replace(microsecond=micro)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
