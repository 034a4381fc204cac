"""Agent A pays agent B $0.001 per inference call, released in batches of 100.

Runs against the embedded sandbox by default (no key, no network). With ``PF_API_KEY`` set
(and ``PF_PROVIDER_ID`` naming the provider agent) it pays on the live Purple Flea API.

    python examples/inference_stream.py --calls 1234
"""

from __future__ import annotations

import argparse
import os
import random
import time

from pf_metered import PaymentStream, metered


def connect() -> tuple[object, str, object | None]:
    """(client, provider id, sandbox or None)."""
    if os.environ.get("PF_API_KEY"):
        from pf_metered import EscrowClient

        provider = os.environ.get("PF_PROVIDER_ID")
        if not provider:
            raise SystemExit("set PF_PROVIDER_ID to the agent you are paying")
        return EscrowClient(), provider, None
    from pf_metered.sandbox import Sandbox

    sb = Sandbox()
    payer = sb.add_agent(balance="100")
    provider = sb.add_agent()
    return sb.client(payer.api_key), provider.agent_id, sb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1234)
    ap.add_argument("--budget", default="10.00", help="USDC locked in escrow")
    ap.add_argument("--latency-ms", type=float, default=0.5,
                    help="simulated inference time per call (0 for as fast as possible)")
    args = ap.parse_args()
    client, provider, sandbox = connect()

    with PaymentStream(client, provider, "0.001", batch=100, budget=args.budget,
                       auto_release_hours=24, memo="stream:inference:rate=0.001/call") as s:

        @metered(stream=s)
        def call_inference_provider(prompt: str) -> str:
            time.sleep(args.latency_ms / 1000)  # your inference call here
            return f"answer to {prompt!r} ({random.random():.3f})"

        for i in range(args.calls):
            call_inference_provider(f"question {i}")
    print(s.receipt)
    if sandbox is not None:
        print(f"provider balance: {sandbox.balance(provider)} USDC")


if __name__ == "__main__":
    main()
