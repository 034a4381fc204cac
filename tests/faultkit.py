"""Fault injection for the fault suite: a transport that loses answers after the server acted.

``FaultyTransport(inner, schedule)`` wraps ``sandbox.transport()``. For each request it asks
the schedule what to do:

* ``None`` — pass through;
* ``"refuse"`` — raise ``httpx.ConnectError`` *before* the server sees the request;
* ``"timeout"`` / ``"reset"`` — let the server apply the request, then raise
  ``httpx.ReadTimeout`` / ``httpx.RemoteProtocolError`` (the answer is lost);
* ``"500"`` — let the server apply the request, then answer a 500 ``internal_error``.

A :class:`SeededSchedule` draws these with a seeded RNG (``p`` per request, only for the
methods asked), so a failing seed replays exactly. Counters say what was injected.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
from collections import Counter
from collections.abc import Callable

import httpx

FAULTS = ("refuse", "timeout", "reset", "500")
AFTER_COMMIT = ("timeout", "reset", "500")


class SeededSchedule:
    """Inject a fault into a request with probability ``p`` (POSTs only by default)."""

    def __init__(
        self,
        seed: int,
        p: float = 0.3,
        *,
        kinds: tuple[str, ...] = FAULTS,
        methods: tuple[str, ...] = ("POST",),
        paths: tuple[str, ...] = (),
    ) -> None:
        self.rng = random.Random(seed)
        self.p = p
        self.kinds = kinds
        self.methods = methods
        self.paths = paths
        self.enabled = True
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> str | None:
        if not self.enabled or request.method not in self.methods:
            return None
        if self.paths and not any(p in request.url.path for p in self.paths):
            return None
        with self._lock:
            if self.rng.random() >= self.p:
                return None
            return self.rng.choice(self.kinds)


class FaultyTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """See the module docstring."""

    def __init__(self, inner: object, schedule: Callable[[httpx.Request], str | None]) -> None:
        self.inner = inner
        self.schedule = schedule
        self.injected: Counter[str] = Counter()
        self.requests: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()

    def _decide(self, request: httpx.Request) -> str | None:
        fault = self.schedule(request)
        with self._lock:
            self.requests.append(
                (request.method, request.url.path, request.headers.get("idempotency-key"))
            )
            if fault:
                self.injected[fault] += 1
        return fault

    @staticmethod
    def _after(fault: str, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        if fault == "timeout":
            raise httpx.ReadTimeout("injected: answer lost (timeout)", request=request)
        if fault == "reset":
            raise httpx.RemoteProtocolError("injected: connection reset", request=request)
        body = json.dumps({"error": "internal_error", "message": "injected"}).encode()
        return httpx.Response(
            500, headers={"content-type": "application/json"}, content=body, request=request
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._decide(request)
        if fault == "refuse":
            raise httpx.ConnectError("injected: refused", request=request)
        response = self.inner.handle_request(request)  # type: ignore[attr-defined]
        if fault is None:
            return response
        response.read()
        return self._after(fault, request, response)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        fault = self._decide(request)
        if fault == "refuse":
            raise httpx.ConnectError("injected: refused", request=request)
        response = await self.inner.handle_async_request(request)  # type: ignore[attr-defined]
        if fault is None:
            return response
        await response.aread()
        return self._after(fault, request, response)

    def posts(self, fragment: str) -> list[tuple[str, str, str | None]]:
        return [r for r in self.requests if r[0] == "POST" and fragment in r[1]]

    def close(self) -> None:
        """The sandbox owns the inner transport."""

    async def aclose(self) -> None:
        """The sandbox owns the inner transport."""


# ------------------------------------------------------------------------ lost responses
def _client(sandbox: object, key: str, transport: FaultyTransport) -> object:
    return sandbox.client(key, transport=transport, _sleep=lambda s: None)  # type: ignore[attr-defined]


def run_lost_responses(seed: int, sandbox: object, *, p: float = 0.35) -> dict[str, int]:
    """One seeded schedule: a stream records, flushes and closes while answers are lost.

    Returns the figures the suite and ``scripts/reliability.py`` check: ``lost`` (units counted
    but not paid for, or paid for but not counted — in micro-USDC), ``doubled`` (releases
    applied more than once), ``budget_gap`` (released + refunded − budget).
    """
    from pf_metered.errors import PFMeteredError
    from pf_metered.money import parse_rate
    from pf_metered.stream import PaymentStream

    rng = random.Random(seed)
    payer = sandbox.add_agent(balance="50")  # type: ignore[attr-defined]
    provider = sandbox.add_agent()  # type: ignore[attr-defined]
    schedule = SeededSchedule(seed, p)
    transport = FaultyTransport(sandbox.transport(), schedule)  # type: ignore[attr-defined]
    client = _client(sandbox, payer.api_key, transport)
    rate = rng.choice(["0.0000013", "0.001", "0.0000001", "0.37", "0.0123457"])
    budget = "20"
    stream = PaymentStream(
        client,
        provider.agent_id,
        rate,
        batch=rng.randint(1, 40),
        budget=budget,  # type: ignore[arg-type]
        background=False,
    )
    for _ in range(100):
        try:
            stream.open()
            break
        except PFMeteredError:
            continue
    units = 0
    for _ in range(rng.randint(1, 30)):
        n = rng.randint(0, 25)
        try:
            stream.record(n)
            units += n
        except PFMeteredError:
            pass
        with contextlib.suppress(PFMeteredError):
            stream.flush() if rng.random() < 0.3 else stream.pump()
    receipt = None
    for _ in range(200):
        try:
            receipt = stream.close()
            break
        except PFMeteredError:
            continue
    assert receipt is not None, f"seed {seed}: close never succeeded"
    escrow = sandbox.escrow(stream.escrow_id)  # type: ignore[attr-defined]
    expected = parse_rate(rate).micro_half_up(units)
    memos = [r.memo for r in escrow.releases]
    return {
        "units": units,
        "injected": sum(transport.injected.values()),
        "lost": abs(escrow.released_micro - expected) + abs(receipt.units - units),
        "doubled": len(memos) - len(set(memos)),
        "budget_gap": escrow.released_micro + escrow.refunded_micro - escrow.amount_micro,
        "receipt_gap": abs(receipt.paid_micro - escrow.released_micro),
    }


# ------------------------------------------------------------------------ crash recovery
CRASH_POINTS = (
    "after_open",
    "after_journal",
    "before_http",
    "after_http",
    "after_settle",
    "after_record",
    "after_refund",
    "sigkill",
)


def run_crash(
    seed: int, sandbox: object, base_url: str, workdir: str, *, durability: str = "per_record"
) -> dict[str, object]:
    """Run ``crash_child.py``, kill it at a seeded point, resume in this process, close.

    Figures: ``lost`` (units the child saw counted that the journal lacks, per_record only),
    ``pay_gap`` (|released − rate × journaled units|), ``budget_gap``, ``doubled``.
    """
    import signal
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    from pf_metered.client import EscrowClient
    from pf_metered.meter.sqlite_store import SQLiteStore
    from pf_metered.money import parse_rate
    from pf_metered.stream import PaymentStream

    rng = random.Random(seed)
    payer = sandbox.add_agent(balance="10")  # type: ignore[attr-defined]
    provider = sandbox.add_agent()  # type: ignore[attr-defined]
    point = rng.choice(CRASH_POINTS)
    rate = rng.choice(["0.0000013", "0.00037", "0.0123457"])
    units = rng.randint(5, 60)
    journal = str(Path(workdir) / f"journal-{seed}.db")
    sid = f"crash{seed}-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "PFM_KEY": payer.api_key,
        "PFM_BASE_URL": base_url,
        "PFM_JOURNAL": journal,
        "PFM_STREAM_ID": sid,
        "PFM_PROVIDER": provider.agent_id,
        "PFM_RATE": rate,
        "PFM_BATCH": str(rng.randint(1, 12)),
        "PFM_BUDGET": "3",
        "PFM_UNITS": str(units),
        "PFM_DURABILITY": durability,
        "PF_METERED_SIGTERM": "0",
        "PFM_CRASH_AT": "" if point == "sigkill" else point,
        "PFM_CRASH_N": str(1 if point in ("after_open", "after_refund") else rng.randint(1, 3)),
    }
    child = Path(__file__).with_name("crash_child.py")
    proc = subprocess.Popen(
        [sys.executable, str(child)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    kill_after = rng.randint(1, units) if point == "sigkill" else -1
    seen_units = 0
    lines = 0
    for line in proc.stdout:
        if line.startswith("U "):
            seen_units = int(line.split()[1])
            lines += 1
            if lines == kill_after:
                proc.send_signal(signal.SIGKILL)
                break
    proc.stdout.close()
    code = proc.wait(timeout=60)
    if code not in (0, 137, -signal.SIGKILL):
        raise AssertionError(f"seed {seed}: child failed with exit code {code}")
    client = EscrowClient(payer.api_key, base_url=base_url)
    store = SQLiteStore(journal)
    state = store.load(sid)
    if state is None:  # died before the stream was journaled: nothing may be locked
        assert not client.list_escrows(), f"seed {seed}: an escrow exists with no journal"
        return {
            "point": point,
            "code": code,
            "lost": 0,
            "pay_gap": 0,
            "budget_gap": 0,
            "doubled": 0,
            "units": 0,
        }
    stream = PaymentStream.resume(store, sid, client)
    receipt = stream.close()
    receipt2 = PaymentStream.resume(journal, sid, client).close()  # closing twice: no-op
    assert receipt2.paid_micro == receipt.paid_micro
    final = store.load(sid)
    assert final is not None and final.status == "closed"
    escrow = sandbox.escrow(final.escrow_id)  # type: ignore[attr-defined]
    memos = [r.memo for r in escrow.releases]
    client.close()
    store.close()
    return {
        "point": point,
        "code": code,
        "units": final.units,
        "lost": max(0, seen_units - final.units) if durability == "per_record" else 0,
        "pay_gap": abs(escrow.released_micro - parse_rate(rate).micro_half_up(final.units)),
        "budget_gap": escrow.released_micro + escrow.refunded_micro - escrow.amount_micro,
        "doubled": len(memos) - len(set(memos)),
        "escrows": len(client_escrows(sandbox, payer.api_key, base_url)),
    }


def client_escrows(sandbox: object, key: str, base_url: str) -> list[object]:
    from pf_metered.client import EscrowClient

    with EscrowClient(key, base_url=base_url) as c:
        return list(c.list_escrows())
