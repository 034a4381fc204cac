"""Exit codes of ``pf-metered`` and the one place an exception becomes one.

Why a fixed table: scripts that drive the command line branch on the exit status, so each code
means one family of failure and never changes meaning:

=====  ===================================================================================
code   meaning
=====  ===================================================================================
0      success
1      unexpected failure (a bug: the message says where to report it)
2      usage error: a bad option or argument, refused before any request was sent
3      API error: the escrow service refused the request (auth, not found, insufficient
       funds, invalid status, rate limited, server error), could not be reached, or a
       release's outcome could not be settled
4      configuration error: no API key, an insecure base URL, a missing optional extra
130    interrupted (Ctrl-C)
=====  ===================================================================================

What this module must never do: put an API key into a message. Every message passes through
:func:`pf_metered.cli._secrets.scrub` before it is printed.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import urlsplit

from pf_metered.errors import (
    AmbiguousOutcome,
    APIConnectionError,
    APIError,
    APITimeout,
    AuthError,
    BudgetExhausted,
    ConfigError,
    InsufficientFunds,
    InvalidInput,
    NotFound,
    PermissionDenied,
    PFMeteredError,
    RateLimited,
    StreamClosed,
    UnsupportedByDialect,
)

__all__ = [
    "EXIT_API",
    "EXIT_CONFIG",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "CLIError",
    "exit_code_for",
    "message_for",
]

EXIT_OK: Final = 0
EXIT_UNEXPECTED: Final = 1
EXIT_USAGE: Final = 2
EXIT_API: Final = 3
EXIT_CONFIG: Final = 4
EXIT_INTERRUPTED: Final = 130


class CLIError(Exception):
    """A failure the command line reports as one line with a chosen exit code."""

    def __init__(self, message: str, code: int, *, kind: str = "error") -> None:
        self.message = message
        self.code = code
        self.kind = kind
        super().__init__(message)


def exit_code_for(exc: BaseException) -> int:
    """The exit status for an exception raised while running a command."""
    if isinstance(exc, CLIError):
        return exc.code
    if isinstance(exc, InvalidInput):
        return EXIT_USAGE
    if isinstance(exc, ConfigError | UnsupportedByDialect):
        return EXIT_CONFIG
    if isinstance(exc, APIError | APIConnectionError | AmbiguousOutcome):
        return EXIT_API
    if isinstance(exc, BudgetExhausted | StreamClosed | PFMeteredError):
        return EXIT_API
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_UNEXPECTED


_LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "::1")


def message_for(exc: BaseException, url: str | None = None) -> str:
    """The one line shown for ``exc``: what happened, then where to look.

    Why not ``str(exc)`` alone: the library's messages say what the server answered; a person
    at the command line needs to know which setting to check. ``url`` is the service the
    command talked to (for the unreachable and refused-key cases).
    """
    text = exc.message if isinstance(exc, CLIError) else str(exc)
    where = f" at {url}" if url else ""
    if (
        isinstance(exc, AuthError)
        and not isinstance(exc, PermissionDenied)
        and exc.status in (None, 401)
    ):
        return (
            f"API key refused (HTTP 401): check PF_API_KEY: it must be a key of the "
            f"service{where} (server said {exc.code or 'no code'}: {exc.message})"
        )
    if isinstance(exc, InsufficientFunds):
        return (
            f"{text}: the payer's balance cannot cover it; a new agent's registration credits "
            "1 USDC (the faucet grant), more must be deposited with Purple Flea"
        )
    if isinstance(exc, NotFound):
        what = "agent id" if exc.code == "counterparty_not_found" else "id"
        return (
            f"{text}: check the {what}, and that the service{where} is the one that holds it "
            "(PF_BASE_URL; a host answers 404 to every path of a dialect it does not speak)"
        )
    if isinstance(exc, RateLimited):
        return f"{text}: the service's rate limit (per path, per minute); wait a minute and retry"
    if isinstance(exc, APIConnectionError):
        what = (
            "no answer within the timeout from" if isinstance(exc, APITimeout) else "cannot reach"
        )
        target = url or "the escrow service"
        host = urlsplit(url).hostname if url else None
        hint = (
            "is `pf-metered sandbox serve` running?"
            if host in _LOOPBACK_HOSTS
            else "check the network and PF_BASE_URL"
        )
        return f"{what} {target} ({text}): {hint}"
    return text
