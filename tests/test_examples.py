"""Every example runs (against the sandbox, no key) and prints the receipt it should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(name: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PF_API_KEY", "PF_PROVIDER_ID")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def row(out: str, label: str) -> list[str]:
    return re.findall(rf"\| {re.escape(label)}\s+\|\s+(.+?) \|", out)


def test_inference_stream():
    out = run("inference_stream.py", "--calls", "1234", "--latency-ms", "0")
    assert row(out, "units") == ["1,234"]
    assert row(out, "paid") == ["1.234 USDC"]
    assert row(out, "fee (1%)") == ["0.01234 USDC"]
    assert row(out, "refunded") == ["8.766 USDC"]
    assert "provider balance: 1.221660 USDC" in out


def test_compute_time_stops_on_heartbeat():
    out = run("compute_time.py", "--speedup", "36000", "--fail-after", "1")
    assert "clock stopped (heartbeat)" in out
    paid = float(row(out, "paid")[0].split()[0])
    refunded = float(row(out, "refunded")[0].split()[0])
    # at most 1 h billed (how much of it depends on the scheduler: a wall clock sped up 36000x)
    assert 0 < paid <= 0.5 and abs(paid + refunded - 4.0) < 1e-9


def test_data_feed():
    out = run("data_feed.py", "--ticks", "3000")
    assert row(out, "rate")[:1] == ["0.0001 USDC / unit"]
    assert "price_feed: 3000 points" in out
    assert row(out, "paid")[0] == "0.30 USDC"


@pytest.mark.parametrize("calls", ["200"])
def test_async_agent(calls):
    out = run("async_agent.py", "--calls", calls, "--concurrency", "20")
    assert row(out, "units") == ["200"] and row(out, "paid") == ["0.40 USDC"]


def test_langchain_agent_pays_per_model_call_and_per_tool_call():
    """examples/langchain_agent.py: create_agent with MeteredMiddleware paying the model's host
    per model call (on a stream it opens and closes for the run, its bill in the state), and
    the agent paying the provider per market_price call from the stream it opens and closes
    itself; the printed receipts add up to what the sandbox ledger shows."""
    out = run("langchain_agent.py")
    assert out.count("[error]") == 3  # over the cap, a rate in words, buying before paying
    assert "Cap exceeded" in out and "no payment stream to provider" in out
    assert out.count("tool market_price   [ok]") == 12
    # first table: the agent's stream to the provider; second: the program's to the host
    assert row(out, "rate") == ["0.01 USDC / unit", "0.002 USDC / unit"]
    assert row(out, "units") == ["12", "10"]  # 12 paid tool calls; 10 model calls
    assert row(out, "paid") == ["0.12 USDC", "0.02 USDC"]
    assert row(out, "fee (1%)") == ["0.0012 USDC", "0.0002 USDC"]
    assert row(out, "provider net") == ["0.1188 USDC", "0.0198 USDC"]
    assert row(out, "refunded") == ["0.88 USDC", "0.98 USDC"]
    assert row(out, "model calls") == ["10"]  # the bill MeteredMiddleware left in state
    # the ledger: what the receipts say, to the micro-USDC
    assert row(out, "payer spent") == ["0.14 USDC"]  # 0.12 + 0.02
    assert row(out, "provider got") == ["0.1188 USDC"]
    assert row(out, "model host got") == ["0.0198 USDC"]
    assert row(out, "fees") == ["0.0014 USDC"]  # 0.0012 + 0.0002
