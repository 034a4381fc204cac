"""Every error pf_metered raises, in one tree, so callers can catch as broadly as they need.

::

    PFMeteredError
    ├── ConfigError                  missing key, insecure base URL, bad option
    │   └── MissingExtra (ImportError)  an optional extra is not installed; says what to pip install
    ├── InvalidInput (ValueError)    an argument refused before any I/O; names the field
    ├── APIError                     the escrow service answered with an error
    │   ├── InvalidRequest           400 (invalid_amount, ...)
    │   ├── AuthError                401 / 403
    │   │   └── PermissionDenied     403 forbidden
    │   ├── InsufficientFunds        402
    │   ├── NotFound                 404
    │   ├── Conflict                 409 (invalid_status, request in progress)
    │   ├── IdempotencyConflict      422 (same key, other body)
    │   ├── RateLimited              429; ``retry_after`` seconds when the server said
    │   ├── ServerError              5xx
    │   └── InvalidResponse          an answer we refuse to believe (malformed, hostile)
    ├── APIConnectionError           the request may not have reached the server
    │   └── APITimeout
    ├── AmbiguousOutcome             a POST whose effect could not be settled
    │   ├── AmbiguousRelease
    │   └── AmbiguousCreate
    ├── UnsupportedByDialect         the server's dialect has no such call
    ├── BudgetExhausted              a unit would exceed the stream's budget
    ├── StreamClosed                 the stream no longer takes units
    ├── StreamBusy                   a live process holds the stream's pending release
    └── StoreError                   the meter's store failed (``transient``: a retry may work)
        └── StoreUnavailable         the store could not be reached (transient)

Raised elsewhere, on the same root: ``TrancheFailure`` (``pf_metered.stream``: a deployed-dialect
chain of escrows cannot go on), ``LedgerInvariantError`` (``pf_metered.sandbox``: the sandbox's
books do not add up, a bug) and ``ToolError`` (``pf_metered.tools``: what a tool tells a model).

What never happens here: an exception that carries the API key. Messages are built from
status, code, server message and request id only, and every one of those server-supplied
strings passes :func:`redact` *before* it is truncated or stored: any ``pf_live_``/``pf_test_``
/``pf_sbx_``-shaped token, bearer token, and any run of :data:`MIN_KEY_FRAGMENT` or more
characters of a live key, or its first :data:`MIN_KEY_PREFIX` (one held by a client's
``Secret``, registered with :func:`register_secret`), in any letter case — so a server
that echoes the key as its error code, lower-cased or cut to 40 characters, cannot put it
into ``str(exc)``.
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any, Final, Protocol

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeout",
    "AmbiguousCreate",
    "AmbiguousOutcome",
    "AmbiguousRelease",
    "AuthError",
    "BudgetExhausted",
    "ConfigError",
    "Conflict",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidInput",
    "InvalidRequest",
    "InvalidResponse",
    "MissingExtra",
    "NotFound",
    "PFMeteredError",
    "PermissionDenied",
    "RateLimited",
    "ServerError",
    "StoreError",
    "StoreUnavailable",
    "StreamBusy",
    "StreamClosed",
    "UnsupportedByDialect",
    "redact",
    "register_secret",
]

# pf_live_/pf_test_/pf_sbx_: the product documentation's and the sandbox's keys; sk_live_ and
# sk_test_: what the deployed service's registration really hands out (sk_live_ + 48 hex).
_KEYLIKE = re.compile(
    r"((?:pf_(?:live|test|sbx)|sk_(?:live|test))_)[A-Za-z0-9_\-]+|(Bearer\s+)\S+", re.IGNORECASE
)
_MAX_MESSAGE = 300
_MAX_CODE = 64
_MAX_REQUEST_ID = 128

MIN_KEY_PREFIX: Final = 10
"""The first this-many characters of a live key (or more of them), in any letter case, are
masked wherever they appear: a server or a truncation that keeps only the start of a key (its
first 40 characters, say) must not show it. Nine say little, and fewer would start masking
the ``pf_live_`` every key begins with."""

MIN_KEY_FRAGMENT: Final = 16
"""A run of this many characters from anywhere in a live key is masked too. Longer than the
prefix limit because keys made of words (test keys) share shorter runs with ordinary text
("connection")."""

_GRAM: Final = MIN_KEY_PREFIX // 2
"""Every run of ``2 * _GRAM - 1`` or more key characters contains one of the key's
``_GRAM``-long pieces at offsets ``0, _GRAM, 2 * _GRAM, ...`` (a prefix contains the first):
those are what is searched for."""

_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class SecretHolder(Protocol):
    """What :func:`register_secret` watches: an object that can reveal the key it holds."""

    def reveal(self) -> str: ...


_holders: weakref.WeakKeyDictionary[SecretHolder, tuple[str, tuple[tuple[int, str], ...]]] = (
    weakref.WeakKeyDictionary()
)
_holders_lock = threading.Lock()


def register_secret(holder: SecretHolder) -> None:
    """Make :func:`redact` mask ``holder``'s key (and runs of it) for as long as it lives.

    Why here, below the client: every exception and every printed line already passes
    :func:`redact`, so a key registered once is masked everywhere, in every layer.
    """
    key = holder.reveal().translate(_ASCII_LOWER)
    pieces = tuple((i, key[i : i + _GRAM]) for i in range(0, len(key) - _GRAM + 1, _GRAM))
    with _holders_lock:
        _holders[holder] = (key, pieces)


def _mask_live_keys(text: str) -> str:
    with _holders_lock:
        keys = list(_holders.values())
    if not keys or len(text) < MIN_KEY_PREFIX:
        return text
    low = text.translate(_ASCII_LOWER)  # the same length as text: spans carry over
    spans: list[tuple[int, int]] = []
    for key, pieces in keys:
        for offset, piece in pieces:
            at = low.find(piece)
            while at != -1:
                start, end, k_start, k_end = at, at + _GRAM, offset, offset + _GRAM
                while start > 0 and k_start > 0 and low[start - 1] == key[k_start - 1]:
                    start, k_start = start - 1, k_start - 1
                while end < len(low) and k_end < len(key) and low[end] == key[k_end]:
                    end, k_end = end + 1, k_end + 1
                if end - start >= (MIN_KEY_PREFIX if k_start == 0 else MIN_KEY_FRAGMENT):
                    spans.append((start, end))
                at = low.find(piece, at + 1)
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for start, end in sorted(spans):
        if end <= pos:
            continue
        if start > pos or not out:
            out += [text[pos:start], "***"]
        pos = end  # a span overlapping (or touching) the one before extends its marker
    out.append(text[pos:])
    return "".join(out)


def redact(text: str) -> str:
    """Replace anything shaped like an API key or bearer token, and any run of
    :data:`MIN_KEY_FRAGMENT` or more characters of a live key or its first
    :data:`MIN_KEY_PREFIX` (any case), with a marker."""
    return _KEYLIKE.sub(lambda m: (m.group(1) or m.group(2)) + "***", _mask_live_keys(text))


def _server_text(value: str | None, limit: int) -> str | None:
    """A server-supplied string as an exception may keep it: redacted first, then cut."""
    return None if value is None else redact(value)[:limit]


class PFMeteredError(Exception):
    """The root of every error this library raises."""


class ConfigError(PFMeteredError):
    """The library was configured in a way it cannot work with (no key, http to a remote)."""


class MissingExtra(ConfigError, ImportError):
    """An optional extra is not installed; the message is the ``pip install`` line that fixes it.

    Why an ``ImportError`` too: code that probes for an extra (``pytest.importorskip``, a
    ``try: import ... except ImportError``) keeps working, while the command line reports it
    as a configuration error (exit 4) with the line to run.
    """

    def __init__(self, extra: str, what: str, *, missing: str | None = None) -> None:
        self.extra = extra
        message = f"{what} needs the optional extra: pip install 'pf-metered[{extra}]'"
        if missing:
            message += f" (no module named {missing!r})"
        super().__init__(message)
        self.name = missing


class InvalidInput(PFMeteredError, ValueError):
    """An argument was refused before any request was sent; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field} {problem}")


class APIError(PFMeteredError):
    """The escrow service answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = _server_text(code, _MAX_CODE)
        self.request_id = _server_text(request_id, _MAX_REQUEST_ID)
        self.message = redact(message)[:_MAX_MESSAGE]
        code, request_id = self.code, self.request_id
        parts = [self.message]
        if status is not None:
            parts.append(f"(HTTP {status}{', ' + code if code else ''})")
        if request_id:
            parts.append(f"[request {request_id}]")
        super().__init__(" ".join(parts))


class InvalidRequest(APIError):
    """400: the server refused the request's content."""


class AuthError(APIError):
    """401/403: the key is missing, wrong, or not allowed to do this."""


class PermissionDenied(AuthError):
    """403: the key is valid but may not act on this escrow."""


class InsufficientFunds(APIError):
    """402: the payer's balance cannot cover the escrow."""


class NotFound(APIError):
    """404: no such escrow (or not one of the caller's)."""


class Conflict(APIError):
    """409: the escrow's state forbids this, or the same request is still in progress."""


class IdempotencyConflict(APIError):
    """422: the idempotency key was used before with a different body."""


class RateLimited(APIError):
    """429: too many requests; ``retry_after`` is the server's hint in seconds, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class ServerError(APIError):
    """5xx: the server failed; the request may or may not have taken effect."""


class InvalidResponse(APIError):
    """The server's answer was malformed or contradicts itself; nothing local was changed."""


class APIConnectionError(PFMeteredError):
    """The request could not be completed over the network (reset, refused, DNS)."""


class APITimeout(APIConnectionError):
    """The request timed out; it may have taken effect on the server."""


class AmbiguousOutcome(PFMeteredError):
    """A POST may or may not have taken effect, and reading back could not settle it."""

    def __init__(self, message: str, *, idempotency_key: str | None = None, **known: Any) -> None:
        self.idempotency_key = idempotency_key
        self.known = known
        super().__init__(message)


class AmbiguousRelease(AmbiguousOutcome):
    """A release may have been applied; retry only with the same idempotency key."""


class AmbiguousCreate(AmbiguousOutcome):
    """An escrow may have been created; do not create another before reconciling."""


class UnsupportedByDialect(PFMeteredError):
    """The server's API dialect has no such operation (e.g. partial release on 'deployed')."""


class BudgetExhausted(PFMeteredError):
    """Recording these units would spend more than the stream's budget; nothing was counted."""

    def __init__(self, message: str, *, remaining_units: int | None = None) -> None:
        self.remaining_units = remaining_units
        super().__init__(message)


class StreamClosed(PFMeteredError):
    """The stream is closed (or closing) and takes no more units."""


class StreamBusy(PFMeteredError):
    """``resume`` refused: a process that is still alive holds the stream's pending release.

    Taking it over could pay the batch twice (a server that ignores idempotency keys would
    accept both sends). ``owner`` names the holder; ``retry_after`` is the number of seconds
    after which its claim lapses if it stops renewing it (``None``: retry once it has exited).
    """

    def __init__(self, message: str, *, owner: str, retry_after: float | None = None) -> None:
        self.owner = owner
        self.retry_after = retry_after
        super().__init__(message)


class StoreError(PFMeteredError):
    """The meter's store (SQLite file, Redis) failed. ``transient``: a later retry may work
    (the stream's background sender then backs off and retries instead of stopping)."""

    transient: bool = False


class StoreUnavailable(StoreError):
    """The store could not be reached, even after retries; the operation's effect is unknown.

    ``transient``: a stream's background sender retries later (Redis may be restarting); the
    operations it retries are idempotent or settle a claim left pending by the lost answer.
    """

    transient = True
