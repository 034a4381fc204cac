"""Reconciliation both ways, across processes: ``pf-metered sandbox serve`` on loopback, the
provider's service (``examples/provider_service.py``) in a second process, and consumers
(``examples/provider_client.py``: ``@metered`` around an httpx call with ``auth=stream.auth()``)
in a third. Checks: every unit served to an honest consumer was paid, at most ``credit`` units
were ever served unpaid, a consumer that stops paying is refused within one batch of the
payment it missed, and a caller lying about its escrow is refused before any work is done.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).with_name("pf-metered")
pytestmark = pytest.mark.skipif(not BIN.exists(), reason="pf-metered is not installed in the venv")

RATE, BATCH = "0.001", 20
CREDIT = 2 * BATCH


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PF_")}


def _start(argv: list[str], env: dict[str, str], pattern: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        argv,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()  # blocks until the process says where it listens
    m = re.search(pattern, first)
    if not m:
        proc.kill()
        raise AssertionError(first + proc.stderr.read())  # type: ignore[union-attr]
    return proc, m.group(1)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Services:
    def __init__(self, tmp: Path) -> None:
        keys = tmp / "demo.env"
        self.sandbox, self.base_url = _start(
            [str(BIN), "sandbox", "serve", "--port", "0", "--keys-file", str(keys)],
            _clean_env(),
            r"serving (http://127\.0\.0\.1:\d+/api/v1)",
        )
        self.exports = dict(re.findall(r"^export (\w+)=(\S+)", keys.read_text(), re.M))
        env = _clean_env()
        env.update(
            PF_BASE_URL=self.exports["PF_BASE_URL"],
            PF_PROVIDER_API_KEY=self.exports["PF_PROVIDER_API_KEY"],
            PF_PROVIDER_ID=self.exports["PF_PROVIDER_ID"],
        )
        self.provider, self.url = _start(
            [
                sys.executable,
                "examples/provider_service.py",
                "--port",
                "0",
                "--rate",
                RATE,
                "--batch",
                str(BATCH),
            ],
            env,
            r"provider serving (http://127\.0\.0\.1:\d+)",
        )
        self.secrets = {self.exports["PF_API_KEY"], self.exports["PF_PROVIDER_API_KEY"]}

    def consumer(self, *args: str) -> dict:
        env = _clean_env()
        env.update({k: v for k, v in self.exports.items() if k != "PF_PROVIDER_API_KEY"})
        proc = subprocess.run(
            [
                sys.executable,
                "examples/provider_client.py",
                "--service",
                self.url,
                "--rate",
                RATE,
                "--batch",
                str(BATCH),
                *args,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        for secret in self.secrets:
            assert secret not in proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def gate(self, fresh: bool = False) -> dict:
        r = httpx.get(f"{self.url}/_gate", params={"fresh": "1"} if fresh else {}, timeout=10)
        r.raise_for_status()
        return r.json()

    def account(self, escrow_id: str, fresh: bool = False) -> dict:
        return next(a for a in self.gate(fresh)["accounts"] if a["escrow_id"] == escrow_id)

    def close(self) -> None:
        _stop(self.provider)
        _stop(self.sandbox)


@pytest.fixture
def services(tmp_path):
    s = Services(tmp_path)
    yield s
    s.close()


@pytest.mark.timeout(300)  # five consumer processes and 700 paid calls on a shared machine
def test_two_processes_reconcile_and_refuse_who_does_not_pay(services, capsys):
    figures: dict[str, object] = {}
    assert services.gate()["credit"] == CREDIT

    # an honest consumer: every unit served was paid, never more than the credit unpaid
    honest = services.consumer("--calls", "500")
    acct = services.account(honest["escrow_id"])
    assert honest["units"] == 500 == acct["served"]
    assert Decimal(honest["paid"]) == Decimal(RATE) * 500
    assert acct["max_unpaid"] <= CREDIT and acct["refusals"] == {}
    figures["honest"] = {k: acct[k] for k in ("served", "paid_units", "paid", "max_unpaid")}
    # the operator's view: pf-metered provider watch URL
    shown = subprocess.run(
        [str(BIN), "provider", "watch", f"{services.url}/_gate", "--once", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        check=True,
        stdin=subprocess.DEVNULL,
    )
    watched = json.loads(shown.stdout)
    assert any(
        a["escrow_id"] == honest["escrow_id"] and a["served"] == 500 for a in watched["accounts"]
    )
    table = subprocess.run(
        [str(BIN), "provider", "watch", f"{services.url}/_gate", "--once"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
        check=True,
        stdin=subprocess.DEVNULL,
    ).stdout
    assert "SERVED" in table and honest["escrow_id"] in table
    # the gate's own view after the close, read afresh: exactly what was served is paid
    acct = services.account(honest["escrow_id"], fresh=True)
    assert acct["paid_units"] == 500 and Decimal(acct["owed"]) == 0
    assert acct["status"] == "closed"

    # a consumer that stops paying after 100 calls is refused within one batch
    cheat = services.consumer("--stop-paying-after", "100")
    extra = cheat["unpaid_calls_served"]
    assert cheat["units"] == 100 and cheat["refusal"]["error"] == "unpaid"
    missed_due = (100 // BATCH + 1) * BATCH  # the first payment it never made falls due here
    assert 100 + extra - missed_due <= BATCH  # refused within one batch of it
    assert extra <= CREDIT
    assert Decimal(cheat["refusal"]["owed"]) == Decimal(RATE) * extra
    acct = services.account(cheat["escrow_id"], fresh=True)
    assert acct["paid_units"] == 100 and Decimal(acct["owed"]) == Decimal(RATE) * extra
    assert acct["max_unpaid"] <= CREDIT and acct["refusals"] == {"unpaid": 1}
    figures["stops_paying"] = {"served_unpaid": extra, "max_unpaid": acct["max_unpaid"]}

    # liars are refused before any work is done
    refusals = {}
    for kind, reasons in [
        ("someone-else", {"not_payer"}),
        ("closed", {"escrow_closed"}),
        ("other-provider", {"unknown_escrow", "wrong_provider"}),  # v1: only parties may read
    ]:
        before = services.gate()["work_done"]
        answer = services.consumer("--lie", kind)["answer"]
        assert answer["status"] == 402 and answer["error"] in reasons, answer
        assert services.gate()["work_done"] == before
        refusals[kind] = answer["error"]
    figures["liars"] = refusals
    figures["work_done"] = services.gate()["work_done"]
    assert figures["work_done"] == 500 + 100 + extra
    with capsys.disabled():
        print("\ntwo-process figures:", json.dumps(figures))
