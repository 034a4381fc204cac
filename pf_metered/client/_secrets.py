"""The API key as a secret, and the logging filter that keeps it out of every log record.

What this module is for: holding the key so that nothing but the request builder can read it,
and redacting anything key-shaped (``Authorization`` headers, bearer tokens, ``pf_live_…`` /
``pf_test_…`` / ``pf_sbx_…`` tokens, and the exact text of every key a client holds) from log
records of this library and of httpx and httpcore, at every level including DEBUG.

What it must never do: draw more of a key than its last four characters — not in ``repr``,
not in ``str``, not in an error message, not in a log record. It keeps no key after the
:class:`Secret` holding it is garbage-collected.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from typing import Final, NoReturn

import httpx

from pf_metered.errors import ConfigError, redact, register_secret

__all__ = [
    "LOGGERS",
    "RedactingFilter",
    "Secret",
    "install_log_redaction",
    "redact_text",
    "trust_env_for",
]

_KEY_RE: Final = re.compile(r"^[\x21-\x7e]{8,512}$")
_HEADERISH: Final = re.compile(
    r"((?:proxy-)?authorization|x-api-key|api[-_]key|cookie)"
    # the separator, a bytes literal's b' (only before a quote: the B of "Bearer" is no
    # prefix), and an auth scheme, all kept so the message still says what was expected
    r"(['\"]?\s*[:=,]\s*(?:b?['\"])?(?:(?:bearer|basic|token)\s+)?)"
    r"[^\r\n'\"]*",
    re.IGNORECASE,
)
_BEARER: Final = re.compile(r"(bearer\s+)[^\s'\",)]+", re.IGNORECASE)

LOGGERS: Final = (
    "pf_metered",
    "pf_metered.client",
    "pf_metered.decorators",
    "pf_metered.sandbox",
    "pf_metered.sandbox.server",
    "pf_metered.meter.sqlite",
    "pf_metered.meter.store",
    "pf_metered.meter.redis_store",
    "pf_metered.stream",
    "pf_metered.stream.recovery",
    "pf_metered.stream.tranches",
    "pf_metered.tools",
    "pf_metered.langchain",
    "pf_metered.mcp",
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
)
"""Loggers the redaction filter sits on. A filter on a logger sees only records logged to that
logger itself (not its children's), so every logger of this package and httpcore's children
are named one by one (a test checks that every ``getLogger`` in the package is listed)."""

_lock = threading.Lock()


class Secret:
    """An API key that shows only its last four characters anywhere it could be printed."""

    __slots__ = ("__value", "__weakref__")

    def __init__(self, value: str) -> None:
        if not isinstance(value, str) or not _KEY_RE.fullmatch(value):
            # Never echo the value: it may be a real key with a stray newline.
            raise ConfigError(
                "api_key must be 8..512 printable ASCII characters without spaces "
                "(the value is not shown)"
            )
        self.__value = value
        register_secret(self)  # redact() masks it (and runs of it) everywhere while we live

    def reveal(self) -> str:
        """The key itself: for the ``Authorization`` header and nothing else."""
        return self.__value

    @property
    def hint(self) -> str:
        """``'***' + last four characters``: enough to tell two keys apart, no more."""
        return "***" + self.__value[-4:]

    def __repr__(self) -> str:
        return f"Secret('{self.hint}')"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")


def redact_text(text: str) -> str:
    """``text`` with every header-, bearer-, key-shaped token and every live key masked."""
    text = _HEADERISH.sub(lambda m: m.group(1) + m.group(2) + "[redacted]", text)
    text = _BEARER.sub(lambda m: m.group(1) + "***", text)
    return redact(text)  # and every run of a live key (any case) the patterns left


class RedactingFilter(logging.Filter):
    """Rewrite each record's message with :func:`redact_text`; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose args do not format: drop its args, keep the text
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            # formatted here and redacted; a formatter prints exc_text as it is, and the raw
            # exception (whose args may hold a key) leaves the record
            record.exc_text = _FORMATTER.formatException(record.exc_info)
        record.exc_info = None
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


_FORMATTER: Final = logging.Formatter()


_FILTER: Final = RedactingFilter(name="")
_installed = False


def install_log_redaction() -> None:
    """Put the redaction filter on this library's, httpx's and httpcore's loggers (once)."""
    global _installed  # noqa: PLW0603 - a process-wide, idempotent installation
    with _lock:
        if _installed:
            return
        for name in LOGGERS:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
        _installed = True


def trust_env_for(url: str) -> bool:
    """Whether an httpx client for ``url`` may read the environment (``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``ALL_PROXY`` and their lower-case twins, ``NO_PROXY``, ``SSL_CERT_FILE``,
    netrc): only for https to a host that is not loopback.

    Why: httpx trusts the environment by default, and a proxy for a plain-http URL is sent the
    whole request, ``Authorization: Bearer <key>`` included. Plain http is allowed only to
    loopback (``check_base_url``), and loopback never goes through a proxy, so neither ever
    does. For https elsewhere a proxy is acceptable: httpx opens a ``CONNECT`` tunnel, the
    proxy learns the host and port, and the key travels inside TLS to the server itself.
    """
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        return False
    if parsed.scheme != "https":
        return False
    host = (parsed.host or "").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True
