"""Agent B sells inference over HTTP and serves a caller only while its stream pays.

A Starlette app behind ``PaymentGateMiddleware``: each ``POST /infer`` costs one unit at
``--rate``; a caller names its PaymentStream in the request headers (``auth=stream.auth()``),
and is refused with ``402 {error, message, owed, escrow_id}`` when the escrow does not pay this
agent, is closed, or more than ``--credit`` units are served unpaid. ``GET /_gate`` shows what
the gate counted per stream (a loopback demo endpoint: a real service keeps it private);
``pf-metered provider watch http://127.0.0.1:8900/_gate`` shows it live.

Needs a provider's key: ``source`` the keys file of ``pf-metered sandbox serve --keys-file F``
(it sets ``PF_BASE_URL``, ``PF_PROVIDER_API_KEY`` and ``PF_PROVIDER_ID``), or set them for the
live service. Then pay it with ``examples/provider_client.py``.

    python examples/provider_service.py --port 8900
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pf_metered import AsyncEscrowClient
from pf_metered.provider import AsyncPaymentGate
from pf_metered.provider.asgi import PaymentGateMiddleware, accounts_json, report_units


def build_app(gate: AsyncPaymentGate, *, per_token: bool = False) -> Starlette:
    """The provider's app: ``/infer`` is paid, ``/health`` and ``/_gate`` are free."""
    work = {"done": 0}

    async def infer(request: Request) -> JSONResponse:
        body = await request.json()
        prompt = str(body.get("prompt", ""))
        work["done"] += 1  # the work a lying caller must never get
        answer = f"echo: {prompt[::-1]}"
        tokens = len(answer.split())
        if per_token:
            report_units(request, tokens)
        return JSONResponse({"answer": answer, "tokens": tokens})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def stats(request: Request) -> JSONResponse:
        if request.query_params.get("fresh"):  # read every stream's escrows afresh first
            for key in [a.escrow_id for a in gate.accounts()]:
                await gate.reconcile(key)
        return JSONResponse({"work_done": work["done"], **accounts_json(gate)})

    return Starlette(
        routes=[
            Route("/infer", infer, methods=["POST"]),
            Route("/health", health),
            Route("/_gate", stats),
        ],
        middleware=[Middleware(PaymentGateMiddleware, gate=gate, exempt=("/health", "/_gate"))],
    )


def listening_socket(port: int) -> socket.socket:
    """Bind and listen on 127.0.0.1 before the server starts: clients queue, never refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else 40 ms per answer
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8900, help="port on 127.0.0.1 (0 = any free)")
    ap.add_argument("--rate", default="0.001", help="USDC per call (default 0.001)")
    ap.add_argument("--batch", type=int, default=100, help="units a caller pays at a time (100)")
    ap.add_argument("--credit", type=int, default=None, help="units served unpaid (2 batches)")
    ap.add_argument("--per-token", action="store_true", help="bill per token of the answer")
    args = ap.parse_args()
    key = os.environ.get("PF_PROVIDER_API_KEY")
    me = os.environ.get("PF_PROVIDER_ID")
    if not key or not me:
        sys.exit("set PF_PROVIDER_API_KEY and PF_PROVIDER_ID (source a sandbox keys file)")
    client = AsyncEscrowClient(key)  # base URL from PF_BASE_URL
    gate = AsyncPaymentGate(client, me, args.rate, batch=args.batch, credit=args.credit)
    app = build_app(gate, per_token=args.per_token)
    sock = listening_socket(args.port)
    print(f"provider serving http://127.0.0.1:{sock.getsockname()[1]}  (agent {me})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: uvicorn already shut down
        asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
