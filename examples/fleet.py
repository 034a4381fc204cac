"""A fleet of worker processes metering ONE payment stream through Redis, against the sandbox.

    python examples/fleet.py --workers 8 --units 2000 --rate 0.001 --batch 100

The coordinator serves a sandbox escrow ledger on loopback, opens one stream (budget locked in
one escrow) in a ``RedisStore``, and starts N worker processes. Each joins the same stream id,
records U units (leasing budget headroom from Redis in chunks, so most units cost no round
trip) and releases whichever whole batches are due; any worker may claim a batch, exactly one
does. The coordinator then releases what is still due, closes the stream for everybody (last
partial batch, refund of the rest) and checks the books against the escrow:

* units counted = N × U (or, with a budget too small, every unit a worker was allowed);
* releases = ⌈units / batch⌉, released = rate × units (half-up), refunded = budget − released;
* the sandbox ledger audit passes.

It prints the receipt and exits 1 if any of that is not exact, 2 if Redis is unreachable.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
import uuid
from typing import Any

from pf_metered.errors import BudgetExhausted, StreamClosed
from pf_metered.money import format_usdc, parse_amount, parse_rate


def _stream(conn: dict[str, Any], chunk: int) -> Any:
    """A ``PaymentStream`` on the shared stream id, in a ``RedisStore`` of this process."""
    from pf_metered.client import EscrowClient
    from pf_metered.meter.redis_store import RedisStore
    from pf_metered.stream import PaymentStream

    store = RedisStore(conn["redis_url"], prefix=conn["prefix"], chunk=chunk)
    # Every worker's client must send the same body for the same key (a take-over resends
    # another worker's release), so none of them should guess whether the server honours keys.
    client = EscrowClient(
        conn["api_key"], base_url=conn["base_url"], server_honours_idempotency=True
    )
    return PaymentStream(client, store=store, background=False, **conn["spec"])


def worker(conn: dict[str, Any], units: int, chans: tuple[Any, Any, Any]) -> None:
    """Join the shared stream, record ``units`` units, release due batches, report."""
    ready, start, results = chans
    spec = conn["spec"]
    stream = _stream(conn, conn["chunk"])
    stream.open()  # the stream exists in Redis with its escrow: this joins it, locks nothing
    batch = spec["batch"]
    ready.put(1)
    start.wait()
    store = stream.store
    done = 0
    while done < units:
        try:
            stream.record()
        except StreamClosed:
            break
        except BudgetExhausted:
            # Out of headroom here; other workers may still hold leases they will give back.
            # Stop only when the fleet's budget is spent for good.
            fleet = store.fleet_status(stream.stream_id)
            if fleet.remaining_units <= 0 and not fleet.leases:
                break
            time.sleep(0.005)
            continue
        done += 1
        if done % batch == 0:
            stream.pump()  # claims a due batch if nobody else has; one Redis round trip
    store.flush(stream.stream_id)  # push what this worker counted locally
    stream.pump()
    store.close()  # give the unused lease back
    stream.client.close()
    results.put((done, store.round_trips))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--workers", type=int, default=4, help="worker processes sharing the stream (default 4)"
    )
    parser.add_argument("--units", type=int, default=1000, help="units per worker")
    parser.add_argument("--rate", default="0.001", help="USDC per unit, e.g. 0.001")
    parser.add_argument("--batch", type=int, default=100, help="units per release")
    parser.add_argument(
        "--chunk",
        type=int,
        default=100,
        help="units of budget a worker leases per Redis round trip (0: none)",
    )
    parser.add_argument(
        "--budget", default=None, help="USDC locked (default: what N × U units cost, plus 10%%)"
    )
    parser.add_argument(
        "--redis-url",
        default="redis://127.0.0.1:6379/0",
        help="the Redis the workers share (default %(default)s)",
    )
    parser.add_argument(
        "--start-method",
        choices=mp.get_all_start_methods(),
        default="fork" if "fork" in mp.get_all_start_methods() else "spawn",
        help="fork (default where available: children start in milliseconds) or spawn",
    )
    args = parser.parse_args(argv)
    if args.workers < 1 or args.units < 0 or args.batch < 1 or args.chunk < 0:
        parser.error("--workers and --batch must be >= 1, --units and --chunk >= 0")

    import redis

    from pf_metered.meter.redis_store import purge_prefix
    from pf_metered.sandbox import Sandbox

    try:
        redis.Redis.from_url(args.redis_url, socket_connect_timeout=1.0).ping()
    except redis.RedisError as exc:
        print(f"Redis unreachable at {args.redis_url}: {exc}", file=sys.stderr)
        return 2

    rate = parse_rate(args.rate)
    want_units = args.workers * args.units
    if args.budget is not None:
        budget_micro = parse_amount(args.budget, "budget")
    else:
        budget_micro = max(rate.micro_half_up(want_units) * 11 // 10, 1_000_000)
    budget = format_usdc(budget_micro)
    prefix = f"pfm-fleet-{uuid.uuid4().hex[:10]}"
    ctx = mp.get_context(args.start_method)
    ok = True
    with Sandbox() as sb:
        server = sb.serve()
        payer = sb.add_agent(balance=format_usdc(budget_micro + 1_000_000))
        provider = sb.add_agent()
        spec: dict[str, Any] = {
            "to_agent_id": provider.agent_id,
            "rate": args.rate,
            "batch": args.batch,
            "budget": budget,
            "stream_id": uuid.uuid4().hex,
        }
        conn = {
            "base_url": server.base_url,
            "api_key": payer.api_key,
            "spec": spec,
            "redis_url": args.redis_url,
            "prefix": prefix,
            "chunk": args.chunk,
        }
        coordinator = _stream(conn, 0)
        coordinator.open()
        ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(
                target=worker,
                args=(conn, args.units, (ready, start, results)),
            )
            for _ in range(args.workers)
        ]
        try:
            for p in procs:
                p.start()
            for _ in procs:
                ready.get(timeout=60)
            t0 = time.perf_counter()
            start.set()
            reports = [results.get(timeout=300) for _ in procs]
            elapsed = time.perf_counter() - t0
            for p in procs:
                p.join(timeout=30)
            coordinator.pump()  # whole batches still due
            receipt = coordinator.close()
            escrow = coordinator.client.get_escrow(coordinator.escrow_id)
            fleet = coordinator.store.fleet_status(coordinator.stream_id)
            audit = sb.audit(raise_on_error=False)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            coordinator.store.close()
            coordinator.client.close()
            purge_prefix(redis.Redis.from_url(args.redis_url), prefix)

    recorded = sum(done for done, _ in reports)
    trips = sum(rt for _, rt in reports)
    expected_units = min(want_units, coordinator.max_units)
    released_micro = int(escrow.released * 1_000_000)
    refunded_micro = int(escrow.refunded * 1_000_000)
    want_releases = -(-receipt.units // args.batch) if rate.micro_floor(args.batch) else None
    print(receipt)
    print()
    print(
        f"workers        {args.workers} × {args.units} units, batch {args.batch}, "
        f"chunk {args.chunk}"
    )
    print(f"units          {receipt.units} counted, {recorded} recorded by the workers")
    print(f"releases       {receipt.releases} (escrow history: {escrow.total_releases})")
    print(
        f"released       {format_usdc(released_micro)} USDC "
        f"(rate × units = {format_usdc(rate.micro_half_up(receipt.units))})"
    )
    print(f"refunded       {format_usdc(refunded_micro)} USDC of {budget}")
    print(f"throughput     {recorded / elapsed:,.0f} units/s over {elapsed:.2f} s")
    print(f"redis          {trips} worker round trips, {trips / max(recorded, 1):.4f} per unit")
    if fleet is not None and (fleet.lost_units or fleet.revoked_units):
        print(f"leases         {fleet.revoked_units} units revoked, {fleet.lost_units} lost")

    checks = {
        "every recorded unit was counted": receipt.units == recorded,
        "units as asked (or up to the budget)": receipt.units == expected_units,
        "released = rate × units": released_micro == rate.micro_half_up(receipt.units),
        "receipt paid = escrow released": receipt.paid_micro == released_micro,
        "released + refunded = budget": released_micro + refunded_micro == budget_micro,
        "escrow releases = receipt releases": escrow.total_releases == receipt.releases,
        "releases = ceil(units / batch)": want_releases is None
        or receipt.releases == want_releases,
        "ledger audit": audit.ok,
        "no unit lost": fleet is None or fleet.lost_units == 0,
    }
    for name, passed in checks.items():
        if not passed:
            ok = False
            print(f"NOT EXACT: {name}", file=sys.stderr)
    print("totals exact" if ok else "TOTALS NOT EXACT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
