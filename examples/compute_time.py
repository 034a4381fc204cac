"""Pay an agent $0.50 per hour of compute while its heartbeat says it is alive.

Time is billed in micro-hours (3.6 ms, priced exactly at $0.0000005) and released every
simulated hour. ``--speedup`` runs simulated time faster than the wall clock so the demo
takes seconds; ``--fail-after`` makes the heartbeat fail after that many simulated hours,
which stops billing and closes the stream (the rest of the budget is refunded).

    python examples/compute_time.py --speedup 36000 --fail-after 3
"""

from __future__ import annotations

import argparse
import threading
import time
from decimal import Decimal

from _connect import connect

from pf_metered import PaymentStream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--speedup",
        type=float,
        default=36000.0,
        help="simulated seconds per real second (1 = real time)",
    )
    ap.add_argument(
        "--max-hours", type=int, default=8, help="hours of compute the budget pays for (default 8)"
    )
    ap.add_argument(
        "--fail-after",
        type=float,
        default=3.0,
        help="simulated hours after which the heartbeat fails",
    )
    args = ap.parse_args()
    world = connect()
    client, provider = world.client, world.provider

    start = time.monotonic_ns()

    def sim_ns() -> int:  # simulated time: the wall clock, sped up
        return int((time.monotonic_ns() - start) * args.speedup)

    fail_after_ns = int(args.fail_after * 3600 * 10**9)  # simulated hours, as ns

    def heartbeat() -> bool:
        return sim_ns() < fail_after_ns

    stopped = threading.Event()
    s = PaymentStream(
        client,
        provider,
        "0.50",
        per="hour",
        budget=Decimal("0.50") * args.max_hours,
        batch=1_000_000,
        auto_release_hours=args.max_hours + 1,
        memo="compute_time:rate=0.50/hr",
    )
    print(f"Streaming $0.50/hr to {provider}, max {args.max_hours}h (x{args.speedup:g} speed)")
    with s:
        start = time.monotonic_ns()  # the job starts once its escrow is locked
        clock = s.clock(heartbeat=heartbeat, every=600 / args.speedup, source=sim_ns)
        clock.start()
        deadline = args.max_hours * 3600 / args.speedup
        while clock.running and not stopped.wait(min(0.05, deadline)):
            if time.monotonic_ns() - start > deadline * 1e9:
                break
        clock.stop()
    hours = Decimal(clock.billed_units) / 1_000_000
    print(f"clock stopped ({clock.stopped_reason}) after {hours:.4f} billed hours")
    print(s.receipt)


if __name__ == "__main__":
    main()
