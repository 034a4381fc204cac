"""64 threads race ``@metered`` calls against ``close()`` (issue 14.1): exact to the unit.

Every call that returned its result was counted, nothing else was, and the receipt, the
escrow and the money agree: paid = half_up(rate × units), paid + refunded = budget. The
threads start together (a barrier), close() starts once every thread has finished a few
calls (a countdown, no sleep), and the calls still running then are waited for.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from pf_metered import PaymentStream, metered
from pf_metered.errors import BudgetExhausted, StreamClosed
from pf_metered.money import parse_rate

THREADS = 64
RATE = "0.000123"


@pytest.mark.parametrize("store", ["memory", "group"])
def test_64_threads_race_close_exactly(agents: Any, tmp_path: Path, store: str) -> None:
    spec = None if store == "memory" else str(tmp_path / "m.db") + "?durability=group"
    stream = PaymentStream(
        agents.client, agents.provider.agent_id, RATE, batch=97, budget="900", store=spec
    ).open()

    @metered(stream=stream)
    def work(i: int) -> int:
        return i + 1

    start = threading.Barrier(THREADS + 1)
    warmed = threading.Semaphore(0)
    returned = [0] * THREADS
    refused = [0] * THREADS

    def racer(k: int) -> None:
        start.wait()
        n = 0
        while True:
            try:
                assert work(n) == n + 1
            except (StreamClosed, BudgetExhausted):
                # Refused: by the close, or by the budget when the other threads spent it
                # first (on 2 cores a thread can wait a GIL slice of ~40,000 calls of theirs).
                refused[k] += 1
                if n < 20:
                    warmed.release()  # it will make no more calls: do not wait for them
                return
            returned[k] += 1
            n += 1
            if n == 20:
                warmed.release()

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(THREADS)]
    for t in threads:
        t.start()
    start.wait()
    for _ in range(THREADS):  # every thread has made 20 calls or was refused
        warmed.acquire()
    receipt = stream.close()
    for t in threads:
        t.join(60)
    calls = sum(returned)
    assert all(refused)  # every thread saw the close
    assert receipt.units == calls  # every returned call counted, nothing else
    assert stream.late_units == 0
    rate = parse_rate(RATE)
    assert receipt.paid_micro == rate.micro_half_up(calls)
    assert receipt.paid_micro + receipt.refunded_micro == receipt.budget_micro
    escrow = agents.escrow(stream.escrow_id)
    assert escrow.released_micro == receipt.paid_micro
    assert escrow.refunded_micro == receipt.refunded_micro
