"""A fleet of real processes on one stream in the real Redis, paying through the loopback sandbox.

8 processes race on one budget: exact totals, releases = ⌈units / batch⌉, no overspend when
the budget runs out mid-race; a worker SIGKILLed in the middle of a release leaves an intent
that the closer takes over and settles exactly once with the same idempotency key.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pf_metered.client import EscrowClient
from pf_metered.errors import BudgetExhausted
from pf_metered.meter.redis_store import RedisStore
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parents[1]
CTX = mp.get_context("fork")


def test_fleet_example_8_processes_exact_totals(redis_url):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "fleet.py"),
            "--workers",
            "8",
            "--units",
            "1500",
            "--rate",
            "0.0000123",
            "--batch",
            "100",
            "--chunk",
            "64",
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "units          12000 counted, 12000 recorded" in out.stdout
    assert "releases       120 (escrow history: 120)" in out.stdout
    assert "totals exact" in out.stdout


def test_fleet_example_budget_runs_out_mid_race(redis_url):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "fleet.py"),
            "--workers",
            "8",
            "--units",
            "700",
            "--rate",
            "0.001",
            "--batch",
            "64",
            "--budget",
            "3.00",
            "--chunk",
            "50",
            "--redis-url",
            redis_url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # 8 × 700 wanted, 3000 affordable: every one of them used, none more
    assert "units          3000 counted, 3000 recorded" in out.stdout
    assert "refunded       0.00 USDC of 3.00" in out.stdout


def _race(redis_url: str, prefix: str, sid: str, chunk: int, results, start) -> None:
    store = RedisStore(redis_url, prefix=prefix, chunk=chunk)
    store.load(sid)  # connected before the start, like the others
    # All start together: with a lease of 32 units, one worker spends the whole budget in a
    # few ms, before a loaded machine has even started the next process.
    start.wait(60)
    done = 0
    while True:
        try:
            store.add_units(sid, 1)
        except BudgetExhausted:
            store.flush(sid)
            fleet = store.fleet_status(sid)
            if fleet.remaining_units <= 0 and not fleet.leases:
                break
            time.sleep(0.002)
            continue
        done += 1
    store.close()
    results.put(done)


@pytest.mark.parametrize("chunk", [0, 32])
def test_no_overspend_when_the_budget_runs_out_mid_race(redis_url, redis_prefix, chunk):
    from pf_metered.meter.store import StreamConfig

    store = RedisStore(redis_url, prefix=redis_prefix)
    store.create(StreamConfig("race", "agent_b", "0.001", 2_500_000, 2_500))
    store.set_escrow("race", "esc_1")
    results = CTX.Queue()
    start = CTX.Barrier(8)
    procs = [
        CTX.Process(target=_race, args=(redis_url, redis_prefix, "race", chunk, results, start))
        for _ in range(8)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    fleet = store.fleet_status("race")
    store.close()
    assert sum(counts) == fleet.state.units == 2_500  # all of it, and not one unit more
    assert fleet.lost_units == 0 and fleet.reserved_units == 0
    assert sum(1 for c in counts if c) >= 2  # it really was a race


def _doomed_worker(base_url, api_key, redis_url, prefix, spec, after_send, ready) -> None:
    """Record a batch, then die (SIGKILL from the test) in the middle of releasing it."""
    store = RedisStore(redis_url, prefix=prefix)
    client = EscrowClient(api_key, base_url=base_url, server_honours_idempotency=True)
    stream = PaymentStream(client, store=store, background=False, **spec)
    stream.open()
    stream.record(100)
    real = client.release_partial

    def release_then_hang(*args, **kwargs):
        if after_send:
            real(*args, **kwargs)  # the escrow has it; the store never hears back
        ready.put(os.getpid())
        time.sleep(600)

    client.release_partial = release_then_hang  # type: ignore[method-assign]
    stream.pump()


@pytest.mark.parametrize("after_send", [False, True], ids=["before-send", "after-send"])
def test_worker_killed_mid_release_is_taken_over_and_settled_once(
    redis_url, redis_prefix, after_send
):
    with Sandbox() as sb:
        server = sb.serve()
        payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
        spec = {
            "to_agent_id": provider.agent_id,
            "rate": "0.001",
            "batch": 100,
            "budget": "1.00",
            "stream_id": uuid.uuid4().hex,
        }
        client = EscrowClient(
            payer.api_key, base_url=server.base_url, server_honours_idempotency=True
        )
        store = RedisStore(redis_url, prefix=redis_prefix, intent_lease=0.5)
        closer = PaymentStream(client, store=store, background=False, **spec)
        closer.open()
        ready = CTX.Queue()
        doomed = CTX.Process(
            target=_doomed_worker,
            args=(server.base_url, payer.api_key, redis_url, redis_prefix, spec, after_send, ready),
        )
        doomed.start()
        pid = ready.get(timeout=30)
        os.kill(pid, signal.SIGKILL)
        doomed.join(timeout=10)
        fleet = store.fleet_status(spec["stream_id"])
        assert [seq for seq, _, _ in fleet.owners] == [1]  # its intent is left pending
        assert fleet.owners[0][1] != store.worker
        closer.record(30)
        receipt = closer.close()  # takes the intent over after 0.5 s, then the final one
        escrow = client.get_escrow(closer.escrow_id)
        client.close()
        store.close()
        sb.audit()
    memos = [r.memo for r in escrow.releases]
    assert memos.count("batch:units 1-100") == 1  # settled once, whether it had landed or not
    assert memos == ["batch:units 1-100", "final:units 101-130"]
    assert receipt.units == 130 and receipt.releases == 2
    assert receipt.paid_micro == int(escrow.released * 1_000_000) == 130_000
    assert receipt.refunded_micro == 870_000
