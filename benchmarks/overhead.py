"""What metering costs: ns per call for @metered against common baselines, from one run.

Prints ns/call for a bare call, a functools.wraps counting decorator, a plain wrapt.decorator,
a function calling prometheus_client Counter.inc(), @metered (sync and async) and a plain
functools async wrapper, with ratios; records/s for bulk record(n); and the HTTP requests a
stream makes for 1,000,000 units (counted with a transport wrapper around the sandbox).

    .venv/bin/python benchmarks/overhead.py [--quick]

A script, not a test: figures depend on the machine; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import platform
import statistics
import sys
import threading
import time
import timeit

import httpx
import wrapt
from prometheus_client import CollectorRegistry, Counter

from pf_metered import PaymentStream, metered
from pf_metered.sandbox import Sandbox


class CountingTransport(httpx.BaseTransport):
    """Counts every request that reaches the (sandbox) transport."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.requests = 0
        self.by_path: dict[str, int] = {}
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests += 1
            key = f"{request.method} {request.url.path.rsplit('/', 1)[-1]}"
            self.by_path[key] = self.by_path.get(key, 0) + 1
        return self.inner.handle_request(request)


REPEATS = 9


def per_call_ns(fn, number: int, repeat: int = 7) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e9


def async_per_call_ns(coro_fn, number: int, repeat: int = 5) -> float:
    async def loop() -> float:
        best = math.inf
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            for _ in range(number):
                await coro_fn(1)
            best = min(best, (time.perf_counter_ns() - t0) / number)
        return best

    return asyncio.run(loop())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations")
    args = ap.parse_args()
    n = 200_000 if args.quick else 1_000_000

    sb = Sandbox()
    payer = sb.add_agent(balance="10000000")
    provider = sb.add_agent()
    client = sb.client(payer.api_key)
    # No batch policy while timing: the figures are the hot path alone, not the GIL time a
    # background sender spends parsing answers on a shared core (that is measured below).
    stream = PaymentStream(client, provider.agent_id, "0.000001", budget="1000000").open()

    def bare(x):
        return x

    count = [0]

    def counting(fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            r = fn(*a, **k)
            count[0] += 1
            return r

        return wrapper

    @wrapt.decorator
    def passthrough(wrapped, instance, a, k):
        return wrapped(*a, **k)

    reg = CollectorRegistry()
    c = Counter("calls", "calls", registry=reg)

    def prom(x):
        c.inc()
        return x

    f_counting = counting(bare)
    f_wrapt = passthrough(bare)
    f_metered = metered(stream=stream)(bare)

    sync_fns = [
        ("bare call", bare),
        ("functools.wraps counter", f_counting),
        ("wrapt.decorator passthrough", f_wrapt),
        ("Counter.inc() in function", prom),
        ("@metered (sync)", f_metered),
    ]
    # Side by side: the repeats of every function are interleaved, so a burst of load on a
    # shared machine hits them alike; each figure is the median of its repeats.
    samples: dict[str, list[float]] = {name: [] for name, _ in sync_fns}
    for _ in range(REPEATS):
        for name, fn in sync_fns:
            samples[name].append(per_call_ns(lambda fn=fn: fn(1), n // REPEATS, repeat=1))
    rows = [(name, statistics.median(samples[name])) for name, _ in sync_fns]
    base = rows[0][1]
    loop_cost = per_call_ns(lambda: None, n)

    async def abare(x):
        return x

    def async_wraps(fn):
        @functools.wraps(fn)
        async def wrapper(*a, **k):
            r = await fn(*a, **k)
            count[0] += 1
            return r

        return wrapper

    a_plain = async_wraps(abare)
    a_metered = metered(stream=stream)(abare)
    an = n // 4
    async_fns = [
        ("async bare await", abare),
        ("async functools wrapper", a_plain),
        ("@metered (async)", a_metered),
    ]
    asamples: dict[str, list[float]] = {name: [] for name, _ in async_fns}
    for _ in range(REPEATS):
        for name, afn in async_fns:
            asamples[name].append(async_per_call_ns(afn, an // REPEATS, repeat=1))
    arows = [(name, statistics.median(asamples[name])) for name, _ in async_fns]

    print(
        f"Python {platform.python_version()} on {platform.machine()}, wrapt "
        f"{wrapt.__version__}; {n:,} calls per figure, median of {REPEATS} interleaved "
        f"repeats (timeit loop ≈ "
        f"{loop_cost:.0f} ns included in sync figures)"
    )
    print(f"{'sync':32} {'ns/call':>9} {'added':>8} {'× bare':>7}")
    prom_added = rows[3][1] - base
    for name, ns in rows:
        print(f"{name:32} {ns:9.0f} {ns - base:8.0f} {ns / base:7.2f}")
    met_added = rows[4][1] - base
    print(
        f"@metered adds {met_added:.0f} ns vs Counter.inc() {prom_added:.0f} ns "
        f"(ratio {met_added / prom_added:.2f}, target ≤ 0.5); wrapt passthrough adds "
        f"{rows[2][1] - base:.0f}"
    )
    print(f"\n{'async':32} {'ns/call':>9} {'added':>8}")
    for name, ns in arows:
        print(f"{name:32} {ns:9.0f} {ns - arows[0][1]:8.0f}")
    print(
        f"@metered async − functools async wrapper = {arows[2][1] - arows[1][1]:.0f} ns "
        f"(target ≤ 150)"
    )
    stream.close()

    # --- bulk record(n) -------------------------------------------------------------
    s = PaymentStream(client, provider.agent_id, "0.000001", batch=10**9, budget="1000000").open()
    reps = n
    t0 = time.perf_counter()
    for _ in range(reps):
        s.record(100)
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(reps):
        s.record()
    dt1 = time.perf_counter() - t0
    s.close()
    print(
        f"\nrecord(100): {reps / dt:,.0f} calls/s = {reps * 100 / dt:,.0f} units/s; "
        f"record(): {reps / dt1:,.0f} units/s"
    )

    # --- HTTP requests per 1,000,000 units ------------------------------------------
    units, batch = 1_000_000, 100  # answers carry no whole history: 10,000 releases are fine
    bound = math.ceil(units / batch) + 2  # + open (create) + close (refund; final is 0)
    for label, paced in [("free-running record()", False), ("paced (record(batch); flush)", True)]:
        transport = CountingTransport(sb.transport())
        cl = sb.client(payer.api_key, transport=transport)
        t0 = time.perf_counter()
        with PaymentStream(cl, provider.agent_id, "0.000001", batch=batch, budget="10") as s:
            if paced:
                for _ in range(units // batch):
                    s.record(batch)
                    s.flush()
            else:
                rec = s.record
                for _ in range(units):
                    rec()
        dt = time.perf_counter() - t0
        r = s.receipt
        assert r.paid_micro == units  # 1 µUSDC per unit, exactly
        print(
            f"{label:30}: {transport.requests:,} HTTP requests for {units:,} units "
            f"(bound ⌈units/batch⌉+open+close = {bound:,}); {r.releases:,} releases; "
            f"{dt:.1f} s; {dict(sorted(transport.by_path.items()))}"
        )
    sb.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
