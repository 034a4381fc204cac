"""Fault suite 2: a durable stream in a subprocess is killed at named points and at random.

The sandbox serves on loopback from this process (its ledger in a SQLite file); the child runs
a ``PaymentStream`` over a ``SQLiteStore`` journal and dies by ``os._exit`` at a named point
(right after the journal write, right after HTTP success, …) or by SIGKILL after a random
number of units. Then ``PaymentStream.resume`` + ``close()`` here must give: released =
rate × journaled units exactly, released + refunded = budget, nothing released twice, one
escrow, and (per-record durability) every unit the child saw counted is in the journal.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from faultkit import run_crash

from pf_metered import _lifecycle
from pf_metered.client import EscrowClient
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import intent_amount_micro
from pf_metered.money import format_usdc, parse_rate
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream

RUNS = int(os.environ.get("PFM_CRASH_RUNS", "18"))


@pytest.mark.parametrize("durability", ["per_record", "group"])
def test_killed_streams_resume_exactly(tmp_path: Path, durability: str) -> None:
    runs = RUNS if durability == "per_record" else RUNS // 3
    with Sandbox(str(tmp_path / "ledger.db")) as sandbox:
        server = sandbox.serve()
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) + 1)) as pool:
            results = list(
                pool.map(
                    lambda seed: run_crash(
                        seed, sandbox, server.base_url, str(tmp_path), durability=durability
                    ),
                    range(runs),
                )
            )
        sandbox.audit()
    for seed, r in enumerate(results):
        assert r["lost"] == 0, (seed, r)
        assert r["pay_gap"] == 0, (seed, r)
        assert r["budget_gap"] == 0, (seed, r)
        assert r["doubled"] == 0, (seed, r)
        assert r.get("escrows", 1) == 1, (seed, r)
    crashed = [r for r in results if r["code"] != 0]
    assert len(crashed) >= runs // 3  # the points were reached


def test_a_release_cut_off_mid_request_by_a_kill_is_resent_under_its_key(tmp_path: Path) -> None:
    """The seeded ``sigkill`` runs above, made deterministic: the child's release intent is
    journaled and its request is on the wire (headers, not the body) when the child dies.

    The server must not answer a request whose body never arrived; if it did (a 400, stored
    under the intent's Idempotency-Key), ``resume`` re-sending the intent with its real body
    under the same key was refused with 422 ``idempotency_key_reused``.
    """
    rate = "0.0123457"
    journal = str(tmp_path / "journal.db")
    with Sandbox(str(tmp_path / "ledger.db")) as sandbox:
        server = sandbox.serve()
        payer, provider = sandbox.add_agent(balance="10"), sandbox.add_agent()
        # the child: count, journal the release, start sending it, die
        with EscrowClient(payer.api_key, base_url=server.base_url) as client:
            store = SQLiteStore(journal)
            stream = PaymentStream(
                client,
                provider.agent_id,
                rate,
                batch=1000,
                budget="3",
                store=store,
                stream_id="cut-off",
                background=False,
            )
            stream.open()
            for i in range(63):
                stream.record(1 + i % 3)
            intent = store.claim("cut-off", min_units=1)
            assert intent is not None and intent.seq == 1
            amount = format_usdc(intent_amount_micro(parse_rate(rate), intent))
            body = (
                f'{{"amount":"{amount}","memo":"batch:units 1-{intent.units_to} '
                f'[idem:{intent.idempotency_key}]"}}'
            ).encode()
            url = urlsplit(server.base_url)
            head = (
                f"POST {url.path}/escrow/{stream.escrow_id}/release-partial HTTP/1.1\r\n"
                f"Host: {url.netloc}\r\nAuthorization: Bearer {payer.api_key}\r\n"
                f"Content-Type: application/json\r\n"
                f"Idempotency-Key: {intent.idempotency_key}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            with socket.create_connection((url.hostname, url.port), timeout=5) as s:
                s.sendall(head)  # killed here: the body never goes out
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):  # until the server is done with what it got
                    pass
            store.close()
            _lifecycle.forget(stream)  # the child is dead: no exit flush of its own
        # the parent: resume and close
        with EscrowClient(payer.api_key, base_url=server.base_url) as client:
            receipt = PaymentStream.resume(journal, "cut-off", client).close()
        escrow = sandbox.escrow(receipt.escrow_id)
        assert receipt.units == 126
        assert escrow.released_micro == parse_rate(rate).micro_half_up(126)
        assert escrow.released_micro + escrow.refunded_micro == escrow.amount_micro
        memos = [r.memo for r in escrow.releases]
        assert memos[0] == "batch:units 1-126 [idem:pfm-cut-off-r1]"  # the journaled intent
        assert len(set(memos)) == len(memos)
        sandbox.audit()
