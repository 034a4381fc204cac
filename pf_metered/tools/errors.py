"""Turning failures into messages a language model can act on.

Why a separate error type: a tool call that fails must not crash the agent loop, and the model
must learn from the answer what to change (a smaller budget, a known stream id, a field's
format). :class:`ToolError` carries that sentence; the LangChain layer raises it as a
``ToolException`` and the MCP server returns it as a tool error, both with the same text.

Every message says what is wrong and then a next step the model can really take: a tool it was
given (the adapter says which with :func:`offering`; a message never sends the model to a tool
its toolkit left out, the caps refuse, or the escrow service cannot run), waiting, fixing its
own arguments, or asking the user. A developer's mistake (a sync call on a context with only an
async client) is no message for the model: it is a ``ConfigError`` naming what to change,
raised to the program (:func:`sync_call_without_client`).

What this module must never do: put an API key, a bearer token or a stack trace into a message
(everything passes through :func:`pf_metered.errors.redact`), or turn a failure whose outcome is
unknown into one that invites a blind retry.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

from pydantic import ValidationError

from pf_metered.errors import (
    AmbiguousOutcome,
    APIConnectionError,
    APIError,
    APITimeout,
    AuthError,
    BudgetExhausted,
    ConfigError,
    Conflict,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    InvalidRequest,
    InvalidResponse,
    NotFound,
    PermissionDenied,
    PFMeteredError,
    RateLimited,
    ServerError,
    StoreError,
    StreamBusy,
    StreamClosed,
    UnsupportedByDialect,
    redact,
)
from pf_metered.tools.caps import ALL_TOOL_NAMES

__all__ = [
    "ToolError",
    "explain",
    "format_validation_error",
    "offered_tools",
    "offering",
    "offers",
    "provider_not_allowed",
    "sync_call_without_client",
    "unknown_provider",
]

_MAX = 700

_OFFERED: ContextVar[frozenset[str] | None] = ContextVar("pf_metered_offered_tools", default=None)


@contextlib.contextmanager
def offering(tools: Iterable[str] | None) -> Iterator[None]:
    """While a tool call runs: the tools the model can call, so a message names only those.

    Why a context variable: a message is written deep inside a handler (a cap check, a client
    error's translation) that does not know which toolkit it serves; the adapter does, and
    sets it around the call (``asyncio.to_thread`` and tasks copy it along).
    """
    token = _OFFERED.set(None if tools is None else frozenset(tools))
    try:
        yield
    finally:
        _OFFERED.reset(token)


def offered_tools() -> frozenset[str]:
    """The tools the model can call now (every tool when no adapter said which)."""
    tools = _OFFERED.get()
    return frozenset(ALL_TOOL_NAMES) if tools is None else tools


def offers(tool_name: str) -> bool:
    """Whether a message may tell the model to call ``tool_name``."""
    return tool_name in offered_tools()


class ToolError(PFMeteredError):
    """A tool call failed in a way the calling agent can read and correct.

    ``kind`` is a stable short code (``cap_exceeded``, ``invalid_argument``, ``unknown_stream``,
    ``budget_exhausted``, ``insufficient_funds``, ...) for programs; the message is for the model:
    ``problem`` (what is wrong), then ``next_step`` (appended when given), something the model
    can do with the tools it has or by asking the user.
    """

    def __init__(self, message: str, *, kind: str = "error", next_step: str = "") -> None:
        self.kind = kind
        self.problem = redact(message)[:_MAX]
        self.next_step = redact(next_step)
        text = f"{message} {next_step}" if next_step else message
        self.message = redact(text)[:_MAX]
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


def sync_call_without_client(tool_name: str) -> ConfigError:
    """A tool run synchronously over a context that has only an ``async_client``.

    Why a ``ConfigError`` and not a :class:`ToolError`: the model cannot choose how the program
    invokes a tool, so an answer telling it to "call asynchronously" is one it can never act
    on; the developer can, and the error says how. It is raised out of ``tool.invoke`` (and out
    of an agent loop: ``ToolNode`` re-raises what is not a ``ToolException``).
    """
    return ConfigError(
        f"{tool_name} was run synchronously (tool.invoke, agent.invoke), but its ToolContext has "
        "only an async_client. Run it asynchronously (tool.ainvoke, agent.ainvoke), or give the "
        "ToolContext (or PurpleFleaToolkit) a sync client=EscrowClient(...) as well."
    )


def unknown_provider(exc: NotFound, *, provider: str, tool_name: str) -> ToolError:
    """A ``NotFound`` while locking money for ``provider``: the provider agent is unknown.

    Why not :func:`explain`: there "not found" means an escrow id, and the model would go
    looking for an escrow it never had; here the only id in the request is the provider's.
    """
    said = f" (the service said: {exc.message})" if exc.message else ""
    return ToolError(
        f"Unknown provider: the escrow service has no agent {provider!r}{said}.",
        next_step=f"Check the provider's agent id (ask the user if you were not given one) and "
        f"call {tool_name} again.",
        kind="unknown_provider",
    )


def provider_not_allowed(provider: str, allowed: Iterable[str], *, tool_name: str) -> ToolError:
    """The operator's ``allowed_providers`` leaves ``provider`` out: name who may be paid."""
    names = sorted(allowed)
    listing = ", ".join(repr(n) for n in names[:10]) + (" ..." if len(names) > 10 else "")
    instead = f"Pay one of the allowed providers ({listing}) instead, or ask" if names else "Ask"
    return ToolError(
        f"Cap exceeded: the operator does not allow paying {provider!r}"
        + ("." if names else "; no provider may be paid."),
        next_step=f"{instead} the user to have the operator allow {provider!r}; do not call "
        f"{tool_name} for {provider!r} again until then.",
        kind="cap_exceeded",
    )


def _first(*steps: tuple[str, str]) -> str:
    """The first ``(tool, sentence)`` whose tool is offered (``""``: needs no tool)."""
    for tool, sentence in steps:
        if not tool or offers(tool):
            return sentence
    return ""  # pragma: no cover - every chain ends with a step that needs no tool


def _check_first(tool_name: str, *, moves_money: bool) -> str:
    """Before repeating a call whose effect is unknown: the read tool that shows the truth."""
    if not moves_money:
        return f"Call {tool_name} again in a minute."
    then = f"what happened before calling {tool_name} again."
    streams = (
        ("stream_list", f"Check with stream_list (or stream_status) {then}"),
        ("stream_status", f"Check with stream_status {then}"),
    )
    escrows = (
        ("escrow_list", f"Check with escrow_list (or escrow_status) {then}"),
        ("escrow_status", f"Check with escrow_status {then}"),
    )
    reads = streams + escrows if tool_name.startswith("stream") else escrows + streams
    return _first(
        *reads,
        ("", f"Do not call {tool_name} again for this; tell the user what you tried."),
    )


_MOVES_MONEY = frozenset(
    {
        "escrow_create",
        "escrow_release",
        "escrow_refund",
        "faucet_claim",
        "stream_open",
        "stream_close",
        "stream_record",
    }
)

_TELL_THE_USER = (
    "This cannot be fixed by changing arguments: tell the user, who must have the operator fix it."
)


def explain(exc: BaseException, *, tool_name: str) -> ToolError:
    """The :class:`ToolError` for a library failure raised while running ``tool_name``: what is
    wrong and a next step the model can take with the tools it has (:func:`offering`), or by
    asking the user where no tool helps. Never an invitation to repeat a call whose effect on
    the money is unknown."""
    if isinstance(exc, ToolError):
        return exc
    moves = tool_name in _MOVES_MONEY
    if isinstance(exc, ValidationError):
        return ToolError(format_validation_error(tool_name, exc), kind="invalid_argument")
    if isinstance(exc, InvalidInput):
        return ToolError(
            f"Invalid argument {exc.field}: {exc.problem}.",
            next_step=f"Fix it and call {tool_name} again.",
            kind="invalid_argument",
        )
    if isinstance(exc, BudgetExhausted):
        n = exc.remaining_units
        left = "" if n is None else f" ({n} unit{'' if n == 1 else 's'} left)"
        if offers("stream_close") and offers("stream_open"):
            step = (
                "Record at most the units left, or close this stream with stream_close and open "
                "a new one with stream_open if more work must be paid for."
            )
        elif offers("stream_close"):
            step = (
                "Record at most the units left, or close this stream with stream_close and tell "
                "the user its budget is spent."
            )
        else:
            step = "Record at most the units left, or tell the user the budget is spent."
        return ToolError(
            f"Budget exhausted{left}: nothing was counted.",
            next_step=step,
            kind="budget_exhausted",
        )
    if isinstance(exc, StreamClosed):
        return ToolError(
            f"This stream is closed and takes no more units ({str(exc).rstrip('.')}).",
            next_step=_first(
                ("stream_open", "Open a new stream with stream_open to pay for more units."),
                ("", "It takes no more units; tell the user if more work must be paid for."),
            ),
            kind="stream_closed",
        )
    if isinstance(exc, InsufficientFunds):
        return ToolError(
            "Insufficient funds: this agent's balance cannot cover this amount.",
            next_step="Use a smaller amount or budget"
            + (
                ", claim the one-time faucet credit with faucet_claim if this agent never has"
                if offers("faucet_claim")
                else ""
            )
            + ", or ask the user to add funds to this agent's account.",
            kind="insufficient_funds",
        )
    if isinstance(exc, NotFound):
        return ToolError(
            "Not found: this agent has no such escrow.",
            next_step=_first(
                ("escrow_list", f"Check the id with escrow_list and call {tool_name} with it."),
                ("", "Copy the escrow id exactly as the answer that made it gave it."),
            ),
            kind="not_found",
        )
    if isinstance(exc, PermissionDenied):
        return ToolError(
            "Forbidden: only the payer who created an escrow may release or refund it.",
            next_step=f"Do not call {tool_name} for this escrow again"
            + (
                "; escrow_list shows the escrows you can act on."
                if offers("escrow_list")
                else "; act only on escrows you created."
            ),
            kind="forbidden",
        )
    if isinstance(exc, AuthError):
        return ToolError(
            "Not authorized: the escrow service refused the operator's API key.",
            next_step=_TELL_THE_USER,
            kind="unauthorized",
        )
    if isinstance(exc, Conflict):
        return _conflict(exc, tool_name)
    if isinstance(exc, IdempotencyConflict):
        return ToolError(
            "The escrow service refused this request as a changed repeat of an earlier one.",
            next_step=_check_first(tool_name, moves_money=True),
            kind="idempotency_conflict",
        )
    if isinstance(exc, RateLimited):
        return ToolError(
            "Rate limited by the escrow service: nothing was done.",
            next_step=_wait_then_retry(exc.retry_after, tool_name),
            kind="rate_limited",
        )
    if isinstance(exc, InvalidRequest):
        return ToolError(
            f"The escrow service refused the request: {exc.message}.",
            next_step=f"Fix the arguments and call {tool_name} again.",
            kind="invalid_argument",
        )
    if isinstance(exc, AmbiguousOutcome):
        return ToolError(
            "The payment may or may not have gone through (the answer was lost). Do NOT repeat "
            "it blindly.",
            next_step=_check_first(tool_name, moves_money=True),
            kind="ambiguous",
        )
    if isinstance(exc, UnsupportedByDialect):
        return ToolError(
            f"Not supported by this escrow service: {exc}.",
            next_step=f"Do not call {tool_name} for this again; tell the user if it is needed.",
            kind="unsupported",
        )
    if isinstance(exc, StreamBusy):
        return ToolError(
            "Another process is settling this stream's payment right now.",
            next_step=_wait_then_retry(exc.retry_after, tool_name),
            kind="busy",
        )
    if isinstance(exc, StoreError):
        return ToolError(
            "The payment journal could not be read or written, so the effect of this call is "
            "not known.",
            next_step=_check_first(tool_name, moves_money=moves),
            kind="store_error",
        )
    if isinstance(exc, ServerError | InvalidResponse | APITimeout):
        return ToolError(
            f"The escrow service failed or its answer was unusable ({type(exc).__name__}); the "
            "call may or may not have taken effect.",
            next_step=_check_first(tool_name, moves_money=moves),
            kind="service_error",
        )
    if isinstance(exc, APIError | APIConnectionError):
        return ToolError(
            f"The escrow service is unavailable or failed ({type(exc).__name__}): {exc}.",
            next_step=_or_tell(_check_first(tool_name, moves_money=moves)),
            kind="service_error",
        )
    if isinstance(exc, ConfigError):  # raised past the tools (call_answer lets these through)
        return ToolError(
            f"The payment tools are not usable as configured: {exc}.",
            next_step=_TELL_THE_USER,
            kind="config",
        )
    cause = exc.__cause__
    if isinstance(cause, PFMeteredError) and not isinstance(cause, ConfigError):
        inner = explain(cause, tool_name=tool_name)  # e.g. a tranche chain stopped by funds
        return ToolError(
            f"{tool_name} could not go on ({str(exc).rstrip('.')}): {inner.problem}",
            next_step=inner.next_step,
            kind=inner.kind,
        )
    return ToolError(
        f"{tool_name} failed: {str(exc).rstrip('.')}.",
        next_step=_or_tell(_check_first(tool_name, moves_money=moves)),
        kind="error",
    )


def _wait_then_retry(retry_after: float | None, tool_name: str) -> str:
    """The step for a refusal that passes with time (rate limit, a busy stream): wait as long
    as the service asked (a minute when it did not say), then repeat the same call."""
    wait = f"{retry_after:g} seconds" if retry_after else "a minute"
    return f"Wait {wait}, then call {tool_name} again."


def _or_tell(step: str) -> str:
    """A step for a failure that may last: the user hears of it if retrying does not help."""
    return step if "the user" in step else f"{step} If it keeps failing, tell the user."


def _conflict(exc: Conflict, tool_name: str) -> ToolError:
    """409: the faucet was claimed before, or the escrow's state forbids the call now."""
    if exc.code == "already_claimed" or tool_name == "faucet_claim":
        return ToolError(
            "Conflict (already_claimed): this agent already claimed the faucet; it pays once "
            "per agent.",
            next_step=f"Do not call {tool_name} again; if more funds are needed, ask the user.",
            kind=exc.code or "already_claimed",
        )
    said = f": {exc.message}" if exc.message else ""
    return ToolError(
        f"Conflict ({exc.code or 'invalid_status'}): not possible in the escrow's current "
        f"state{said}.",
        next_step=_first(
            (
                "escrow_status",
                f"Read the escrow's state with escrow_status before calling {tool_name} again.",
            ),
            ("", f"Do not call {tool_name} for it again; tell the user if it is needed."),
        ),
        kind=exc.code or "conflict",
    )
