"""What durability costs per counted unit: MemoryStore vs SQLiteStore per_record / group.

Prints ns (or µs) per ``add_units`` for one thread and for 8 threads, and the same through a
``PaymentStream.record`` (releases in the background against the in-process sandbox). One run
on one machine; the disk's fsync latency dominates ``per_record``.

    .venv/bin/python benchmarks/durability.py [--units N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from pathlib import Path

from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import MemoryStore, StreamConfig


def make(kind: str, d: Path):
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite per_record":
        return SQLiteStore(d / f"{uuid.uuid4().hex}.db")
    if kind == "sqlite group":
        return SQLiteStore(d / f"{uuid.uuid4().hex}.db", durability="group")
    return SQLiteStore(d / f"{uuid.uuid4().hex}.db", durability="group", group_wait=True)


KINDS = ["memory", "sqlite per_record", "sqlite group", "sqlite group_wait"]


def bench_store(kind: str, d: Path, units: int, threads: int) -> float:
    store = make(kind, d)
    cfg = StreamConfig(uuid.uuid4().hex, "ag_b", "0.000001", 10**12, 10**12)
    store.create(cfg)
    store.set_escrow(cfg.stream_id, "esc_1")
    add = store.add_units
    sid = cfg.stream_id
    per = units // threads

    def work() -> None:
        for _ in range(per):
            add(sid, 1)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    sync = getattr(store, "sync", None)
    if sync:
        sync()  # every unit durable before the clock stops
    elapsed = time.perf_counter() - t0
    state = store.load(sid)
    assert state is not None and state.units == per * threads
    close = getattr(store, "close", None)
    if close:
        close()
    return elapsed / (per * threads) * 1e9


def bench_stream(kind: str, d: Path, units: int) -> float:
    from pf_metered.sandbox import Sandbox
    from pf_metered.stream import PaymentStream

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="1000"), sb.add_agent()
        client = sb.client(payer.api_key)
        store = make(kind, d)
        stream = PaymentStream(
            client, provider.agent_id, "0.000001", batch=1000, budget="100", store=store
        )
        stream.open()
        record = stream.record
        t0 = time.perf_counter()
        for _ in range(units):
            record()
        sync = getattr(store, "sync", None)
        if sync:
            sync()
        elapsed = time.perf_counter() - t0
        stream.close()
        return elapsed / units * 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--units", type=int, default=200_000)
    ap.add_argument(
        "--durable-units",
        type=int,
        default=3_000,
        help="units for per_record / group_wait (one fsync each when alone)",
    )
    ap.add_argument("--dir", default=None, help="where the SQLite files go (default: a tmpdir)")
    args = ap.parse_args()
    d = Path(args.dir or tempfile.mkdtemp(prefix="pfm-bench-"))
    print(f"files in {d}")
    print(f"{'store':22} {'1 thread':>14} {'8 threads':>14} {'stream.record':>14}   (ns per unit)")
    for kind in KINDS:
        slow = kind in ("sqlite per_record", "sqlite group_wait")
        n = args.durable_units if slow else args.units
        one = bench_store(kind, d, n, 1)
        eight = bench_store(kind, d, n, 8)
        rec = bench_stream(kind, d, n)
        print(f"{kind:22} {one:14,.0f} {eight:14,.0f} {rec:14,.0f}")
    print("per_record: every returned unit is on disk (fsync per call).")
    print("group: at risk on a crash = units recorded in the last group_interval (5 ms);")
    print("       a release never pays for a unit that is not on disk.")
    print("group_wait: nothing returned is at risk; concurrent recorders share one fsync.")


if __name__ == "__main__":
    main()
