"""The process the crash-recovery suite kills: a durable stream against a loopback sandbox.

Configured by environment (``PFM_*``). ``PFM_CRASH_AT=<point>`` and ``PFM_CRASH_N=<n>`` make it
``os._exit(137)`` the n-th time it reaches a named point (no cleanup, no atexit, no flush: as a
SIGKILL would). Points: ``after_open`` (escrow created, not yet journaled), ``after_journal``
(release intent committed, not sent), ``before_http``, ``after_http`` (release applied by the
server, answer not journaled), ``after_settle``, ``after_record``, ``after_refund`` (refund
applied, close not journaled). Each counted unit is printed (``U <total>``) after ``record()``
returned, so the parent can check that every unit it saw counted survived.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from pf_metered.client import EscrowClient
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.stream import PaymentStream

CRASH_AT = os.environ.get("PFM_CRASH_AT", "")
CRASH_N = int(os.environ.get("PFM_CRASH_N", "1"))
_seen: dict[str, int] = {}


def hit(point: str) -> None:
    if point != CRASH_AT:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] >= CRASH_N:
        sys.stdout.flush()
        os._exit(137)


class CrashStore(SQLiteStore):
    def claim(self, stream_id: str, *, min_units: int, final: bool = False) -> Any:
        intent = super().claim(stream_id, min_units=min_units, final=final)
        if intent is not None:
            hit("after_journal")
        return intent

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        super().settle(stream_id, seq, amount_micro)
        hit("after_settle")


class CrashClient:
    def __init__(self, inner: EscrowClient) -> None:
        self.inner = inner

    def create_escrow(self, *a: Any, **kw: Any) -> Any:
        escrow = self.inner.create_escrow(*a, **kw)
        hit("after_open")
        return escrow

    def release_partial(self, *a: Any, **kw: Any) -> Any:
        hit("before_http")
        escrow = self.inner.release_partial(*a, **kw)
        hit("after_http")
        return escrow

    def get_escrow(self, *a: Any, **kw: Any) -> Any:
        return self.inner.get_escrow(*a, **kw)

    def refund(self, *a: Any, **kw: Any) -> Any:
        escrow = self.inner.refund(*a, **kw)
        hit("after_refund")
        return escrow


def main() -> None:
    env = os.environ
    client = CrashClient(EscrowClient(env["PFM_KEY"], base_url=env["PFM_BASE_URL"]))
    store = CrashStore(env["PFM_JOURNAL"], durability=env.get("PFM_DURABILITY", "per_record"))  # type: ignore[arg-type]
    stream = PaymentStream(
        client,  # type: ignore[arg-type]
        env["PFM_PROVIDER"],
        env["PFM_RATE"],
        batch=int(env["PFM_BATCH"]),
        budget=env["PFM_BUDGET"],
        store=store,
        stream_id=env["PFM_STREAM_ID"],
    )
    with stream:
        for i in range(int(env["PFM_UNITS"])):
            total = stream.record(1 + i % 3)
            print(f"U {total}", flush=True)
            hit("after_record")
    print("CLOSED", flush=True)


if __name__ == "__main__":
    main()
