"""An asyncio agent paying per call for many concurrent requests: ``async with`` a stream.

    python examples/async_agent.py --calls 500 --concurrency 50
"""

from __future__ import annotations

import argparse
import asyncio
import os

from pf_metered import AsyncPaymentStream, metered


def connect() -> tuple[object, str, object | None]:
    if os.environ.get("PF_API_KEY"):
        from pf_metered import AsyncEscrowClient

        provider = os.environ.get("PF_PROVIDER_ID")
        if not provider:
            raise SystemExit("set PF_PROVIDER_ID to the agent you are paying")
        return AsyncEscrowClient(), provider, None
    from pf_metered.sandbox import Sandbox

    sb = Sandbox()
    payer = sb.add_agent(balance="100")
    return sb.async_client(payer.api_key), sb.add_agent().agent_id, sb


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=50)
    args = ap.parse_args()
    client, provider, _sandbox = connect()
    gate = asyncio.Semaphore(args.concurrency)

    async with AsyncPaymentStream(client, provider, "0.002", batch=50, budget="5.00") as s:

        @metered(stream=s)
        async def ask(i: int) -> str:
            async with gate:
                await asyncio.sleep(0.001)  # the remote agent thinking
                return f"answer {i}"

        answers = await asyncio.gather(*(ask(i) for i in range(args.calls)))
        print(f"{len(answers)} answers; status: {s.status().units} units, "
              f"{s.status().released} USDC released so far")
    print(s.receipt)


if __name__ == "__main__":
    asyncio.run(main())
