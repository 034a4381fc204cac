"""Agent A pays agent B $0.001 per inference call, released in batches of 100.

Runs against the embedded sandbox by default (no key, no network). With ``PF_API_KEY`` set
(and ``PF_PROVIDER_ID`` naming the provider agent) it pays on the live Purple Flea API.

    python examples/inference_stream.py --calls 1234
"""

from __future__ import annotations

import argparse
import random
import time

from _connect import connect

from pf_metered import BudgetExhausted, PaymentStream, format_usdc, metered


def report(stream: PaymentStream, done: int, total: int) -> None:
    """One progress line: what has been used, paid and is still owed."""
    st = stream.status()
    bar = "#" * (20 * done // total)
    print(
        f"[{bar:<20}] {done:>6}/{total} calls  released {format_usdc(st.released_micro)} USDC in "
        f"{len(st.history)} batch{'es' if len(st.history) != 1 else ''}  "
        f"{st.pending_units} units not yet paid",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--calls", type=int, default=1234, help="inference calls to make (default 1234)"
    )
    ap.add_argument(
        "--budget", default="10.00", help="USDC locked in escrow, at least 1.00 (default 10.00)"
    )
    ap.add_argument(
        "--latency-ms",
        type=float,
        default=0.5,
        help="simulated inference time per call (0 for as fast as possible)",
    )
    args = ap.parse_args()
    world = connect()
    client, provider, sandbox = world.client, world.provider, world.sandbox

    with PaymentStream(
        client,
        provider,
        "0.001",
        batch=100,
        budget=args.budget,
        auto_release_hours=24,
        memo="stream:inference:rate=0.001/call",
    ) as s:

        @metered(stream=s)
        def call_inference_provider(prompt: str) -> str:
            time.sleep(args.latency_ms / 1000)  # your inference call here
            return f"answer to {prompt!r} ({random.random():.3f})"

        step = max(1, args.calls // 5)
        for i in range(args.calls):
            try:
                call_inference_provider(f"question {i}")
            except BudgetExhausted:
                print(
                    f"budget of {args.budget} USDC spent after {i} calls; raise --budget for more"
                )
                break
            if (i + 1) % step == 0 or i + 1 == args.calls:
                report(s, i + 1, args.calls)
    print(s.receipt)
    if sandbox is not None:
        print(f"provider balance: {sandbox.balance(provider)} USDC")


if __name__ == "__main__":
    main()
