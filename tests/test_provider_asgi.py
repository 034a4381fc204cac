"""PaymentGateMiddleware on a real Starlette app served by uvicorn on a loopback port the test
owns; the consumer is a real PaymentStream paying through the in-process sandbox."""

from __future__ import annotations

import socket
import threading
from decimal import Decimal

import httpx
import pytest

starlette = pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from starlette.applications import Starlette  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from pf_metered import PaymentStream, Sandbox, metered  # noqa: E402
from pf_metered.errors import InvalidInput  # noqa: E402
from pf_metered.provider import HEADER_ESCROW, AsyncPaymentGate  # noqa: E402
from pf_metered.provider.asgi import PaymentGateMiddleware, report_units  # noqa: E402


class Served:
    """A Starlette app on 127.0.0.1: the socket listens before uvicorn starts, so no request
    races the start (it waits in the backlog)."""

    def __init__(self, app: Starlette) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted ones inherit it
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class World:
    def __init__(
        self,
        *,
        rate: str = "0.001",
        batch: int = 10,
        credit: int | None = None,
        max_age: float = 5.0,
    ) -> None:
        self.sandbox = Sandbox()
        self.payer = self.sandbox.add_agent(balance="50.00")
        self.provider = self.sandbox.add_agent()
        self.gate = AsyncPaymentGate(
            self.sandbox.async_client(self.provider.api_key),
            self.provider.agent_id,
            rate,
            batch=batch,
            credit=credit,
            max_age=max_age,
        )
        self.work: list[str] = []

        async def infer(request: Request) -> JSONResponse:
            self.work.append("infer")
            return JSONResponse({"answer": "42"})

        async def tokens(request: Request) -> PlainTextResponse:
            self.work.append("tokens")
            n = int(request.query_params["n"])
            report_units(request, n)
            return PlainTextResponse("t" * n)

        async def broken(request: Request) -> JSONResponse:
            self.work.append("broken")
            return JSONResponse({"error": "model down"}, status_code=503)

        async def stream(request: Request) -> StreamingResponse:
            async def chunks():
                for i in range(3):
                    yield f"chunk {i}\n".encode()

            return StreamingResponse(chunks())

        async def health(request: Request) -> JSONResponse:
            return JSONResponse({"ok": True})

        app = Starlette(
            routes=[
                Route("/infer", infer, methods=["POST"]),
                Route("/tokens", tokens),
                Route("/broken", broken),
                Route("/stream", stream),
                Route("/health", health),
            ],
            middleware=[Middleware(PaymentGateMiddleware, gate=self.gate, exempt=["/health"])],
        )
        self.served = Served(app)
        self.url = self.served.url

    def stream(self, rate: str = "0.001", batch: int = 10, **kw) -> PaymentStream:
        return PaymentStream(
            self.sandbox.client(self.payer.api_key),
            self.provider.agent_id,
            rate,
            batch=batch,
            budget=kw.pop("budget", "5.00"),
            **kw,
        )

    def close(self) -> None:
        self.served.close()
        self.sandbox.close()


@pytest.fixture
def world():
    w = World()
    yield w
    w.close()


def test_a_paying_consumer_is_served_and_the_counts_reconcile():
    world = World(max_age=0.0)  # every request reads the escrow afresh: a close shows at once
    try:
        _paying_consumer(world)
    finally:
        world.close()


def _paying_consumer(world: World) -> None:
    with world.stream() as s, httpx.Client(auth=s.auth()) as http:

        @metered(stream=s)
        def ask() -> str:
            r = http.post(f"{world.url}/infer", json={})
            r.raise_for_status()
            return r.json()["answer"]

        answers = [ask() for _ in range(57)]
    assert answers == ["42"] * 57 and len(world.work) == 57
    view = world.gate.account(s.escrow_id)
    assert view.served == 57 == s.receipt.units
    assert view.max_unpaid <= world.gate.credit
    with httpx.Client() as http:  # after the close, a fresh read shows every unit paid
        r = http.post(f"{world.url}/infer", json={}, headers=s.provider_headers())
    assert r.status_code == 402 and r.json()["error"] == "escrow_closed"
    assert Decimal(r.json()["owed"]) == 0 and s.receipt.paid == Decimal("0.057")


def test_no_header_is_402_with_the_json_body_and_no_work(world):
    with httpx.Client() as http:
        r = http.post(f"{world.url}/infer", json={})
    assert r.status_code == 402 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error", "message", "owed", "escrow_id"}
    assert body["error"] == "missing_escrow" and HEADER_ESCROW in body["message"]
    assert body["escrow_id"] is None and world.work == []


def test_a_consumer_that_stops_paying_gets_402_with_what_it_owes(world):
    with world.stream() as s, httpx.Client(auth=s.auth()) as http:
        served = 0
        while True:
            r = http.post(f"{world.url}/infer", json={})  # never recorded: never paid
            if r.status_code == 402:
                break
            served += 1
        assert served == world.gate.credit == 20
        body = r.json()
        assert body["error"] == "unpaid" and body["escrow_id"] == s.escrow_id
        assert Decimal(body["owed"]) == Decimal("0.020")
        s.record(served)  # it settles at close


def test_units_reported_by_the_handler_are_counted():
    world = World(rate="0.00001", batch=1000)
    try:
        with world.stream(rate="0.00001", batch=1000) as s, httpx.Client(auth=s.auth()) as http:
            for n in (7, 300, 41):
                assert http.get(f"{world.url}/tokens", params={"n": n}).status_code == 200
                s.record(n)
        assert world.gate.account(s.escrow_id).served == 348
    finally:
        world.close()


def test_failed_responses_and_exempt_paths_count_nothing(world):
    with world.stream() as s, httpx.Client(auth=s.auth()) as http:
        assert http.get(f"{world.url}/broken").status_code == 503
        assert http.get(f"{world.url}/health").json() == {"ok": True}
        r = http.get(f"{world.url}/stream")
        assert r.text == "chunk 0\nchunk 1\nchunk 2\n"  # streamed answers pass through
        s.record(1)
    view = world.gate.account(s.escrow_id)
    assert (view.served, view.in_flight) == (1, 0)


def test_report_units_outside_the_middleware_names_the_request():
    with pytest.raises(InvalidInput) as exc:
        report_units({"state": {}}, 3)
    assert exc.value.field == "request"
