"""Optional fixed-window rate limits per (caller, path), by the sandbox clock.

Why fixed windows per concrete path: that is what the deployed service does (60 s windows per
path, so per escrow id, failed requests counted), and a client's retry logic should meet the
same shape in tests. Off unless the Sandbox is given limits. Unlike the deployed service, the
sandbox's 429 carries ``Retry-After`` (what the v1 contract promises).

What this module must never do: sleep, or grow without bound (old windows are dropped).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

from pf_metered.errors import InvalidInput

__all__ = ["RateLimiter", "RateLimits"]

_US = 1_000_000


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Requests allowed per window, keyed by route.

    A route is ``"METHOD /template"`` as the v1 app names it, e.g. ``"POST /escrow"``,
    ``"POST /escrow/{id}/release-partial"``, ``"GET /escrow/{id}"``; ``"*"`` applies to every
    route not named. Each concrete path (each escrow id) has its own counter per caller.
    """

    limits: Mapping[str, int] = field(default_factory=dict)
    window_seconds: int = 60

    def __post_init__(self) -> None:
        if isinstance(self.window_seconds, bool) or not isinstance(self.window_seconds, int):
            raise InvalidInput("window_seconds", "must be a whole number of seconds")
        if self.window_seconds < 1:
            raise InvalidInput("window_seconds", "must be at least 1")
        for route, limit in self.limits.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InvalidInput("rate_limits", f"{route!r} needs a whole number ≥ 1")

    def limit_for(self, route: str) -> int | None:
        return self.limits.get(route, self.limits.get("*"))


class RateLimiter:
    """Counts requests in fixed windows; thread-safe."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._window_us = limits.window_seconds * _US
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}
        self._lock = threading.Lock()

    def hit(self, caller: str, route: str, path: str, now_us: int) -> int | None:
        """Count one request; ``None`` if allowed, else the seconds until the window ends."""
        limit = self.limits.limit_for(route)
        if limit is None:
            return None
        window = now_us // self._window_us
        key = (caller, path)
        with self._lock:
            if len(self._counts) > 10_000:
                self._counts = {k: v for k, v in self._counts.items() if v[0] == window}
            seen_window, count = self._counts.get(key, (window, 0))
            if seen_window != window:
                count = 0
            count += 1
            self._counts[key] = (window, count)
        if count <= limit:
            return None
        ends_us = (window + 1) * self._window_us
        return max(1, -(-(ends_us - now_us) // _US))
