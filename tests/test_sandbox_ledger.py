"""The sandbox ledger keeps exact books: fees, refunds, auto-release, faucet, audit, files."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from pf_metered.errors import InvalidInput
from pf_metered.money import fee_micro
from pf_metered.sandbox import (
    FEE_ACCOUNT_ID,
    LedgerInvariantError,
    ManualClock,
    Sandbox,
    SandboxAgent,
    SandboxClock,
)

BASE = "http://localhost/api/v1"


@pytest.fixture
def sb():
    with Sandbox(clock=ManualClock()) as sandbox:
        yield sandbox


def api(sandbox: Sandbox, agent: SandboxAgent) -> httpx.Client:
    return httpx.Client(
        transport=sandbox.transport(),
        base_url=BASE,
        headers={"Authorization": f"Bearer {agent.api_key}"},
    )


def open_escrow(c: httpx.Client, to: str, amount: str = "10.00", **extra) -> str:
    r = c.post("/escrow", json={"to_agent_id": to, "amount": amount, "memo": "", **extra})
    assert r.status_code == 201, r.text
    return r.json()["escrow_id"]


def test_agents_have_test_keys_that_repr_never_shows(sb: Sandbox) -> None:
    a = sb.add_agent("12.5")
    assert a.api_key.startswith("pf_test_") and len(a.api_key) > 30
    assert a.api_key not in repr(a) and a.api_key not in str(a)
    assert sb.balance(a.agent_id) == Decimal("12.5")
    b = sb.add_agent(agent_id="bob")
    assert b.agent_id == "bob" and sb.balance("bob") == 0
    assert sb.agent_ids() == [a.agent_id, "bob"]
    with pytest.raises(InvalidInput):
        sb.add_agent(agent_id="bob")
    with pytest.raises(InvalidInput):
        sb.add_agent(agent_id=FEE_ACCOUNT_ID)
    with pytest.raises(InvalidInput):
        sb.add_agent(agent_id="no spaces")
    with pytest.raises(InvalidInput):
        sb.add_agent(1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        sb.add_agent("-1")
    with pytest.raises(InvalidInput):
        sb.balance("nobody")


def test_fund_mints_and_is_audited(sb: Sandbox) -> None:
    a = sb.add_agent("1")
    assert sb.fund(a.agent_id, "2.000001") == Decimal("3.000001")
    assert sb.audit().minted == Decimal("3.000001")
    with pytest.raises(InvalidInput):
        sb.fund("nobody", "1")


def test_thousand_releases_of_ten_cents_pay_exactly_one_dollar_of_fee(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("100"), sb.add_agent()
    with api(sb, payer) as c:
        eid = open_escrow(c, provider.agent_id, "100.00")
        for i in range(1000):
            r = c.post(f"/escrow/{eid}/release-partial", json={"amount": "0.10", "memo": str(i)})
            assert r.status_code == 200
    esc = sb.escrow(eid)
    assert esc.status == "released" and esc.released == Decimal("100")
    assert sb.fees() == Decimal("1.00")
    with api(sb, provider) as c:
        body = c.get(f"/escrow/{eid}").json()
        assert (len(body["releases"]), body["release_count"]) == (100, 1000)  # the last 100
        assert [r["memo"] for r in body["releases"]] == [str(i) for i in range(900, 1000)]
        releases = [
            r
            for offset in range(0, 1000, 300)
            for r in c.get(f"/escrow/{eid}/releases?offset={offset}&limit=300").json()["releases"]
        ]
    assert [r["memo"] for r in releases] == [str(i) for i in range(1000)]
    assert sum(Decimal(r["fee"]) for r in releases) == Decimal("1.00")
    assert sb.balance(provider.agent_id) == Decimal("99.00")
    assert sb.balance(payer.agent_id) == 0
    sb.audit()


def test_fee_is_charged_on_the_cumulative_amount_half_up(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        eid = open_escrow(c, provider.agent_id, "10.00")
        fees = []
        for amount in ("0.000050", "0.000050", "0.000049", "1.234567"):
            body = c.post(f"/escrow/{eid}/release-partial", json={"amount": amount}).json()
            fees.append(body["releases"][-1]["fee"])
    # 50 micro → fee 0.5 → rounds up to 1; 100 → 1 (no more); 149 → 1.49 → 1; then cumulative
    assert fees[:3] == ["0.000001", "0.00", "0.00"]
    total = 50 + 50 + 49 + 1_234_567
    assert sb.fees() == Decimal(fee_micro(total)) / 1_000_000
    assert sb.balance(provider.agent_id) == Decimal(total - fee_micro(total)) / 1_000_000
    sb.audit()


def test_refund_returns_the_unreleased_rest_and_closes(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        eid = open_escrow(c, provider.agent_id, "4.00")
        c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"})
        r = c.post(f"/escrow/{eid}/refund", json={})
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "refunded"
    assert (body["released"], body["remaining"], body["refunded"]) == ("1.00", "0.00", "3.00")
    assert sb.balance(payer.agent_id) == Decimal("9.00")
    assert sb.balance(provider.agent_id) == Decimal("0.99")
    sb.audit()


def test_auto_release_pays_the_rest_to_the_provider_when_the_clock_moves(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        eid = open_escrow(c, provider.agent_id, "5.00", auto_release_hours=2)
        c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"})
        sb.clock.advance(2 * 3600 - 1)
        assert c.get(f"/escrow/{eid}").json()["status"] == "locked"
        sb.clock.advance(1)
        body = c.get(f"/escrow/{eid}").json()  # applied lazily on the next request
    assert body["status"] == "released"
    assert (body["released"], body["remaining"]) == ("5.00", "0.00")
    assert body["releases"][-1]["memo"] == "auto-release"
    assert body["releases"][-1]["created_at"] == body["auto_release_at"]
    assert sb.balance(provider.agent_id) == Decimal("4.95")
    assert sb.fees() == Decimal("0.05")
    sb.audit()


def test_tick_applies_due_auto_releases_without_a_request(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        due = open_escrow(c, provider.agent_id, "2.00", auto_release_hours=1)
        later = open_escrow(c, provider.agent_id, "2.00", auto_release_hours=3)
        never = open_escrow(c, provider.agent_id, "2.00")
    sb.clock.advance(3600)
    assert sb.tick() == 1
    assert sb.tick() == 0
    assert [sb.escrow(e).status for e in (due, later, never)] == ["released", "locked", "locked"]
    assert sb.audit().escrowed == Decimal("4.00")


def test_a_refunded_escrow_is_not_auto_released(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        eid = open_escrow(c, provider.agent_id, "2.00", auto_release_hours=1)
        c.post(f"/escrow/{eid}/refund", json={})
    sb.clock.advance(7200)
    assert sb.tick() == 0
    assert sb.escrow(eid).status == "refunded"
    assert sb.balance(payer.agent_id) == Decimal("10")


def test_the_faucet_pays_once(sb: Sandbox) -> None:
    a = sb.add_agent()
    with api(sb, a) as c:
        first = c.post("/faucet/claim", json={})
        second = c.post("/faucet/claim", json={})
    assert first.status_code == 200
    assert first.json()["credited"] == "1.00" and first.json()["agent_id"] == a.agent_id
    assert second.status_code == 409 and second.json()["error"] == "already_claimed"
    assert sb.balance(a.agent_id) == Decimal("1")
    assert sb.audit().minted == Decimal("1")


def test_escrow_read_model_validates_and_adds_up(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        eid = open_escrow(c, provider.agent_id, "3.00", memo="job 7")
        c.post(f"/escrow/{eid}/release-partial", json={"amount": "0.000001"})
    esc = sb.escrow(eid)
    assert esc.memo == "job 7"
    assert esc.released_micro == 1 and esc.remaining_micro == 2_999_999
    assert esc.from_agent_id == payer.agent_id and esc.to_agent_id == provider.agent_id
    with pytest.raises(InvalidInput):
        sb.escrow("esc_nope")


def test_audit_reports_a_corrupted_ledger(sb: Sandbox) -> None:
    payer, provider = sb.add_agent("10"), sb.add_agent()
    with api(sb, payer) as c:
        open_escrow(c, provider.agent_id, "3.00")
    report = sb.audit()
    assert report.ok and report.minted == report.balances + report.fees + report.escrowed
    with sb._db.transaction() as conn:  # a bug elsewhere could do this; audit must notice
        conn.execute(
            "UPDATE accounts SET balance = balance + 1 WHERE account_id = ?", (provider.agent_id,)
        )
    bad = sb.audit(raise_on_error=False)
    assert not bad.ok and "not conserved" in bad.problems[0]
    with pytest.raises(LedgerInvariantError) as info:
        sb.audit()
    assert info.value.report == bad


def test_negative_balance_is_impossible_even_by_sql(sb: Sandbox) -> None:
    a = sb.add_agent("1")
    with pytest.raises(sqlite3.IntegrityError), sb._db.transaction() as conn:
        conn.execute("UPDATE accounts SET balance = -1 WHERE account_id = ?", (a.agent_id,))
    assert sb.balance(a.agent_id) == 1


def test_a_file_ledger_survives_reopening(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger.sqlite3")
    with Sandbox(path) as first:
        payer, provider = first.add_agent("10"), first.add_agent()
        with api(first, payer) as c:
            eid = open_escrow(c, provider.agent_id, "4.00")
            key = {"Idempotency-Key": "once"}
            r1 = c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"}, headers=key)
    with Sandbox(path) as second:
        assert second.balance(payer.agent_id) == Decimal("6")
        assert second.escrow(eid).released == Decimal("1")
        with api(second, payer) as c:  # the key still works: only its hash was stored
            r2 = c.post(f"/escrow/{eid}/release-partial", json={"amount": "1.00"}, headers=key)
        assert r2.headers["idempotent-replayed"] == "true" and r2.json() == r1.json()
        second.audit()
    raw = (tmp_path / "ledger.sqlite3").read_bytes()
    assert payer.api_key.encode() not in raw


def test_closed_sandbox_answers_5xx_and_refuses_reads() -> None:
    sb = Sandbox()
    a = sb.add_agent("1")
    sb.close()
    assert sb.closed
    with api(sb, a) as c:
        r = c.get("/escrow")
    assert r.status_code == 500 and r.json()["error"] == "internal_error"
    with pytest.raises(RuntimeError):
        sb.balance(a.agent_id)
    sb.close()  # twice is fine


def test_clocks_move_forward_only() -> None:
    manual = ManualClock(start=100)
    manual.advance(0.1)
    for _ in range(10_000):
        manual.advance(0.0001)
    assert manual.now_us() == 101_100_000
    wall = SandboxClock()
    before = wall.now_us()
    wall.advance(3600)
    assert wall.now_us() - before >= 3600 * 1_000_000
    for bad in (-1, float("nan"), float("inf"), True, "1"):
        with pytest.raises(InvalidInput):
            manual.advance(bad)  # type: ignore[arg-type]
    assert "ManualClock" in repr(manual) and "SandboxClock" in repr(wall)
