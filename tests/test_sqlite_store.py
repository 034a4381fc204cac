"""The store contract run on MemoryStore and SQLiteStore, and what only a durable file can show:
several processes sharing one stream, and units surviving a process that dies without closing.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_contract import StoreContract, config, opened, settle_all

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import MemoryStore, Store

ROOT = Path(__file__).resolve().parents[1]


class TestMemoryStoreContract(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return MemoryStore()


class TestSQLiteStoreContract(StoreContract):
    concurrent_processes = True

    def make_store(self, tmp_path: Path) -> Store:
        return SQLiteStore(tmp_path / "meter.db")


class TestSQLiteGroupContract(StoreContract):
    concurrent_processes = True

    def make_store(self, tmp_path: Path) -> Store:
        return SQLiteStore(tmp_path / "meter.db", durability="group", lease_units=64)


class TestSQLiteGroupWaitContract(StoreContract):
    concurrent_processes = True

    def make_store(self, tmp_path: Path) -> Store:
        return SQLiteStore(tmp_path / "meter.db", durability="group", group_wait=True)


# ---------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"durability": "sometimes"}, "durability"),
        ({"group_interval": 0}, "group_interval"),
        ({"group_interval": True}, "group_interval"),
        ({"lease_units": 0}, "lease_units"),
    ],
)
def test_bad_options_refused(tmp_path: Path, kw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as err:
        SQLiteStore(tmp_path / "x.db", **kw)  # type: ignore[arg-type]
    assert err.value.field == field


def test_pragmas(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "m.db") as store:
        db = store._db()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_two_handles_see_one_stream(tmp_path: Path) -> None:
    a = SQLiteStore(tmp_path / "m.db")
    b = SQLiteStore(tmp_path / "m.db")
    cfg = opened(a, max_units=10)
    b.add_units(cfg.stream_id, 6)
    with pytest.raises(BudgetExhausted):
        a.add_units(cfg.stream_id, 5)
    intent = a.claim(cfg.stream_id, min_units=1)
    assert intent is not None
    assert b.claim(cfg.stream_id, min_units=0) is None  # pending in a is pending in b
    settle_all(b, cfg, intent)
    settle_all(a, cfg, intent)  # the same answer seen twice: paid once
    state = a.load(cfg.stream_id)
    assert state is not None and state.paid_micro == 9000 and state.releases == 1
    a.close()
    b.close()


def test_group_leases_never_overspend_across_handles(tmp_path: Path) -> None:
    a = SQLiteStore(tmp_path / "m.db", durability="group", lease_units=8)
    b = SQLiteStore(tmp_path / "m.db", durability="group", lease_units=8)
    cfg = opened(a, max_units=20)
    counted = 0
    for store in (a, b, a, b, a, b):
        for _ in range(5):
            try:
                store.add_units(cfg.stream_id, 1)
                counted += 1
            except BudgetExhausted:
                break
    assert counted <= 20
    a.close()  # gives its unused lease back
    while True:
        try:
            b.add_units(cfg.stream_id, 1)
            counted += 1
        except BudgetExhausted:
            break
    b.sync()
    state = b.load(cfg.stream_id)
    assert state is not None and state.units == counted == 20
    b.close()


def test_group_claim_commits_buffered_units_first(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = SQLiteStore(path, durability="group", group_interval=60)
    cfg = opened(store)
    store.add_units(cfg.stream_id, 42)
    intent = store.claim(cfg.stream_id, min_units=1)
    assert intent is not None and intent.units_to == 42
    # A second handle (another process, in effect) sees the units the intent pays for.
    other = SQLiteStore(path)
    state = other.load(cfg.stream_id)
    assert state is not None and state.units == 42 and state.pending == (intent,)
    other.close()
    store.close()


def test_closed_store_refuses(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "m.db")
    cfg = opened(store)
    store.close()
    store.close()
    with pytest.raises(StreamClosed):
        store.add_units(cfg.stream_id, 1)


# ---------------------------------------------------------------------- processes
def _proc_record(path: str, stream_id: str, durability: str, out: mp.Queue[int]) -> None:
    store = SQLiteStore(path, durability=durability, lease_units=16)  # type: ignore[arg-type]
    counted = 0
    claims = 0
    while True:
        try:
            store.add_units(stream_id, 1)
            counted += 1
        except BudgetExhausted:
            break
        if counted % 17 == 0:
            intent = store.claim(stream_id, min_units=5)
            if intent is not None:
                cfg = config(1)  # rate only
                del cfg
                state = store.load(stream_id)
                assert state is not None
                from pf_metered.meter.store import intent_amount_micro

                store.settle(
                    stream_id, intent.seq, intent_amount_micro(state.config.parsed_rate, intent)
                )
                claims += 1
    store.close()
    out.put(counted)


@pytest.mark.parametrize("durability", ["per_record", "group"])
def test_processes_share_one_budget(tmp_path: Path, durability: str) -> None:
    path = str(tmp_path / "m.db")
    store = SQLiteStore(path)
    cfg = opened(store, max_units=300, rate="0.0000013")
    ctx = mp.get_context("spawn")
    out: mp.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_proc_record, args=(path, cfg.stream_id, durability, out))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    counts = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    final = store.claim(cfg.stream_id, min_units=0, final=True)
    assert final is not None
    settle_all(store, cfg, final)
    state = store.load(cfg.stream_id)
    assert state is not None
    assert state.units == sum(counts) == 300
    ranges = [(i.units_from, i.units_to) for i, _ in state.settled]
    assert ranges[0][0] == 0 and ranges[-1][1] == 300
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert state.paid_micro == cfg.parsed_rate.micro_half_up(300)
    store.close()


_DIE = textwrap.dedent(
    """
    import os, sys
    from pf_metered.meter.sqlite_store import SQLiteStore
    path, sid, mode, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = SQLiteStore(path, durability=mode, group_interval=60)
    for _ in range(n):
        store.add_units(sid, 1)
    if mode == "group" and sys.argv[5] == "sync":
        store.sync()
    if mode == "group" and sys.argv[5] == "claim":
        store.claim(sid, min_units=1)
    os._exit(0)  # no atexit, no close: as if killed
    """
)


@pytest.mark.parametrize(
    ("mode", "then", "survive"),
    [
        ("per_record", "-", 25),
        ("group", "sync", 25),
        ("group", "claim", 25),
        ("group", "-", 0),  # the documented window: buffered, never flushed (interval 60 s)
    ],
)
def test_units_survive_a_dead_process(tmp_path: Path, mode: str, then: str, survive: int) -> None:
    path = str(tmp_path / "m.db")
    store = SQLiteStore(path)
    cfg = opened(store)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", _DIE, path, cfg.stream_id, mode, "25", then],
        check=True,
        env=env,
        timeout=60,
    )
    state = store.load(cfg.stream_id)
    assert state is not None and state.units == survive
    # The dead process's lease is reclaimed so its budget is usable again.
    store.reclaim(cfg.stream_id)
    store.add_units(cfg.stream_id, cfg.max_units - survive)
    store.close()
