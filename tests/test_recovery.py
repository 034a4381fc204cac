"""Resume after a crash (simulated in-process: a stream abandoned mid-way, its store reopened).

Each test leaves the journal in one of the states a crash can leave it in, then checks that
``PaymentStream.resume`` finishes the job with the same idempotency keys: released =
rate × units exactly, released + refunded = budget, nothing sent twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from faultkit import FaultyTransport

from pf_metered.errors import AmbiguousRelease, InvalidInput
from pf_metered.meter.open import open_store
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import MemoryStore, intent_amount_micro
from pf_metered.sandbox import Sandbox
from pf_metered.stream import AsyncPaymentStream, PaymentStream

RATE = "0.0000137"


class World:
    def __init__(self) -> None:
        self.sandbox = Sandbox()
        self.payer = self.sandbox.add_agent(balance="100")
        self.provider = self.sandbox.add_agent()
        self.transport = FaultyTransport(self.sandbox.transport(), lambda r: None)

    def client(self):
        return self.sandbox.client(
            self.payer.api_key, transport=self.transport, _sleep=lambda s: None
        )

    def aclient(self):
        return self.sandbox.async_client(
            self.payer.api_key, transport=self.transport, _sleep=_anosleep
        )

    def check(self, escrow_id: str, units: int, budget_micro: int) -> None:
        from pf_metered.money import parse_rate

        escrow = self.sandbox.escrow(escrow_id)
        assert escrow.released_micro == parse_rate(RATE).micro_half_up(units)
        assert escrow.status == "refunded" or escrow.released_micro == budget_micro
        assert escrow.released_micro + escrow.refunded_micro == budget_micro
        keys = [k for _, path, k in self.transport.requests if path.endswith("release-partial")]
        amounts = [r.amount for r in escrow.releases]
        assert len(amounts) == len({r.memo for r in escrow.releases})  # each release once
        assert len(set(keys)) >= len(amounts)
        self.sandbox.audit()


async def _anosleep(seconds: float) -> None:
    return None


@pytest.fixture
def world():
    w = World()
    yield w
    w.sandbox.close()


def crashed_stream(world: World, path: Path, units: int, **kw) -> tuple[PaymentStream, SQLiteStore]:
    store = SQLiteStore(path)
    stream = PaymentStream(
        world.client(),
        world.provider.agent_id,
        RATE,
        batch=50,
        budget="1",
        store=store,
        background=False,
        **kw,
    )
    stream.open()
    for _ in range(units):
        stream.record()
    return stream, store


def test_counted_units_are_released_on_resume(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old, _ = crashed_stream(world, path, 123)
    sid, eid = old.stream_id, old.escrow_id
    assert eid is not None
    resumed = PaymentStream.resume(str(path), sid, world.client())
    assert resumed.escrow_id == eid
    assert world.sandbox.escrow(eid).released_micro == resumed.meter.rate.micro_floor(123)
    receipt = resumed.close()
    assert receipt.units == 123
    world.check(eid, 123, 1_000_000)
    assert resumed.close() is receipt  # closing twice: the same receipt, no request
    again = PaymentStream.resume(str(path), sid, world.client())  # after close: no request
    n = len(world.transport.requests)
    assert again.closed and again.receipt is not None and again.receipt.units == 123
    assert len(world.transport.requests) == n
    world.check(eid, 123, 1_000_000)


def test_pending_intent_never_sent_is_sent_with_its_key(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old, store = crashed_stream(world, path, 77)
    intent = store.claim(old.stream_id, min_units=1)  # journaled, then the process died
    assert intent is not None
    resumed = PaymentStream.resume(path, old.stream_id, world.client())
    keys = [k for _, p, k in world.transport.posts("release-partial")]
    assert keys[0] == intent.idempotency_key
    resumed.close()
    world.check(old.escrow_id, 77, 1_000_000)


def test_pending_intent_that_landed_is_settled_from_the_escrow(
    world: World, tmp_path: Path
) -> None:
    path = tmp_path / "j.db"
    old, store = crashed_stream(world, path, 200)
    intent = store.claim(old.stream_id, min_units=1)
    assert intent is not None
    amount = intent_amount_micro(old.meter.rate, intent)
    from pf_metered.money import format_usdc

    # Sent and applied, the answer never recorded (crash right after HTTP success).
    world.client().release_partial(
        old.escrow_id,
        format_usdc(amount),
        memo="batch:units 1-200",
        idempotency_key=intent.idempotency_key,
    )
    before = len(world.transport.posts("release-partial"))
    resumed = PaymentStream.resume(path, old.stream_id, world.client())
    assert len(world.transport.posts("release-partial")) == before  # reconciled, not resent
    state = SQLiteStore(path).load(old.stream_id)
    assert state is not None and state.paid_micro == amount and not state.pending
    resumed.close()
    world.check(old.escrow_id, 200, 1_000_000)


def test_disagreeing_escrow_is_refused_not_guessed(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old, store = crashed_stream(world, path, 200)
    assert store.claim(old.stream_id, min_units=1) is not None
    world.client().release_partial(old.escrow_id, "0.000001", idempotency_key="someone-else")
    with pytest.raises(AmbiguousRelease):
        PaymentStream.resume(path, old.stream_id, world.client())


def test_crash_while_closing_finishes_the_close_once(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old, store = crashed_stream(world, path, 31)
    final = store.claim(old.stream_id, min_units=0, final=True)
    assert final is not None
    resumed = PaymentStream.resume(path, old.stream_id, world.client())
    assert resumed.closed
    world.check(old.escrow_id, 31, 1_000_000)
    refunds = world.transport.posts("/refund")
    assert len(refunds) == 1
    resumed.close()
    assert len(world.transport.posts("/refund")) == 1


def test_crash_after_refund_before_it_was_recorded(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old, store = crashed_stream(world, path, 64)
    old.flush()
    final = store.claim(old.stream_id, min_units=0, final=True)
    assert final is not None
    amount = intent_amount_micro(old.meter.rate, final)
    from pf_metered.money import format_usdc

    c = world.client()
    c.release_partial(
        old.escrow_id, format_usdc(amount), memo="final", idempotency_key=final.idempotency_key
    )
    c.refund(old.escrow_id, idempotency_key=f"pfm-{old.stream_id}-refund")
    resumed = PaymentStream.resume(path, old.stream_id, world.client())
    assert resumed.closed and resumed.receipt is not None
    assert resumed.receipt.refunded_micro == 1_000_000 - resumed.meter.rate.micro_half_up(64)
    world.check(old.escrow_id, 64, 1_000_000)
    assert len(world.transport.posts("/refund")) == 1


def test_crash_before_the_escrow_was_recorded(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    store = SQLiteStore(path)
    stream = PaymentStream(
        world.client(),
        world.provider.agent_id,
        RATE,
        batch=10,
        budget="2",
        store=store,
        background=False,
    )
    world.transport.schedule = lambda r: "timeout" if r.method == "POST" else None
    with pytest.raises(Exception):
        stream.open()
    world.transport.schedule = lambda r: None
    resumed = PaymentStream.resume(path, stream.stream_id, world.client())
    opens = world.transport.posts("/escrow")
    assert len({k for _, p, k in opens if p.endswith("/escrow")}) == 1  # one key for the lock
    resumed.record(5)
    receipt = resumed.close()
    assert len(world.sandbox.agent_ids()) == 2
    world.check(receipt.escrow_id, 5, 2_000_000)


def test_resume_refuses_unknown_stream(tmp_path: Path, world: World) -> None:
    with pytest.raises(InvalidInput):
        PaymentStream.resume(tmp_path / "j.db", "nope", world.client())
    with pytest.raises(InvalidInput):
        PaymentStream.resume(MemoryStore(), "", world.client())


def test_async_resume(world: World, tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    old, store = crashed_stream(world, path, 99)
    assert store.claim(old.stream_id, min_units=1) is not None

    async def go() -> None:
        client = world.aclient()
        resumed = await AsyncPaymentStream.resume(path, old.stream_id, client)
        resumed.record(1)
        await resumed.close()
        await client.aclose()

    asyncio.run(go())
    world.check(old.escrow_id, 100, 1_000_000)


def test_open_store_specs(tmp_path: Path) -> None:
    assert isinstance(open_store(None), MemoryStore)
    s = open_store(tmp_path / "a.db")
    assert isinstance(s, SQLiteStore) and s.durability == "per_record"
    g = open_store(f"sqlite:///{tmp_path}/b.db?durability=group")
    assert isinstance(g, SQLiteStore) and g.durability == "group"
    m = MemoryStore()
    assert open_store(m) is m
    for bad in (3, b"x", "", "ftp://x", f"{tmp_path}/c.db?fast=1", object()):
        with pytest.raises(InvalidInput) as err:
            open_store(bad)
        assert err.value.field == "store"


def test_stream_accepts_a_path(world: World, tmp_path: Path) -> None:
    with PaymentStream(
        world.client(),
        world.provider.agent_id,
        RATE,
        batch=10,
        budget="1",
        store=str(tmp_path / "p.db"),
    ) as s:
        s.record(25)
    assert isinstance(s.store, SQLiteStore)
    world.check(s.escrow_id, 25, 1_000_000)


_SIGTERM_CHILD = """
import os, sys
from pf_metered.client import EscrowClient
from pf_metered.stream import PaymentStream
client = EscrowClient(os.environ["PFM_KEY"], base_url=os.environ["PFM_BASE_URL"])
s = PaymentStream(client, os.environ["PFM_PROVIDER"], "0.001", batch=1000, budget="2",
                  store=os.environ.get("PFM_JOURNAL") or None)
s.open()
s.record(321)
print(s.escrow_id, flush=True)
sys.stdin.read()  # blocks until killed
"""


@pytest.mark.parametrize("journal", [False, True])
def test_sigterm_flushes_due_releases(tmp_path: Path, journal: bool) -> None:
    import os
    import signal
    import subprocess
    import sys

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="10"), sb.add_agent()
        server = sb.serve()
        env = {
            **os.environ,
            "PFM_KEY": payer.api_key,
            "PFM_BASE_URL": server.base_url,
            "PFM_PROVIDER": provider.agent_id,
            "PFM_JOURNAL": str(tmp_path / "j.db") if journal else "",
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGTERM_CHILD],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        escrow_id = proc.stdout.readline().strip()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        assert code == -signal.SIGTERM  # still dies of SIGTERM, after flushing
        assert sb.escrow(escrow_id).released_micro == 321_000


def test_sigterm_flush_is_bounded_and_the_journal_keeps_the_rest(tmp_path: Path) -> None:
    """The escrow service hangs at SIGTERM: the process still dies within its exit timeout
    (PF_METERED_EXIT_TIMEOUT), not when the hang ends, and resume from the journal releases
    the units exactly once with the journaled key."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import threading

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="10"), sb.add_agent()
        server = sb.serve()
        entered, go_on, hang_over = threading.Event(), threading.Event(), threading.Event()

        def hang(request: object) -> None:
            if getattr(request, "path", "").endswith("release-partial"):
                entered.set()
                go_on.wait()  # until the test lets it go: the child cannot outwait it
                hang_over.set()
                raise RuntimeError("the service fell over (test)")  # nothing applied

        sb.before_handle = hang
        journal = str(tmp_path / "j.db")
        env = {
            **os.environ,
            "PFM_KEY": payer.api_key,
            "PFM_BASE_URL": server.base_url,
            "PFM_PROVIDER": provider.agent_id,
            "PFM_JOURNAL": journal,
            "PF_METERED_EXIT_TIMEOUT": "0.3",
        }
        proc = subprocess.Popen(
            [sys.executable, "-c", _SIGTERM_CHILD],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            escrow_id = proc.stdout.readline().strip()
            proc.send_signal(signal.SIGTERM)
            assert entered.wait(10)  # the flush's release reached the service and hangs
            code = proc.wait(timeout=60)  # a guard against a hang, not a measurement
            assert code == -signal.SIGTERM
            assert not hang_over.is_set()  # it left on its exit timeout, the release still hung
        finally:
            go_on.set()
            if proc.poll() is None:
                proc.kill()
        sb.before_handle = None
        assert sb.escrow(escrow_id).released_micro == 0
        with sqlite3.connect(journal) as db:
            ((sid,),) = db.execute("SELECT stream_id FROM streams").fetchall()
        store = SQLiteStore(journal)
        receipt = PaymentStream.resume(store, sid, sb.client(payer.api_key)).close()
        escrow = sb.escrow(escrow_id)
        assert receipt.units == 321
        assert escrow.released_micro == receipt.paid_micro == 321_000
        assert escrow.refunded_micro == 2_000_000 - 321_000
        assert len(escrow.releases) == 1
        store.close()
        sb.audit()
