"""The payment gate's cost per request beside a bare Starlette endpoint, in one run.

Two routes on one Starlette app: ``/bare`` (no gate) and ``/paid`` (behind
``PaymentGateMiddleware``), timed request by request in alternation so load on the machine hits
both alike; medians are reported. Measured two ways: over loopback (uvicorn + httpx keep-alive:
what a caller sees) and in-process (``httpx.ASGITransport``: the gate's own cost, no sockets).
The gate's credit is large, so these are cached admissions (the common case); a read of the
escrow happens once per stream and when near its credit, bounded per stream by ``min_interval``.

    python benchmarks/provider_overhead.py --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import threading
import time

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from pf_metered import PaymentStream, Sandbox
from pf_metered.provider import AsyncPaymentGate
from pf_metered.provider.asgi import PaymentGateMiddleware


def build(gate: AsyncPaymentGate) -> Starlette:
    async def answer(request):
        return JSONResponse({"answer": "42"})

    paid = PaymentGateMiddleware(Starlette(routes=[Route("/paid", answer)]), gate=gate)
    bare = Starlette(routes=[Route("/bare", answer)])

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        target = paid if scope.get("path") == "/paid" else bare
        await target(scope, receive, send)

    return app  # type: ignore[return-value]


def paired(get, n: int) -> dict[str, float]:
    """Median µs per request of /bare and /paid, timed in alternation request by request, so a
    load spike on the machine hits both alike; medians ignore the spikes themselves."""
    out: dict[str, list[float]] = {"bare": [], "paid": []}
    for i in range(2 * n):
        path = ("bare", "paid")[i % 2]
        t = time.perf_counter()
        get(path)
        out[path].append((time.perf_counter() - t) * 1e6)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000, help="requests per route")
    args = ap.parse_args()
    with Sandbox() as sandbox:
        payer, me = sandbox.add_agent(balance="100"), sandbox.add_agent()
        gate = AsyncPaymentGate(
            sandbox.async_client(me.api_key), me.agent_id, "0.000001", credit=10**9
        )
        stream = PaymentStream(
            sandbox.client(payer.api_key), me.agent_id, "0.000001", batch=10**6, budget="10"
        ).open()
        headers = stream.provider_headers()
        app = build(gate)

        # in-process: the middleware's own cost
        async def inproc() -> dict[str, float]:
            async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://x", headers=headers
            ) as c:
                await c.get("/paid")  # the one verification read
                out: dict[str, list[float]] = {"bare": [], "paid": []}
                for i in range(2 * args.requests):
                    path = ("bare", "paid")[i % 2]
                    t = time.perf_counter()
                    await c.get(f"/{path}")
                    out[path].append((time.perf_counter() - t) * 1e6)
                return {k: statistics.median(v) for k, v in out.items()}

        local = asyncio.run(inproc())

        # over loopback
        sock = socket.socket()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        with httpx.Client(base_url=url, headers=headers) as http:
            http.get("/paid").raise_for_status()
            wire = paired(lambda p: http.get(f"/{p}"), args.requests)
        server.should_exit = True
        thread.join(timeout=10)
        view = gate.account(str(stream.escrow_id))
        stream.record(view.served)
        stream.close()

    print("| path | bare µs/req | gated µs/req | gate adds |")
    print("|---|---:|---:|---:|")
    for name, m in (("in-process ASGI", local), ("uvicorn over loopback", wire)):
        print(f"| {name} | {m['bare']:.0f} | {m['paid']:.0f} | {m['paid'] - m['bare']:.0f} |")
    print(f"gate served {view.served} requests; escrow reads: verification only")


if __name__ == "__main__":
    main()
