"""Pay per data point: price ticks, order-book snapshots, news items and sensor readings.

One escrow per (provider, feed type), each with its own per-point price, releasing every
1000 points (the seed's data-feed case).

    python examples/data_feed.py --ticks 5000
"""

from __future__ import annotations

import argparse
import os
import random

from pf_metered import DataFeedPayments


def connect() -> tuple[object, str, object | None]:
    if os.environ.get("PF_API_KEY"):
        from pf_metered import EscrowClient

        provider = os.environ.get("PF_PROVIDER_ID")
        if not provider:
            raise SystemExit("set PF_PROVIDER_ID to the agent you are paying")
        return EscrowClient(), provider, None
    from pf_metered.sandbox import Sandbox

    sb = Sandbox()
    payer = sb.add_agent(balance="100")
    return sb.client(payer.api_key), sb.add_agent().agent_id, sb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=5000)
    args = ap.parse_args()
    client, provider, _sandbox = connect()
    rng = random.Random(7)
    counts = dict.fromkeys(("price_feed", "market_depth", "news_event", "sensor_reading"), 0)
    with DataFeedPayments(client, batch=1000) as feeds:
        feeds.subscribe(provider, "price_feed", budget="2.00")
        feeds.subscribe(provider, "market_depth", budget="2.00")
        feeds.subscribe(provider, "news_event", budget="2.00")
        feeds.subscribe(provider, "sensor_reading", budget="1.00")
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
