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
