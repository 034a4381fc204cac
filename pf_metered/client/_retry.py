"""The retry decision: which outcomes are retried, how long to wait, and the named defaults.

What this module is for: one table, shared by both clients, that sorts every outcome of one
HTTP exchange into four verdicts —

* ``OK``: a 2xx answer, to be parsed;
* ``RETRY``: the request certainly had no effect (connect errors, pool timeouts, 408, 429,
  409 ``request_in_progress``) and may be sent again as it is;
* ``LOST``: the request may have taken effect and its answer is lost (read/write timeouts,
  connection resets, protocol errors, 5xx) — a GET is simply sent again, a POST is sent again
  only with the same idempotency key on a server that honours keys, or after reading back;
* ``FAIL``: final (every other 4xx, 1xx/3xx as a final answer, our own protocol errors).

What it must never do: sleep, send, or decide to retry any 4xx other than 408, 409-in-progress
and 429. It does no I/O; the injected ``rand`` makes the jitter testable.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Final

import httpx

from pf_metered.errors import ConfigError

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "JITTER",
    "MAX_TOTAL_TIMEOUT",
    "RETRY_AFTER_CAP",
    "CallDeadline",
    "DeadlinePassed",
    "Verdict",
    "backoff_delay",
    "check_total_timeout",
    "classify_exception",
    "classify_status",
    "parse_retry_after",
]

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds for each of connect, read, write and pool acquisition of one attempt."""

DEFAULT_TOTAL_TIMEOUT: Final = 120.0
"""Seconds one logical call may take in all — every attempt, read-back and wait between them.

Why a total as well as :data:`DEFAULT_TIMEOUT`: that one bounds each socket operation, so a
server that sends a byte just inside it keeps a call alive for ever. Past the total deadline
a driver sends nothing more and the call ends (``APITimeout``, or for a POST whose answer was
lost an ambiguous outcome naming its idempotency key: retry with that key, or reconcile)."""

MAX_TOTAL_TIMEOUT: Final = 86_400.0
"""The largest ``total_timeout`` accepted (a day)."""

DEFAULT_MAX_RETRIES: Final = 3
"""Retries after the first attempt of one logical call (so at most four sends)."""

BACKOFF_BASE: Final = 0.5
"""Seconds before the first retry; doubled for each further retry."""

BACKOFF_CAP: Final = 8.0
"""The most any computed backoff waits."""

JITTER: Final = 0.25
"""Each computed backoff is shortened by a random fraction up to this, so clients spread out."""

RETRY_AFTER_CAP: Final = 60.0
"""The most a server's ``Retry-After`` makes us wait; beyond it we wait this long."""


class DeadlinePassed(httpx.TimeoutException):
    """What a driver reports instead of sending once the call's total deadline has passed (or
    the wait before the attempt would pass it): nothing was sent, and it is not retried."""


def check_total_timeout(value: object) -> float:
    """``total_timeout`` as float seconds, refused unless a positive number up to a day."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value <= MAX_TOTAL_TIMEOUT
    ):
        raise ConfigError(
            f"total_timeout must be a positive number of seconds, at most {MAX_TOTAL_TIMEOUT:g}"
        )
    return float(value)  # ok: seconds, not money


class CallDeadline:
    """The total deadline of one logical call, as its driver keeps it.

    Time spent is the real time since the call began, plus the waits a test's injected sleep
    asked for without letting real time pass (``real_sleep=False``), so a test that records
    sleeps sees the same decisions a real run makes. Once out of time — the deadline passed, or
    a wait would pass it — the call stays out of time: :meth:`refusal` is what the driver
    reports for every later send instead of sending it.
    """

    def __init__(
        self, total: float, *, real_sleep: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._total = total
        self._clock = clock
        self._start = clock()
        self._real_sleep = real_sleep
        self._waited = 0.0
        self._expired: str | None = None

    @property
    def at(self) -> float:
        """The deadline on the ``clock`` (``time.monotonic``) scale."""
        return self._start + self._total - (0.0 if self._real_sleep else self._waited)

    def left(self) -> float:
        return self.at - self._clock()

    def may_wait(self, seconds: float) -> bool:
        """Whether to wait ``seconds`` before the next attempt (``False``: out of time)."""
        if self._expired is None and seconds > 0 and seconds >= self.left():
            self._expired = (
                f"waiting {seconds:.3g} s before the next attempt would pass the call's total "
                f"deadline (total_timeout={self._total:g} s)"
            )
        if self._expired is not None:
            return False
        self._waited += seconds
        return True

    def refusal(self) -> DeadlinePassed | None:
        """``None`` while there is time to send; else what to report instead of sending."""
        if self._expired is None and self.left() <= 0:
            self._expired = f"the call's total deadline (total_timeout={self._total:g} s) passed"
        return None if self._expired is None else DeadlinePassed(f"not sent: {self._expired}")


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    LOST = "lost"
    FAIL = "fail"


_NOT_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError)
_OUR_BUG: Final = (httpx.UnsupportedProtocol, httpx.LocalProtocolError)


def classify_status(status: int, *, in_progress: bool = False) -> Verdict:
    """The verdict for an HTTP answer with this status (``in_progress``: a 409 whose code
    says the same idempotency key is still being processed)."""
    if 200 <= status <= 299:
        return Verdict.OK
    if status in (408, 429) or (status == 409 and in_progress):
        return Verdict.RETRY
    if 500 <= status <= 599:
        return Verdict.LOST
    return Verdict.FAIL


def classify_exception(exc: BaseException) -> Verdict:
    """The verdict for an httpx error raised while sending or reading."""
    if isinstance(exc, DeadlinePassed):
        return Verdict.FAIL  # the call is out of time: nothing more is sent
    if isinstance(exc, _NOT_SENT):
        return Verdict.RETRY
    if isinstance(exc, _OUR_BUG):
        return Verdict.FAIL
    if isinstance(exc, httpx.TransportError | httpx.DecodingError):
        return Verdict.LOST
    return Verdict.FAIL


def parse_retry_after(value: str | None, *, now: Callable[[], float] = time.time) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); ``None`` if absent
    or unreadable. Never negative, never NaN."""
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    try:
        seconds = float(text)  # ok: seconds, not money
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def backoff_delay(
    retry_number: int,
    retry_after: float | None = None,
    *,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``retry_number`` (1 for the first retry).

    A server's ``Retry-After`` wins, capped at :data:`RETRY_AFTER_CAP`; otherwise capped
    exponential backoff, ``min(BACKOFF_CAP, BACKOFF_BASE * 2**(n-1))``, less up to
    :data:`JITTER` of itself.
    """
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_CAP)
    exp = max(0, min(retry_number - 1, 32))
    delay = min(BACKOFF_CAP, BACKOFF_BASE * float(1 << exp))  # ok: seconds, not money
    return delay * (1.0 - JITTER * rand())
