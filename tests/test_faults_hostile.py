"""Fault suite 5: hostile server answers to a stream's release (and to the read-back that
follows): typed errors, and the journal unchanged — nothing settled, nothing paid locally.
Then the honest server gets the same release, with the same key, and the books close exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from pf_metered.client import MAX_ANSWER_BYTES
from pf_metered.errors import PFMeteredError
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream


def _escrow(eid: str, **over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "escrow_id": eid,
        "status": "locked",
        "amount": "5.00",
        "released": "0.50",
        "remaining": "4.50",
        "refunded": "0.00",
        "releases": [],
    }
    body.update(over)
    return body


HOSTILE = {
    "amount_as_number": lambda eid: json.dumps(_escrow(eid, released=0.5, remaining=4.5)),
    "nan": lambda eid: json.dumps(_escrow(eid, released="NaN")),
    "nan_literal": lambda eid: json.dumps(_escrow(eid)).replace('"0.50"', "NaN"),
    "released_over_amount": lambda eid: json.dumps(
        _escrow(eid, released="9.00", remaining="-4.00")
    ),
    "other_escrow": lambda eid: json.dumps(_escrow("esc_someone_else")),
    "not_json": lambda eid: "<html>502 Bad Gateway</html>",
    "oversized": lambda eid: json.dumps(_escrow(eid, memo="x" * (MAX_ANSWER_BYTES + 10))),
    "unknown_status": lambda eid: json.dumps(_escrow(eid, status="teleported")),
    "duplicate_keys": lambda eid: json.dumps(_escrow(eid))[:-1] + ', "released": "0.00"}',
}


class Hostile(httpx.BaseTransport):
    """Answers every escrow request but the open with a hostile 200, without applying it."""

    def __init__(self, inner: httpx.BaseTransport, kind: str) -> None:
        self.inner = inner
        self.kind = kind
        self.on = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not self.on or request.url.path.endswith("/escrow"):
            return self.inner.handle_request(request)
        eid = request.url.path.split("/escrow/")[1].split("/")[0]
        return httpx.Response(
            200,
            headers={"content-type": "application/json"},
            content=HOSTILE[self.kind](eid).encode(),
            request=request,
        )


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_answers_change_nothing(tmp_path: Path, kind: str) -> None:
    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="10"), sb.add_agent()
        wire = Hostile(sb.transport(), kind)
        client = sb.client(payer.api_key, transport=wire, _sleep=lambda s: None, max_retries=1)
        store = SQLiteStore(tmp_path / "j.db")
        stream = PaymentStream(
            client, provider.agent_id, "0.01", batch=1000, budget="5", store=store, background=False
        )
        stream.open()
        stream.record(50)
        before = store.load(stream.stream_id)
        wire.on = True
        with pytest.raises(PFMeteredError) as err:
            stream.flush()
        assert type(err.value).__name__ in (
            "InvalidResponse",
            "AmbiguousRelease",
            "ServerError",
            "APIConnectionError",
        ), repr(err.value)
        after = store.load(stream.stream_id)
        assert before is not None and after is not None
        assert (after.paid_micro, after.releases, after.units) == (
            before.paid_micro,
            before.releases,
            before.units,
        )
        assert after.settled == before.settled
        assert sb.escrow(stream.escrow_id).released_micro == 0
        wire.on = False
        receipt = stream.close()
        assert receipt.paid_micro == 500_000
        escrow = sb.escrow(stream.escrow_id)
        assert escrow.released_micro == 500_000 and escrow.refunded_micro == 4_500_000
