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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from faultkit import run_crash

from pf_metered.sandbox import Sandbox

RUNS = int(os.environ.get("PFM_CRASH_RUNS", "18"))


@pytest.mark.parametrize("durability", ["per_record", "group"])
def test_killed_streams_resume_exactly(tmp_path: Path, durability: str) -> None:
    runs = RUNS if durability == "per_record" else RUNS // 3
    with Sandbox(str(tmp_path / "ledger.db")) as sandbox:
        server = sandbox.serve()
        with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) + 1)) as pool:
            results = list(pool.map(
                lambda seed: run_crash(seed, sandbox, server.base_url, str(tmp_path),
                                       durability=durability),
                range(runs),
            ))
        sandbox.audit()
    for seed, r in enumerate(results):
        assert r["lost"] == 0, (seed, r)
        assert r["pay_gap"] == 0, (seed, r)
        assert r["budget_gap"] == 0, (seed, r)
        assert r["doubled"] == 0, (seed, r)
        assert r.get("escrows", 1) == 1, (seed, r)
    crashed = [r for r in results if r["code"] != 0]
    assert len(crashed) >= runs // 3  # the points were reached
