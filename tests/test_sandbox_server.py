"""The sandbox over a real loopback socket: same API, keep-alive, limits, clean shutdown."""

from __future__ import annotations

import io
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest

from pf_metered.errors import ConfigError
from pf_metered.sandbox import ManualClock, Sandbox, SandboxServer, serve_forever


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with Sandbox(clock=ManualClock()) as sandbox:
        yield sandbox


def test_the_full_flow_over_loopback(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with sb.serve() as server:
        assert server.base_url == f"http://127.0.0.1:{server.port}/api/v1"
        headers = {"Authorization": f"Bearer {payer.api_key}"}
        with httpx.Client(base_url=server.base_url, headers=headers) as c:
            r = c.post("/escrow", json={"to_agent_id": provider.agent_id, "amount": "4.00"})
            assert r.status_code == 201 and r.headers["x-request-id"].startswith("req_")
            eid = r.json()["escrow_id"]
            key = {"Idempotency-Key": "net-1"}
            a = c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"}, headers=key)
            b = c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"}, headers=key)
            assert b.headers["idempotent-replayed"] == "true" and a.json() == b.json()
            refund = c.post(f"/escrow/{eid}/refund", json={}).json()
            assert (refund["status"], refund["refunded"]) == ("refunded", "3.00")
            assert c.get("/escrow?ignored=1").json()["escrows"][0]["escrow_id"] == eid
            missing = c.get("/escrow/esc_x")
            assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert sb.balance(payer.agent_id) == Decimal("9.00")
    sb.audit()


async def test_async_over_loopback(sb: Sandbox) -> None:
    a = sb.add_agent()
    with sb.serve() as server:
        headers = {"Authorization": f"Bearer {a.api_key}"}
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as c:
            first = await c.post("/faucet/claim", json={})
            second = await c.post("/faucet/claim", json={})
    assert first.json()["credited"] == "1.00"
    assert second.status_code == 409 and second.json()["error"] == "already_claimed"


def raw_http(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_oversized_and_chunked_bodies_are_refused_unread(sb: Sandbox) -> None:
    with sb.serve() as server:
        big = raw_http(
            server.port,
            b"POST /api/v1/escrow HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n",
        )
        chunked = raw_http(
            server.port,
            b"POST /api/v1/escrow HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
        bad_len = raw_http(
            server.port, b"POST /api/v1/escrow HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"
        )
    assert big.startswith(b"HTTP/1.1 413") and b'"invalid_request"' in big
    assert b"X-Request-Id" in big or b"x-request-id" in big
    assert chunked.startswith(b"HTTP/1.1 411")
    assert bad_len.startswith(b"HTTP/1.1 400")


def cut_off_post(port: int, path: str, api_key: str, key: str, body: bytes, sent: int) -> bytes:
    """A client that dies mid-request: headers (the full Content-Length) and ``sent`` bytes of
    the body, then the connection ends. Returns whatever the server answered before closing."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {api_key}\r\n"
        f"Content-Type: application/json\r\nIdempotency-Key: {key}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + body[:sent])
        s.shutdown(socket.SHUT_WR)  # as a killed process's socket: EOF where the body was due
        chunks = []
        while chunk := s.recv(65536):  # until the server is done with the connection
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("sent", [0, 7])
def test_a_body_cut_off_by_a_dying_client_is_never_dispatched(sb: Sandbox, sent: int) -> None:
    """Regression: a child killed between the headers and the body of a release left the
    server answering (and storing under the Idempotency-Key) a request with a short body, so
    the resumed stream's real release under that key got 422 ``idempotency_key_reused``."""
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with sb.serve() as server:
        headers = {"Authorization": f"Bearer {payer.api_key}"}
        with httpx.Client(base_url=server.base_url, headers=headers) as c:
            eid = c.post(
                "/escrow", json={"to_agent_id": provider.agent_id, "amount": "4.00"}
            ).json()["escrow_id"]
            path = f"/escrow/{eid}/release-partial"
            body = b'{"amount":"1.00","memo":"batch:units 1-10"}'
            answer = cut_off_post(server.port, "/api/v1" + path, payer.api_key, "cut-1", body, sent)
            assert answer == b""  # no request, no answer: the connection is just dropped
            assert c.get(f"/escrow/{eid}").json()["released"] == "0.00"
            ok = c.post(
                path,
                content=body,
                headers={"Idempotency-Key": "cut-1", "Content-Type": "application/json"},
            )
            assert ok.status_code == 200, ok.text
            assert ok.json()["released"] == "1.00"
    sb.audit()


def test_only_loopback_addresses_are_served(sb: Sandbox) -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "localhost.evil.com", "::"):
        with pytest.raises(ConfigError):
            sb.serve(host)
    with sb.serve("localhost") as server:
        assert server.host == "127.0.0.1"


def test_ipv6_loopback_when_available(sb: Sandbox) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = sb.serve("::1")
    except OSError:
        pytest.skip("::1 not configured")
    with server:
        assert server.base_url.startswith("http://[::1]:")
        assert httpx.get(server.base_url + "/escrow").status_code == 401


def test_close_stops_serving_and_leaves_no_thread(sb: Sandbox) -> None:
    a = sb.add_agent()
    before = set(threading.enumerate())
    server = sb.serve()
    client = httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {a.api_key}"}
    )
    assert client.get("/escrow").status_code == 200  # leaves a keep-alive connection open
    server.close()
    server.close()
    assert server.closed and "closed" in repr(server)
    with pytest.raises(httpx.TransportError):
        client.get("/escrow")
    client.close()
    lingering = [t for t in threading.enumerate() if t not in before and t.name.startswith("pf-")]
    assert lingering == []


def test_sandbox_close_closes_its_servers() -> None:
    sb = Sandbox()
    server = sb.serve()
    sb.close()
    assert server.closed
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/escrow")


def test_concurrent_requests_over_the_socket(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("100"), sb.add_agent()
    with sb.serve() as server:
        headers = {"Authorization": f"Bearer {payer.api_key}"}
        with httpx.Client(base_url=server.base_url, headers=headers) as c:
            eid = c.post(
                "/escrow", json={"to_agent_id": provider.agent_id, "amount": "10.00"}
            ).json()["escrow_id"]

        def worker(n: int) -> list[int]:
            with httpx.Client(base_url=server.base_url, headers=headers) as c:
                return [
                    c.post(f"/escrow/{eid}/release-partial", json={"amount": "0.05"}).status_code
                    for _ in range(10)
                ]

        with ThreadPoolExecutor(16) as pool:
            codes = [s for r in pool.map(worker, range(16)) for s in r]
    assert codes.count(200) == 160
    assert sb.escrow(eid).released == Decimal("8.00")
    sb.audit()


def test_serve_forever_prints_ids_not_keys_and_stops_on_request() -> None:
    out = io.StringIO()
    stop = threading.Event()
    started: list[SandboxServer] = []

    def ready(server: SandboxServer) -> None:
        started.append(server)
        stop.set()  # stop as soon as it is up; serve_forever returns and closes everything

    serve_forever(
        ":memory:", "127.0.0.1", 0, agents=2, balance="7", out=out, stop=stop, ready=ready
    )
    text = out.getvalue()
    assert started and started[0].base_url in text
    assert text.count("agent ag_") == 2 and "balance 7" in text
    assert "pf_test_" not in text
    assert started[0].closed


def test_serve_forever_shows_keys_on_request_and_they_work() -> None:
    out = io.StringIO()
    stop = threading.Event()
    results: list[int] = []

    def ready(server: SandboxServer) -> None:
        key = out.getvalue().split("key ")[1].split()[0]
        r = httpx.get(server.base_url + "/escrow", headers={"Authorization": f"Bearer {key}"})
        results.append(r.status_code)
        stop.set()

    serve_forever(port=0, agents=1, show_keys=True, out=out, stop=stop, ready=ready)
    assert results == [200]
    assert "pf_test_" in out.getvalue()
