"""Several stream objects on one stream in one shared store (Redis fleet, SQLite file shared by
processes, one store object shared in a process): who may send a pending release, how often a
worker that has nothing to claim asks the store, and who closes.

Each "worker" is a stream object with its own store object (as a separate process has), except
in the ``*-same`` cases where two stream objects in one process share one store object. The
sandbox does NOT honour idempotency keys here: a release sent twice is paid twice, so the
ledger shows any double send.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import MemoryStore
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream

RATE = "0.001"


class World:
    def __init__(self) -> None:
        self.sandbox = Sandbox(honour_idempotency=False)
        self.payer = self.sandbox.add_agent(balance="100")
        self.provider = self.sandbox.add_agent()
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def client(self) -> Any:
        return CountingClient(self.sandbox.client(self.payer.api_key), self)


class CountingClient:
    """The payer's client, noting every release (by memo) and refund it sends."""

    def __init__(self, inner: Any, world: World) -> None:
        self._inner = inner
        self._world = world
        self.before_release: Callable[[str], None] | None = None

    def release_partial(self, escrow_id: str, amount: Any, memo: str = "", **kw: Any) -> Any:
        if self.before_release is not None:
            self.before_release(memo)
        with self._world._lock:
            self._world.calls.append(("release", memo))
        return self._inner.release_partial(escrow_id, amount, memo, **kw)

    def refund(self, escrow_id: str, **kw: Any) -> Any:
        with self._world._lock:
            self._world.calls.append(("refund", escrow_id))
        return self._inner.refund(escrow_id, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.sandbox.close()


StoreFactory = Callable[[], tuple[Any, Any]]


@pytest.fixture(params=["redis", "sqlite", "sqlite-same", "memory-same"])
def two_stores(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[tuple[Any, Any]]:
    """Two workers' stores on one stream: two objects (two processes), or one shared."""
    kind = request.param
    made: list[Any] = []
    if kind == "redis":
        from pf_metered.meter.redis_store import RedisStore

        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        made = [RedisStore(url, prefix=prefix), RedisStore(url, prefix=prefix)]
        pair = (made[0], made[1])
    elif kind == "sqlite":
        made = [SQLiteStore(tmp_path / "m.db"), SQLiteStore(tmp_path / "m.db")]
        pair = (made[0], made[1])
    elif kind == "sqlite-same":
        made = [SQLiteStore(tmp_path / "m.db")]
        pair = (made[0], made[0])
    else:
        store = MemoryStore()
        pair = (store, store)
    yield pair
    for s in made:
        s.close()


def _stream(world: World, store: Any, sid: str, **kw: Any) -> PaymentStream:
    kw.setdefault("batch", 100)
    kw.setdefault("background", False)
    kw.setdefault("budget", "1.00")
    return PaymentStream(
        world.client(), world.provider.agent_id, RATE, store=store, stream_id=sid, **kw
    )


def _releases(world: World) -> list[str]:
    return [memo for kind, memo in world.calls if kind == "release"]


def _memos(escrow: Any) -> list[str]:
    """The escrow's release memos, without the key tag a client adds on such a server."""
    return [r.memo.split(" [idem:")[0] for r in escrow.releases]


def test_joining_worker_does_not_resend_a_live_workers_release(world, two_stores):
    store_a, store_b = two_stores
    sid = uuid.uuid4().hex
    a = _stream(world, store_a, sid).open()
    a.record(100)
    action = a.meter.next_release()  # A claimed batch 1-100 and is sending it right now
    assert action is not None and action.memo == "batch:units 1-100"

    b = _stream(world, store_b, sid).open()  # B joins the stream while A sends
    b.flush()  # B must not send A's release
    a.pump()  # A's send goes out (once)
    assert _releases(world) == ["batch:units 1-100"]

    b.record(50)
    receipt_b = b.close()
    receipt_a = a.close()
    escrow = world.sandbox.escrow(a.escrow_id)
    assert _memos(escrow) == ["batch:units 1-100", "final:units 101-150"]
    assert escrow.released_micro == receipt_b.paid_micro == 150_000
    assert escrow.refunded_micro == receipt_b.refunded_micro == 850_000
    assert receipt_a.paid_micro == receipt_b.paid_micro
    assert receipt_a.refunded_micro == receipt_b.refunded_micro
    assert [k for k, _ in world.calls].count("refund") == 1
    world.sandbox.audit()


def test_a_stale_release_is_taken_over_once(world, tmp_path):
    """A holder that is gone (its lease ran out) leaves its release to the next worker, which
    reads the escrow back first: it had landed, so nothing is sent again."""
    sid = uuid.uuid4().hex
    dead_store = SQLiteStore(tmp_path / "m.db")
    live_store = SQLiteStore(tmp_path / "m.db", intent_lease=0)
    dead = _stream(world, dead_store, sid).open()
    dead.record(100)
    dead.pump()  # sent and answered...
    dead.record(100)
    action = dead.meter.next_release()
    assert action is not None
    dead.client._inner.release_partial(  # ...the second lands, and its holder dies unsettled
        dead.escrow_id, action.amount, action.memo, idempotency_key=action.idempotency_key
    )
    live = _stream(world, live_store, sid).open()
    live.record(10)
    receipt = live.close()
    escrow = world.sandbox.escrow(live.escrow_id)
    memos = _memos(escrow)
    assert memos == ["batch:units 1-100", "batch:units 101-200", "final:units 201-210"]
    assert receipt.paid_micro == escrow.released_micro == 210_000
    dead_store.close()
    live_store.close()
    world.sandbox.audit()


def count_claims(store: Any) -> list[int]:
    """Count ``store.claim`` round trips from now on (patched on this store object)."""
    count = [0]
    real = store.claim

    def claim(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real(*args, **kwargs)

    store.claim = claim
    return count


def test_a_worker_with_nothing_to_claim_does_not_claim_per_record(world, two_stores):
    store_a, store_b = two_stores
    sid = uuid.uuid4().hex
    batch, n = 10, 1000
    a = _stream(world, store_a, sid, batch=batch, budget="2.00").open()
    a.record(batch)
    assert a.meter.next_release() is not None  # A's release stays in flight throughout
    b = _stream(world, store_b, sid, batch=batch, budget="2.00").open()
    claims = count_claims(store_b)
    # B's background sender, step by step: woken when a record reaches the due threshold.
    for _ in range(n):
        b.record()
        if b._woken:
            b._woken = False
            b.pump()
    assert claims[0] <= n // batch + 3, claims[0]
    assert world.calls == []  # nothing sent by B: A's release is A's

    a.pump()
    b.close()
    a.close()
    escrow = world.sandbox.escrow(a.escrow_id)
    assert escrow.released_micro == (n + batch) * 1000
    world.sandbox.audit()


def test_two_closers_one_refund_after_the_final_release(world, two_stores):
    """A closes first and is slow to send the final release; B closes meanwhile: B must not
    refund (before or after), it waits for A and returns the same figures."""
    store_a, store_b = two_stores
    sid = uuid.uuid4().hex
    a = _stream(world, store_a, sid).open()
    b = _stream(world, store_b, sid).open()
    a.record(120)
    b.record(30)
    a_sending, b_waiting = threading.Event(), threading.Event()

    def slow_final(memo: str) -> None:
        if memo.startswith("final"):
            a_sending.set()
            b_waiting.wait(10)

    a.client.before_release = slow_final  # type: ignore[attr-defined]
    real_state = b.meter.close_state

    def observed_state() -> Any:
        state = real_state()
        if state != "mine":
            b_waiting.set()
        return state

    b.meter.close_state = observed_state  # type: ignore[method-assign]
    results: dict[str, Any] = {}

    def close(name: str, s: PaymentStream) -> None:
        try:
            results[name] = s.close()
        except BaseException as exc:  # reported by the assertions below
            results[name] = exc

    ta = threading.Thread(target=close, args=("a", a))
    ta.start()
    assert a_sending.wait(10)
    tb = threading.Thread(target=close, args=("b", b))
    tb.start()
    ta.join(20)
    tb.join(20)
    ra, rb = results["a"], results["b"]
    assert not isinstance(ra, BaseException), ra
    assert not isinstance(rb, BaseException), rb
    kinds = [k for k, _ in world.calls]
    assert kinds.count("refund") == 1
    assert kinds[-1] == "refund"  # after every release
    figures = ("units", "releases", "paid_micro", "refunded_micro", "escrow_id")
    assert [getattr(ra, f) for f in figures] == [getattr(rb, f) for f in figures]
    escrow = world.sandbox.escrow(a.escrow_id)
    assert ra.units == 150 and escrow.released_micro == ra.paid_micro == 150_000
    assert escrow.refunded_micro == ra.refunded_micro == 850_000
    world.sandbox.audit()


def test_two_closers_at_once(world, two_stores):
    store_a, store_b = two_stores
    sid = uuid.uuid4().hex
    a = _stream(world, store_a, sid).open()
    b = _stream(world, store_b, sid).open()
    a.record(70)
    b.record(80)
    start = threading.Barrier(2)
    results: dict[str, Any] = {}

    def close(name: str, s: PaymentStream) -> None:
        start.wait()
        try:
            results[name] = s.close()
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=close, args=(n, s)) for n, s in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    ra, rb = results["a"], results["b"]
    assert not isinstance(ra, BaseException), ra
    assert not isinstance(rb, BaseException), rb
    assert [k for k, _ in world.calls].count("refund") == 1
    assert (ra.paid_micro, ra.refunded_micro) == (rb.paid_micro, rb.refunded_micro)
    assert (ra.paid_micro, ra.refunded_micro) == (150_000, 850_000)
    world.sandbox.audit()


class AsyncCountingClient(CountingClient):
    async def release_partial(  # type: ignore[override]
        self, escrow_id: str, amount: Any, memo: str = "", **kw: Any
    ) -> Any:
        if memo.startswith("final") and self.final_gate is not None:
            await self.final_gate()
        with self._world._lock:
            self._world.calls.append(("release", memo))
        return await self._inner.release_partial(escrow_id, amount, memo, **kw)

    async def refund(self, escrow_id: str, **kw: Any) -> Any:  # type: ignore[override]
        with self._world._lock:
            self._world.calls.append(("refund", escrow_id))
        return await self._inner.refund(escrow_id, **kw)

    final_gate: Callable[[], Any] | None = None


@pytest.mark.parametrize("kind", ["sqlite", "memory-same"])
def test_two_async_closers_one_refund_after_the_final_release(world, tmp_path, kind):
    import asyncio

    from pf_metered.stream import AsyncPaymentStream

    if kind == "sqlite":
        stores = [SQLiteStore(tmp_path / "m.db"), SQLiteStore(tmp_path / "m.db")]
    else:
        stores = [MemoryStore()] * 2
    sid = uuid.uuid4().hex

    async def main() -> tuple[Any, Any]:
        clients = [
            AsyncCountingClient(world.sandbox.async_client(world.payer.api_key), world)
            for _ in range(2)
        ]
        a, b = (
            AsyncPaymentStream(
                c,
                world.provider.agent_id,
                RATE,
                budget="1.00",
                batch=100,
                store=s,
                stream_id=sid,
                background=False,
            )
            for c, s in zip(clients, stores, strict=True)
        )
        await a.open()
        await b.open()
        a.record(120)
        b.record(30)
        a_sending, b_waiting = asyncio.Event(), asyncio.Event()

        async def gate() -> None:
            a_sending.set()
            await b_waiting.wait()

        clients[0].final_gate = gate
        real_state = b.meter.close_state

        def observed_state() -> Any:
            state = real_state()
            if state != "mine":
                b_waiting.set()
            return state

        b.meter.close_state = observed_state  # type: ignore[method-assign]
        task_a = asyncio.create_task(a.close())
        await a_sending.wait()
        ra, rb = await asyncio.wait_for(asyncio.gather(task_a, b.close()), 20)
        return ra, rb

    ra, rb = asyncio.run(main())
    kinds = [k for k, _ in world.calls]
    assert kinds.count("refund") == 1 and kinds[-1] == "refund"
    assert (ra.units, ra.paid_micro, ra.refunded_micro) == (150, 150_000, 850_000)
    assert (rb.units, rb.paid_micro, rb.refunded_micro) == (150, 150_000, 850_000)
    for s in stores:
        if isinstance(s, SQLiteStore):
            s.close()
    world.sandbox.audit()


class _Died(BaseException):
    """A worker process dying at one exact point (raised where it stops)."""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_closer_that_died_before_refunding_is_not_awaited_forever(world, two_stores, mode):
    """A pays the final release, then dies before refunding: no intent is left to take over,
    so B's close gives up after ``close_wait`` with a clear error naming ``resume``, which
    finishes the close with one refund; B's next close returns that receipt."""
    import asyncio

    from pf_metered.errors import StreamClosed
    from pf_metered.stream import AsyncPaymentStream

    store_a, store_b = two_stores
    sid = uuid.uuid4().hex
    a = _stream(world, store_a, sid).open()
    a.record(120)

    def die(escrow_id: str, **kw: Any) -> Any:
        raise _Died

    a.client.refund = die  # type: ignore[attr-defined]
    with pytest.raises(_Died):
        a.close()
    escrow = world.sandbox.escrow(a.escrow_id)
    assert escrow.released_micro == 120_000 and escrow.is_open  # final paid, no refund
    if mode == "sync":
        b = _stream(world, store_b, sid, close_wait=0.05).open()
        with pytest.raises(StreamClosed, match=r"resume\(store, stream_id, client\)"):
            b.close()
    else:

        async def close_b() -> None:
            bb = AsyncPaymentStream(
                world.sandbox.async_client(world.payer.api_key),
                world.provider.agent_id,
                RATE,
                budget="1.00",
                batch=100,
                store=store_b,
                stream_id=sid,
                background=False,
                close_wait=0.05,
            )
            await bb.open()
            with pytest.raises(StreamClosed, match="close_wait"):
                await bb.close()

        asyncio.run(close_b())
    assert [k for k, _ in world.calls].count("refund") == 0  # B never refunds
    assert world.sandbox.escrow(a.escrow_id).is_open

    done = PaymentStream.resume(store_b, sid, world.client())
    receipt = done.receipt
    assert receipt is not None
    escrow = world.sandbox.escrow(a.escrow_id)
    assert escrow.refunded_micro == receipt.refunded_micro == 880_000
    assert escrow.released_micro == receipt.paid_micro == 120_000
    again = _stream(world, store_b, sid).open().close()  # closed now: same figures, no request
    assert (again.paid_micro, again.refunded_micro) == (120_000, 880_000)
    assert [k for k, _ in world.calls].count("refund") == 1  # resume's
    world.sandbox.audit()


def test_close_wait_is_validated(world):
    from pf_metered.errors import InvalidInput

    for bad in (0, -1, True, "5", float("nan"), 10**6):
        with pytest.raises(InvalidInput, match="close_wait"):
            _stream(world, MemoryStore(), uuid.uuid4().hex, close_wait=bad)
