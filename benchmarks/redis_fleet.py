"""Fleet throughput on one Redis-backed stream: units/s and Redis round trips per unit.

    python benchmarks/redis_fleet.py [--units 20000] [--chunk 256] [--batch 1000] [--redis-url URL]

For 1, 2, 4 and 8 worker processes on ONE stream, each worker counts units through the
stream's hot path (``store.counter(sid).add(1)``, what ``PaymentStream.record()`` calls) and
claims and settles whichever batch is due every ``batch`` of its own units (the HTTP release
itself is left out: this measures the meter and Redis, not the escrow service). Two modes:

* direct (``chunk=0``): one atomic Lua script per unit;
* leased (``chunk=N``): budget headroom leased N units at a time, counted locally.

Round trips are counted twice: by the stores (script calls sent) and by the server
(``INFO commandstats`` deltas of EVALSHA/EVAL/SCRIPT LOAD; other clients of the same server
would add to it). Prints one table, then checks leased mode's bound (fewer than
``0.01`` round trips per unit, :data:`LEASED_TRIPS_PER_UNIT`) and exits 1 if it was missed.

The budget is the units the workers record plus one chunk per worker: a worker that finishes
may still hold up to a chunk of lease until it closes, and a fleet whose budget is exactly its
work would then see a late worker refused with budget left (leased to a finished one). That
end-of-budget race is the stores' tests' business (``tests/test_redis_fleet.py``); here every
unit recorded must be counted, exactly.

Without ``--redis-url`` it starts a private ``redis-server`` on a free loopback port (no
persistence) and stops it afterwards, so the server's counts are this benchmark's alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
import uuid
from pathlib import Path

import redis

from pf_metered.meter.redis_store import RedisStore, purge_prefix
from pf_metered.meter.store import StreamConfig, intent_amount_micro

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from redis_server import RedisServer  # the tests' private-server helper

CTX = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")

LEASED_TRIPS_PER_UNIT = 0.01
"""Leased mode's budget of Redis round trips per counted unit (issue 14.4)."""


def _calls(client: redis.Redis) -> int:
    """EVALSHA/EVAL calls the server has run: every store operation is one of them.

    (Commands run inside a script are counted in commandstats as well, so the total over all
    commands would overstate the network round trips; the script calls are the round trips.)
    """
    stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("evalsha", "eval", "script|load")
    )


def _worker(job: tuple, chans: tuple) -> None:
    try:
        _work(job, chans)
    except BaseException as exc:  # the parent stops at once instead of waiting on the queue
        chans[2].put(f"worker {os.getpid()} failed: {exc!r}")
        raise


def _work(job: tuple, chans: tuple) -> None:
    url, prefix, sid, chunk, units, batch = job
    ready, go, out = chans
    store = RedisStore(url, prefix=prefix, chunk=chunk)
    cfg = store.load(sid).config
    counter = store.counter(sid)
    ready.put(os.getpid())
    go.wait()
    rate = cfg.parsed_rate
    for i in range(1, units + 1):
        counter.add(1)
        if i % batch == 0:
            intent = store.claim(sid, min_units=batch)
            if intent is not None:
                store.settle(sid, intent.seq, intent_amount_micro(rate, intent))
    store.flush(sid)
    trips = store.round_trips
    store.close()
    out.put(trips)


def run(url: str, procs: int, units: int, chunk: int, batch: int) -> dict[str, float]:
    prefix = f"pfm-bench-{uuid.uuid4().hex[:8]}"
    sid = "bench"
    admin = redis.Redis.from_url(url)
    store = RedisStore(url, prefix=prefix)
    total = procs * units
    budget = total + procs * chunk  # see the module docstring
    store.create(StreamConfig(sid, "agent_b", "0.000001", budget, budget, batch_units=batch))
    store.set_escrow(sid, "esc_bench")
    ready, go, out = CTX.Queue(), CTX.Event(), CTX.Queue()
    workers = [
        CTX.Process(
            target=_worker,
            args=((url, prefix, sid, chunk, units, batch), (ready, go, out)),
        )
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=60)
    before = _calls(admin)
    t0 = time.perf_counter()
    go.set()
    answers = [out.get(timeout=600) for _ in workers]
    elapsed = time.perf_counter() - t0
    failed = [a for a in answers if isinstance(a, str)]
    if failed:
        raise SystemExit("; ".join(failed))
    trips = sum(answers)
    server_calls = _calls(admin) - before
    for w in workers:
        w.join()
    counted = store.load(sid).units
    store.close()
    purge_prefix(admin, prefix)
    admin.close()
    if counted != total:
        raise SystemExit(f"NOT EXACT: {counted} counted, {total} recorded")
    return {
        "units_per_s": total / elapsed,
        "store_trips_per_unit": trips / total,
        "server_cmds_per_unit": server_calls / total,
        "seconds": elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", type=int, default=20_000, help="units per process")
    p.add_argument("--chunk", type=int, default=256, help="lease size in leased mode")
    p.add_argument("--batch", type=int, default=1_000, help="units per release")
    p.add_argument(
        "--redis-url", default=None, help="use this server (default: start a private one)"
    )
    p.add_argument("--procs", default="1,2,4,8")
    args = p.parse_args()
    if args.redis_url is None:
        with RedisServer() as server:
            print(f"private redis-server on {server.url}")
            table(args, server.url)
    else:
        table(args, args.redis_url)


def table(args: argparse.Namespace, url: str) -> None:
    print(f"{os.cpu_count()} CPUs; {args.units:,} units per process; batch {args.batch}")
    print(
        f"{'mode':<14}{'procs':>6}{'units/s':>12}{'trips/unit':>12}{'server/unit':>12}"
        f"{'seconds':>9}"
    )
    worst = 0.0
    for chunk in (0, args.chunk):
        mode = "direct" if chunk == 0 else f"leased({chunk})"
        units = args.units if chunk else max(args.units // 4, args.batch)
        for n in (int(x) for x in args.procs.split(",")):
            r = run(url, n, units, chunk, args.batch)
            print(
                f"{mode:<14}{n:>6}{r['units_per_s']:>12,.0f}{r['store_trips_per_unit']:>12.4f}"
                f"{r['server_cmds_per_unit']:>12.4f}{r['seconds']:>9.2f}",
                flush=True,
            )
            if chunk:
                worst = max(worst, r["store_trips_per_unit"], r["server_cmds_per_unit"])
    ok = worst < LEASED_TRIPS_PER_UNIT
    print(
        f"leased mode: at most {worst:.4f} round trips per unit "
        f"({'under' if ok else 'NOT under'} {LEASED_TRIPS_PER_UNIT})"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
