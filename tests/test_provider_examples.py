"""The example pair runs on its own: ``examples/provider_client.py`` with no arguments starts an
in-process sandbox and ``examples/provider_service.py``'s app on a loopback port, and pays it.
(``test_provider_two_process.py`` runs the two as separate processes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "provider_client.py"), *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_example_pair_pays_for_every_call():
    out = run("--calls", "150", "--batch", "25")
    assert out["units"] == 150 and out["paid"] == "0.150000" and out["refusal"] is None


def test_the_example_consumer_that_stops_paying_is_refused():
    out = run("--stop-paying-after", "30", "--batch", "10")
    assert out["units"] == 30 and out["refusal"]["error"] == "unpaid"
    assert out["unpaid_calls_served"] == 20  # the credit: two batches
