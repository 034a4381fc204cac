"""The deployed services' recorded answers, held against the sandbox *and* the client.

Why both: the sandbox and the client were once written from one reading of the service and
agreed with each other while both disagreed with it (every release refused after the server
had applied it). ``fixtures/deployed_answers.json`` is what the service itself answered; here

* the sandbox's deployed apps must answer every recorded exchange with the same status, the
  same fields in the same order, the same JSON types and the same constants; and
* the client, driven over httpx's ``MockTransport`` replaying those recorded answers byte for
  byte, must decode each one into the right result or error — so a shape the client cannot
  read fails here even if the sandbox were wrong in the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DeployedWorld

from pf_metered.client import EscrowClient
from pf_metered.client import deployed as D
from pf_metered.errors import (
    APIError,
    AuthError,
    Conflict,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
)

FIXTURES = json.loads((Path(__file__).parent / "fixtures" / "deployed_answers.json").read_text())
ANSWERS: dict[str, dict[str, Any]] = FIXTURES["answers"]
ESCROW = "http://localhost/deployed"
CASINO = "http://localhost/casino"
FAUCET = "http://localhost/faucet"


def recorded(name: str) -> dict[str, Any]:
    """The recorded body, its ``_info`` placeholder replaced by the service's object."""
    body = dict(ANSWERS[name]["body"])
    body["_info"] = FIXTURES["info"][body["_info"]]
    return body


def shape(value: Any) -> Any:
    """A JSON value's shape: objects keep their keys *in order*, lists their first item."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return type(value).__name__


# -- the sandbox answers as the service did ----------------------------------------------


class Services:
    """One sandbox on a frozen clock, raw HTTP to its deployed apps, and the agents."""

    def __init__(self) -> None:
        self.world = DeployedWorld(balance="10")
        self.http = httpx.Client(transport=self.world.sandbox.transport())
        self.payer, self.provider = self.world.payer, self.world.provider
        self.answers: dict[str, httpx.Response] = {}

    def auth(self, agent: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {agent.api_key}"}

    def post(self, path: str, body: Any = None, *, agent: Any = None, **headers: str) -> Any:
        hdrs = {**(self.auth(agent) if agent else {}), **headers}
        return self.http.post(ESCROW + path, json=body if body is not None else {}, headers=hdrs)

    def create(self, **over: Any) -> httpx.Response:
        body = {
            "amount_usd": 2.5,
            "description": "contract test",
            "counterparty_agent_id": self.provider.agent_id,
            "timeout_hours": 2,
            **over,
        }
        return self.post("/escrow/create", body, agent=self.payer)

    def run(self) -> dict[str, httpx.Response]:
        a = self.answers
        world = self.world
        a["create_insufficient"] = self.create(amount_usd=5000)  # while the balance is 10.00
        first = a["create"] = self.create(description="contract test [idem:pfm_x]")
        eid = first.json()["escrow_id"]
        a["create_clamped"] = self.create(timeout_hours=9999, amount_usd=0.5)
        a["create_floored"] = self.create(timeout_hours=0.5, amount_usd=0.5)
        a["get_party"] = self.http.get(f"{ESCROW}/escrow/{eid}", headers=self.auth(self.payer))
        a["get_public"] = self.http.get(f"{ESCROW}/escrow/{eid}")
        a["release_unauthorized"] = self.post(f"/escrow/release/{eid}")
        a["release_forbidden"] = self.post(f"/escrow/release/{eid}", agent=self.provider)
        a["complete_forbidden"] = self.post(f"/escrow/complete/{eid}", agent=self.payer)
        world.clock.advance(1)
        a["complete"] = self.post(f"/escrow/complete/{eid}", agent=self.provider)
        world.clock.advance(1)
        a["release"] = self.post(f"/escrow/release/{eid}", agent=self.payer)
        a["release_again"] = self.post(f"/escrow/release/{eid}", agent=self.payer)
        a["get_released"] = self.http.get(f"{ESCROW}/escrow/{eid}", headers=self.auth(self.payer))
        other = self.create(amount_usd=0.5).json()["escrow_id"]
        a["dispute"] = self.post(
            f"/escrow/dispute/{other}", {"reason": "late"}, agent=self.provider
        )
        expiring = self.create(amount_usd=0.5, timeout_hours=1).json()["escrow_id"]
        a["create_unauthorized"] = self.post("/escrow/create", {"amount_usd": 1})
        a["create_under_minimum"] = self.create(amount_usd=0.05)
        a["create_no_description"] = self.create(description="ab")
        a["create_bad_counterparty"] = self.create(counterparty_agent_id="agent_x")
        a["create_self"] = self.create(counterparty_agent_id=self.payer.agent_id)
        a["create_unknown_counterparty"] = self.create(counterparty_agent_id="ag_000000000000")
        a["release_unknown"] = self.post("/escrow/release/esc_unknown", agent=self.payer)
        a["dispute_unknown"] = self.post("/escrow/dispute/esc_unknown", agent=self.payer)
        a["get_unknown"] = self.http.get(f"{ESCROW}/escrow/esc_unknown")
        a["no_such_route"] = self.http.get(f"{ESCROW}/api/v1/escrow/esc_unknown")
        # 12 creates so far in this window (refused ones count): 8 more, then the 21st is refused
        for _ in range(8):
            assert self.create(amount_usd=0.05).status_code == 400
        a["create_rate_limited"] = self.create(amount_usd=0.05)
        for _ in range(10):
            self.post(f"/escrow/dispute/{other}", agent=self.provider)
        a["dispute_rate_limited"] = self.post(f"/escrow/dispute/{other}", agent=self.provider)
        world.clock.advance(3600)
        a["get_refunded"] = self.http.get(
            f"{ESCROW}/escrow/{expiring}", headers=self.auth(self.payer)
        )
        # casino and faucet
        a["register"] = self.http.post(f"{CASINO}/api/v1/auth/register", json={})
        for _ in range(9):
            self.http.post(f"{CASINO}/api/v1/auth/register", json={})
        a["register_rate_limited"] = self.http.post(f"{CASINO}/api/v1/auth/register", json={})
        fresh = world.sandbox.add_agent()
        a["faucet_claim"] = self.claim(fresh.agent_id, "10.0.0.1")
        a["faucet_address_cooldown"] = self.claim(world.sandbox.add_agent().agent_id, "10.0.0.1")
        a["faucet_already_claimed"] = self.claim(a["register"].json()["agent_id"], "10.0.0.2")
        for _ in range(5):
            self.claim("not-an-agent", "10.0.0.3")
        a["faucet_rate_limited"] = self.claim(fresh.agent_id, "10.0.0.3")
        return a

    def claim(self, agent_id: str, address: str) -> httpx.Response:
        return self.http.post(
            f"{FAUCET}/faucet/claim",
            json={"agent_casino_id": agent_id},
            headers={"X-Forwarded-For": address},
        )

    def close(self) -> None:
        self.http.close()
        self.world.close()


@pytest.fixture(scope="module")
def sandbox_answers() -> Iterator[dict[str, httpx.Response]]:
    services = Services()
    try:
        yield services.run()
    finally:
        services.close()


def test_every_recorded_answer_is_exercised(sandbox_answers):
    assert set(sandbox_answers) == set(ANSWERS)


@pytest.mark.parametrize("name", sorted(ANSWERS))
def test_the_sandbox_answers_as_the_service_did(name, sandbox_answers):
    want, got = ANSWERS[name], sandbox_answers[name]
    body = got.json()
    assert got.status_code == want["status"], body
    assert shape(body) == shape(recorded(name)), name
    for field in want["exact"]:
        assert body[field] == recorded(name)[field], field
    assert body["_info"] == recorded(name)["_info"]
    assert "retry-after" not in got.headers


def test_sandbox_money_figures_are_exact_six_place_numbers(sandbox_answers):
    """The service rounds each figure with toFixed(6): no float tails in its answers."""
    for name in ("create", "get_party", "release"):
        text = sandbox_answers[name].text
        assert "0000000" not in text and "9999999" not in text, name


# -- the client decodes the recorded answers ---------------------------------------------


def replay(script: dict[tuple[str, str], tuple[int, dict[str, Any]]]) -> httpx.MockTransport:
    """A transport answering each (method, path) with a recorded answer, byte for byte as
    the service sent it (compact JSON, no Retry-After)."""

    def handler(request: httpx.Request) -> httpx.Response:
        status, body = script[(request.method, request.url.path)]
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
        return httpx.Response(
            status, content=text.encode(), headers={"content-type": "application/json"}
        )

    return httpx.MockTransport(handler)


EID = "esc_0123456789abcdef"


def client_over(script: dict[tuple[str, str], tuple[int, dict[str, Any]]]) -> EscrowClient:
    return EscrowClient(
        "sk_live_contract",
        base_url="http://127.0.0.1:3007",
        dialect="deployed",
        transport=replay(script),
        rate_limits=False,
        max_retries=0,
    )


def test_the_client_decodes_the_create_answer():
    c = client_over({("POST", "/escrow/create"): (201, recorded("create"))})
    esc = c.create_escrow("ag_bbbbbbbbbbbb", "2.5", memo="contract test")
    assert esc.escrow_id == EID and esc.status == "locked"
    assert esc.amount == Decimal("2.5") and esc.commission == Decimal("0.025")
    assert esc.net_to_counterparty == Decimal("2.475") and esc.from_agent_id == "ag_aaaaaaaaaaaa"
    assert esc.nonce == "pfm_x" and esc.timeout_hours == 2


@pytest.mark.parametrize("name", ["get_party", "get_public", "get_released", "get_refunded"])
def test_the_client_decodes_every_read(name):
    c = client_over({("GET", f"/escrow/{EID}"): (200, recorded(name))})
    esc = c.get_escrow(EID)
    body = recorded(name)
    assert esc.deployed_status == body["status"]
    assert esc.amount_micro == 2_500_000 and esc.commission_micro == 25_000
    assert len(esc.events) == len(body.get("events", []))
    assert esc.released_micro + esc.remaining_micro + esc.refunded_micro == esc.amount_micro


def test_the_client_believes_a_release_once_the_escrow_agrees():
    c = client_over(
        {
            ("POST", f"/escrow/release/{EID}"): (200, recorded("release")),
            ("GET", f"/escrow/{EID}"): (200, recorded("get_released")),
        }
    )
    esc = c.release(EID)
    assert esc.status == "released" and esc.released == Decimal("2.5")
    assert esc.net_to_counterparty == Decimal("2.475") and esc.commission == Decimal("0.025")
    assert [e.event for e in esc.events] == ["created", "completed", "released"]


def test_a_release_the_server_applied_never_surfaces_as_an_error_when_the_read_fails():
    c = client_over(
        {
            ("POST", f"/escrow/release/{EID}"): (200, recorded("release")),
            ("GET", f"/escrow/{EID}"): (500, {"error": "internal_error"}),
        }
    )
    esc = c.release(EID)
    assert esc.status == "released" and esc.amount == Decimal("2.5")  # 2.475 + 0.025
    assert esc.net_to_counterparty == Decimal("2.475")


@pytest.mark.parametrize(
    ("action", "name", "after"),
    [("complete", "complete", "completed"), ("dispute", "dispute", "disputed")],
)
def test_the_client_decodes_complete_and_dispute(action, name, after):
    read = dict(recorded("get_party"), status=after)
    c = client_over(
        {
            ("POST", f"/escrow/{action}/{EID}"): (200, recorded(name)),
            ("GET", f"/escrow/{EID}"): (200, read),
        }
    )
    esc = c.complete(EID) if action == "complete" else c.dispute(EID, "late")
    assert esc.deployed_status == after and esc.escrow_id == EID


ERRORS: list[tuple[str, str, type[APIError]]] = [
    ("create_unauthorized", "POST /escrow/create", AuthError),
    ("create_under_minimum", "POST /escrow/create", InvalidRequest),
    ("create_no_description", "POST /escrow/create", InvalidRequest),
    ("create_bad_counterparty", "POST /escrow/create", InvalidRequest),
    ("create_self", "POST /escrow/create", InvalidRequest),
    ("create_unknown_counterparty", "POST /escrow/create", NotFound),
    ("create_insufficient", "POST /escrow/create", InsufficientFunds),
    ("create_rate_limited", "POST /escrow/create", RateLimited),
    ("release_forbidden", f"POST /escrow/release/{EID}", PermissionDenied),
    ("release_again", f"POST /escrow/release/{EID}", Conflict),
    ("release_unknown", f"POST /escrow/release/{EID}", NotFound),
    ("release_unauthorized", f"POST /escrow/release/{EID}", AuthError),
    ("complete_forbidden", f"POST /escrow/complete/{EID}", PermissionDenied),
    ("dispute_unknown", f"POST /escrow/dispute/{EID}", NotFound),
    ("dispute_rate_limited", f"POST /escrow/dispute/{EID}", RateLimited),
    ("get_unknown", f"GET /escrow/{EID}", NotFound),
]


def _call(c: EscrowClient, route: str) -> Callable[[], Any]:
    if route == "POST /escrow/create":
        return lambda: c.create_escrow("ag_bbbbbbbbbbbb", "2.5", memo="contract test")
    if "/release/" in route:
        return lambda: c.release(EID)
    if "/complete/" in route:
        return lambda: c.complete(EID)
    if "/dispute/" in route:
        return lambda: c.dispute(EID, "late")
    return lambda: c.get_escrow(EID)


@pytest.mark.parametrize(("name", "route", "cls"), ERRORS)
def test_the_client_maps_every_recorded_refusal(name, route, cls):
    method, path = route.split(" ", 1)
    c = client_over({(method, path): (ANSWERS[name]["status"], recorded(name))})
    with pytest.raises(cls) as info:
        _call(c, route)()
    assert info.value.code == recorded(name)["error"]
    assert info.value.status == ANSWERS[name]["status"]
    if isinstance(info.value, RateLimited):
        assert info.value.retry_after is None  # the service sends none


def test_the_client_decodes_registration_and_the_faucet():
    reg = D.DEPLOYED.parse_registration(recorded("register"))
    assert reg.agent_id == "ag_cccccccccccc"
    assert "sk_live_" not in repr(reg)
    claim = D.DEPLOYED.parse_faucet_claim(recorded("faucet_claim"))
    assert claim.credited == Decimal("1") and claim.agent_id == "ag_cccccccccccc"


# -- and the client against the sandbox, the same flow -----------------------------------


def test_the_client_runs_the_recorded_flow_against_the_sandbox(deployed: DeployedWorld):
    payer = deployed.client()
    provider = deployed.sandbox.client(
        deployed.provider.api_key, transport=deployed.sandbox.transport(), rate_limits=False
    )
    esc = payer.create_escrow(deployed.provider.agent_id, "2.5", memo="contract test")
    assert esc.timeout_hours == 24 and esc.deployed_status == "funded"
    assert provider.complete(esc.escrow_id).deployed_status == "completed"
    done = payer.release(esc.escrow_id)
    assert done.status == "released" and done.amount == Decimal("2.5")
    assert [e.event for e in done.events] == ["created", "completed", "released"]
    assert deployed.balance("provider") == Decimal("2.475")
    disputed = payer.create_escrow(deployed.provider.agent_id, "0.5")
    assert provider.dispute(disputed.escrow_id, "late").deployed_status == "disputed"
    provider.close()
    deployed.sandbox.audit()
