"""Configuration, input validation before any request, answer parsing and reading back after
a lost answer — the shared base, through both the sync and the async client."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx
import pytest
from conftest import CANARY_KEY, Recorder, escrow_json, released_json

from pf_metered import errors
from pf_metered.client import DEFAULT_BASE_URL, AsyncEscrowClient, EscrowClient
from pf_metered.client._base import MAX_ANSWER_BYTES, check_base_url

# -- configuration ------------------------------------------------------------------------


def test_key_from_argument_then_environment(monkeypatch) -> None:
    monkeypatch.delenv("PF_API_KEY", raising=False)
    monkeypatch.delenv("PF_BASE_URL", raising=False)
    for cls in (EscrowClient, AsyncEscrowClient):
        with pytest.raises(errors.ConfigError) as info:
            cls()
        assert "api_key" in str(info.value) and "PF_API_KEY" in str(info.value)
    monkeypatch.setenv("PF_API_KEY", "")
    with pytest.raises(errors.ConfigError):
        EscrowClient()
    monkeypatch.setenv("PF_API_KEY", CANARY_KEY)
    client = EscrowClient()
    assert client.base_url == DEFAULT_BASE_URL
    client.close()


def test_base_url_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("PF_BASE_URL", "http://127.0.0.1:8080/api/v1/")
    with EscrowClient(CANARY_KEY) as client:
        assert client.base_url == "http://127.0.0.1:8080/api/v1"
    monkeypatch.setenv("PF_BASE_URL", "http://example.com/api/v1")
    with pytest.raises(errors.ConfigError):
        EscrowClient(CANARY_KEY)


@pytest.mark.parametrize(
    "url",
    [
        "https://escrow.purpleflea.com/api/v1",
        "https://example.com",
        "http://localhost/api/v1",
        "http://LOCALHOST:9000/api/v1",
        "http://127.0.0.1:5000/api/v1",
        "http://127.255.0.9/api/v1",
        "http://[::1]:8000/api/v1",
        "http://[::1]/api/v1",
        "http://127.0.0.1/",
        "https://localhost.evil.com/api/v1",  # https is fine anywhere
    ],
)
def test_accepted_base_urls(url: str) -> None:
    assert check_base_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://escrow.purpleflea.com/api/v1",
        "http://localhost.evil.com/api/v1",
        "http://127.0.0.1.nip.io/api/v1",
        "http://localhost./api/v1",
        "http://128.0.0.1/",
        "http://10.0.0.1/",
        "http://[::2]/",
        "http://0.0.0.0/",
        "ftp://localhost/",
        "file:///etc/passwd",
        "https://user:hunter2@escrow.purpleflea.com/api/v1",
        "http://127.0.0.1.evil.com/api/v1",
        "http://localhost@evil.com/api/v1",
        "https://localhost@evil.com/api/v1",
        "http://localhost:hunter2@evil.com/",
        "http://127.0.0.1:80@evil.com/",
        "http://evil.com\\@localhost/",
        "http://0x7f.1/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://127.1/",
        "http://0177.0.0.1/",
        "http://[::ffff:7f00:1]/",
        "http://[::]/",
        "http://evil.com#@localhost/",
        "http://evil.com?@localhost/",
        "http://localhost%2eevil.com/",
        "HTTP://evil.com/",
        "https://escrow.purpleflea.com/api/v1?key=1",
        "https://escrow.purpleflea.com/api/v1#frag",
        "",
        "not a url",
        "https://",
    ],
)
def test_refused_base_urls_never_echo_credentials(url: str) -> None:
    with pytest.raises(errors.ConfigError) as info:
        EscrowClient(CANARY_KEY, base_url=url)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("inf")},
        {"timeout": True},
        {"max_retries": -1},
        {"max_retries": 1.5},
        {"max_retries": 100},
        {"server_honours_idempotency": "yes"},
        {"api_key": "short"},
        {"api_key": "pf_live_has space"},
        {"api_key": "pf_live_newline\nInjected: 1"},
    ],
)
def test_bad_options_are_config_errors(kw: dict[str, Any]) -> None:
    kw.setdefault("api_key", CANARY_KEY)
    with pytest.raises(errors.ConfigError) as info:
        EscrowClient(**kw)
    assert "Injected" not in str(info.value)


def test_transport_kind_must_match_the_client() -> None:
    class SyncOnly(httpx.BaseTransport):
        pass

    class AsyncOnly(httpx.AsyncBaseTransport):
        pass

    with pytest.raises(errors.ConfigError):
        EscrowClient(CANARY_KEY, transport=AsyncOnly())
    with pytest.raises(errors.ConfigError):
        AsyncEscrowClient(CANARY_KEY, transport=SyncOnly())


def test_capabilities_and_learning_that_the_server_honours_keys(make_client) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=escrow_json(), headers={"Idempotency-Supported": "true"})

    client = make_client(transport=Recorder(handler).transport)
    caps = client.capabilities
    assert caps.dialect == "v1" and caps.supports_partial_release
    assert caps.honours_idempotency is None
    client.get_escrow("esc_1")
    assert client.capabilities.honours_idempotency is True

    declared = make_client(transport=Recorder(handler).transport, server_honours_idempotency=False)
    declared.get_escrow("esc_1")
    assert declared.capabilities.honours_idempotency is False


# -- bad input: refused before any request ------------------------------------------------

BAD_CALLS: list[tuple[str, tuple[Any, ...], dict[str, Any], str]] = [
    ("create_escrow", ("agent_b", 1.5), {}, "amount"),
    ("create_escrow", ("agent_b", "NaN"), {}, "amount"),
    ("create_escrow", ("agent_b", "Infinity"), {}, "amount"),
    ("create_escrow", ("agent_b", "-1"), {}, "amount"),
    ("create_escrow", ("agent_b", "0"), {}, "amount"),
    ("create_escrow", ("agent_b", "0.50"), {}, "amount"),
    ("create_escrow", ("agent_b", "1.0000001"), {}, "amount"),
    ("create_escrow", ("agent_b", True), {}, "amount"),
    ("create_escrow", ("agent_b", "1e30"), {}, "amount"),
    ("create_escrow", ("agent_b", None), {}, "amount"),
    ("create_escrow", ("", "10"), {}, "to_agent_id"),
    ("create_escrow", ("../admin", "10"), {}, "to_agent_id"),
    ("create_escrow", ("..", "10"), {}, "to_agent_id"),
    ("create_escrow", ("a" * 129, "10"), {}, "to_agent_id"),
    ("create_escrow", (7, "10"), {}, "to_agent_id"),
    ("create_escrow", ("agent_b", "10"), {"memo": "m" * 1001}, "memo"),
    ("create_escrow", ("agent_b", "10"), {"memo": b"bytes"}, "memo"),
    ("create_escrow", ("agent_b", "10"), {"auto_release_hours": 0}, "auto_release_hours"),
    ("create_escrow", ("agent_b", "10"), {"auto_release_hours": 8761}, "auto_release_hours"),
    ("create_escrow", ("agent_b", "10"), {"auto_release_hours": 1.5}, "auto_release_hours"),
    ("create_escrow", ("agent_b", "10"), {"auto_release_hours": True}, "auto_release_hours"),
    ("create_escrow", ("agent_b", "10"), {"idempotency_key": ""}, "idempotency_key"),
    ("create_escrow", ("agent_b", "10"), {"idempotency_key": "k" * 256}, "idempotency_key"),
    ("create_escrow", ("agent_b", "10"), {"idempotency_key": "caf\u00e9"}, "idempotency_key"),
    ("create_escrow", ("agent_b", "10"), {"idempotency_key": "a\nb"}, "idempotency_key"),
    ("create_escrow", ("agent_b", "10"), {"idempotency_key": " padded"}, "idempotency_key"),
    ("release_partial", ("esc_1", Decimal("NaN")), {}, "amount"),
    ("release_partial", ("esc_1", 0.1), {}, "amount"),
    ("release_partial", ("esc_1", "0"), {}, "amount"),
    ("release_partial", ("esc/1", "1"), {}, "escrow_id"),
    ("release_partial", ("esc_1", "1"), {"memo": "m" * 1000}, "memo"),
    ("release_partial", ("esc_1", "1"), {"idempotency_key": 5}, "idempotency_key"),
    ("get_escrow", ("esc 1",), {}, "escrow_id"),
    ("get_escrow", (None,), {}, "escrow_id"),
    ("refund", ("esc?x=1",), {}, "escrow_id"),
    ("refund", ("esc_1",), {"idempotency_key": "\x00"}, "idempotency_key"),
    ("refund", (None,), {}, "escrow_id"),
    ("release_partial", ("esc_1", "1"), {"memo": None}, "memo"),
    ("release_partial", ("esc_1", "1e2"), {}, "amount"),
    ("release_partial", ("esc_1", "1" * 20), {}, "amount"),
    ("release_partial", (".", "1"), {}, "escrow_id"),
    ("list_releases", ("esc 1",), {}, "escrow_id"),
    ("list_releases", ("esc_1", -1), {}, "offset"),
    ("list_releases", ("esc_1", True), {}, "offset"),
    ("list_releases", ("esc_1", 0, 0), {}, "limit"),
    ("list_releases", ("esc_1", 0, 1001), {}, "limit"),
    ("list_releases", ("esc_1", 0, 2.0), {}, "limit"),
    ("release", ("esc/1",), {}, "escrow_id"),
    ("release", ("esc_1",), {"memo": 5}, "memo"),
    ("release", ("esc_1",), {"memo": "m" * 1001}, "memo"),
    ("release", ("esc_1",), {"idempotency_key": ""}, "idempotency_key"),
    ("complete", ("esc 1",), {}, "escrow_id"),
    ("dispute", ("esc?1",), {}, "escrow_id"),
    ("dispute", ("esc_1",), {"reason": b"bytes"}, "reason"),
    ("dispute", ("esc_1",), {"reason": "r" * 1001}, "reason"),
]


@pytest.mark.parametrize(("method", "args", "kwargs", "field"), BAD_CALLS)
def test_bad_input_is_refused_before_any_request(make_client, method, args, kwargs, field) -> None:
    rec = Recorder(lambda req: httpx.Response(500))
    client = make_client(transport=rec.transport)
    with pytest.raises(errors.InvalidInput) as info:
        getattr(client, method)(*args, **kwargs)
    assert info.value.field == field
    assert rec.requests == []


def test_memo_limit_leaves_room_for_the_tag_only_when_needed(make_client) -> None:
    rec = Recorder(
        lambda req: httpx.Response(200, json=escrow_json(released="1.00", remaining="9.00"))
    )
    honouring = make_client(transport=rec.transport, server_honours_idempotency=True)
    honouring.release_partial("esc_1", "1", memo="m" * 1000)
    assert json.loads(rec.requests[-1].content)["memo"] == "m" * 1000
    with pytest.raises(errors.InvalidInput, match="reserved"):
        make_client(transport=rec.transport).release_partial("esc_1", "1", memo="m" * 1000)


def test_amounts_go_on_the_wire_as_exact_strings(make_client) -> None:
    rec = Recorder(
        lambda req: httpx.Response(
            201, json=escrow_json(amount="12.345678", remaining="12.345678", memo="x")
        )
    )
    client = make_client(transport=rec.transport, server_honours_idempotency=True)
    client.create_escrow("agent_b", Decimal("12.345678"), memo="x", auto_release_hours=24)
    body = json.loads(rec.requests[0].content)
    assert body == {
        "to_agent_id": "agent_b",
        "amount": "12.345678",
        "memo": "x",
        "auto_release_hours": 24,
    }


# -- answers ------------------------------------------------------------------------------


def _raw(status: int, content: bytes, **headers: str) -> Any:
    return lambda req: httpx.Response(status, content=content, headers=headers)


HOSTILE = {
    "amount as number": json.dumps(escrow_json(amount=10, remaining="10.00")).encode(),
    "released as float": b'{"escrow_id":"esc_1","status":"locked","amount":"10.00",'
    b'"released":1.5,"remaining":"8.50"}',
    "NaN": b'{"escrow_id":"esc_1","status":"locked","amount":NaN,"released":"0","remaining":"0"}',
    "Infinity": b'{"escrow_id":"esc_1","status":"locked","amount":"1","released":Infinity}',
    "released > amount": json.dumps(escrow_json(released="11.00", remaining="-1.00")).encode(),
    "does not add up": json.dumps(escrow_json(released="1.00")).encode(),
    "unknown status": json.dumps(escrow_json(status="exploded")).encode(),
    "wrong escrow": json.dumps(escrow_json(escrow_id="esc_other")).encode(),
    "non-JSON": b"<html>oops</html>",
    "empty": b"",
    "a list": b"[]",
    "not utf-8": b'{"escrow_id": "\xff"}',
    "duplicate keys": b'{"escrow_id":"esc_1","escrow_id":"esc_2","status":"locked",'
    b'"amount":"1.00","released":"0.00","remaining":"1.00"}',
    "release fee as number": json.dumps(
        escrow_json(released="1.00", remaining="9.00", releases=[{"amount": "1.00", "fee": 0.01}])
    ).encode(),
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "huge int": b'{"n": ' + b"9" * 10_000 + b"}",
    "2 MiB": json.dumps(escrow_json(memo="", pad="x" * (2 << 20))).encode(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_answers_are_invalid_responses(make_client, name: str) -> None:
    rec = Recorder(_raw(200, HOSTILE[name], **{"X-Request-Id": "req_9"}))
    client = make_client(transport=rec.transport)
    with pytest.raises(errors.InvalidResponse) as info:
        client.get_escrow("esc_1")
    assert info.value.request_id == "req_9"
    assert len(rec.requests) == 1  # not retried


def test_a_body_over_the_limit_without_content_length_is_refused(make_client) -> None:
    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * 65536

    rec = Recorder(lambda req: httpx.Response(200, content=chunks()))
    client = make_client(transport=rec.transport)
    if client.mode == "async":

        async def achunks() -> Any:
            for _ in range(40):
                yield b"x" * 65536

        rec.handler = lambda req: httpx.Response(200, content=achunks())
    with pytest.raises(errors.InvalidResponse, match="larger than"):
        client.get_escrow("esc_1")
    assert MAX_ANSWER_BYTES < 40 * 65536


def test_hostile_list_and_faucet_answers(make_client) -> None:
    rec = Recorder(_raw(200, b'{"escrows": {"a": 1}}'))
    with pytest.raises(errors.InvalidResponse):
        make_client(transport=rec.transport).list_escrows()
    rec = Recorder(_raw(200, b'{"credited": 1.0, "claim_id": "clm_1"}'))
    with pytest.raises(errors.InvalidResponse):
        make_client(transport=rec.transport).claim_faucet()


def test_create_answer_must_match_what_was_asked(make_client) -> None:
    # A 2xx that contradicts the request is never success: the escrow it names is read back,
    # and when that agrees with the answer rather than the request, the outcome is ambiguous
    # (an escrow exists, not the one asked for) — named, so it can be dealt with.
    rec = Recorder(lambda req: httpx.Response(201, json=escrow_json(to_agent_id="mallory")))
    client = make_client(transport=rec.transport, server_honours_idempotency=True)
    with pytest.raises(errors.AmbiguousCreate) as info:
        client.create_escrow("agent_b", "10.00")
    assert info.value.known["escrow_id"] == "esc_1" and "mallory" in str(info.value)
    assert [r.method for r in rec.requests] == ["POST", "GET"]
    rec = Recorder(lambda req: httpx.Response(201, json=escrow_json(amount="10.00")))
    client = make_client(transport=rec.transport, server_honours_idempotency=True)
    with pytest.raises(errors.AmbiguousCreate):
        client.create_escrow("agent_b", "11.00")
    assert [r.method for r in rec.requests] == ["POST", "GET"]  # never created a second time


def test_error_body_that_is_not_json_still_maps_by_status(make_client) -> None:
    rec = Recorder(_raw(404, b"<html>not here</html>"))
    with pytest.raises(errors.NotFound) as info:
        make_client(transport=rec.transport).get_escrow("esc_1")
    assert info.value.code is None


def test_redirects_are_not_followed(make_client) -> None:
    rec = Recorder(
        lambda req: httpx.Response(302, headers={"Location": "https://evil.example/steal"})
    )
    with pytest.raises(errors.InvalidResponse):
        make_client(transport=rec.transport).get_escrow("esc_1")
    assert len(rec.requests) == 1


# -- reading back after a lost answer (scripted server) -----------------------------------


class Ledger:
    """A tiny scripted escrow server that ignores idempotency keys, with a fault switch."""

    def __init__(self, faults: list[str]) -> None:
        self.faults = faults  # consumed one per POST: "timeout-after", "500-after", "ok"
        self.releases: list[dict[str, str]] = []
        self.escrows: list[dict[str, Any]] = []
        self.get_fails = False

    def escrow(self) -> dict[str, Any]:
        released = sum(Decimal(r["amount"]) for r in self.releases)
        return escrow_json(
            released=f"{released:.2f}",
            remaining=f"{Decimal(10) - released:.2f}",
            releases=self.releases,
        )

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            if self.get_fails:
                return httpx.Response(503)
            if req.url.path.endswith("/escrow"):
                return httpx.Response(200, json={"escrows": self.escrows})
            return httpx.Response(200, json=self.escrow())
        body = json.loads(req.content)
        fault = self.faults.pop(0) if self.faults else "ok"
        if fault == "refused":
            raise httpx.ConnectError("refused", request=req)
        if req.url.path.endswith("/release-partial"):
            self.releases.append({"amount": body["amount"], "memo": body["memo"]})
            answer = self.escrow()
        else:
            answer = escrow_json(escrow_id=f"esc_{len(self.escrows) + 1}", memo=body["memo"])
            self.escrows.append(answer)
        if fault == "timeout-after":
            raise httpx.ReadTimeout("lost", request=req)
        if fault == "reset-after":
            raise httpx.RemoteProtocolError("reset", request=req)
        if fault == "500-after":
            return httpx.Response(500, json={"error": "internal_error", "message": "x"})
        return httpx.Response(200, json=answer)


@pytest.mark.parametrize("fault", ["timeout-after", "reset-after", "500-after"])
def test_lost_release_is_found_by_reading_back_not_sent_twice(make_client, fault) -> None:
    ledger = Ledger([fault])
    rec = Recorder(ledger)
    client = make_client(transport=rec.transport)
    escrow = client.release_partial("esc_1", "1.25", memo="batch 1")
    assert len(ledger.releases) == 1
    assert escrow.released_micro == 1_250_000
    assert [r.method for r in rec.requests] == ["POST", "GET"]
    assert ledger.releases[0]["memo"].startswith("batch 1 [idem:")


def test_release_absent_on_read_back_is_resent_with_the_same_key(make_client) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            return httpx.Response(200, json=escrow_json())
        if len([r for r in rec.requests if r.method == "POST"]) == 1:
            return httpx.Response(502)  # lost before applying
        return httpx.Response(200, json=released_json(req))

    rec = Recorder(handler)
    client = make_client(transport=rec.transport)
    client.release_partial("esc_1", "1.00")
    assert [r.method for r in rec.requests] == ["POST", "GET", "POST"]
    posts = [r for r in rec.requests if r.method == "POST"]
    assert posts[0].headers["idempotency-key"] == posts[1].headers["idempotency-key"]
    assert posts[0].content == posts[1].content


def test_release_that_cannot_be_settled_is_ambiguous(make_client) -> None:
    ledger = Ledger(["timeout-after"])
    ledger.get_fails = True
    client = make_client(transport=Recorder(ledger).transport)
    with pytest.raises(errors.AmbiguousRelease) as info:
        client.release_partial("esc_1", "1.00")
    assert info.value.idempotency_key.startswith("pfm_")
    assert info.value.known["escrow_id"] == "esc_1"


def test_release_without_history_is_ambiguous(make_client) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            return httpx.Response(200, json=escrow_json(released="1.00", remaining="9.00"))
        raise httpx.ReadTimeout("lost", request=req)

    client = make_client(transport=Recorder(handler).transport)
    with pytest.raises(errors.AmbiguousRelease) as info:
        client.release_partial("esc_1", "1.00")
    assert info.value.known["released"] == Decimal("1.00")


def test_retry_with_the_ambiguous_key_is_reconciled_before_sending(make_client) -> None:
    ledger = Ledger(["timeout-after"])
    ledger.get_fails = True
    client = make_client(transport=Recorder(ledger).transport)
    with pytest.raises(errors.AmbiguousRelease) as info:
        client.release_partial("esc_1", "1.00", memo="b1")
    ledger.get_fails = False
    # The caller retries with the same key (as the exception says): found, not re-sent.
    escrow = client.release_partial(
        "esc_1", "1.00", memo="b1", idempotency_key=info.value.idempotency_key
    )
    assert len(ledger.releases) == 1
    assert escrow.released_micro == 1_000_000


def test_caller_key_pre_read_failure_sends_nothing(make_client) -> None:
    ledger = Ledger([])
    ledger.get_fails = True
    client = make_client(transport=Recorder(ledger).transport, max_retries=0)
    with pytest.raises(errors.ServerError):
        client.release_partial("esc_1", "1.00", idempotency_key="batch-1")
    assert ledger.releases == []


class WindowLedger(Ledger):
    """The scripted server speaking the bounded wire: a read carries the last ``window``
    releases and ``release_count``, a release answer only the release just made; the paged
    history (``GET /escrow/{id}/releases``) is served when ``pages`` is true."""

    def __init__(self, faults: list[str], *, prior: int, window: int = 100, pages: bool) -> None:
        super().__init__(faults)
        self.window = window
        self.pages = pages
        self.releases = [{"amount": "0.01", "memo": f"old {i}"} for i in range(prior)]

    def escrow(self, recent: int | None = None) -> dict[str, Any]:
        released = sum(Decimal(r["amount"]) for r in self.releases)
        full = escrow_json(
            amount="1000.00", released=f"{released:.2f}", remaining=f"{1000 - released:.2f}"
        )
        n = self.window if recent is None else recent
        full["releases"] = self.releases[-n:] if n else []
        full["release_count"] = len(self.releases)
        return full

    def __call__(self, req: httpx.Request) -> httpx.Response:
        if req.method == "GET" and req.url.path.endswith("/releases"):
            if not self.pages:
                return httpx.Response(404, json={"error": "not_found", "message": "no"})
            offset = int(req.url.params["offset"])
            limit = int(req.url.params["limit"])
            return httpx.Response(
                200,
                json={
                    "escrow_id": "esc_1",
                    "release_count": len(self.releases),
                    "offset": offset,
                    "releases": self.releases[offset : offset + limit],
                },
            )
        answer = super().__call__(req)
        if req.method == "POST" and answer.status_code == 200:
            return httpx.Response(200, json=self.escrow(recent=1))
        return answer


def test_lost_release_is_found_in_the_recent_window(make_client) -> None:
    ledger = WindowLedger(["timeout-after"], prior=5000, pages=False)
    rec = Recorder(ledger)
    escrow = make_client(transport=rec.transport).release_partial("esc_1", "1.25", memo="b")
    assert len(ledger.releases) == 5001
    assert [r.method for r in rec.requests] == ["POST", "GET"]  # no history paging needed
    assert escrow.release_count == 5001 and len(escrow.releases) == 100


def test_lost_release_absent_from_a_truncated_window_is_searched_then_resent(make_client) -> None:
    ledger = WindowLedger([], prior=2500, pages=True)
    rec = Recorder(ledger)

    posts = {"n": 0}
    inner = rec.handler

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            posts["n"] += 1
            if posts["n"] == 1:
                return httpx.Response(502)  # lost before it was applied
        return inner(req)

    rec.handler = handler
    escrow = make_client(transport=rec.transport).release_partial("esc_1", "1.00", memo="b")
    assert len(ledger.releases) == 2501 and escrow.released == Decimal("26.00")
    paths = [(r.method, r.url.path.rsplit("/", 1)[-1]) for r in rec.requests]
    # read back, the 2,400 older releases searched in pages of 1,000, then sent again once
    assert paths == [
        ("POST", "release-partial"),
        ("GET", "esc_1"),
        ("GET", "releases"),
        ("GET", "releases"),
        ("GET", "releases"),
        ("POST", "release-partial"),
    ]


def test_lost_release_with_truncated_unsearchable_history_is_ambiguous(make_client) -> None:
    ledger = WindowLedger([], prior=150, pages=False)
    rec = Recorder(ledger)
    inner = rec.handler

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            return httpx.Response(502)  # never applied, but the client cannot know
        return inner(req)

    rec.handler = handler
    with pytest.raises(errors.AmbiguousRelease) as info:
        make_client(transport=rec.transport).release_partial("esc_1", "1.00", memo="b")
    assert info.value.known["released"] == Decimal("1.50")
    assert [r.method for r in rec.requests].count("POST") == 1  # never a re-send


@pytest.mark.parametrize("pages", [True, False])
def test_caller_key_release_older_than_the_window(make_client, pages: bool) -> None:
    ledger = WindowLedger([], prior=10, pages=pages)
    rec = Recorder(ledger)
    client = make_client(transport=rec.transport)
    client.release_partial("esc_1", "0.50", memo="b1", idempotency_key="key-b1")
    ledger.releases += [{"amount": "0.01", "memo": f"other {i}"} for i in range(150)]
    before = len(ledger.releases)
    if pages:  # found in the older history: not sent again
        escrow = client.release_partial("esc_1", "0.50", memo="b1", idempotency_key="key-b1")
        assert escrow.release_count == before
        with pytest.raises(errors.IdempotencyConflict):
            client.release_partial("esc_1", "0.40", memo="b1", idempotency_key="key-b1")
    else:  # beyond the window and unsearchable: ambiguous, nothing sent
        with pytest.raises(errors.AmbiguousRelease):
            client.release_partial("esc_1", "0.50", memo="b1", idempotency_key="key-b1")
    assert len(ledger.releases) == before


@pytest.mark.parametrize("fault", ["timeout-after", "500-after"])
def test_lost_create_is_reconciled_through_the_list(make_client, fault) -> None:
    ledger = Ledger([fault])
    client = make_client(transport=Recorder(ledger).transport)
    escrow = client.create_escrow("agent_b", "10.00", memo="job 1")
    assert len(ledger.escrows) == 1
    assert escrow.escrow_id == "esc_1"


def test_create_that_cannot_be_settled_is_ambiguous(make_client) -> None:
    ledger = Ledger(["timeout-after"])
    ledger.get_fails = True
    client = make_client(transport=Recorder(ledger).transport)
    with pytest.raises(errors.AmbiguousCreate):
        client.create_escrow("agent_b", "10.00")
    assert len(ledger.escrows) == 1


def test_lost_refund_is_settled_by_status(make_client) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "GET":
            return httpx.Response(
                200, json=escrow_json(status="refunded", remaining="0.00", refunded="10.00")
            )
        raise httpx.ReadTimeout("lost", request=req)

    rec = Recorder(handler)
    client = make_client(transport=rec.transport)
    assert client.refund("esc_1").status == "refunded"
    assert [r.method for r in rec.requests] == ["POST", "GET"]


def test_lost_faucet_claim_then_already_claimed_is_ambiguous(make_client) -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        if len(rec.requests) == 1:
            raise httpx.ReadTimeout("lost", request=req)
        return httpx.Response(409, json={"error": "already_claimed", "message": "once"})

    rec = Recorder(handler)
    with pytest.raises(errors.AmbiguousOutcome):
        make_client(transport=rec.transport).claim_faucet()


@pytest.mark.parametrize("bad", [123, object(), 1.5, ["v1"]])
def test_a_dialect_that_is_not_one_is_refused_naming_dialect(bad: object) -> None:
    from pf_metered.client import AsyncEscrowClient, EscrowClient

    for cls in (EscrowClient, AsyncEscrowClient):
        with pytest.raises(errors.ConfigError, match="dialect"):
            cls("pf_live_abcdefgh1234", dialect=bad)
