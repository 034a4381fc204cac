"""Long streams: the product page's $1,000 budget released 100 calls at a time at $0.001 is
10,000 releases. Every answer must stay the same small size however long the history grows
(it used to carry the whole history, so a long stream broke on the client's 1 MiB cap and
cost O(n²)), and the totals must stay exact to the micro-USDC."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from pf_metered.sandbox import Sandbox
from pf_metered.stream import AsyncPaymentStream, PaymentStream

BASE = "http://localhost/api/v1"


def test_ten_thousand_releases_stream_with_exact_totals() -> None:
    sb = Sandbox()
    payer, provider = sb.add_agent(balance="1000.00"), sb.add_agent()
    client = sb.client(payer.api_key)
    with PaymentStream(client, provider.agent_id, "0.001", batch=100, budget="1000.00") as s:
        for _ in range(10_000):
            s.record(100)  # one batch of 100 calls ...
            s.flush()  # ... released on its own: 10,000 releases
    receipt = s.receipt
    assert receipt.units == 1_000_000 and receipt.releases == 10_000
    assert receipt.paid == Decimal("1000.00") == Decimal("0.001") * 1_000_000
    assert receipt.refunded == 0
    assert receipt.fee == Decimal("10.00") and receipt.provider_net == Decimal("990.00")
    escrow = client.get_escrow(receipt.escrow_id)
    assert escrow.status == "released" and escrow.released == Decimal("1000.00")
    assert escrow.release_count == 10_000 and len(escrow.releases) == 100
    assert sum(r.amount for r in client.iter_releases(receipt.escrow_id, 1000)) == Decimal(1000)
    assert sb.fees() == Decimal("10.00")
    assert sb.balance(provider.agent_id) == Decimal("990.00")
    assert sb.balance(payer.agent_id) == 0
    sb.audit()
    client.close()
    sb.close()


async def test_async_stream_past_the_history_window() -> None:
    sb = Sandbox()
    payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
    aclient = sb.async_client(payer.api_key)
    async with AsyncPaymentStream(
        aclient, provider.agent_id, "0.0001", batch=10, budget="10.00"
    ) as s:
        for _ in range(1_500):
            s.record(10)
            await s.flush()
    assert s.receipt.releases == 1_500 and s.receipt.paid == Decimal("1.50")
    escrow = await aclient.get_escrow(s.receipt.escrow_id)
    assert (escrow.release_count, len(escrow.releases)) == (1_500, 100)
    memos = [r.memo async for r in aclient.iter_releases(s.receipt.escrow_id)]
    assert len(memos) == len(set(memos)) == 1_500
    await aclient.aclose()
    sb.audit()
    sb.close()


def test_answers_stay_small_however_long_the_history() -> None:
    sb = Sandbox()
    payer, provider, other = sb.add_agent(balance="100.00"), sb.add_agent(), sb.add_agent()
    auth = {"Authorization": f"Bearer {payer.api_key}"}
    with httpx.Client(transport=sb.transport(), base_url=BASE, headers=auth) as c:
        created = c.post("/escrow", json={"to_agent_id": provider.agent_id, "amount": "60.00"})
        assert created.status_code == 201 and len(created.content) < 1024
        eid = created.json()["escrow_id"]
        sizes = []
        for i in range(5_000):
            r = c.post(
                f"/escrow/{eid}/release-partial",
                json={"amount": "0.01", "memo": f"batch:units {i * 100 + 1}-{i * 100 + 100}"},
                headers={"Idempotency-Key": f"k{i}"},
            )
            assert r.status_code == 200
            if i in (0, 4_999):
                sizes.append(len(r.content))
        body = r.json()
        assert body["release_count"] == 5_000 and len(body["releases"]) == 1  # the one just made
        assert body["releases"][0]["memo"] == "batch:units 499901-500000"
        assert sizes[1] < 4096 and sizes[1] - sizes[0] < 16, sizes  # constant, not O(n)
        replay = c.post(
            f"/escrow/{eid}/release-partial",
            json={"amount": "0.01", "memo": "batch:units 499901-500000"},
            headers={"Idempotency-Key": "k4999"},
        )
        assert replay.headers["idempotent-replayed"] == "true" and replay.content == r.content
        read = c.get(f"/escrow/{eid}")
        assert len(read.content) < 64 * 1024
        window = read.json()
        assert window["release_count"] == 5_000
        assert [x["memo"] for x in window["releases"]] == [
            f"batch:units {i * 100 + 1}-{i * 100 + 100}" for i in range(4_900, 5_000)
        ]
        listed = c.get("/escrow")
        assert len(listed.content) < 4096
        assert [(e["release_count"], e["releases"]) for e in listed.json()["escrows"]] == [
            (5_000, [])
        ]
        page = c.get(f"/escrow/{eid}/releases", params={"offset": 4_990, "limit": 1000}).json()
        assert (page["offset"], page["release_count"], len(page["releases"])) == (4_990, 5_000, 10)
        refunded = c.post(f"/escrow/{eid}/refund", json={})
        assert len(refunded.content) < 1024
        assert (refunded.json()["releases"], refunded.json()["release_count"]) == ([], 5_000)
        # the page call's refusals
        for query, status in [
            ("limit=0", 400),
            ("limit=1001", 400),
            ("offset=-1", 400),
            ("offset=x", 400),
            ("page=2", 400),
            ("offset=1&offset=2", 400),
            ("offset=9000", 200),
        ]:
            r = c.get(f"/escrow/{eid}/releases?{query}")
            assert r.status_code == status, (query, r.text)
        assert c.get(f"/escrow/{eid}/releases?offset=9000").json()["releases"] == []
        assert c.post(f"/escrow/{eid}/releases", json={}).status_code == 405
    stranger = {"Authorization": f"Bearer {other.api_key}"}
    with httpx.Client(transport=sb.transport(), base_url=BASE, headers=stranger) as c:
        assert c.get(f"/escrow/{eid}/releases").status_code == 403
        assert c.get("/escrow/esc_nope/releases").status_code == 404
    sb.audit()
    sb.close()


def test_a_sandbox_file_from_before_the_counter_is_migrated(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    sb = Sandbox(path)
    payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
    client = sb.client(payer.api_key)
    eid = client.create_escrow(provider.agent_id, "5.00").escrow_id
    for _ in range(3):
        client.release_partial(eid, "0.10")
    client.close()
    sb.close()
    with sqlite3.connect(path) as conn:  # what a file written before the counter looks like
        conn.execute("ALTER TABLE escrows DROP COLUMN release_count")
    conn.close()
    sb = Sandbox(path)
    escrow = sb.client(payer.api_key).get_escrow(eid)
    assert escrow.release_count == 3 and len(escrow.releases) == 3
    sb.audit()
    sb.close()


@pytest.mark.parametrize("releases", [101, 250])
def test_cli_style_status_shows_the_recent_ones_with_the_count(releases: int) -> None:
    from pf_metered.cli._format import escrow_detail

    sb = Sandbox()
    payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
    client = sb.client(payer.api_key)
    eid = client.create_escrow(provider.agent_id, "5.00").escrow_id
    for _ in range(releases):
        client.release_partial(eid, "0.01")
    detail = escrow_detail(client.get_escrow(eid))
    assert detail["release_count"] == releases and len(detail["releases"]) == 100
    client.close()
    sb.close()
