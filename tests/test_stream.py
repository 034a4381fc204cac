"""PaymentStream and AsyncPaymentStream against the real sandbox ledger, twins side by side."""

from __future__ import annotations

import asyncio
import itertools
import threading
from decimal import ROUND_HALF_UP, Decimal

import pytest

from pf_metered.errors import BudgetExhausted, Conflict, InvalidInput, StreamClosed
from pf_metered.stream import AsyncPaymentStream, DataFeedPayments, PaymentStream

RATES = ["0.0000001", "0.333333333", "1.5"]


def exact(rate: str, units: int) -> Decimal:
    return (Decimal(rate) * units).quantize(Decimal("0.000001"), ROUND_HALF_UP)


def check_ledger(agents, receipt, rate: str, units: int) -> None:
    esc = agents.escrow(receipt.escrow_id)
    assert receipt.units == units
    assert receipt.paid == exact(rate, units) == esc.released
    assert receipt.refunded == esc.refunded == receipt.budget - receipt.paid
    assert esc.status == ("refunded" if receipt.refunded else esc.status)
    assert receipt.fee + receipt.provider_net == receipt.paid
    assert agents.sandbox.balance(agents.provider.agent_id) == receipt.provider_net


@pytest.mark.parametrize("rate", RATES)
def test_exact_totals_sync(agents, rate):
    with PaymentStream(agents.client, agents.provider.agent_id, rate, batch=7, budget="100") as s:
        n = 0
        for k in (1, 2, 3, 6, 10):
            if Decimal(rate) * (n + k) > 100:
                break
            s.record(k)
            n += k
        s.flush()
    check_ledger(agents, s.receipt, rate, n)


@pytest.mark.parametrize("rate", RATES)
async def test_exact_totals_async(agents, rate):
    async with AsyncPaymentStream(
        agents.aclient, agents.provider.agent_id, rate, batch=7, budget="100"
    ) as s:
        n = 0
        for k in (1, 2, 3, 6, 10):
            if Decimal(rate) * (n + k) > 100:
                break
            s.record(k)
            n += k
        await s.flush()
    check_ledger(agents, s.receipt, rate, n)


def test_budget_enforced_sync(agents):
    with PaymentStream(agents.client, agents.provider.agent_id, "1.5", budget="10") as s:
        s.record(6)
        with pytest.raises(BudgetExhausted):
            s.record()
        assert s.status().units == 6
    assert s.receipt.paid == Decimal("9.0") and s.receipt.refunded == Decimal("1.0")


async def test_budget_enforced_async(agents):
    async with AsyncPaymentStream(
        agents.aclient, agents.provider.agent_id, "1.5", budget="10"
    ) as s:
        s.record(6)
        with pytest.raises(BudgetExhausted):
            s.record()
    assert s.receipt.paid == Decimal("9.0")


def test_32_threads_exact_and_no_double_release(agents):
    with PaymentStream(
        agents.client, agents.provider.agent_id, "0.0001", batch=100, budget="100"
    ) as s:

        def work():
            for _ in range(1000):
                s.record()

        threads = [threading.Thread(target=work) for _ in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    r = s.receipt
    check_ledger(agents, r, "0.0001", 32_000)
    hist = s.status().history
    spans = sorted((h.units_from, h.units_to) for h in hist)
    assert all(b[0] == a[1] for a, b in itertools.pairwise(spans))
    memos = [rel.memo for rel in agents.escrow(r.escrow_id).releases]
    assert len(memos) == len(set(memos)) == r.releases


async def test_thousands_of_tasks_exact(agents):
    async with AsyncPaymentStream(
        agents.aclient, agents.provider.agent_id, "0.0001", batch=50, budget="100"
    ) as s:

        async def work():
            for _ in range(5):
                s.record()
                await asyncio.sleep(0)

        await asyncio.gather(*(work() for _ in range(3000)))
    check_ledger(agents, s.receipt, "0.0001", 15_000)
    memos = [rel.memo for rel in agents.escrow(s.receipt.escrow_id).releases]
    assert len(memos) == len(set(memos))


def test_context_manager_closes_on_exception_sync(agents):
    with (
        pytest.raises(RuntimeError),
        PaymentStream(agents.client, agents.provider.agent_id, "0.01", budget="5") as s,
    ):
        s.record(10)
        raise RuntimeError("boom")
    assert s.closed and s.receipt.paid == Decimal("0.10") and s.receipt.refunded == Decimal("4.9")
    with pytest.raises(StreamClosed):
        s.record()


async def test_context_manager_closes_on_exception_async(agents):
    with pytest.raises(RuntimeError):
        async with AsyncPaymentStream(
            agents.aclient, agents.provider.agent_id, "0.01", budget="5"
        ) as s:
            s.record(10)
            raise RuntimeError("boom")
    assert s.closed and s.receipt.paid == Decimal("0.10")


def test_close_twice_same_receipt_and_memos(agents):
    s = PaymentStream(
        agents.client, agents.provider.agent_id, "0.001", batch=100, budget="1", background=False
    ).open()
    s.record(150)
    s.pump()
    s.record(60)
    r1 = s.close()
    assert s.close() is r1
    memos = [rel.memo for rel in agents.escrow(r1.escrow_id).releases]
    assert memos == ["batch:units 1-150", "final:units 151-210"]
    assert len(s.stream_id) == 32 and r1.stream_id == s.stream_id


def test_status_and_receipt_table(agents):
    s = PaymentStream(
        agents.client, agents.provider.agent_id, "0.001", batch=100, budget="10", background=False
    ).open()
    s.record(250)
    s.pump()
    st = s.status()
    assert (st.units, st.released, st.pending_units) == (250, Decimal("0.25"), 0)
    s.record(5)
    assert s.status().pending_units == 5 and s.status().remaining == Decimal("9.75")
    r = s.close()
    text = str(r)
    for label, value in [
        ("units", "255"),
        ("paid", "0.255 USDC"),
        ("fee (1%)", "0.00255"),
        ("provider net", "0.25245"),
        ("refunded", "9.745"),
    ]:
        assert any(label in line and value in line for line in text.splitlines()), label


def test_time_policy_with_fake_clock(agents):
    now = [0.0]
    s = PaymentStream(
        agents.client,
        agents.provider.agent_id,
        "0.001",
        every=60,
        budget="10",
        background=False,
        clock=lambda: now[0],
    ).open()
    s.record(3)
    s.pump()
    assert s.status().releases == 0
    now[0] = 60.0
    s.pump()
    assert s.status().releases == 1
    s.close()


def test_permanent_background_failure_surfaces(agents):
    s = PaymentStream(agents.client, agents.provider.agent_id, "0.01", batch=1, budget="2")
    s.open()
    agents.client.refund(s.escrow_id)  # the escrow is closed under the stream
    s.record(3)
    s._worker.join(timeout=10)  # a permanent failure ends the worker; it does not spin
    assert isinstance(s.last_error, Conflict)
    with pytest.raises(Conflict):
        s.record()
    with pytest.raises(Conflict):
        s.flush()


def test_open_is_idempotent_and_validates(agents):
    with pytest.raises(InvalidInput):
        PaymentStream(agents.client, agents.provider.agent_id, 0.5, budget="1")  # type: ignore[arg-type]
    s = PaymentStream(agents.client, agents.provider.agent_id, "0.5", budget="2")
    assert s.open() is s.open()
    assert s.close().paid == 0
    esc = agents.escrow(s.escrow_id)
    assert esc.status == "refunded" and esc.refunded == Decimal("2")


def test_clock_bills_time_and_stops_on_heartbeat(agents):
    t = [0]
    alive = [True]
    s = PaymentStream(
        agents.client, agents.provider.agent_id, "0.50", per="hour", budget="4", every=3600
    ).open()
    c = s.clock(heartbeat=lambda: alive[0], every=60, source=lambda: t[0], background=False)
    c.start()
    t[0] = 3600 * 10**9  # one hour
    assert c.tick()
    t[0] = 5400 * 10**9
    alive[0] = False
    assert not c.tick()  # provider gone: the half hour after the last beat is not billed
    assert c.stopped_reason == "heartbeat" and s.closed
    assert s.receipt.paid == Decimal("0.50") and s.receipt.refunded == Decimal("3.50")
    assert "0.5 USDC / hour" in str(s.receipt)


async def test_async_clock_bills_until_stopped(agents):
    t = [0]
    s = AsyncPaymentStream(
        agents.aclient, agents.provider.agent_id, "0.002", per="second", budget="1"
    )
    async with s, s.clock(every=1, source=lambda: t[0], background=False) as c:
        t[0] = 1_500_000_000 + 123  # 1.5 s
        assert await c.tick()
        t[0] = 2_250_000_000
    assert c.billed_units == 2250 and s.receipt.paid == Decimal("0.0045")


def test_clock_stops_at_budget(agents):
    t = [0]
    with PaymentStream(agents.client, agents.provider.agent_id, "1", per="second", budget="2") as s:
        c = s.clock(source=lambda: t[0], background=False).start()
        t[0] = 5 * 10**9
        assert not c.tick()
        assert c.stopped_reason == "budget"
    assert s.receipt.paid == Decimal("2") and s.receipt.refunded == 0


def test_keyed_data_feeds(agents):
    with DataFeedPayments(agents.client, batch=1000) as feeds:
        feeds.subscribe(agents.provider.agent_id, "price_feed", budget="1")
        feeds.subscribe(agents.provider.agent_id, "news_event", budget="1")
        for _ in range(2500):
            feeds.record(agents.provider.agent_id, "price_feed")
        feeds.record(agents.provider.agent_id, "news_event", n=3)
        with pytest.raises(InvalidInput):
            feeds.record(agents.provider.agent_id, "sensor_reading")
    receipts = feeds.close()
    assert receipts[(agents.provider.agent_id, "price_feed")].paid == Decimal("0.25")
    assert receipts[(agents.provider.agent_id, "news_event")].paid == Decimal("0.03")


# -- a release claimed in the store but never recorded by the meter ----------------------


def _store_for(kind: str, tmp_path, request):
    if kind == "memory":
        return None
    if kind == "sqlite":
        return str(tmp_path / "meter.db")
    from pf_metered.meter.redis_store import RedisStore

    return RedisStore(
        request.getfixturevalue("redis_url"), prefix=request.getfixturevalue("redis_prefix")
    )


class _StopAfterClaim:
    """The process is stopped (KeyboardInterrupt) right after the store commits a claim,
    before the meter has recorded the intent as in flight."""

    def __init__(self, store) -> None:
        self.store = store

    def __enter__(self) -> None:
        real = self.store.claim

        def claim(*args, **kwargs):
            intent = real(*args, **kwargs)
            if intent is not None:
                del self.store.claim  # once
                raise KeyboardInterrupt
            return intent

        self.store.claim = claim

    def __exit__(self, *exc) -> None:
        self.store.__dict__.pop("claim", None)


@pytest.mark.parametrize("where", ["batch", "final"])
@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_claim_the_meter_never_recorded_is_adopted(agents, tmp_path, request, kind, where, mode):
    """Stopped between the store's commit of an intent and the meter's record of it, a live
    stream must still send that release (its units paid, not refunded) and leave nothing
    pending: close() and the sender adopt the pending intent this process owns."""
    store = _store_for(kind, tmp_path, request)
    kw = dict(batch=10, budget="10", background=False, store=store)
    if mode == "sync":
        s = PaymentStream(agents.client, agents.provider.agent_id, "0.01", **kw).open()
        s.record(10)
        with _StopAfterClaim(s.store), pytest.raises(KeyboardInterrupt):
            s.pump() if where == "batch" else s.close()
        if where == "batch":
            s.record(5)
            s.pump()  # the sender: the unrecorded batch goes out (once)
            assert agents.escrow(s.escrow_id).released == Decimal("0.10")
        receipt = s.close()
    else:

        async def run() -> AsyncPaymentStream:
            s = AsyncPaymentStream(agents.aclient, agents.provider.agent_id, "0.01", **kw)
            await s.open()
            s.record(10)
            with _StopAfterClaim(s.store), pytest.raises(KeyboardInterrupt):
                await (s.pump() if where == "batch" else s.close())
            if where == "batch":
                s.record(5)
                await s.pump()
                assert agents.escrow(s.escrow_id).released == Decimal("0.10")
            await s.close()
            return s

        s = asyncio.run(run())
        receipt = s.receipt
    units = 15 if where == "batch" else 10
    check_ledger(agents, receipt, "0.01", units)
    state = s.store.load(s.stream_id)
    assert state.pending == () and state.status == "closed"
    assert state.releases == (2 if where == "batch" else 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_read_back_finds_a_release_whose_memo_carries_the_key_tag(mode):
    """On a server not declared to honour idempotency keys the client sends each memo with
    `` [idem:KEY]`` appended. When a release's answer AND the client's own read-back are lost,
    the stream reads the escrow back itself: it must recognise its release by the key, settle
    it and send nothing again (it used to look for the bare memo, miss it, and fail)."""
    import httpx

    from pf_metered.sandbox import Sandbox

    class LoseReleaseAndReadBack(httpx.BaseTransport, httpx.AsyncBaseTransport):
        def __init__(self, inner) -> None:
            self.inner, self.armed, self.lost = inner, False, []

        def _lose(self, request) -> bool:
            if not self.armed:
                return False
            if request.method == "POST" and "release" in request.url.path and not self.lost:
                self.lost.append("release")
                return True
            if request.method == "GET" and self.lost == ["release"]:
                self.lost.append("read-back")
                return True
            return False

        def handle_request(self, request):
            lose = self._lose(request)
            response = self.inner.handle_request(request)
            if lose:
                raise httpx.ReadTimeout("answer lost (test)", request=request)
            return response

        async def handle_async_request(self, request):
            lose = self._lose(request)
            response = await self.inner.handle_async_request(request)
            if lose:
                raise httpx.ReadTimeout("answer lost (test)", request=request)
            return response

    async def no_sleep(seconds: float) -> None:
        return None

    with Sandbox(honour_idempotency=False) as sb:
        payer, provider = sb.add_agent(balance="10"), sb.add_agent()
        lose = LoseReleaseAndReadBack(sb.transport())
        kw = dict(batch=10, budget="1", background=False)
        if mode == "sync":
            client = sb.client(payer.api_key, transport=lose, max_retries=0, _sleep=lambda s: None)
            s = PaymentStream(client, provider.agent_id, "0.01", **kw).open()
            s.record(10)
            lose.armed = True
            s.flush()  # settled from the stream's read-back, no error
            receipt = s.close()
        else:

            async def run():
                client = sb.async_client(
                    payer.api_key, transport=lose, max_retries=0, _sleep=no_sleep
                )
                s = AsyncPaymentStream(client, provider.agent_id, "0.01", **kw)
                await s.open()
                s.record(10)
                lose.armed = True
                await s.flush()
                return await s.close()

            receipt = asyncio.run(run())
        assert lose.lost == ["release", "read-back"]
        escrow = sb.escrow(receipt.escrow_id)
        assert [r.memo.split(" [idem:")[0] for r in escrow.releases] == ["batch:units 1-10"]
        assert escrow.released_micro == receipt.paid_micro == 100_000
        assert escrow.refunded_micro == receipt.refunded_micro == 900_000
        sb.audit()


@pytest.mark.parametrize("store", ["memory", "sqlite", "sqlite-group"])
def test_record_and_metered_calls_never_wait_on_a_release_in_flight(tmp_path, store):
    """A release hangs at the escrow service; meanwhile other threads record, make metered
    calls and read the status: none of it waits on that request (no I/O to the service, no
    lock the sender holds across it)."""
    from pf_metered.decorators import metered
    from pf_metered.meter.sqlite_store import SQLiteStore
    from pf_metered.sandbox import Sandbox

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="20"), sb.add_agent()
        entered, go_on = threading.Event(), threading.Event()

        def hang(request) -> None:
            if request.path.endswith("release-partial") and not go_on.is_set():
                entered.set()
                go_on.wait(20)

        sb.before_handle = hang
        st = {
            "memory": None,
            "sqlite": SQLiteStore(tmp_path / "m.db"),
            "sqlite-group": SQLiteStore(tmp_path / "g.db", durability="group"),
        }[store]
        s = PaymentStream(
            sb.client(payer.api_key), provider.agent_id, "0.001", batch=10, budget="10", store=st
        ).open()

        @metered(stream=s)
        def call() -> int:
            return 1

        s.record(10)  # a batch is due: the background sender sends it, and it hangs
        assert entered.wait(10)
        done = threading.Event()

        def busy() -> None:
            for _ in range(200):
                s.record()
                call()
            s.status()
            done.set()

        threading.Thread(target=busy, daemon=True).start()
        finished = done.wait(10)
        hung = not go_on.is_set()
        go_on.set()
        assert finished and hung  # all of it done while the release was still hanging
        receipt = s.close()
        assert receipt.units == 410 and receipt.paid == Decimal("0.41")
        if st is not None:
            st.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_awkward_rate_spends_the_budget_exactly_and_never_more(agents, mode):
    """0.333333333 × 3 = 0.999999999: each batch pays the floor (0.333333), the close pays the
    half-up rest (0.000001, memo ``final:rounding``), the total is the budget to the
    micro-USDC, and a 4th unit is refused before it is counted."""
    rate = "0.333333333"
    if mode == "sync":
        with PaymentStream(agents.client, agents.provider.agent_id, rate, batch=1, budget="1") as s:
            for _ in range(3):
                s.record()
                s.flush()
            with pytest.raises(BudgetExhausted):
                s.record()
        receipt = s.receipt
    else:

        async def run():
            async with AsyncPaymentStream(
                agents.aclient, agents.provider.agent_id, rate, batch=1, budget="1"
            ) as s:
                for _ in range(3):
                    s.record()
                    await s.flush()
                with pytest.raises(BudgetExhausted):
                    s.record()
            return s.receipt

        receipt = asyncio.run(run())
    check_ledger(agents, receipt, rate, 3)
    escrow = agents.escrow(receipt.escrow_id)
    assert [r.amount for r in escrow.releases] == [Decimal("0.333333")] * 3 + [Decimal("0.000001")]
    assert escrow.releases[-1].memo == "final:rounding"
    assert escrow.released == Decimal("1") and escrow.refunded == 0


async def test_async_clock_stops_billing_when_the_heartbeat_fails(agents):
    t = [0]
    beats = iter([True, False])

    async def heartbeat() -> bool:
        return next(beats)

    s = AsyncPaymentStream(agents.aclient, agents.provider.agent_id, "0.50", per="hour", budget="4")
    async with s:
        c = s.clock(heartbeat=heartbeat, every=60, source=lambda: t[0], background=False)
        await c.start()
        t[0] = 3600 * 10**9
        assert await c.tick()
        t[0] = 7200 * 10**9
        assert not await c.tick()  # provider gone: the second hour is not billed
        assert c.stopped_reason == "heartbeat" and s.closed
    assert s.receipt.paid == Decimal("0.50") and s.receipt.refunded == Decimal("3.50")


def test_a_heartbeat_that_raises_stops_billing(agents):
    t = [0]

    def heartbeat() -> bool:
        if t[0] > 10**9:
            raise ConnectionError("provider unreachable")
        return True

    s = PaymentStream(
        agents.client, agents.provider.agent_id, "0.001", per="second", budget="1"
    ).open()
    with s.clock(heartbeat=heartbeat, source=lambda: t[0], background=False) as c:
        t[0] = 10**9
        assert c.tick()
        t[0] = 5 * 10**9
        assert not c.tick()
    assert c.stopped_reason == "heartbeat" and c.billed_units == 1000
    assert s.receipt.paid == Decimal("0.001")


def test_an_unreachable_store_does_not_stop_the_background_sender(agents):
    """A Redis restart outlasting the store's own retries (StoreUnavailable) is transient for
    the sender: it backs off and sends the batch once the store answers again."""
    from pf_metered.meter.redis_store import StoreUnavailable

    s = PaymentStream(agents.client, agents.provider.agent_id, "0.001", batch=10, budget="1").open()
    real = s.store.claim
    failed = threading.Event()

    def claim(*args, **kwargs):
        if not failed.is_set():
            failed.set()
            raise StoreUnavailable("Redis unreachable after 6 attempts (test)")
        return real(*args, **kwargs)

    s.store.claim = claim
    sent = threading.Event()
    real_settled = s.meter.settled

    def settled(action):
        real_settled(action)
        sent.set()

    s.meter.settled = settled
    s.record(10)
    assert failed.wait(10)
    assert sent.wait(10)  # the sender itself retried and settled the batch
    assert isinstance(s.last_error, StoreUnavailable)
    s.record()  # the stream goes on: no stored failure is raised
    receipt = s.close()
    check_ledger(agents, receipt, "0.001", 11)


@pytest.mark.parametrize(
    ("kwargs", "shown"),
    [({"budget": "0.50"}, "got 0.50"), ({"max_units": 10}, "got 0.01 (rate × max_units)")],
)
def test_a_budget_under_the_escrow_minimum_is_refused_at_construction(agents, kwargs, shown):
    """The service locks nothing under 1.00 (v1): say so naming ``budget``, before any I/O,
    not from ``open()`` naming an ``amount`` the user never set."""
    from pf_metered.meter.store import MemoryStore

    store = MemoryStore()
    with pytest.raises(InvalidInput) as info:
        PaymentStream(
            agents.client, agents.provider.agent_id, "0.001", batch=10, store=store, **kwargs
        )
    assert info.value.field == "budget"
    assert "at least 1.00" in str(info.value) and shown in str(info.value)
    assert not agents.client.list_escrows()  # nothing was locked


def test_the_callers_decimal_context_does_not_change_what_is_billed(agents):
    # issue 13 item 5: with getcontext().prec = 6, 60 s at 0.123456789/s billed 7.407420
    import decimal

    t = [0]
    with decimal.localcontext() as ctx:
        ctx.prec = 6
        with PaymentStream(
            agents.client, agents.provider.agent_id, "0.123456789", per="second", budget="10.5"
        ) as s:
            assert s.budget == Decimal("10.5")
            c = s.clock(source=lambda: t[0], background=False).start()
            t[0] = 60 * 10**9
            assert c.tick()
    assert s.receipt.paid == Decimal("7.407407")
    assert s.receipt.refunded == Decimal("10.5") - Decimal("7.407407")


# -- close() is bounded (issue 13 item 9) ------------------------------------------------


def _hanging_release(sb):
    entered, go_on = threading.Event(), threading.Event()

    def hang(request) -> None:
        if request.path.endswith("release-partial") and not go_on.is_set():
            entered.set()
            go_on.wait(30)

    sb.before_handle = hang
    return entered, go_on


def test_close_gives_up_on_a_hung_background_send_and_says_how_to_finish():
    from pf_metered.errors import APITimeout
    from pf_metered.sandbox import Sandbox

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="20"), sb.add_agent()
        entered, go_on = _hanging_release(sb)
        s = PaymentStream(
            sb.client(payer.api_key),
            provider.agent_id,
            "0.01",
            batch=10,
            budget="1",
            close_wait=0.3,
        ).open()
        s.record(10)  # due: the background sender sends it, and the escrow service hangs
        assert entered.wait(10)
        with pytest.raises(APITimeout) as info:
            s.close()
        message = str(info.value)
        assert "close_wait" in message and "close() again" in message and "resume" in message
        assert "10 units" in message and s.stream_id in message
        go_on.set()  # the service answers at last: the same close finishes the stream
        receipt = s.close()
    assert receipt.units == 10 and receipt.paid == Decimal("0.10")
    assert receipt.refunded == Decimal("0.90")


async def test_async_close_gives_up_on_a_hung_background_send_and_says_how_to_finish():
    from pf_metered.errors import APITimeout
    from pf_metered.sandbox import Sandbox

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="20"), sb.add_agent()
        entered, go_on = _hanging_release(sb)
        client = sb.async_client(payer.api_key)
        s = await AsyncPaymentStream(
            client, provider.agent_id, "0.01", batch=10, budget="1", close_wait=0.3
        ).open()
        s.record(10)
        assert await asyncio.to_thread(entered.wait, 10)
        with pytest.raises(APITimeout) as info:
            await s.close()
        assert "close() again" in str(info.value) and "resume" in str(info.value)
        go_on.set()
        receipt = await s.close()
        await client.aclose()
    assert receipt.units == 10 and receipt.paid == Decimal("0.10")


# -- ids validated at construction, before anything is written (issue 13 item 11) ----------


@pytest.mark.parametrize("agent_id", ["a b", "ü", "../x", "x" * 129, "a\n", ""])
def test_bad_agent_ids_are_refused_by_the_constructor(agents, tmp_path, agent_id):
    from pf_metered.meter.sqlite_store import SQLiteStore

    store = SQLiteStore(tmp_path / "j.db")
    with pytest.raises(InvalidInput) as info:
        PaymentStream(agents.client, agent_id, "0.01", budget="1", store=store)
    assert info.value.field == "to_agent_id"
    assert store.load("anything") is None and _journal_rows(tmp_path / "j.db") == 0
    store.close()


@pytest.mark.parametrize("stream_id", ["s" * 300, "a b", "../x", "ü", ""])
def test_bad_stream_ids_are_refused_naming_stream_id(agents, tmp_path, stream_id):
    from pf_metered.meter.sqlite_store import SQLiteStore

    store = SQLiteStore(tmp_path / "j.db")
    for cls, client in ((PaymentStream, agents.client), (AsyncPaymentStream, agents.aclient)):
        with pytest.raises(InvalidInput) as info:
            cls(
                client,
                agents.provider.agent_id,
                "0.01",
                budget="1",
                store=store,
                stream_id=stream_id,
            )
        assert info.value.field == "stream_id"
    assert _journal_rows(tmp_path / "j.db") == 0
    store.close()


def _journal_rows(path) -> int:
    import sqlite3

    with sqlite3.connect(path) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return sum(db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables)


def test_a_float_clock_source_is_refused(agents):
    import time

    with PaymentStream(
        agents.client, agents.provider.agent_id, "0.001", per="second", budget="1"
    ) as s:
        with pytest.raises(InvalidInput) as info:
            s.clock(source=time.perf_counter, background=False)
        assert info.value.field == "source"
