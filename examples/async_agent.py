"""An asyncio agent paying per call for many concurrent requests: ``async with`` a stream.

python examples/async_agent.py --calls 500 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio

from _connect import connect

from pf_metered import AsyncPaymentStream, format_usdc, metered


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500, help="calls to make (default 500)")
    ap.add_argument(
        "--concurrency", type=int, default=50, help="calls in flight at once (default 50)"
    )
    args = ap.parse_args()
    budget_micro = max(5_000_000, 2_000 * args.calls)  # 0.002 USDC a call; at least 5.00
    world = connect(asynchronous=True, balance=format_usdc(budget_micro + 100_000_000))
    client, provider = world.client, world.provider
    gate = asyncio.Semaphore(args.concurrency)

    async with AsyncPaymentStream(
        client, provider, "0.002", batch=50, budget=format_usdc(budget_micro)
    ) as s:

        @metered(stream=s)
        async def ask(i: int) -> str:
            async with gate:
                await asyncio.sleep(0.001)  # the remote agent thinking
                return f"answer {i}"

        answers = await asyncio.gather(*(ask(i) for i in range(args.calls)))
        print(
            f"{len(answers)} answers; status: {s.status().units} units, "
            f"{format_usdc(s.status().released_micro)} USDC released so far"
        )
    print(s.receipt)


if __name__ == "__main__":
    asyncio.run(main())
