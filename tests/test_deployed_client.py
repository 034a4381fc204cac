"""The deployed dialect: wire parsing (float money as Decimal), the sandbox serving it, account
bootstrap, lost answers settled by reading back, and 429 storms met by client-side pacing."""

from __future__ import annotations

import logging
import re
from decimal import Decimal

import httpx
import pytest
from conftest import DeployedWorld, LoseAnswers

from pf_metered.client import AsyncEscrowClient, EscrowClient
from pf_metered.client import deployed as D
from pf_metered.client._dialects import default_dialect_for
from pf_metered.errors import (
    AmbiguousCreate,
    AuthError,
    Conflict,
    InsufficientFunds,
    InvalidInput,
    InvalidResponse,
    NotFound,
    PermissionDenied,
    RateLimited,
    UnsupportedByDialect,
)
from pf_metered.sandbox import Sandbox

# -- wire -----------------------------------------------------------------------------------


def wire(**over):
    base = {
        "escrow_id": "esc_1",
        "status": "funded",
        "amount_usd": 43.4310,
        "commission_usd": 0.43431000000000003,
        "net_to_counterparty": 42.99668999999999,
        "counterparty_agent_id": "agent_b",
        "creator_agent_id": "agent_a",
        "description": "work [idem:pfm_abc]",
        "timeout_hours": 24,
    }
    base.update(over)
    return base


def parse(obj) -> D.DeployedEscrow:
    import json

    return D.DEPLOYED.parse_escrow(D.decode_json(json.dumps(obj)))


def test_float_money_parsed_from_the_text_and_rounded_to_the_micro():
    esc = parse(wire())
    assert esc.net_to_counterparty == Decimal("42.996690")
    assert esc.amount == Decimal("43.431") and esc.commission == Decimal("0.43431")
    assert esc.status == "locked" and esc.deployed_status == "funded"
    assert esc.released == 0 and esc.remaining == esc.amount
    assert esc.nonce == "pfm_abc" and esc.to_agent_id == "agent_b"
    assert "99999" not in repr(esc)


def test_decode_keeps_json_numbers_exact():
    data = D.decode_json(b'{"a": 42.99669999999999, "b": 2, "c": "2.5"}')
    assert data["a"] == Decimal("42.99669999999999") and data["b"] == 2
    assert D.wire_money_micro(data["a"]) == 42_996_700
    assert D.wire_money_micro(data["b"]) == 2_000_000
    assert D.wire_money_micro(data["c"]) == 2_500_000
    for bad in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1, "a": 2}', b"not json"):
        with pytest.raises(InvalidResponse):
            D.decode_json(bad)


@pytest.mark.parametrize("bad", [0.5, True, None, "abc", -1, "1e400", [1]])
def test_wire_money_refuses_floats_and_junk(bad):
    with pytest.raises(InvalidResponse):
        D.wire_money_micro(bad)


@pytest.mark.parametrize(
    ("status", "neutral", "released", "refunded"),
    [
        ("funded", "locked", 0, 0),
        ("completed", "completed", 0, 0),
        ("disputed", "disputed", 0, 0),
        ("released", "released", 1, 0),
        ("refunded", "refunded", 0, 1),
    ],
)
def test_status_mapping(status, neutral, released, refunded):
    esc = parse(wire(status=status, amount_usd=2, commission_usd=0.02, net_to_counterparty=1.98))
    assert esc.status == neutral
    assert esc.released == 2 * released and esc.refunded == 2 * refunded
    assert esc.released + esc.remaining + esc.refunded == esc.amount
    if status == "refunded":
        assert esc.returned_to_creator_micro == 1_980_000


@pytest.mark.parametrize(
    "over",
    [
        {"status": "locked"},
        {"amount_usd": "x"},
        {"commission_usd": 0.5},
        {"net_to_counterparty": 40},
        {"amount_usd": 43.431, "escrow_id": "bad id!"},
    ],
)
def test_inconsistent_or_unknown_answers_refused(over):
    with pytest.raises(InvalidResponse):
        parse(wire(**over))


def test_requests_carry_exact_number_literals():
    spec = D.DEPLOYED.create_escrow(
        to_agent_id="agent_b",
        amount_micro=43_431_000,
        memo="m [idem:k]",
        auto_release_hours=None,
        idempotency_key="k",
    )
    assert spec.path == "/escrow/create"
    assert b'"amount_usd":43.431' in spec.body and b'"timeout_hours":24' in spec.body
    assert b'"description":"m [idem:k]"' in spec.body
    with pytest.raises(InvalidInput):
        D.DEPLOYED.create_escrow(
            to_agent_id="b",
            amount_micro=99_999,
            memo="",
            auto_release_hours=None,
            idempotency_key="k",
        )
    with pytest.raises(UnsupportedByDialect):
        D.DEPLOYED.release_partial(escrow_id="e", amount_micro=1, memo="", idempotency_key="k")
    with pytest.raises(UnsupportedByDialect):
        D.DEPLOYED.refund(escrow_id="e", idempotency_key="k")
    with pytest.raises(UnsupportedByDialect):
        D.DEPLOYED.list_escrows()


@pytest.mark.parametrize(
    ("url", "dialect"),
    [
        ("https://escrow.purpleflea.com", "deployed"),
        ("https://escrow.purpleflea.com/", "deployed"),
        ("https://escrow.purpleflea.com/api/v1", "v1"),
        ("http://127.0.0.1:8765/api/v1", "v1"),
        ("http://localhost/deployed", "deployed"),
        ("https://example.com/x", "v1"),
    ],
)
def test_default_dialect_per_base_url(url, dialect):
    assert default_dialect_for(url) == dialect
    with EscrowClient("pf_test_x", base_url=url) as c:
        assert c.capabilities.dialect == dialect
        assert c.capabilities.supports_partial_release is (dialect == "v1")
        if dialect == "deployed":
            assert c.capabilities.honours_idempotency is False


def test_dialect_must_be_known():
    with pytest.raises(InvalidInput):
        EscrowClient("pf_test_x", base_url="https://x.example", dialect="v2")


# -- the sandbox serving it ---------------------------------------------------------------


def test_lifecycle_on_the_sandbox(deployed: DeployedWorld):
    c = deployed.client()
    esc = c.create_escrow(deployed.provider.agent_id, "43.431", memo="job")
    assert esc.status == "locked" and esc.commission == Decimal("0.43431")
    assert esc.memo.startswith("job [idem:")
    with pytest.raises(UnsupportedByDialect):
        c.release_partial(esc.escrow_id, "1.00")
    done = c.release(esc.escrow_id)
    assert done.status == "released" and done.released == Decimal("43.431")
    assert deployed.balance("provider") == Decimal("42.99669")
    with pytest.raises(Conflict) as info:
        c.release(esc.escrow_id)
    assert info.value.code == "invalid_status"
    deployed.sandbox.audit()


def test_raw_answers_are_six_place_numbers_without_retry_after(deployed: DeployedWorld):
    c = deployed.client()
    esc = c.create_escrow(deployed.provider.agent_id, "10.03")
    assert esc.net_to_counterparty == Decimal("9.9297")
    http = httpx.Client(transport=deployed.sandbox.transport())
    r = http.get(f"http://localhost/deployed/escrow/{esc.escrow_id}")  # no key needed
    assert r.status_code == 200 and "events" not in r.json()  # only parties see the events
    assert '"net_to_counterparty":9.9297,' in r.text  # toFixed(6) on the service: no tail
    assert '"amount_usd":10.03' in r.text and '"status":"funded"' in r.text
    created = http.post(
        "http://localhost/deployed/escrow/create",
        headers={"Authorization": f"Bearer {deployed.payer.api_key}", "Idempotency-Key": "same"},
        json={
            "amount_usd": "2.5",
            "description": "job",
            "counterparty_agent_id": deployed.provider.agent_id,
        },
    )
    again = http.post(
        "http://localhost/deployed/escrow/create",
        headers={"Authorization": f"Bearer {deployed.payer.api_key}", "Idempotency-Key": "same"},
        json={
            "amount_usd": "2.5",
            "description": "job",
            "counterparty_agent_id": deployed.provider.agent_id,
        },
    )
    assert created.status_code == again.status_code == 201
    assert created.json()["escrow_id"] != again.json()["escrow_id"]  # key ignored
    assert created.json()["amount_usd"] == 2.5
    assert "idempotent-replayed" not in again.headers
    reads = [http.get(f"http://localhost/deployed/escrow/{esc.escrow_id}") for _ in range(40)]
    assert {r.status_code for r in reads} == {200}  # reads are not rate limited
    creates = [http.post("http://localhost/deployed/escrow/create", json={}) for _ in range(18)]
    assert [r.status_code for r in creates] == [401] * 17 + [429]  # 3 + 17 counted, then 429
    assert creates[-1].json()["error"] == "rate_limited"
    assert "retry-after" not in creates[-1].headers
    http.close()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"amount_usd": 0.09}, 400, "invalid_amount"),
        ({"amount_usd": 1.0000001}, 400, "invalid_amount"),
        ({"amount_usd": 5000}, 402, "insufficient_balance"),
        ({"amount_usd": 1, "counterparty_agent_id": "nobody"}, 400, "invalid_counterparty"),
        (
            {"amount_usd": 1, "counterparty_agent_id": "ag_000000000000"},
            404,
            "counterparty_not_found",
        ),
        ({"amount_usd": 1, "description": "ab"}, 400, "invalid_description"),
    ],
)
def test_refusals_use_the_services_codes(body, status, code):
    world = DeployedWorld(balance="10")
    try:
        body = {"counterparty_agent_id": world.provider.agent_id, "description": "job", **body}
        http = httpx.Client(transport=world.sandbox.transport())
        r = http.post(
            "http://localhost/deployed/escrow/create",
            json=body,
            headers={"Authorization": f"Bearer {world.payer.api_key}"},
        )
        assert (r.status_code, r.json()["error"]) == (status, code)
        assert {"error", "message", "_info"} <= set(r.json())
        http.close()
    finally:
        world.close()


def test_complete_dispute_and_permissions(deployed: DeployedWorld):
    payer = deployed.client()
    provider = deployed.sandbox.client(
        deployed.provider.api_key, transport=deployed.sandbox.transport(), rate_limits=False
    )
    esc = payer.create_escrow(deployed.provider.agent_id, "1.00")
    with pytest.raises(PermissionDenied):
        payer.complete(esc.escrow_id)
    with pytest.raises(PermissionDenied):
        provider.release(esc.escrow_id)
    assert provider.complete(esc.escrow_id).status == "completed"
    assert payer.release(esc.escrow_id).status == "released"  # creator releases a completed one
    other = payer.create_escrow(deployed.provider.agent_id, "1.00")
    assert provider.dispute(other.escrow_id, "late").status == "disputed"
    with pytest.raises(Conflict):
        payer.release(other.escrow_id)
    deployed.clock.advance(48 * 3600)
    assert payer.get_escrow(other.escrow_id).status == "disputed"  # stays locked
    with pytest.raises(NotFound):
        payer.get_escrow("esc_nope")
    with pytest.raises(UnsupportedByDialect):
        payer.refund(other.escrow_id)
    provider.close()
    deployed.sandbox.audit()


def test_timeout_hands_back_less_one_percent(deployed: DeployedWorld):
    c = deployed.client()
    before = deployed.balance()
    esc = c.create_escrow(deployed.provider.agent_id, "2.00", auto_release_hours=1)
    deployed.clock.advance(3599)
    assert c.get_escrow(esc.escrow_id).status == "locked"
    deployed.clock.advance(1)
    back = c.get_escrow(esc.escrow_id)
    assert back.status == "refunded" and back.returned_to_creator_micro == 1_980_000
    assert deployed.balance() == before - Decimal("0.02")
    assert deployed.sandbox.fees() == Decimal("0.02")
    deployed.sandbox.audit()


def test_auth_and_insufficient_funds(deployed: DeployedWorld):
    bad = deployed.sandbox.client(
        "pf_test_wrongwrongwrong", transport=deployed.sandbox.transport(), rate_limits=False
    )
    with pytest.raises(AuthError):
        bad.create_escrow(deployed.provider.agent_id, "1.00")
    with pytest.raises(NotFound):
        bad.get_escrow("esc_1")  # reads need no key: an unknown id is simply not found
    bad.close()
    with pytest.raises(InsufficientFunds):
        deployed.client().create_escrow(deployed.provider.agent_id, "5000")
    with pytest.raises(InvalidInput):
        deployed.client().create_escrow(deployed.provider.agent_id, "0.05")


def test_one_sandbox_serves_both_dialects():
    with Sandbox() as sb:
        a, b = sb.add_agent(balance="10"), sb.add_agent()
        v1 = sb.client(a.api_key)
        dep = sb.client(a.api_key, dialect="deployed")
        e1 = v1.create_escrow(b.agent_id, "1.00")
        e2 = dep.create_escrow(b.agent_id, "1.00")
        assert v1.capabilities.dialect == "v1" and dep.capabilities.dialect == "deployed"
        assert v1.release(e1.escrow_id).status == "released"  # whole release on v1 too
        assert dep.release(e2.escrow_id).status == "released"
        assert sb.balance(b.agent_id) == Decimal("1.98")
        sb.audit()
        v1.close()
        dep.close()


# -- account bootstrap ----------------------------------------------------------------------


def test_register_credits_the_grant_then_the_faucet_refuses_it(deployed: DeployedWorld):
    t = deployed.sandbox.transport()
    reg = D.register(base_url="http://localhost/casino", transport=t)
    assert reg.agent_id.startswith("ag_") and "pf_test_" not in repr(reg)
    key = reg.api_key.get_secret_value()
    assert deployed.sandbox.balance(reg.agent_id) == Decimal("1")  # the casino claimed it
    with pytest.raises(Conflict) as info:
        D.claim_faucet(reg.agent_id, base_url="http://localhost/faucet", transport=t)
    assert info.value.code == "already_claimed"
    assert deployed.sandbox.balance(reg.agent_id) == Decimal("1")
    with deployed.sandbox.client(key, rate_limits=False) as c:
        esc = c.create_escrow(deployed.provider.agent_id, "0.10")
        assert esc.amount == Decimal("0.1")
    with pytest.raises(InvalidInput):
        D.claim_faucet("bad id!", base_url="http://localhost/faucet", transport=t)


def test_the_faucet_pays_once_per_address_a_day_and_is_never_retried(deployed: DeployedWorld):
    t = deployed.sandbox.transport()
    first, second = deployed.sandbox.add_agent(), deployed.sandbox.add_agent()
    claim = D.claim_faucet(first.agent_id, base_url="http://localhost/faucet", transport=t)
    assert claim.credited == Decimal("1") and claim.agent_id == first.agent_id
    sleeps: list[float] = []
    with pytest.raises(RateLimited) as info:
        D.claim_faucet(
            second.agent_id, base_url="http://localhost/faucet", transport=t, _sleep=sleeps.append
        )
    assert info.value.code == "ip_rate_limited" and sleeps == []  # refused once, not retried
    assert "try again in ~24h" in str(info.value).lower()
    assert deployed.sandbox.balance(second.agent_id) == 0


async def test_async_bootstrap(deployed: DeployedWorld):
    t = deployed.sandbox.transport()
    reg = await D.aregister(base_url="http://localhost/casino", transport=t)
    assert deployed.sandbox.balance(reg.agent_id) == 1
    other = deployed.sandbox.add_agent()
    claim = await D.aclaim_faucet(other.agent_id, base_url="http://localhost/faucet", transport=t)
    assert claim.credited == 1


def test_lost_faucet_answer_then_already_claimed_is_ambiguous_not_double(deployed):
    from pf_metered.errors import AmbiguousOutcome

    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/faucet/claim"): 1})
    reg = D.register(base_url="http://localhost/casino", transport=t)
    with pytest.raises(AmbiguousOutcome):
        D.claim_faucet(
            reg.agent_id, base_url="http://localhost/faucet", transport=t, _sleep=lambda s: None
        )
    assert deployed.sandbox.balance(reg.agent_id) == Decimal("1")


def test_lost_registration_answer_is_not_resent(deployed: DeployedWorld):
    from pf_metered.errors import AmbiguousOutcome

    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/auth/register"): 1})
    before = len(deployed.sandbox.agent_ids())
    with pytest.raises(AmbiguousOutcome):
        D.register(base_url="http://localhost/casino", transport=t)
    assert len(deployed.sandbox.agent_ids()) == before + 1
    assert t.seen.count(("POST", "/casino/api/v1/auth/register")) == 1


# -- lost answers ---------------------------------------------------------------------------


def escrow_count(world: DeployedWorld) -> int:
    with world.sandbox._db.transaction() as conn:
        return int(conn.execute("SELECT COUNT(*) FROM deployed_escrows").fetchone()[0])


def test_lost_create_without_listing_is_ambiguous_and_never_resent(deployed):
    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/escrow/create"): 1})
    c = deployed.client(transport=t)
    with pytest.raises(AmbiguousCreate) as info:
        c.create_escrow(deployed.provider.agent_id, "3.00", memo="job")
    assert info.value.idempotency_key
    assert info.value.known.get("amount") == Decimal("3.00")
    assert info.value.known.get("to_agent_id") == deployed.provider.agent_id
    assert escrow_count(deployed) == 1
    assert t.seen.count(("POST", "/deployed/escrow/create")) == 1


def test_lost_create_with_listing_is_reconciled_by_its_nonce():
    world = DeployedWorld(deployed_list_path="/escrows")
    try:
        t = LoseAnswers(world.sandbox.transport(), {("POST", "/escrow/create"): 1})
        c = world.client(transport=t, dialect=D.DeployedDialect(list_path="/escrows"))
        esc = c.create_escrow(world.provider.agent_id, "3.00", memo="job")
        assert esc.amount == 3 and escrow_count(world) == 1
        assert esc.nonce and esc.memo.endswith(f"[idem:{esc.nonce}]")
        # lost before reaching the server? then it is sent again, once
        t2 = LoseAnswers(world.sandbox.transport())
        c2 = world.client(transport=t2, dialect=D.DeployedDialect(list_path="/escrows"))
        assert len(c2.list_escrows()) == 1
    finally:
        world.close()


@pytest.mark.parametrize("times", [1, 2])
def test_lost_release_is_read_back_not_resent(deployed, times):
    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/escrow/release/"): times})
    c = deployed.client(transport=t)
    esc = c.create_escrow(deployed.provider.agent_id, "2.00")
    done = c.release(esc.escrow_id)
    assert done.status == "released"
    assert t.seen.count(("POST", f"/deployed/escrow/release/{esc.escrow_id}")) == 1
    assert deployed.balance("provider") == Decimal("1.98")


def test_release_lost_before_reaching_the_server_is_resent(deployed):
    class DropFirst(LoseAnswers):
        def handle_request(self, request):
            if request.method == "POST" and "/release/" in request.url.path and not self.lost:
                self.lost.append(("POST", request.url.path))
                raise httpx.ReadTimeout("lost on the way (test)", request=request)
            return self.inner.handle_request(request)

    t = DropFirst(deployed.sandbox.transport())
    c = deployed.client(transport=t)
    esc = c.create_escrow(deployed.provider.agent_id, "2.00")
    assert c.release(esc.escrow_id).status == "released"
    assert deployed.balance("provider") == Decimal("1.98")


# -- 429 storms -----------------------------------------------------------------------------


def test_pacing_uses_the_servers_whole_limit_and_says_why_it_waits(deployed, caplog):
    c = deployed.client()
    with caplog.at_level(logging.INFO, logger="pf_metered.client"):
        made = [c.create_escrow(deployed.provider.agent_id, "0.10") for _ in range(41)]
    assert len(made) == 41
    assert c._limiter.drawn_429 == 0
    elapsed = deployed.now() - 1_767_225_600
    assert 120 < elapsed < 122  # 20 a window (60.5 s guarded): 41 creates open a third one
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert len(waits) == 2 and "POST /escrow/create" in waits[0]
    assert "20 of these a minute" in waits[0]


def test_without_the_bucket_a_storm_draws_429s_and_backs_off(deployed):
    c = deployed.client(rate_limits=False, max_retries=0)
    got = []
    for _ in range(22):
        try:
            c.create_escrow(deployed.provider.agent_id, "0.10")
            got.append("ok")
        except RateLimited as exc:
            assert exc.retry_after is None and exc.code == "rate_limited"
            got.append("429")
    assert got.count("ok") == 20 and got.count("429") == 2


def test_a_429_drawn_anyway_slows_the_path_and_succeeds(deployed):
    # Another process shares the address: the server's window is already nearly full.
    http = httpx.Client(transport=deployed.sandbox.transport())
    for _ in range(20):
        http.post("http://localhost/deployed/escrow/create", json={})
    http.close()
    c = deployed.client(max_retries=5)
    esc = c.create_escrow(deployed.provider.agent_id, "0.10")
    assert esc.amount == Decimal("0.1")
    assert c._limiter.drawn_429 >= 1
    assert sum(deployed.sleeps) >= 1.0  # it waited for the window instead of hammering
    assert escrow_count(deployed) == 1


async def test_async_client_on_the_deployed_sandbox(deployed):
    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/escrow/release/"): 1})
    c = deployed.aclient(transport=t)
    assert isinstance(c, AsyncEscrowClient)
    esc = await c.create_escrow(deployed.provider.agent_id, "2.00")
    done = await c.release(esc.escrow_id)
    assert done.status == "released"
    results = [await c.create_escrow(deployed.provider.agent_id, "0.10") for _ in range(15)]
    assert len({r.escrow_id for r in results}) == 15 and c._limiter.drawn_429 == 0
    with pytest.raises(UnsupportedByDialect):
        await c.release_partial(esc.escrow_id, "1.00")
    await c.aclose()


@pytest.mark.parametrize(("sent", "kept"), [(0, 1), (0.5, 1), (5.9, 5), (9999, 720), (None, 24)])
def test_timeout_hours_are_floored_and_clamped_without_a_word(sent, kept):
    world = DeployedWorld()
    try:
        http = httpx.Client(transport=world.sandbox.transport())
        body = {
            "amount_usd": 1,
            "description": "job",
            "counterparty_agent_id": world.provider.agent_id,
        }
        if sent is not None:
            body["timeout_hours"] = sent
        r = http.post(
            "http://localhost/deployed/escrow/create",
            headers={"Authorization": f"Bearer {world.payer.api_key}"},
            json=body,
        )
        assert r.status_code == 201 and r.json()["timeout_hours"] == kept
        http.close()
    finally:
        world.close()


def test_auto_release_hours_past_the_services_maximum_are_refused_up_front(deployed):
    c = deployed.client()
    with pytest.raises(InvalidInput) as info:
        c.create_escrow(deployed.provider.agent_id, "1.00", auto_release_hours=721)
    assert info.value.field == "auto_release_hours" and "720" in str(info.value)
    assert escrow_count(deployed) == 0
    assert (
        c.create_escrow(deployed.provider.agent_id, "1.00", auto_release_hours=720).timeout_hours
        == 720
    )


def test_cli_register_writes_the_key_to_a_file_never_the_terminal(tmp_path, monkeypatch, capsys):
    from pf_metered.cli import main

    with Sandbox() as sb:
        server = sb.serve()
        monkeypatch.setenv("PF_CASINO_URL", server.base_url.replace("/api/v1", "") + "/casino")
        keys = tmp_path / "agent.env"
        assert main(["register", "--keys-file", str(keys)]) == 0
        out = capsys.readouterr()
        text = keys.read_text()
        assert "PF_API_KEY=" in text and "pf_test_" in text
        key = re.search(r"pf_test_[A-Za-z0-9_\-]+", text).group(0)
        assert key not in out.out and key not in out.err
        assert len(sb.agent_ids()) == 1


# -- review: exactness whatever the Decimal context; no chained body; no silent re-create ------


def test_wire_money_rounds_once_half_up_in_its_own_context():
    from decimal import ROUND_HALF_EVEN, localcontext

    tail = D.decode_json(b'{"a": 0.000000' + b"4" + b"9" * 60 + b"}")["a"]
    half = D.decode_json(b'{"a": 0.0000005}')["a"]
    with localcontext() as ctx:
        ctx.prec = 4
        ctx.rounding = ROUND_HALF_EVEN
        assert D.wire_money_micro(Decimal("42.99669999999999")) == 42_996_700
        assert D.wire_money_micro(Decimal("999999.9999994")) == 999_999_999_999
        assert D.wire_money_micro(half) == 1  # half-up, not the context's half-even
        assert D.wire_money_micro(tail) == 0  # one rounding of the exact value, not two
        assert parse(wire()).amount_micro == 43_431_000
    assert D.wire_money_micro(tail) == 0


def test_undecodable_answers_chain_nothing_that_holds_the_body():
    hostile = b'{"api_key": "pf_live_CANARYsecret1234", "x": NaN'
    for body in (hostile, hostile + b"}", b'{"a": 1, "a": "pf_live_CANARYsecret1234"}'):
        with pytest.raises(InvalidResponse) as info:
            D.decode_json(body)
        assert info.value.__context__ is None and info.value.__cause__ is None
        assert "CANARY" not in str(info.value)


def test_retrying_an_ambiguous_create_with_its_key_never_sends_a_second_create(deployed):
    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/escrow/create"): 1})
    c = deployed.client(transport=t)
    with pytest.raises(AmbiguousCreate) as info:
        c.create_escrow(deployed.provider.agent_id, "3.00", memo="job")
    key = info.value.idempotency_key
    assert key
    with pytest.raises((AmbiguousCreate, UnsupportedByDialect)):
        c.create_escrow(deployed.provider.agent_id, "3.00", memo="job", idempotency_key=key)
    assert escrow_count(deployed) == 1
    assert t.seen.count(("POST", "/deployed/escrow/create")) == 1


def test_ids_with_a_trailing_newline_are_refused(deployed):
    with pytest.raises(InvalidInput):
        D.claim_faucet("agent_b\n", transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    http = httpx.Client(transport=deployed.sandbox.transport())
    try:
        r = http.post(
            "http://localhost/deployed/escrow/create",
            headers={"Authorization": f"Bearer {deployed.payer.api_key}"},
            json={"amount_usd": 1, "counterparty_agent_id": deployed.provider.agent_id + "\n"},
        )
        assert r.status_code in (400, 404)
    finally:
        http.close()
    assert escrow_count(deployed) == 0


# -- answer size cap on bootstrap calls -------------------------------------------------------


def _huge_answer_transport(chunked: bool) -> tuple[httpx.MockTransport, list[int]]:
    """Answers 200 with a body far past MAX_ANSWER_BYTES; counts the bytes the client pulled."""
    from pf_metered.client import MAX_ANSWER_BYTES

    pulled = [0]
    size = 20 * MAX_ANSWER_BYTES

    class Body(httpx.SyncByteStream, httpx.AsyncByteStream):
        def _chunks(self):
            yield b'{"agent_id": "a", "api_key": "pf_live_x", "pad": "'
            while pulled[0] < size:
                pulled[0] += 65536
                yield b"x" * 65536
            yield b'"}'

        def __iter__(self):
            yield from self._chunks()

        async def __aiter__(self):
            for chunk in self._chunks():
                yield chunk

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {} if chunked else {"Content-Length": str(size + 60)}
        return httpx.Response(200, headers=headers, stream=Body())

    return httpx.MockTransport(handler), pulled


@pytest.mark.parametrize("chunked", [True, False])
def test_bootstrap_answers_past_the_cap_are_refused_unread(chunked):
    from pf_metered.client import MAX_ANSWER_BYTES

    for call in (
        lambda t: D.register(base_url="http://localhost/casino", transport=t),
        lambda t: D.claim_faucet("agent_a", base_url="http://localhost/faucet", transport=t),
    ):
        t, pulled = _huge_answer_transport(chunked)
        with pytest.raises(InvalidResponse) as info:
            call(t)
        assert str(MAX_ANSWER_BYTES) in str(info.value)
        assert pulled[0] <= MAX_ANSWER_BYTES + 65536


@pytest.mark.parametrize("chunked", [True, False])
async def test_async_bootstrap_answers_past_the_cap_are_refused_unread(chunked):
    from pf_metered.client import MAX_ANSWER_BYTES

    for call in (
        lambda t: D.aregister(base_url="http://localhost/casino", transport=t),
        lambda t: D.aclaim_faucet("agent_a", base_url="http://localhost/faucet", transport=t),
    ):
        t, pulled = _huge_answer_transport(chunked)
        with pytest.raises(InvalidResponse):
            await call(t)
        assert pulled[0] <= MAX_ANSWER_BYTES + 65536


def test_bootstrap_refusal_past_the_cap_keeps_its_status():
    from pf_metered.client import MAX_ANSWER_BYTES

    def handler(request: httpx.Request) -> httpx.Response:
        body = b'{"error": "already_claimed", "pad": "' + b"x" * (2 * MAX_ANSWER_BYTES) + b'"}'
        return httpx.Response(409, content=body)

    with pytest.raises(Conflict) as info:
        D.claim_faucet(
            "agent_a", base_url="http://localhost/faucet", transport=httpx.MockTransport(handler)
        )
    assert info.value.code is None  # the oversized body was not read for its code


# -- what to do about a create that cannot be reconciled --------------------------------------


def test_ambiguous_create_without_listing_says_what_can_be_done(deployed):
    t = LoseAnswers(deployed.sandbox.transport(), {("POST", "/escrow/create"): 1})
    c = deployed.client(transport=t)
    with pytest.raises(AmbiguousCreate) as info:
        c.create_escrow(deployed.provider.agent_id, "3.00", memo="job")
    message = str(info.value)
    key = info.value.idempotency_key
    assert "list_escrows()" not in message and "same idempotency_key" not in message
    assert "nothing was re-sent" in message
    assert f"[idem:{key}]" in message and "get_escrow" in message
    assert "dashboard" in message and "support" in message
    with pytest.raises(UnsupportedByDialect) as retry:
        c.create_escrow(deployed.provider.agent_id, "3.00", memo="job", idempotency_key=key)
    message = str(retry.value)
    assert "nothing was sent" in message and f"[idem:{key}]" in message
    assert "get_escrow" in message and "dashboard" in message and "support" in message
    assert escrow_count(deployed) == 1
    assert t.seen.count(("POST", "/deployed/escrow/create")) == 1


def test_ambiguous_create_with_listing_keeps_its_advice():
    from pf_metered.client._base import _Lost
    from pf_metered.errors import APITimeout

    world = DeployedWorld(deployed_list_path="/escrows")
    try:
        c = world.client(dialect=D.DeployedDialect(list_path="/escrows"))
        err = c._ambiguous_create(_Lost(APITimeout("t")), "k1", "retries exhausted", "p", 1)
        assert "list_escrows()" in str(err)
    finally:
        world.close()
