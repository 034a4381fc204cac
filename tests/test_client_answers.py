"""A 2xx answer that contradicts the request is not believed (issue 13, item 3).

Each answer is checked against what was asked — the status after a refund, the release
after a release, the released figure and gross after a deployed release, the amount and
counterparty after a create — and a contradiction is settled by reading the escrow back:
applied → the escrow as read; not applied → an ambiguous outcome, never a success and never
sent again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from conftest import escrow_json, released_json

from pf_metered.client import EscrowClient
from pf_metered.errors import AmbiguousCreate, AmbiguousOutcome, AmbiguousRelease

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **kw: Any) -> tuple[EscrowClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return handler(req)

    kw.setdefault("base_url", "http://127.0.0.1:9/api/v1")
    kw.setdefault("max_retries", 0)
    c = EscrowClient("pf_test_answers", transport=httpx.MockTransport(record), **kw)
    return c, seen


# -- v1: refund ------------------------------------------------------------------------------


def test_a_refund_answered_200_with_the_escrow_still_locked_is_not_success():
    locked = escrow_json(released="0.25", remaining="9.75")
    c, seen = client(lambda req: httpx.Response(200, json=locked))
    with pytest.raises(AmbiguousOutcome) as info:
        c.refund("esc_1")
    assert info.value.known["status"] == "locked" and "still be locked" in str(info.value)
    assert [r.method for r in seen] == ["POST", "GET"]  # read back, never sent again


def test_a_refund_answer_that_lies_but_the_escrow_reads_refunded_is_settled():
    refunded = escrow_json(status="refunded", remaining="0.00", refunded="10.00")

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=escrow_json() if req.method == "POST" else refunded)

    c, _seen = client(handler)
    assert c.refund("esc_1").status == "refunded"


# -- v1: release ----------------------------------------------------------------------------


def test_a_release_answered_200_without_the_release_is_not_success():
    c, seen = client(lambda req: httpx.Response(200, json=escrow_json()))
    with pytest.raises(AmbiguousRelease) as info:
        c.release_partial("esc_1", "1.00")
    assert info.value.known["released"] == Decimal(0)
    assert [r.method for r in seen] == ["POST", "GET"]


def test_a_release_missing_from_its_answer_but_in_the_escrow_is_settled():
    sent: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        if req.method == "POST":
            sent.append(req)
            return httpx.Response(200, json=escrow_json())
        return httpx.Response(200, json=released_json(sent[0]))

    c, seen = client(handler)
    assert c.release_partial("esc_1", "1.00").released == Decimal("1")
    assert [r.method for r in seen] == ["POST", "GET"]


def test_a_release_answer_showing_the_release_is_believed_without_a_read():
    c, seen = client(lambda req: httpx.Response(200, json=released_json(req)))
    assert c.release_partial("esc_1", "1.00").released == Decimal("1")
    assert [r.method for r in seen] == ["POST"]


# -- v1 and deployed: create ----------------------------------------------------------------


def deployed_escrow(**over: Any) -> dict[str, Any]:
    body = {
        "escrow_id": "esc_0123456789abcdef",
        "status": "funded",
        "amount_usd": 2.5,
        "commission_usd": 0.025,
        "net_to_counterparty": 2.475,
        "description": "job",
        "creator_id": "ag_aaaaaaaaaaaa",
        "counterparty_id": "ag_bbbbbbbbbbbb",
        "timeout_hours": 24,
    }
    body.update(over)
    return body


def test_a_deployed_create_for_another_counterparty_is_ambiguous_naming_the_escrow():
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json=deployed_escrow(counterparty_id="ag_mallory00000"))

    c, seen = client(handler, base_url="http://127.0.0.1:9", dialect="deployed", rate_limits=False)
    with pytest.raises(AmbiguousCreate) as info:
        c.create_escrow("ag_bbbbbbbbbbbb", "2.5", memo="job")
    assert info.value.known["escrow_id"] == "esc_0123456789abcdef"
    assert "ag_mallory00000" in str(info.value)
    assert [r.method for r in seen] == ["POST", "GET"]  # read back; never created again


def test_a_deployed_create_whose_answer_cannot_be_read_is_ambiguous_not_an_error():
    c, seen = client(
        lambda req: httpx.Response(201, content=b"<html>ok</html>"),
        base_url="http://127.0.0.1:9",
        dialect="deployed",
        rate_limits=False,
    )
    with pytest.raises(AmbiguousCreate) as info:
        c.create_escrow("ag_bbbbbbbbbbbb", "2.5", memo="job")
    assert info.value.known["memo_tag"].startswith("[idem:")
    assert [r.method for r in seen] == ["POST"]


# -- deployed: release --------------------------------------------------------------------


def deployed(script: dict[tuple[str, str], tuple[int, Any]]) -> tuple[EscrowClient, list[Any]]:
    def handler(req: httpx.Request) -> httpx.Response:
        status, body = script[(req.method, req.url.path)]
        return httpx.Response(status, content=json.dumps(body).encode())

    return client(handler, base_url="http://127.0.0.1:9", dialect="deployed", rate_limits=False)


EID = "esc_0123456789abcdef"
RELEASED = {
    "escrow_id": EID,
    "status": "released",
    "amount_released": 2.475,
    "commission": 0.025,
    "referral_commission": 0,
    "counterparty_id": "ag_bbbbbbbbbbbb",
    "message": "$2.48 released to counterparty.",
}


def test_a_deployed_release_answered_released_while_the_escrow_reads_funded_is_ambiguous():
    c, _seen = deployed(
        {
            ("POST", f"/escrow/release/{EID}"): (200, RELEASED),
            ("GET", f"/escrow/{EID}"): (200, deployed_escrow()),
        }
    )
    with pytest.raises(AmbiguousRelease, match="reads funded"):
        c.release(EID)


def test_a_deployed_release_answer_without_figures_is_settled_by_the_escrow():
    short = {"escrow_id": EID, "status": "released"}
    c, _seen = deployed(
        {
            ("POST", f"/escrow/release/{EID}"): (200, short),
            ("GET", f"/escrow/{EID}"): (200, deployed_escrow(status="released")),
        }
    )
    esc = c.release(EID)
    assert esc.status == "released" and esc.amount == Decimal("2.5")


def test_a_deployed_release_whose_gross_is_not_the_escrow_keeps_the_escrows_figures(caplog):
    wrong = dict(RELEASED, amount_released=4.95, commission=0.05)
    c, _seen = deployed(
        {
            ("POST", f"/escrow/release/{EID}"): (200, wrong),
            ("GET", f"/escrow/{EID}"): (200, deployed_escrow(status="released")),
        }
    )
    esc = c.release(EID)
    assert esc.amount == Decimal("2.5") and esc.released == Decimal("2.5")
    assert any("is not the escrow's amount" in r.getMessage() for r in caplog.records)


def test_a_deployed_release_answer_that_is_not_believable_and_unreadable_is_ambiguous():
    c, _seen = deployed(
        {
            ("POST", f"/escrow/release/{EID}"): (200, {"escrow_id": EID, "status": "funded"}),
            ("GET", f"/escrow/{EID}"): (503, {"error": "internal_error"}),
        }
    )
    with pytest.raises(AmbiguousRelease):
        c.release(EID)
