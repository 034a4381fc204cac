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

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "JITTER",
    "RETRY_AFTER_CAP",
    "Verdict",
    "backoff_delay",
    "classify_exception",
    "classify_status",
    "parse_retry_after",
]

DEFAULT_TIMEOUT: Final = 30.0
"""Seconds for each of connect, read, write and pool acquisition of one attempt."""

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
