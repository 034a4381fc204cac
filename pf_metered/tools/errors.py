"""Turning failures into messages a language model can act on.

Why a separate error type: a tool call that fails must not crash the agent loop, and the model
must learn from the answer what to change (a smaller budget, a known stream id, a field's
format). :class:`ToolError` carries that sentence; the LangChain layer raises it as a
``ToolException`` and the MCP server returns it as a tool error, both with the same text.

What this module must never do: put an API key, a bearer token or a stack trace into a message
(everything passes through :func:`pf_metered.errors.redact`), or turn a failure whose outcome is
unknown into one that invites a blind retry.
"""

from __future__ import annotations

from pydantic import ValidationError

from pf_metered.errors import (
    AmbiguousOutcome,
    APIConnectionError,
    APIError,
    AuthError,
    BudgetExhausted,
    Conflict,
    InsufficientFunds,
    InvalidInput,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PFMeteredError,
    RateLimited,
    StreamClosed,
    UnsupportedByDialect,
    redact,
)

__all__ = ["ToolError", "explain", "format_validation_error", "unknown_provider"]

_MAX = 600


class ToolError(PFMeteredError):
    """A tool call failed in a way the calling agent can read and correct.

    ``kind`` is a stable short code (``cap_exceeded``, ``invalid_argument``, ``unknown_stream``,
    ``budget_exhausted``, ``insufficient_funds``, ...) for programs; the message is for the model.
    """

    def __init__(self, message: str, *, kind: str = "error") -> None:
        self.kind = kind
        self.message = redact(message)[:_MAX]
        super().__init__(self.message)


def format_validation_error(tool_name: str, exc: ValidationError) -> str:
    """One line per bad field, naming it, so the model can fix exactly that argument."""
    problems = []
    for err in exc.errors(include_url=False, include_input=False)[:8]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        kind = err.get("type", "")
        if kind == "extra_forbidden":
            problems.append(f"{loc}: not an argument of {tool_name}; remove it")
        elif kind == "missing":
            problems.append(f"{loc}: required")
        elif kind == "string_pattern_mismatch" and loc in {"amount", "rate", "budget"}:
            problems.append(f'{loc}: must be a decimal number written as text, e.g. "0.50"')
        else:
            problems.append(f"{loc}: {err.get('msg', 'invalid')}")
    return redact(
        f"Invalid arguments for {tool_name}: "
        + "; ".join(problems)
        + ". Fix these arguments and call the tool again."
    )[:_MAX]


def unknown_provider(exc: NotFound, *, provider: str, tool_name: str) -> ToolError:
    """A ``NotFound`` while locking money for ``provider``: the provider agent is unknown.

    Why not :func:`explain`: there "not found" means an escrow id, and the model would go
    looking for an escrow it never had; here the only id in the request is the provider's.
    """
    said = f" (the service said: {exc.message})" if exc.message else ""
    return ToolError(
        f"Unknown provider: the escrow service has no agent {provider!r}{said}. Check the "
        f"provider's agent id and call {tool_name} again.",
        kind="unknown_provider",
    )


def explain(exc: BaseException, *, tool_name: str) -> ToolError:
    """The :class:`ToolError` for a library failure raised while running ``tool_name``."""
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, ValidationError):
        return ToolError(format_validation_error(tool_name, exc), kind="invalid_argument")
    if isinstance(exc, InvalidInput):
        return ToolError(
            f"Invalid argument {exc.field}: {exc.problem}. Fix it and call {tool_name} again.",
            kind="invalid_argument",
        )
    if isinstance(exc, BudgetExhausted):
        left = "" if exc.remaining_units is None else f" ({exc.remaining_units} units left)"
        return ToolError(
            f"Budget exhausted{left}: nothing was counted. Close this stream with stream_close "
            "and open a new one if more work must be paid for.",
            kind="budget_exhausted",
        )
    if isinstance(exc, StreamClosed):
        return ToolError(
            f"{exc} Open a new stream with stream_open to pay for more units.",
            kind="stream_closed",
        )
    if isinstance(exc, InsufficientFunds):
        return ToolError(
            "Insufficient funds: the balance cannot cover this amount. Use a smaller amount or "
            "budget, or claim the faucet once with faucet_claim if this is a new agent.",
            kind="insufficient_funds",
        )
    if isinstance(exc, NotFound):
        return ToolError(
            "Not found: no such escrow for this agent. Check the id with escrow_list.",
            kind="not_found",
        )
    if isinstance(exc, PermissionDenied):
        return ToolError(
            "Forbidden: only the payer who created an escrow may release or refund it.",
            kind="forbidden",
        )
    if isinstance(exc, AuthError):
        return ToolError(
            "Not authorized: the operator's API key was refused. This cannot be fixed by "
            "changing arguments; tell the operator.",
            kind="unauthorized",
        )
    if isinstance(exc, Conflict):
        what = "already claimed" if exc.code == "already_claimed" else "not possible now"
        return ToolError(
            f"Conflict ({exc.code or 'invalid_status'}): {what}: {exc.message}. Read the current "
            "state (escrow_status) before trying again.",
            kind=exc.code or "conflict",
        )
    if isinstance(exc, RateLimited):
        wait = f"{exc.retry_after:g} seconds" if exc.retry_after else "a minute"
        return ToolError(
            f"Rate limited by the escrow service: wait {wait} before calling {tool_name} again.",
            kind="rate_limited",
        )
    if isinstance(exc, InvalidRequest):
        return ToolError(
            f"The escrow service refused the request: {exc.message}. Fix the arguments and call "
            f"{tool_name} again.",
            kind="invalid_argument",
        )
    if isinstance(exc, AmbiguousOutcome):
        return ToolError(
            "The payment may or may not have gone through (the answer was lost). Do NOT repeat "
            "it: check with escrow_status or stream_status first.",
            kind="ambiguous",
        )
    if isinstance(exc, UnsupportedByDialect):
        return ToolError(f"Not supported by this escrow service: {exc}", kind="unsupported")
    if isinstance(exc, APIError | APIConnectionError):
        return ToolError(
            f"The escrow service is unavailable or failed ({type(exc).__name__}): {exc}. "
            "Try again later.",
            kind="service_error",
        )
    return ToolError(f"{tool_name} failed: {exc}", kind="error")
