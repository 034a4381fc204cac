"""The retry table, backoff, Retry-After, and one idempotency key per logical call —
every test runs against both the sync and the async client (``make_client``)."""

from __future__ import annotations

import email.utils
import json
from typing import Any

import httpx
import pytest
from conftest import Recorder, escrow_json, released_json

from pf_metered import errors
from pf_metered.client import BACKOFF_BASE, BACKOFF_CAP, RETRY_AFTER_CAP
from pf_metered.client._retry import (
    JITTER,
    Verdict,
    backoff_delay,
    classify_exception,
    classify_status,
    parse_retry_after,
)

RETRIES = 3

RETRIED_STATUSES = {408, 429} | set(range(500, 600))


def _answer(status: int, request: httpx.Request, **body: Any) -> httpx.Response:
    if 200 <= status <= 299:
        return httpx.Response(status, json=escrow_json())
    return httpx.Response(status, json=body or {"error": "some_code", "message": "no"})


# -- every status 100..599 ----------------------------------------------------------------


@pytest.mark.parametrize("status", range(100, 600))
def test_status_table_for_a_read(make_client, status: int) -> None:
    rec = Recorder(lambda req: _answer(status, req))
    client = make_client(transport=rec.transport, max_retries=RETRIES)
    if 200 <= status <= 299:
        assert client.get_escrow("esc_1").escrow_id == "esc_1"
        assert len(rec.requests) == 1
        return
    with pytest.raises(errors.APIError) as info:
        client.get_escrow("esc_1")
    expected_sends = 1 + RETRIES if status in RETRIED_STATUSES else 1
    assert len(rec.requests) == expected_sends
    assert len(client.sleeps) == expected_sends - 1
    assert info.value.status == status
    if status < 200 or 300 <= status <= 399:
        assert isinstance(info.value, errors.InvalidResponse)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.InvalidRequest),
        (401, errors.AuthError),
        (402, errors.InsufficientFunds),
        (403, errors.PermissionDenied),
        (404, errors.NotFound),
        (409, errors.Conflict),
        (422, errors.IdempotencyConflict),
        (429, errors.RateLimited),
        (500, errors.ServerError),
        (503, errors.ServerError),
        (418, errors.APIError),
    ],
)
def test_one_exception_class_per_status_with_request_id(
    make_client, status: int, cls: type
) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            json={"error": "the_code", "message": "server says no"},
            headers={"X-Request-Id": "req_42"},
        )

    client = make_client(transport=Recorder(handler).transport, max_retries=0)
    with pytest.raises(cls) as info:
        client.get_escrow("esc_1")
    assert type(info.value) is cls
    assert info.value.request_id == "req_42"
    assert info.value.code == "the_code"
    assert "server says no" in str(info.value)


def test_409_is_retried_only_when_in_progress(make_client) -> None:
    seen: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) < 3:
            return httpx.Response(409, json={"error": "request_in_progress", "message": "wait"})
        return httpx.Response(200, json=escrow_json(released="1.00", remaining="9.00"))

    client = make_client(transport=Recorder(handler).transport, server_honours_idempotency=True)
    assert client.release_partial("esc_1", "1.00").released_micro == 1_000_000
    assert len(seen) == 3

    rec = Recorder(
        lambda req: httpx.Response(409, json={"error": "invalid_status", "message": "x"})
    )
    client = make_client(transport=rec.transport, server_honours_idempotency=True)
    with pytest.raises(errors.Conflict):
        client.release_partial("esc_1", "1.00")
    assert len(rec.requests) == 1


# -- every httpx transport error ----------------------------------------------------------

NOT_SENT = [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.ProxyError]
MAYBE_SENT = [
    httpx.ReadTimeout,
    httpx.WriteTimeout,
    httpx.TimeoutException,
    httpx.ReadError,
    httpx.WriteError,
    httpx.CloseError,
    httpx.NetworkError,
    httpx.RemoteProtocolError,
    httpx.ProtocolError,
    httpx.TransportError,
    httpx.DecodingError,
]
NEVER_RETRIED = [httpx.UnsupportedProtocol, httpx.LocalProtocolError]


@pytest.mark.parametrize("exc", NOT_SENT + MAYBE_SENT + NEVER_RETRIED)
def test_transport_error_table_for_a_read(make_client, exc: type[Exception]) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise exc("boom", request=req) if exc is not httpx.DecodingError else exc("boom")

    rec = Recorder(handler)
    client = make_client(transport=rec.transport, max_retries=RETRIES)
    expected = (
        errors.APITimeout if issubclass(exc, httpx.TimeoutException) else errors.APIConnectionError
    )
    with pytest.raises(expected):
        client.get_escrow("esc_1")
    assert len(rec.requests) == (1 if exc in NEVER_RETRIED else 1 + RETRIES)


@pytest.mark.parametrize("exc", NOT_SENT)
def test_unsent_post_is_retried_with_the_same_key_without_reading_back(make_client, exc) -> None:
    calls: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req.method)
        if len(calls) < 3:
            raise exc("refused", request=req)
        return httpx.Response(200, json=released_json(req))

    rec = Recorder(handler)
    client = make_client(transport=rec.transport, server_honours_idempotency=False)
    client.release_partial("esc_1", "1.00")
    assert calls == ["POST", "POST", "POST"]
    assert len(set(rec.idempotency_keys)) == 1


def test_classifiers_directly() -> None:
    assert classify_status(200) is Verdict.OK
    assert classify_status(409) is Verdict.FAIL
    assert classify_status(409, in_progress=True) is Verdict.RETRY
    assert classify_status(503) is Verdict.LOST
    assert classify_status(404) is Verdict.FAIL
    assert classify_exception(httpx.ConnectError("x")) is Verdict.RETRY
    assert classify_exception(httpx.ReadTimeout("x")) is Verdict.LOST
    assert classify_exception(httpx.UnsupportedProtocol("x")) is Verdict.FAIL
    assert classify_exception(RuntimeError("x")) is Verdict.FAIL


# -- the idempotency key ------------------------------------------------------------------


@pytest.mark.parametrize("given", [None, "caller-key-1"])
def test_one_key_per_logical_post_identical_on_every_retry(make_client, given) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            return httpx.Response(200, json=escrow_json())
        return httpx.Response(503, json={"error": "internal_error", "message": "x"})

    rec = Recorder(handler)
    client = make_client(transport=rec.transport, server_honours_idempotency=True)
    with pytest.raises(errors.AmbiguousRelease) as info:
        client.release_partial("esc_1", "1.00", idempotency_key=given)
    posts = [r for r in rec.requests if r.method == "POST"]
    assert len(posts) == 1 + RETRIES
    keys = {r.headers["idempotency-key"] for r in posts}
    assert len(keys) == 1
    assert {r.content for r in posts} == {posts[0].content}  # identical bytes too
    key = keys.pop()
    assert info.value.idempotency_key == key
    if given:
        assert key == given

    with pytest.raises(errors.AmbiguousRelease):  # a second logical call: a fresh key
        client.release_partial("esc_1", "1.00")
    assert len({r.headers["idempotency-key"] for r in rec.requests if r.method == "POST"}) == 2


def test_every_post_carries_a_key_and_gets_none(make_client) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        path = req.url.path
        if path.endswith("/faucet/claim"):
            return httpx.Response(200, json={"credited": "1.00", "claim_id": "clm_1"})
        if req.method == "GET" and path.endswith("/escrow"):
            return httpx.Response(200, json={"escrows": []})
        if path.endswith("/refund"):
            return httpx.Response(
                200, json=escrow_json(status="refunded", remaining="0.00", refunded="10.00")
            )
        if req.method == "POST" and path.endswith("/escrow"):
            return httpx.Response(201, json=escrow_json(memo=json.loads(req.content)["memo"]))
        if path.endswith("/release-partial"):
            return httpx.Response(200, json=released_json(req))
        return httpx.Response(200, json=escrow_json())

    rec = Recorder(handler)
    client = make_client(transport=rec.transport)
    client.create_escrow("agent_b", "10.00")
    client.release_partial("esc_1", "1.00")
    client.get_escrow("esc_1")
    client.list_escrows()
    client.refund("esc_1")
    client.claim_faucet()
    for r in rec.requests:
        if r.method == "POST":
            assert r.headers.get("idempotency-key")
            assert r.headers["content-type"] == "application/json"
        else:
            assert "idempotency-key" not in r.headers
        assert r.headers["authorization"].startswith("Bearer ")
    assert len({k for k in rec.idempotency_keys if k}) == 4


# -- Retry-After and backoff --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        ("0", 0.0),
        ("0.5", 0.5),
        ("3600", RETRY_AFTER_CAP),
        (str(10**9), RETRY_AFTER_CAP),
    ],
)
def test_retry_after_is_honoured_up_to_the_cap(make_client, header: str, expected: float) -> None:
    seen: list[int] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) == 1:
            return httpx.Response(
                429,
                json={"error": "rate_limited", "message": "slow"},
                headers={"Retry-After": header},
            )
        return httpx.Response(200, json=escrow_json())

    client = make_client(transport=Recorder(handler).transport)
    client.get_escrow("esc_1")
    assert client.sleeps == [expected]


def test_retry_after_as_http_date_and_junk() -> None:
    now = 1_000_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now=lambda: now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=lambda: now) == 0.0
    for junk in (None, "", "soon", "nan", "inf", "-inf", "x" * 100):
        assert parse_retry_after(junk) is None
    assert parse_retry_after("-5") == 0.0


def test_rate_limited_carries_retry_after_when_retries_run_out(make_client) -> None:
    rec = Recorder(
        lambda req: httpx.Response(
            429, json={"error": "rate_limited", "message": "slow"}, headers={"Retry-After": "7"}
        )
    )
    client = make_client(transport=rec.transport, max_retries=2)
    with pytest.raises(errors.RateLimited) as info:
        client.list_escrows()
    assert info.value.retry_after == 7.0
    assert client.sleeps == [7.0, 7.0]


def test_backoff_is_exponential_capped_and_jittered(make_client) -> None:
    rec = Recorder(
        lambda req: httpx.Response(503, json={"error": "internal_error", "message": "x"})
    )
    client = make_client(transport=rec.transport, max_retries=8)
    client.client._rand = lambda: 0.0
    with pytest.raises(errors.ServerError):
        client.get_escrow("esc_1")
    assert client.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    for n in range(1, 40):
        for r in (0.0, 0.5, 0.999):
            d = backoff_delay(n, rand=lambda r=r: r)
            assert BACKOFF_BASE * (1 - JITTER) <= d <= BACKOFF_CAP


def test_max_retries_zero_sends_once(make_client) -> None:
    rec = Recorder(lambda req: httpx.Response(503))
    client = make_client(transport=rec.transport, max_retries=0)
    with pytest.raises(errors.ServerError):
        client.get_escrow("esc_1")
    assert len(rec.requests) == 1
    assert client.sleeps == []


# -- total deadlines (issue 13 item 9) -----------------------------------------------------

DRIP_EVERY = 0.1
"""The server's pace: far inside the client's read timeout, so only a total deadline ends it."""


def _dripper(kind: str) -> Any:
    """A server that answers one byte at a time, for ever (until the client goes away)."""

    def behave(conn: Any, listener: Any) -> None:
        listener.read_request_head(conn)
        if kind == "status-line":
            head = b""
        elif kind == "headers":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        elif kind == "body":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        else:  # chunked
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        conn.sendall(head)
        drip = {"status-line": b"HTTP/1.1 200 OK"[:1], "headers": b"X", "body": b" "}
        while not listener.stopped.wait(DRIP_EVERY):
            conn.sendall(drip.get(kind, b"1\r\n \r\n"))
            if kind == "status-line":
                drip["status-line"] = b"H"  # never a complete status line

    return behave


@pytest.mark.parametrize("kind", ["status-line", "headers", "body", "chunked"])
def test_a_dripping_server_cannot_keep_a_call_alive(make_client, kind: str) -> None:
    import time

    from loopkit import Listener

    total = 1.5
    with Listener(_dripper(kind)) as server:
        client = make_client(
            base_url=server.url + "/api/v1", timeout=0.5, total_timeout=total, max_retries=1
        )
        started = time.monotonic()
        with pytest.raises(errors.APITimeout) as info:
            client.get_escrow("esc_1")
        elapsed = time.monotonic() - started
        assert "total_timeout" in str(info.value)
        # a POST whose answer dripped away is ambiguous, with its key to retry or reconcile by
        with pytest.raises(errors.AmbiguousRelease) as ambiguous:
            client.release_partial("esc_1", "1.00")
        assert ambiguous.value.idempotency_key  # the key to retry with, or to reconcile by
        assert "idempotency_key" in str(ambiguous.value)
    assert elapsed < 5 * total


def test_retry_after_waits_only_as_long_as_the_deadline_allows(make_client) -> None:
    rec = Recorder(
        lambda req: httpx.Response(
            429,
            json={"error": "rate_limited", "message": "slow"},
            headers={"Retry-After": "100000"},
        )
    )
    client = make_client(transport=rec.transport, total_timeout=100, max_retries=3)
    with pytest.raises(errors.APITimeout) as info:
        client.get_escrow("esc_1")
    assert client.sleeps == [RETRY_AFTER_CAP]  # a second 60 s wait would pass the deadline
    assert len(rec.requests) == 2
    assert "total_timeout=100" in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, True, "10", float("inf"), 10**6])
def test_total_timeout_is_validated(make_client, bad: object) -> None:
    with pytest.raises(errors.ConfigError, match="total_timeout"):
        make_client(total_timeout=bad)
