"""Pay per data point: price ticks, order-book snapshots, news items and sensor readings.

One escrow per (provider, feed type), each with its own per-point price, releasing every
1000 points (the seed's data-feed case).

    python examples/data_feed.py --ticks 5000
"""

from __future__ import annotations

import argparse
import random

from _connect import connect

from pf_metered import DataFeedPayments, format_usdc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--ticks",
        type=int,
        default=5000,
        help="price ticks to receive; the other feeds scale with it (default 5000)",
    )
    args = ap.parse_args()
    # Each feed's expected cost is 0.0001 USDC a tick (see the loop); lock 4x that, at least 2.00.
    budget = format_usdc(max(2_000_000, 400 * args.ticks))
    world = connect(balance=format_usdc(4 * max(2_000_000, 400 * args.ticks) + 100_000_000))
    client, provider = world.client, world.provider
    rng = random.Random(7)
    counts = dict.fromkeys(("price_feed", "market_depth", "news_event", "sensor_reading"), 0)
    with DataFeedPayments(client, batch=1000) as feeds:
        for feed in counts:
            feeds.subscribe(provider, feed, budget=budget)
        for _ in range(args.ticks):
            feeds.record(provider, "price_feed")
            counts["price_feed"] += 1
            if rng.random() < 0.2:
                feeds.record(provider, "market_depth")
                counts["market_depth"] += 1
            if rng.random() < 0.01:
                feeds.record(provider, "news_event")
                counts["news_event"] += 1
            feeds.record(provider, "sensor_reading", n=2)
            counts["sensor_reading"] += 2
    receipts = feeds.close()
    for (_, feed), receipt in receipts.items():
        print(f"{feed}: {counts[feed]} points")
        print(receipt)
    total = sum(r.paid for r in receipts.values())
    print(f"total paid: {total} USDC")


if __name__ == "__main__":
    main()
