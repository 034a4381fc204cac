"""Agent A pays agent B's HTTP service per call: ``@metered`` around an httpx call whose
``auth=stream.auth()`` tells B's payment gate which stream pays.

With no arguments it runs the whole story in one process: an in-process sandbox, the provider's
service (``examples/provider_service.py``) on a loopback port, and this consumer. With
``--service URL`` it calls a running provider, paying from ``PF_API_KEY`` (``source`` the keys
file of ``pf-metered sandbox serve``; ``PF_PROVIDER_ID`` names the provider).

``--stop-paying-after K`` plays a consumer that stops counting (so stops paying) after K calls
and keeps calling until refused; ``--lie someone-else|closed|other-provider`` plays a caller
that names an escrow it has no right to. The last line is a JSON summary.

    python examples/provider_client.py --calls 500
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from pf_metered import EscrowClient, PaymentStream, metered
from pf_metered.client import register_agent
from pf_metered.provider import HEADER_ESCROW, HEADER_PROOF

sys.path.insert(0, str(Path(__file__).resolve().parent))


def call_until_refused(http: httpx.Client, url: str, headers: dict[str, str], limit: int) -> Any:
    """Call without counting (a consumer that stopped paying) until the gate says 402."""
    for extra in range(limit + 1):
        r = http.post(url, json={"prompt": "free lunch?"}, headers=headers)
        if r.status_code == 402:
            return extra, r.json()
        r.raise_for_status()
    return limit, None


def lie(kind: str, client: EscrowClient, provider: str, url: str, http: httpx.Client) -> Any:
    """Name an escrow this caller has no right to; return the gate's answer."""
    if kind == "someone-else":
        victim = PaymentStream(client, provider, "0.001", batch=100, budget="1.00").open()
        headers = {HEADER_ESCROW: str(victim.escrow_id), HEADER_PROOF: secrets.token_hex(16)}
        cleanup = victim.close
    elif kind == "closed":
        old = PaymentStream(client, provider, "0.001", batch=100, budget="1.00").open()
        headers = old.provider_headers()
        old.close()
        cleanup = None
    elif kind == "other-provider":
        other = register_agent().agent_id  # a fresh agent (PF_CASINO_URL names the registry)
        wrong = PaymentStream(client, other, "0.001", batch=100, budget="1.00").open()
        headers = wrong.provider_headers()
        cleanup = wrong.close
    else:
        raise SystemExit(f"unknown --lie {kind!r}")
    r = http.post(url, json={"prompt": "serve me"}, headers=headers)
    if cleanup is not None:
        cleanup()
    return {"status": r.status_code, **(r.json() if r.status_code == 402 else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--service", help="the provider's base URL (default: start one here)")
    ap.add_argument("--calls", type=int, default=500, help="paid calls to make (default 500)")
    ap.add_argument("--rate", default="0.001", help="USDC per call, as the provider asks")
    ap.add_argument("--batch", type=int, default=100, help="calls per release (default 100)")
    ap.add_argument("--budget", default="5.00", help="USDC locked in escrow (default 5.00)")
    ap.add_argument("--stop-paying-after", type=int, default=None, metavar="K")
    ap.add_argument("--lie", choices=["someone-else", "closed", "other-provider"])
    args = ap.parse_args()

    with ExitStack() as stack:
        if args.service:
            client = stack.enter_context(EscrowClient())
            provider = os.environ.get("PF_PROVIDER_ID") or sys.exit("set PF_PROVIDER_ID")
            base = args.service.rstrip("/")
        else:
            client, provider, base = stack.enter_context(_local_world(args))
        url = f"{base}/infer"
        http = stack.enter_context(httpx.Client(timeout=30))
        if args.lie:
            print(
                json.dumps({"lie": args.lie, "answer": lie(args.lie, client, provider, url, http)})
            )
            return

        stream = PaymentStream(
            client, provider, args.rate, batch=args.batch, budget=args.budget, memo="demo: infer"
        )
        with stream, httpx.Client(auth=stream.auth(), timeout=30) as paid:

            @metered(stream=stream)
            def infer(prompt: str) -> str:
                r = paid.post(url, json={"prompt": prompt})
                r.raise_for_status()  # a 402 raises: a refused call is not counted
                return str(r.json()["answer"])

            calls = args.calls if args.stop_paying_after is None else args.stop_paying_after
            for i in range(calls):
                infer(f"question {i}")
            extra, refusal = (0, None)
            if args.stop_paying_after is not None:
                stream.flush()  # everything counted so far is paid ...
                extra, refusal = call_until_refused(
                    http, url, stream.provider_headers(), 10 * args.batch
                )  # ... and what follows never is
        receipt = stream.receipt
        assert receipt is not None
        print(f"paid {receipt.paid} USDC for {receipt.units} calls; refunded {receipt.refunded}")
        summary = {
            "escrow_id": stream.escrow_id,
            "units": receipt.units,
            "paid": str(receipt.paid),
            "unpaid_calls_served": extra,
            "refusal": refusal,
        }
        print(json.dumps(summary))


class _local_world:
    """An in-process sandbox and the provider's service on a loopback port, for the demo."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def __enter__(self) -> tuple[EscrowClient, str, str]:
        import uvicorn
        from provider_service import build_app, listening_socket

        from pf_metered import Sandbox
        from pf_metered.provider import AsyncPaymentGate

        self.sandbox = Sandbox()
        payer, me = self.sandbox.add_agent(balance="100.00"), self.sandbox.add_agent()
        gate = AsyncPaymentGate(
            self.sandbox.async_client(me.api_key),
            me.agent_id,
            self.args.rate,
            batch=self.args.batch,
        )
        sock = listening_socket(0)
        self.server = uvicorn.Server(
            uvicorn.Config(build_app(gate), log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.sandbox.client(payer.api_key), me.agent_id, base

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sandbox.close()


if __name__ == "__main__":
    main()
