"""``ToolContexts`` (a context per conversation, caps per context and across them), and
``close_all``/``aclose_all`` closing streams whatever opened them (issue 15 item 3); plus what
``stream_list`` says is locked once every stream is closed."""

from __future__ import annotations

import asyncio
import threading
from decimal import Decimal
from typing import Any

import pytest
from conftest import DeployedWorld, PFWorld
from toolcalls import acall, call, refusal

from pf_metered.client import AsyncEscrowClient, EscrowClient
from pf_metered.errors import ConfigError
from pf_metered.tools import Caps, ToolContext, ToolContexts, ToolError, ToolState, get_definition

# -- a context per conversation ------------------------------------------------------------


@pytest.mark.parametrize("maker", [ToolContext, ToolContexts])
def test_a_context_without_any_client_is_refused(maker: type) -> None:
    with pytest.raises(ConfigError, match=rf"^{maker.__name__} needs a client, an async_client"):
        maker()


def test_each_key_has_its_own_streams_and_short_ids(pf_world: PFWorld) -> None:
    contexts = ToolContexts(pf_world.client)
    p = pf_world.provider.agent_id
    a, b = contexts.get("thread-a"), contexts.get("thread-b")
    assert contexts.get("thread-a") is a and a is not b
    assert contexts.get(None) is contexts.get("  ") is contexts.get("default")
    assert call(a, "stream_open", provider=p, rate="0.01", budget="1")["stream_id"] == "s1"
    assert call(b, "stream_open", provider=p, rate="0.01", budget="2")["stream_id"] == "s1"
    call(a, "stream_record", stream_id="s1", units=10)
    assert call(b, "stream_status", stream_id="s1")["units"] == 0  # b's own s1
    assert call(a, "stream_list")["locked"] == "1.00"
    assert call(b, "stream_list")["locked"] == "2.00"
    assert contexts.find("thread-c") is None
    assert contexts.keys() == ["thread-a", "thread-b", "default"]
    with pytest.raises(ConfigError, match="still has open streams"):
        contexts.forget("thread-a")
    receipts = contexts.close_all()
    assert [r.paid_micro for r in receipts["thread-a"]] == [100_000]
    assert [r.refunded_micro for r in receipts["thread-b"]] == [2_000_000]
    assert contexts.forget("thread-a") and contexts.find("thread-a") is None
    assert contexts.figures().paid_micro == 100_000  # the book rows stay: lifetime spend
    assert pf_world.balance() == Decimal("99.90")
    pf_world.sandbox.audit()


def test_caps_bind_each_conversation_and_max_locked_all_of_them(pf_world: PFWorld) -> None:
    """``max_total`` per conversation, ``max_locked`` over all of them (one state)."""
    contexts = ToolContexts(pf_world.client, caps=Caps(max_total="3", max_locked="5"))
    p = pf_world.provider.agent_id
    a, b = contexts.get("a"), contexts.get("b")
    call(a, "stream_open", provider=p, rate="0.01", budget="2.5")
    err = refusal(a, "stream_open", provider=p, rate="0.01", budget="1")
    assert err.kind == "cap_exceeded" and "0.50 USDC left" in err.message  # a's own 3
    call(b, "stream_open", provider=p, rate="0.01", budget="2")  # b has its own 3
    err = refusal(b, "escrow_create", to_agent_id=p, amount="0.6")  # 2.5 + 2 + 0.6 > 5
    assert "max_locked" in err.message and "0.50 USDC free" in err.message
    call(a, "stream_close", stream_id="s1")  # refunded 2.50: room across all comes back
    call(b, "escrow_create", to_agent_id=p, amount="1")
    assert contexts.figures().locked_micro == 3_000_000
    assert pf_world.balance() == Decimal("97.00")
    contexts.close_all()


def test_max_locked_holds_under_parallel_conversations(pf_world: PFWorld) -> None:
    """Eight conversations race for a global 5.00: exactly five 1.00 streams get through."""
    contexts = ToolContexts(pf_world.client, caps=Caps(max_locked="5"))
    p = pf_world.provider.agent_id
    start = threading.Barrier(8)
    outcomes: list[str] = []

    def one(n: int) -> None:
        ctx = contexts.get(f"user-{n}")
        start.wait()
        try:
            call(ctx, "stream_open", provider=p, rate="0.01", budget="1")
            outcomes.append("open")
        except ToolError as exc:
            outcomes.append(exc.kind)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["cap_exceeded"] * 3 + ["open"] * 5
    assert pf_world.balance() == Decimal("95.00")
    assert contexts.figures().locked_micro == 5_000_000
    contexts.close_all()
    assert pf_world.balance() == Decimal("100.00")


# -- close_all / aclose_all, whatever opened the streams -----------------------------------


def _open_async_then_leave(ctx: ToolContext, provider: str) -> None:
    async def run() -> None:
        opened = await acall(ctx, "stream_open", provider=provider, rate="0.01", budget="1")
        await acall(ctx, "stream_record", stream_id=opened["stream_id"], units=17)

    asyncio.run(run())  # the loop that opened it is gone afterwards


def test_close_all_closes_a_stream_opened_by_ainvoke_on_a_gone_loop(pf_world: PFWorld) -> None:
    ctx = ToolContext(pf_world.client, pf_world.aclient)
    p = pf_world.provider.agent_id
    call(ctx, "stream_open", provider=p, rate="0.02", budget="1")  # a sync one beside it
    _open_async_then_leave(ctx, p)
    assert [e.is_async for e in ctx.entries()] == [False, True]
    receipts = ctx.close_all()
    assert [(r.paid_micro, r.refunded_micro) for r in receipts] == [
        (0, 1_000_000),
        (170_000, 830_000),
    ]
    assert pf_world.balance() == Decimal("99.83")
    assert pf_world.balance("provider") == Decimal("0.1683")
    assert call(ctx, "stream_list")["locked"] == "0.00"
    pf_world.sandbox.audit()


def test_sync_stream_close_of_an_async_stream_goes_to_its_running_loop(pf_world: PFWorld) -> None:
    """The loop that opened the stream still runs (in another thread): the sync close is
    handed to it; on that loop itself a sync close is refused (it would wait on itself)."""
    ctx = ToolContext(pf_world.client, pf_world.aclient)
    p = pf_world.provider.agent_id
    loop = asyncio.new_event_loop()
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    try:
        opened = asyncio.run_coroutine_threadsafe(
            acall(ctx, "stream_open", provider=p, rate="0.01", budget="1", batch=5), loop
        ).result()
        call(ctx, "stream_record", stream_id=opened["stream_id"], units=12)

        async def on_its_loop() -> ConfigError:
            with pytest.raises(ConfigError) as info:  # the developer's to fix, not the model's
                get_definition("stream_close").call(ctx, {"stream_id": "s1"})
            return info.value

        err = asyncio.run_coroutine_threadsafe(on_its_loop(), loop).result()
        assert "aclose_all" in str(err) and ctx.entries()[0].receipt is None
        receipt = call(ctx, "stream_close", stream_id="s1")  # from this (loop-less) thread
        assert (receipt["paid"], receipt["refunded"]) == ("0.12", "0.88")
    finally:
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
        loop.close()
    assert pf_world.balance() == Decimal("99.88")


async def test_aclose_all_closes_sync_and_async_streams(pf_world: PFWorld) -> None:
    ctx = ToolContext(pf_world.client, pf_world.aclient)
    p = pf_world.provider.agent_id
    await asyncio.to_thread(call, ctx, "stream_open", provider=p, rate="0.01", budget="1")
    await acall(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    ctx.entries()[0].stream.record(30)
    ctx.entries()[1].stream.record(5)
    receipts = await ctx.aclose_all()
    assert [r.paid_micro for r in receipts] == [300_000, 50_000]
    assert pf_world.balance() == Decimal("99.65")
    await pf_world.aclient.aclose()


def test_close_all_after_asyncio_run_over_a_real_loopback_server() -> None:
    """Over real HTTP the async client's pooled connections belong to the loop that made
    them: closing in a later loop must use a new pool, not fail with 'Event loop is closed'."""
    from pf_metered.sandbox import Sandbox

    sandbox = Sandbox()
    payer, provider = sandbox.add_agent(balance="10"), sandbox.add_agent()
    with sandbox.serve() as server:
        client = EscrowClient(payer.api_key, base_url=server.base_url)
        aclient = AsyncEscrowClient(payer.api_key, base_url=server.base_url)
        ctx = ToolContext(client, aclient)
        _open_async_then_leave(ctx, provider.agent_id)
        [receipt] = ctx.close_all()
        assert (receipt.paid_micro, receipt.refunded_micro) == (170_000, 830_000)
        client.close()
    assert sandbox.balance(payer.agent_id) == Decimal("9.83")
    sandbox.audit()
    sandbox.close()


# -- what stream_list calls locked once every stream is closed -----------------------------


def test_stream_list_after_every_stream_closed_reports_only_what_is_really_locked(
    pf_world: PFWorld,
) -> None:
    ctx = ToolContext(pf_world.client, pf_world.aclient)
    p = pf_world.provider.agent_id
    call(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    call(ctx, "stream_record", stream_id="s1", units=100)  # the whole budget: all paid
    call(ctx, "stream_open", provider=p, rate="0.01", budget="2")
    call(ctx, "stream_record", stream_id="s2", units=40)
    _open_async_then_leave(ctx, p)  # s3: 0.17 of 1.00
    ctx.close_all()
    listing = call(ctx, "stream_list", include_closed=True)
    assert (listing["open_streams"], listing["locked"]) == (0, "0.00")
    assert (listing["paid"], listing["refunded"]) == ("1.57", "2.43")
    rows = {r["stream_id"]: r for r in listing["streams"]}
    assert (rows["s2"]["paid"], rows["s2"]["refunded"]) == ("0.40", "1.60")
    assert pf_world.balance() == Decimal("100") - Decimal("1.57")
    assert "locked=0.00, counted=1.57" in repr(ctx)  # max_total still counts what was paid


def test_stream_list_on_the_deployed_dialect_counts_only_the_tranche_still_held() -> None:
    """The deployed service keeps an unused tranche until its timeout: that, and only that,
    is locked after close; paid money is paid."""
    world = DeployedWorld(balance="100")
    try:
        ctx = ToolContext(world.client())
        p = world.provider.agent_id
        call(ctx, "stream_open", provider=p, rate="0.01", budget="1", batch=10)
        call(ctx, "stream_record", stream_id="s1", units=17)
        receipt = call(ctx, "stream_close", stream_id="s1")
        listing = call(ctx, "stream_list", include_closed=True)
        assert listing["locked"] == receipt["still_locked"] == "0.10"
        assert listing["paid"] == receipt["paid"] == "0.17"
        [row] = listing["streams"]
        assert row["still_locked"] == "0.10" and row["paid"] == "0.17"
        held = receipt["still_locked_escrows"][0]["escrow_id"]
        assert world.sandbox.escrow(held).status == "locked"  # really held by the service
    finally:
        world.close()


def test_one_state_may_be_durable_and_shared(pf_world: PFWorld, tmp_path: Any) -> None:
    state = ToolState(tmp_path / "tools.sqlite3")
    contexts = ToolContexts(pf_world.client, state=state, owner_prefix="lc")
    p = pf_world.provider.agent_id
    call(contexts.get("u1"), "stream_open", provider=p, rate="0.01", budget="1")
    assert [s.owner for s in state.streams()] == ["lc:u1"]
    contexts.close_all()
    state.close()
