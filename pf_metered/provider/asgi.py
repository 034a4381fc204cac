"""An ASGI middleware that serves a request only while the stream paying for it pays.

Plain ASGI (no Starlette import): it wraps any ASGI app — Starlette, FastAPI, or a bare
callable. Per request it asks an :class:`~pf_metered.provider.AsyncPaymentGate` to admit the
request's units (the headers name the paying stream); a refusal is answered ``402`` with
``{error, message, owed, escrow_id}`` before the app runs. The app may report what it really
served (tokens) with :func:`report_units`; a response of status ``>= 400`` or an exception
counts nothing (a consumer's ``@metered`` call that failed is not counted either).

What it must never do: run the app for a refused request, count a failed one, or buffer the
response body (streaming answers pass through untouched).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from pf_metered.errors import InvalidInput
from pf_metered.money import format_usdc
from pf_metered.provider._core import PaymentRefused
from pf_metered.provider._gate import AsyncPaymentGate, Served

__all__ = ["PaymentGateMiddleware", "accounts_json", "report_units"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STATE_KEY = "pf_served"


def report_units(request: Any, units: int) -> None:
    """Tell the middleware how many units this request served (a Starlette ``Request`` or an
    ASGI scope). Without it, a request counts the units it was admitted for."""
    scope = request if isinstance(request, MutableMapping) else request.scope
    served = scope.get("state", {}).get(_STATE_KEY)
    if not isinstance(served, Served):
        raise InvalidInput("request", "is not a request admitted by PaymentGateMiddleware")
    if isinstance(units, bool) or not isinstance(units, int) or units < 0:
        raise InvalidInput("units", "must be a whole number >= 0")
    served.units = units


class PaymentGateMiddleware:
    """``Starlette(..., middleware=[Middleware(PaymentGateMiddleware, gate=gate)])``.

    ``units``: what a request is admitted for (an int, or a callable of the scope: a price per
    route). ``exempt``: paths served free (health checks). Only ``http`` requests are gated.
    """

    def __init__(
        self,
        app: ASGIApp,
        gate: AsyncPaymentGate,
        *,
        units: int | Callable[[Scope], int] = 1,
        exempt: Iterable[str] = (),
    ) -> None:
        if not isinstance(gate, AsyncPaymentGate):
            raise InvalidInput("gate", "must be an AsyncPaymentGate")
        if not callable(units) and (isinstance(units, bool) or not isinstance(units, int)):
            raise InvalidInput("units", "must be a whole number or a callable of the scope")
        self.app = app
        self.gate = gate
        self._units = units
        self._exempt = frozenset(exempt)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self._exempt:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
        units = self._units(scope) if callable(self._units) else self._units
        try:
            admission = await self.gate.admit(headers, units)
        except PaymentRefused as refusal:
            await _refuse(send, refusal)
            return
        served = Served(admission)
        scope.setdefault("state", {})[_STATE_KEY] = served
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except BaseException:
            self.gate.cancel(admission)
            raise
        if status >= 400:
            self.gate.cancel(admission)
        else:
            self.gate.finish(admission, served.units)


def accounts_json(gate: AsyncPaymentGate) -> dict[str, Any]:
    """What the gate counted per stream, as JSON (``pf-metered provider watch URL`` reads it):
    ``{"credit", "accounts": [{escrow_id, status, served, in_flight, paid_units, paid, owed,
    max_unpaid, refusals}]}``, amounts as decimal strings. Serve it only where the operator
    looks (loopback, an admin port): it names every paying stream."""
    return {
        "credit": gate.credit,
        "accounts": [
            {
                "escrow_id": a.escrow_id,
                "status": a.status,
                "served": a.served,
                "in_flight": a.in_flight,
                "paid_units": a.paid_units,
                "paid": format_usdc(a.paid_micro),
                "owed": format_usdc(a.owed_micro),
                "max_unpaid": a.max_unpaid,
                "refusals": dict(a.refusals),
            }
            for a in gate.accounts()
        ],
    }


async def _refuse(send: Send, refusal: PaymentRefused) -> None:
    body = json.dumps(refusal.to_json()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 402,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
