"""The sandbox's v1 HTTP API through its in-process transport: every code, idempotency, limits.

Driven with plain httpx (sync and async), never with pf_metered's client: the sandbox is what
the client is tested against, so its tests must not depend on it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import httpx
import pytest

from pf_metered.sandbox import ManualClock, RateLimits, Sandbox, SandboxAgent
from pf_metered.sandbox._http import AppRequest

BASE = "http://localhost/api/v1"


@pytest.fixture
def sb() -> Iterator[Sandbox]:
    with Sandbox(clock=ManualClock()) as sandbox:
        yield sandbox


def api(sandbox: Sandbox, agent: SandboxAgent | None = None, **headers: str) -> httpx.Client:
    if agent is not None:
        headers["Authorization"] = f"Bearer {agent.api_key}"
    return httpx.Client(transport=sandbox.transport(), base_url=BASE, headers=headers)


def error(r: httpx.Response) -> tuple[int, str]:
    body = r.json()
    body.pop("_info", None)  # the deployed service adds its _info object to every answer
    assert set(body) == {"error", "message"}, body
    assert isinstance(body["message"], str) and body["message"]
    return r.status_code, body["error"]


@pytest.fixture
def trio(sb: Sandbox) -> tuple[SandboxAgent, SandboxAgent, SandboxAgent]:
    return sb.add_agent("50"), sb.add_agent(), sb.add_agent("5")


def create(c: httpx.Client, to: str, amount: str = "10.00", **kw) -> httpx.Response:
    return c.post("/escrow", json={"to_agent_id": to, "amount": amount, **kw})


# -- the happy path and the wire shape ---------------------------------------------------


def test_escrow_answers_have_exactly_the_contract_fields(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        r = create(c, provider.agent_id, "10.00", memo="m", auto_release_hours=24)
        assert r.status_code == 201
        esc = r.json()
        assert set(esc) == {
            "escrow_id",
            "status",
            "amount",
            "released",
            "remaining",
            "refunded",
            "to_agent_id",
            "from_agent_id",
            "memo",
            "created_at",
            "auto_release_at",
            "releases",
            "release_count",
        }
        assert (esc["releases"], esc["release_count"]) == ([], 0)
        assert (esc["status"], esc["amount"], esc["released"], esc["remaining"]) == (
            "locked",
            "10.00",
            "0.00",
            "10.00",
        )
        assert (
            esc["created_at"].endswith("Z") and esc["auto_release_at"] == "2026-01-02T00:00:00.000Z"
        )
        r = c.post(
            f"/escrow/{esc['escrow_id']}/release-partial", json={"amount": "0.0015", "memo": "b1"}
        )
        rel = r.json()["releases"][0]
        assert set(rel) == {"release_id", "amount", "fee", "memo", "created_at"}
        assert (rel["amount"], rel["fee"], rel["memo"]) == ("0.0015", "0.000015", "b1")
        assert r.json()["remaining"] == "9.9985"
        assert r.json()["release_count"] == 1
        listed = c.get("/escrow").json()
        assert [e["escrow_id"] for e in listed["escrows"]] == [esc["escrow_id"]]
    with api(sb, provider) as c:  # the provider sees it too, and may read it
        assert len(c.get("/escrow").json()["escrows"]) == 1
        assert c.get(f"/escrow/{esc['escrow_id']}").status_code == 200


def test_every_answer_carries_a_fresh_request_id_and_json(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c, api(sb) as anon:
        answers = [
            create(c, provider.agent_id),
            c.get("/escrow/esc_missing"),
            anon.get("/escrow"),
            c.get("/nowhere"),
            c.get("http://localhost/other"),
            c.post("/escrow", content=b"{"),
        ]
    ids = [r.headers["x-request-id"] for r in answers]
    assert all(i.startswith("req_") for i in ids) and len(set(ids)) == len(ids)
    assert all(r.headers["content-type"] == "application/json" for r in answers)
    assert all(isinstance(r.json(), dict) for r in answers)


# -- every error code --------------------------------------------------------------------


def test_unauthorized(sb: Sandbox, trio) -> None:
    payer, _, _ = trio
    for headers in (
        {},
        {"Authorization": "Bearer pf_test_unknownkey123"},
        {"Authorization": f"Basic {payer.api_key}"},
        {"Authorization": "Bearer"},
    ):
        with api(sb, **headers) as c:
            r = c.get("/escrow")
        assert error(r) == (401, "unauthorized")
        assert payer.api_key not in r.text


def test_not_found(sb: Sandbox, trio) -> None:
    payer, _, _ = trio
    with api(sb, payer) as c:
        assert error(c.get("/escrow/esc_nope")) == (404, "not_found")
        assert error(c.get("/escrow/bad%20id")) == (404, "not_found")
        assert error(c.post("/escrow/esc_nope/release-partial", json={"amount": "1"})) == (
            404,
            "not_found",
        )
        assert error(c.post("/escrow/esc_nope/refund", json={})) == (404, "not_found")
        assert error(create(c, "agent_nobody")) == (404, "not_found")
        assert error(create(c, "pf_fee")) == (404, "not_found")  # the fee account is no agent
        assert error(c.get("/unknown")) == (404, "not_found")
    assert sb.balance(payer.agent_id) == 50


def test_forbidden_unless_payer(sb: Sandbox, trio) -> None:
    payer, provider, stranger = trio
    with api(sb, payer) as c:
        eid = create(c, provider.agent_id).json()["escrow_id"]
    for who in (provider, stranger):
        with api(sb, who) as c:
            assert error(c.post(f"/escrow/{eid}/release-partial", json={"amount": "1"})) == (
                403,
                "forbidden",
            )
            assert error(c.post(f"/escrow/{eid}/refund", json={})) == (403, "forbidden")
    with api(sb, stranger) as c:
        assert error(c.get(f"/escrow/{eid}")) == (403, "forbidden")
        assert c.get("/escrow").json() == {"escrows": []}
    assert sb.escrow(eid).released == 0


def test_insufficient_balance(sb: Sandbox, trio) -> None:
    _, provider, poor = trio
    with api(sb, poor) as c:
        assert error(create(c, provider.agent_id, "5.000001")) == (402, "insufficient_balance")
        assert create(c, provider.agent_id, "5.00").status_code == 201
        assert error(create(c, provider.agent_id, "1.00")) == (402, "insufficient_balance")
    assert sb.balance(poor.agent_id) == 0
    sb.audit()


def test_invalid_status_after_close(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        eid = create(c, provider.agent_id, "2.00").json()["escrow_id"]
        assert (
            c.post(f"/escrow/{eid}/release-partial", json={"amount": "2.00"}).json()["status"]
            == "released"
        )
        assert error(c.post(f"/escrow/{eid}/release-partial", json={"amount": "0.01"})) == (
            409,
            "invalid_status",
        )
        assert error(c.post(f"/escrow/{eid}/refund", json={})) == (409, "invalid_status")
        eid2 = create(c, provider.agent_id, "2.00").json()["escrow_id"]
        assert c.post(f"/escrow/{eid2}/refund").status_code == 200  # empty body is {}
        assert error(c.post(f"/escrow/{eid2}/refund", json={})) == (409, "invalid_status")


@pytest.mark.parametrize(
    ("amount", "why"),
    [
        ("0.99", "below the minimum"),
        ("1.0000001", "seven places"),
        ("-5", "negative"),
        ("NaN", "not finite"),
        ("Infinity", "not finite"),
        ("1e3x", "junk"),
        ("", "empty"),
        (10, "a JSON number"),
        (10.5, "a JSON float"),
        (True, "a bool"),
        (None, "missing"),
        ("1" * 70, "absurd"),
    ],
)
def test_invalid_amount_on_create(sb: Sandbox, trio, amount, why) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        r = create(c, provider.agent_id, amount)
    assert error(r) == (400, "invalid_amount"), why
    assert sb.balance(payer.agent_id) == 50


def test_invalid_amount_on_release(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        eid = create(c, provider.agent_id, "2.00").json()["escrow_id"]
        for amount in ("0", "0.00", "2.000001", "0.0000001", 1, "-0.01"):
            r = c.post(f"/escrow/{eid}/release-partial", json={"amount": amount})
            assert error(r) == (400, "invalid_amount"), amount
        raw = b'{"amount": 0.5}'
        assert error(c.post(f"/escrow/{eid}/release-partial", content=raw)) == (
            400,
            "invalid_amount",
        )
    assert sb.escrow(eid).released == 0


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"amount": "1.00", "amount": "2.00"}',
        b'{"to_agent_id": "x", "amount": "1.00", "extra": NaN}',
        b'{"to_agent_id": "x", "amount": "1.00", "extra": Infinity}',
        b"\xff\xfe",
        b'{"to_agent_id": 5, "amount": "1.00"}',
        b'{"amount": "1.00"}',
        b'{"to_agent_id": "x", "amount": "1.00", "amount_usd": "1.00"}',
        b'{"to_agent_id": "x", "amount": "1.00", "memo": 7}',
        b'{"to_agent_id": "x", "amount": "1.00", "auto_release_hours": 0}',
        b'{"to_agent_id": "x", "amount": "1.00", "auto_release_hours": 8761}',
        b'{"to_agent_id": "x", "amount": "1.00", "auto_release_hours": 1.5}',
        b'{"to_agent_id": "x", "amount": "1.00", "auto_release_hours": true}',
        b'{"to_agent_id": "x", "amount": "1.00", "auto_release_hours": "2"}',
        b"[" * 100_000,
    ],
)
def test_invalid_request_bodies(sb: Sandbox, trio, body: bytes) -> None:
    payer, provider, _ = trio
    body = body.replace(b'"x"', json.dumps(provider.agent_id).encode())
    with api(sb, payer, **{"Content-Type": "application/json"}) as c:
        r = c.post("/escrow", content=body)
    assert r.status_code in (400, 413)
    assert error(r)[1] == "invalid_request"
    assert sb.balance(payer.agent_id) == 50


def test_more_invalid_requests(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        assert error(create(c, payer.agent_id)) == (400, "invalid_request")  # to oneself
        assert error(create(c, provider.agent_id, memo="x" * 1001)) == (400, "invalid_request")
        eid = create(c, provider.agent_id).json()["escrow_id"]
        assert error(c.post(f"/escrow/{eid}/refund", json={"amount": "1"})) == (
            400,
            "invalid_request",
        )
        assert error(c.post("/faucet/claim", json={"agent_casino_id": "x"})) == (
            400,
            "invalid_request",
        )
        r = c.delete(f"/escrow/{eid}")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        assert error(c.get("/faucet/claim"))[0] == 405
        bad_key = c.post(f"/escrow/{eid}/refund", json={}, headers={"Idempotency-Key": "a b"})
        assert error(bad_key) == (400, "invalid_request")
        assert sb.escrow(eid).status == "locked"


def test_oversized_bodies_are_refused_unread(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    body = json.dumps(
        {"to_agent_id": provider.agent_id, "amount": "1.00", "memo": "x" * 70_000}
    ).encode()
    with api(sb, payer) as c:
        r = c.post("/escrow", content=body)
    assert error(r) == (413, "invalid_request")


def test_faucet_already_claimed_is_409(sb: Sandbox) -> None:
    a = sb.add_agent()
    with api(sb, a) as c:
        assert c.post("/faucet/claim").status_code == 200
        assert error(c.post("/faucet/claim", json={})) == (409, "already_claimed")


# -- idempotency -------------------------------------------------------------------------


def test_same_key_same_body_replays_the_first_answer(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        eid = create(c, provider.agent_id).json()["escrow_id"]
        h = {"Idempotency-Key": "rel-1"}
        first = c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"}, headers=h)
        again = c.post(
            f"/escrow/{eid}/release-partial",
            content=b'{ "amount" : "1.00" }',
            headers={**h, "Content-Type": "application/json"},
        )
    assert first.headers["idempotency-supported"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert sb.escrow(eid).released == Decimal(1)


def test_a_replayed_create_makes_one_escrow(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer, **{"Idempotency-Key": "create-1"}) as c:
        a = create(c, provider.agent_id, "3.00")
        b = create(c, provider.agent_id, "3.00")
        assert (a.status_code, b.status_code) == (201, 201)
        assert a.json()["escrow_id"] == b.json()["escrow_id"]
        assert len(c.get("/escrow").json()["escrows"]) == 1
    assert sb.balance(payer.agent_id) == 47


def test_errors_are_replayed_too(sb: Sandbox, trio) -> None:
    _, provider, poor = trio
    with api(sb, poor, **{"Idempotency-Key": "too-much"}) as c:
        first = create(c, provider.agent_id, "6.00")
        sb.fund(poor.agent_id, "10")  # now it could pay, but the key's answer is settled
        again = create(c, provider.agent_id, "6.00")
    assert error(first) == (402, "insufficient_balance")
    assert error(again) == (402, "insufficient_balance")
    assert again.headers["idempotent-replayed"] == "true"


def test_same_key_other_body_is_422(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer) as c:
        eid = create(c, provider.agent_id).json()["escrow_id"]
        h = {"Idempotency-Key": "k"}
        assert (
            c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"}, headers=h).status_code
            == 200
        )
        r = c.post(f"/escrow/{eid}/release-partial", json={"amount": "2.00"}, headers=h)
        assert error(r) == (422, "idempotency_key_reused")
        r = c.post(f"/escrow/{eid}/refund", json={}, headers=h)  # other path, same key
        assert error(r) == (422, "idempotency_key_reused")
    assert sb.escrow(eid).released == Decimal(1)


def test_keys_are_scoped_per_api_key(sb: Sandbox, trio) -> None:
    payer, provider, other = trio
    h = {"Idempotency-Key": "shared"}
    with api(sb, payer) as c:
        a = create(c, provider.agent_id, "1.00", memo="a")
    with api(sb, other) as c:
        b = c.post(
            "/escrow",
            json={"to_agent_id": provider.agent_id, "amount": "1.00", "memo": "a"},
            headers=h,
        )
    with api(sb, payer) as c:
        c2 = c.post(
            "/escrow",
            json={"to_agent_id": provider.agent_id, "amount": "1.00", "memo": "a"},
            headers=h,
        )
    assert b.status_code == 201 and "idempotent-replayed" not in b.headers
    assert c2.status_code == 201 and a.json()["escrow_id"] != c2.json()["escrow_id"]


def test_keys_expire_after_a_day_of_sandbox_time(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer, **{"Idempotency-Key": "daily"}) as c:
        a = create(c, provider.agent_id, "1.00")
        sb.clock.advance(24 * 3600)
        b = create(c, provider.agent_id, "1.00")
    assert a.json()["escrow_id"] != b.json()["escrow_id"]


def test_a_key_still_in_flight_gets_409(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    entered, release = threading.Event(), threading.Event()

    def hold(request: AppRequest) -> None:
        if request.headers.get("idempotency-key") == "slow" and not entered.is_set():
            entered.set()
            assert release.wait(10)

    sb.before_handle = hold
    h = {"Idempotency-Key": "slow"}
    body = {"to_agent_id": provider.agent_id, "amount": "2.00"}
    with ThreadPoolExecutor(1) as pool, api(sb, payer) as c:
        first = pool.submit(c.post, "/escrow", json=body, headers=h)
        assert entered.wait(10)
        second = c.post("/escrow", json=body, headers=h)
        other = c.post("/escrow", json=body, headers={"Idempotency-Key": "fast"})
        release.set()
        first_answer = first.result(10)
        third = c.post("/escrow", json=body, headers=h)
    assert error(second) == (409, "request_in_progress")
    assert other.status_code == 201  # other keys are not held up
    assert first_answer.status_code == 201
    assert third.headers["idempotent-replayed"] == "true"
    assert third.json() == first_answer.json()
    assert sb.balance(payer.agent_id) == 46


def test_without_idempotency_the_same_key_creates_twice() -> None:
    with Sandbox(clock=ManualClock(), honour_idempotency=False) as sb:
        payer, provider = sb.add_agent("10"), sb.add_agent()
        with api(sb, payer, **{"Idempotency-Key": "ignored"}) as c:
            a = create(c, provider.agent_id, "1.00")
            b = create(c, provider.agent_id, "1.00")
        assert "idempotency-supported" not in a.headers
        assert "idempotent-replayed" not in b.headers
        assert a.json()["escrow_id"] != b.json()["escrow_id"]
        assert sb.balance(payer.agent_id) == 8


def test_gets_ignore_idempotency_keys(sb: Sandbox, trio) -> None:
    payer, provider, _ = trio
    with api(sb, payer, **{"Idempotency-Key": "g"}) as c:
        assert c.get("/escrow").json() == {"escrows": []}
        create(c, provider.agent_id, "1.00")
        assert len(c.get("/escrow").json()["escrows"]) == 1


# -- rate limits -------------------------------------------------------------------------


def test_rate_limits_are_fixed_windows_per_path_with_retry_after() -> None:
    clock = ManualClock(start=1_800_000_000)  # on a minute boundary
    limits = {"POST /escrow/{id}/release-partial": 2, "*": 100}
    with Sandbox(clock=clock, rate_limits=limits) as sb:
        payer, provider = sb.add_agent("10"), sb.add_agent()
        with api(sb, payer) as c:
            e1 = create(c, provider.agent_id, "5.00").json()["escrow_id"]
            e2 = create(c, provider.agent_id, "5.00").json()["escrow_id"]
            rel = lambda e: c.post(f"/escrow/{e}/release-partial", json={"amount": "0.01"})  # noqa: E731
            assert [rel(e1).status_code for _ in range(2)] == [200, 200]
            clock.advance(15)
            limited = rel(e1)
            assert error(limited) == (429, "rate_limited")
            assert limited.headers["retry-after"] == "45"
            assert rel(e2).status_code == 200  # another path has its own window
            clock.advance(45)
            assert rel(e1).status_code == 200
        assert sb.escrow(e1).released == Decimal("0.03")


def test_rate_limit_counts_unauthenticated_requests_by_client() -> None:
    with Sandbox(clock=ManualClock(), rate_limits=RateLimits({"*": 1}, window_seconds=10)) as sb:
        with api(sb) as c:
            assert c.get("/escrow").status_code == 401
            r = c.get("/escrow")
        assert error(r) == (429, "rate_limited") and 1 <= int(r.headers["retry-after"]) <= 10


def test_bad_rate_limits_are_refused() -> None:
    from pf_metered.errors import InvalidInput

    for bad in ({"*": 0}, {"*": True}, {"*": 1.5}):
        with pytest.raises(InvalidInput):
            Sandbox(rate_limits=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        RateLimits({"*": 1}, window_seconds=0)


# -- concurrency -------------------------------------------------------------------------


def test_sixteen_threads_releasing_lose_no_update(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("100"), sb.add_agent()
    with api(sb, payer) as c:
        eid = create(c, provider.agent_id, "10.00").json()["escrow_id"]
    barrier = threading.Barrier(16)

    def worker(n: int) -> list[int]:
        statuses = []
        with api(sb, payer) as c:
            barrier.wait()
            for i in range(40):
                r = c.post(
                    f"/escrow/{eid}/release-partial",
                    json={"amount": "0.01"},
                    headers={"Idempotency-Key": f"{n}-{i}"},
                )
                statuses.append(r.status_code)
        return statuses

    with ThreadPoolExecutor(16) as pool:
        results = [s for f in [pool.submit(worker, n) for n in range(16)] for s in f.result()]
    assert results.count(200) == 640
    esc = sb.escrow(eid)
    assert esc.released == Decimal("6.40") and len(esc.releases) == 640
    assert sb.fees() == Decimal("0.064")
    sb.audit()


def test_sixteen_threads_cannot_overdraw(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("5.00"), sb.add_agent()
    barrier = threading.Barrier(16)

    def worker(_: int) -> int:
        with api(sb, payer) as c:
            barrier.wait()
            return create(c, provider.agent_id, "1.00").status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(worker, range(16)))
    assert sorted(codes) == [201] * 5 + [402] * 11
    assert sb.balance(payer.agent_id) == 0
    assert sb.audit().escrowed == Decimal(5)


def test_a_release_racing_a_refund_never_overpays(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("100"), sb.add_agent()
    for _ in range(20):
        with api(sb, payer) as c:
            eid = create(c, provider.agent_id, "1.00").json()["escrow_id"]
        barrier = threading.Barrier(2)

        def go(path: str, body: dict, eid: str = eid) -> int:
            with api(sb, payer) as c:
                barrier.wait()
                return c.post(f"/escrow/{eid}/{path}", json=body).status_code

        with ThreadPoolExecutor(2) as pool:
            a = pool.submit(go, "release-partial", {"amount": "1.00"})
            b = pool.submit(go, "refund", {})
            codes = {a.result(), b.result()}
        assert codes == {200, 409}
        esc = sb.escrow(eid)
        assert esc.released + esc.refunded == Decimal(1)
    sb.audit()


# -- async -------------------------------------------------------------------------------


async def test_async_clients_share_the_same_transport(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("20"), sb.add_agent()
    headers = {"Authorization": f"Bearer {payer.api_key}"}
    async with httpx.AsyncClient(transport=sb.transport(), base_url=BASE, headers=headers) as c:
        r = await c.post("/escrow", json={"to_agent_id": provider.agent_id, "amount": "10.00"})
        eid = r.json()["escrow_id"]
        answers = await asyncio.gather(
            *[
                c.post(
                    f"/escrow/{eid}/release-partial",
                    json={"amount": "0.10"},
                    headers={"Idempotency-Key": f"a{i % 50}"},
                )
                for i in range(100)
            ]
        )
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {200, 409}
        assert codes.count(200) >= 50
        replayed = sum(a.headers.get("idempotent-replayed") == "true" for a in answers)
        assert codes.count(200) == 50 + replayed
        assert (await c.get(f"/escrow/{eid}")).json()["released"] == "5.00"
    # a client closing its transport does not close the sandbox
    with api(sb, payer) as c:
        assert c.get("/escrow").status_code == 200
    sb.audit()


def test_ids_with_a_trailing_newline_are_refused(sb: Sandbox, trio) -> None:
    # re's "$" matches before a final "\n": ids must be checked to the very end
    from pf_metered.errors import InvalidInput

    payer, provider, _ = trio
    with pytest.raises(InvalidInput) as info:
        sb.add_agent(agent_id="agent_x\n")
    assert info.value.field == "agent_id"
    with api(sb, payer) as c:
        r = create(c, provider.agent_id + "\n")
        assert r.status_code in (400, 404) and r.status_code != 201
        eid = create(c, provider.agent_id).json()["escrow_id"]
        r = c.post(f"/escrow/{eid}%0A/release-partial", json={"amount": "1.00"})
        assert r.status_code in (400, 404)
    assert sb.escrow(eid).released_micro == 0


@pytest.mark.parametrize("amount", ["1_0", "١٠", "１０", "+10", " 10 ", "1e3", "10.", ".5"])
def test_money_text_that_is_not_a_plain_ascii_decimal_is_refused(sb: Sandbox, trio, amount) -> None:
    # issue 13 item 10: Decimal() reads all of these as ten (or a thousand)
    payer, provider, _ = trio
    with api(sb, payer) as c:
        r = create(c, provider.agent_id, amount)
        assert error(r) == (400, "invalid_amount")
        assert "amount" in r.json()["message"]
        deployed = c.post(
            "http://localhost/deployed/escrow/create",
            json={"amount_usd": amount, "counterparty_agent_id": provider.agent_id},
        )
        assert error(deployed) == (400, "invalid_amount")
        assert "amount_usd" in deployed.json()["message"]
    assert sb.balance(payer.agent_id) == 50


def test_a_callers_trapping_decimal_context_does_not_break_the_deployed_sandbox(sb, trio):
    # issue 13 item 5: the in-process sandbox runs in the caller's thread and context
    import decimal

    payer, provider, _ = trio
    with api(sb, payer) as c, decimal.localcontext() as ctx:
        ctx.prec = 6
        ctx.traps[decimal.Rounded] = True
        r = c.post(
            "http://localhost/deployed/escrow/create",
            json={
                "amount_usd": "2.5",
                "description": "job",  # the service requires 3 characters at least
                "counterparty_agent_id": provider.agent_id,
            },
        )
    assert r.status_code == 201, r.text
