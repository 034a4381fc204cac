"""Paid MCP tools: a decorator that admits a tool call only while the caller's stream pays.

The caller names its stream the way an HTTP caller does, with the same header names, in the
call's ``_meta`` (``client.call_tool(name, args, meta=stream.provider_headers())``) or, for
clients that cannot set ``_meta``, in a ``payment`` argument the tool declares (a mapping of the
same names). A refusal raises MCPServer's ``ToolError`` (the caller sees a tool error whose text
is the 402 body, ``{error, message, owed, escrow_id}``) from the
:class:`~pf_metered.provider.PaymentRefused`; the tool body never runs. A tool that raises
counts nothing.

Works with ``mcp``'s ``MCPServer`` (``@server.tool()`` over ``@paid_tool(gate)``): the tool
asks for the request context by declaring a ``ctx: Context`` parameter, as MCPServer tools do.
This module imports ``mcp`` only to build that error.

What it must never do: run the tool for a refused call, or count a call that raised.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from pf_metered.errors import InvalidInput
from pf_metered.provider._core import Claim, PaymentRefused
from pf_metered.provider._gate import AsyncPaymentGate
from pf_metered.stream._provider_auth import HEADER_ESCROW

__all__ = ["PaymentRefused", "claim_of_call", "paid_tool"]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _meta_of(value: Any) -> Mapping[str, Any] | None:
    """The ``_meta`` of the request a ``Context`` argument belongs to, if it is one."""
    request = getattr(value, "request_context", None) if hasattr(value, "report_progress") else None
    meta = getattr(request, "meta", None)
    return meta if isinstance(meta, Mapping) else None


def _tool_error(refusal: PaymentRefused) -> Exception:
    """The refusal as the error MCPServer shows the caller (its ``ToolError``; other exceptions
    it hides): the 402 body as JSON text, so a program can read ``owed``."""
    text = json.dumps(refusal.to_json())
    try:
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:  # pragma: no cover - another MCP framework: the refusal itself
        return refusal
    error: Exception = ToolError(text)
    return error


def claim_of_call(kwargs: Mapping[str, Any], payment_arg: str = "payment") -> Claim:
    """The paying stream a tool call names: the ``payment`` argument, else the call's ``_meta``."""
    given = kwargs.get(payment_arg)
    if isinstance(given, Mapping) and given:
        return Claim.from_headers({str(k): str(v) for k, v in given.items()})
    for value in kwargs.values():
        meta = _meta_of(value)
        if meta is not None and any(str(k).lower() == HEADER_ESCROW.lower() for k in meta):
            return Claim.from_headers(
                {str(k): str(v) for k, v in meta.items() if isinstance(v, str)}
            )
    return Claim.from_headers({})  # raises missing_escrow


def paid_tool(
    gate: AsyncPaymentGate,
    *,
    units: int | Callable[[Any], int] = 1,
    payment_arg: str = "payment",
) -> Callable[[F], F]:
    """``@paid_tool(gate)`` on an async MCP tool: one call = ``units`` units (or
    ``units=lambda result: ...`` to count from what the tool returned, e.g. rows served)."""
    if not isinstance(gate, AsyncPaymentGate):
        raise InvalidInput("gate", "must be an AsyncPaymentGate")
    if not callable(units) and (isinstance(units, bool) or not isinstance(units, int)):
        raise InvalidInput("units", "must be a whole number or a callable of the result")

    def decorate(fn: F) -> F:
        if not inspect.iscoroutinefunction(fn):
            raise InvalidInput("fn", "paid_tool needs an async function (MCP tools run async)")

        @functools.wraps(fn)
        async def tool(*args: Any, **kwargs: Any) -> Any:
            try:
                claim = claim_of_call(kwargs, payment_arg)
                admission = await gate.admit(claim, 1 if callable(units) else units)
            except PaymentRefused as refusal:
                raise _tool_error(refusal) from refusal
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                gate.cancel(admission)
                raise
            gate.finish(admission, units(result) if callable(units) else None)
            return result

        return tool  # type: ignore[return-value]

    return decorate
