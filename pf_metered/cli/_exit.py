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

from pf_metered.errors import (
    AmbiguousOutcome,
    APIConnectionError,
    APIError,
    BudgetExhausted,
    ConfigError,
    InvalidInput,
    PFMeteredError,
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
