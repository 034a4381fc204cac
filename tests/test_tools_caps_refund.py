"""``max_total`` counts money paid and money still locked, never money that came back.

Every path that returns money to the payer gives it back to the context's count: an
``escrow_refund`` (whole, or after part of the escrow was released), a stream's unused budget
refunded at close, an escrow the service handed back at its timeout. The count is checked in
integer micro-USDC against the sandbox ledger (what really left the payer), per conversation
and with the global ``max_locked`` / ``max_spend`` over all of them. A refusal names a next
step that exists in the situation it is refused in.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from conftest import DeployedWorld, PFWorld
from toolcalls import acall, call, refusal

from pf_metered.tools import Caps, ToolContext, ToolContexts, ToolError, get_definition


def debited_micro(world: PFWorld | DeployedWorld, start: Decimal) -> int:
    """What really left the payer's balance on the sandbox ledger, in micro-USDC."""
    return int((start - world.balance()) * 10**6)


# -- escrow_refund -------------------------------------------------------------------------


def test_a_refunded_escrow_gives_its_amount_back_to_max_total(pf_world: PFWorld) -> None:
    """The reproduction: 2.00 locked and refunded left nothing paid, so 2.00 of room is back."""
    ctx = ToolContext(pf_world.client, caps=Caps(max_total="2"))
    p = pf_world.provider.agent_id
    made = call(ctx, "escrow_create", to_agent_id=p, amount="2.00")
    back = call(ctx, "escrow_refund", escrow_id=made["escrow_id"])
    assert back["refunded_now"] == "2.00" and pf_world.balance() == Decimal("100")
    assert ctx.locked_micro == 0
    assert "locked=0.00, counted=0.00" in repr(ctx)
    again = call(ctx, "escrow_create", to_agent_id=p, amount="1.00")
    assert again["status"] == "locked"
    assert ctx.locked_micro == debited_micro(pf_world, Decimal("100")) == 1_000_000
    pf_world.sandbox.audit()


def test_part_release_then_refund_counts_exactly_what_was_released(pf_world: PFWorld) -> None:
    ctx = ToolContext(pf_world.client, caps=Caps(max_total="3"))
    p = pf_world.provider.agent_id
    made = call(ctx, "escrow_create", to_agent_id=p, amount="3.00")
    call(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="0.700001")
    call(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="0.3")
    assert ctx.locked_micro == 3_000_000  # paid 1.000001 and locked 1.999999
    back = call(ctx, "escrow_refund", escrow_id=made["escrow_id"])
    assert back["refunded_now"] == "1.999999" and back["released"] == "1.000001"
    assert ctx.locked_micro == 1_000_001 == debited_micro(pf_world, Decimal("100"))
    # seeing the refunded escrow again (status, a second refund's refusal) gives nothing twice
    call(ctx, "escrow_status", escrow_id=made["escrow_id"])
    with pytest.raises(ToolError):
        get_definition("escrow_refund").call(ctx, {"escrow_id": made["escrow_id"]})
    assert ctx.locked_micro == 1_000_001
    err = refusal(ctx, "escrow_create", to_agent_id=p, amount="2")  # 1.000001 + 2 > 3
    assert err.kind == "cap_exceeded" and "1.999999 USDC left" in err.message
    call(ctx, "escrow_create", to_agent_id=p, amount="1.999999")
    assert ctx.locked_micro == 3_000_000 == debited_micro(pf_world, Decimal("100"))
    pf_world.sandbox.audit()


async def test_async_refund_gives_back_too(pf_world: PFWorld) -> None:
    ctx = ToolContext(async_client=pf_world.aclient, caps=Caps(max_total="2"))
    p = pf_world.provider.agent_id
    made = await acall(ctx, "escrow_create", to_agent_id=p, amount="2")
    await acall(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="0.25")
    await acall(ctx, "escrow_refund", escrow_id=made["escrow_id"])
    assert ctx.locked_micro == 250_000 == debited_micro(pf_world, Decimal("100"))
    await acall(ctx, "escrow_create", to_agent_id=p, amount="1.75")
    assert ctx.locked_micro == 2_000_000
    await pf_world.aclient.aclose()


# -- streams -------------------------------------------------------------------------------


def test_stream_close_refund_gives_back_the_unused_budget(pf_world: PFWorld) -> None:
    ctx = ToolContext(pf_world.client, caps=Caps(max_total="2"))
    p = pf_world.provider.agent_id
    call(ctx, "stream_open", provider=p, rate="0.000003", budget="2", batch=1000)
    call(ctx, "stream_record", stream_id="s1", units=123_457)  # 0.370371 owed
    receipt = call(ctx, "stream_close", stream_id="s1")
    assert (receipt["paid"], receipt["refunded"]) == ("0.370371", "1.629629")
    assert ctx.locked_micro == 370_371 == debited_micro(pf_world, Decimal("100"))
    call(ctx, "escrow_create", to_agent_id=p, amount="1.629629")  # exactly the room left
    err = refusal(ctx, "escrow_create", to_agent_id=p, amount="1")
    assert err.kind == "cap_exceeded" and "0.00 USDC left" in err.message
    assert ctx.locked_micro == 2_000_000 == debited_micro(pf_world, Decimal("100"))
    pf_world.sandbox.audit()


def test_an_expired_escrow_on_the_deployed_dialect_gives_back_what_came_back() -> None:
    """The deployed service hands an expired escrow back less its 1% commission: the 1% left
    the payer (it stays counted), the rest came back (it is given back to the count)."""
    world = DeployedWorld(balance="100")
    try:
        ctx = ToolContext(world.client(), caps=Caps(max_total="5"))
        p = world.provider.agent_id
        made = call(ctx, "escrow_create", to_agent_id=p, amount="4", auto_release_hours=1)
        world.sleep(2 * 3600)
        seen = call(ctx, "escrow_status", escrow_id=made["escrow_id"])
        assert seen["status"] == "refunded"
        assert ctx.locked_micro == 40_000 == debited_micro(world, Decimal("100"))
        call(ctx, "escrow_create", to_agent_id=p, amount="4.96")
        assert ctx.locked_micro == 5_000_000
    finally:
        world.close()


# -- per conversation, and the global caps across conversations ----------------------------


def test_refunds_give_back_per_conversation_and_to_the_global_caps(pf_world: PFWorld) -> None:
    contexts = ToolContexts(
        pf_world.client, caps=Caps(max_total="2", max_locked="3", max_spend="3.5")
    )
    p = pf_world.provider.agent_id
    a, b = contexts.get("a"), contexts.get("b")
    ea = call(a, "escrow_create", to_agent_id=p, amount="2")
    call(b, "stream_open", provider=p, rate="0.01", budget="1")
    err = refusal(b, "escrow_create", to_agent_id=p, amount="0.5")  # 2 + 1 + 0.5 > 3 locked
    assert "max_locked" in err.message
    call(a, "escrow_release", escrow_id=ea["escrow_id"], amount="0.5")
    call(a, "escrow_refund", escrow_id=ea["escrow_id"])  # a: 0.50 paid, 1.50 back
    assert (a.locked_micro, b.locked_micro) == (500_000, 1_000_000)
    assert contexts.figures().locked_micro == 1_000_000  # only b's stream is locked now
    call(b, "stream_record", stream_id="s1", units=30)
    call(b, "stream_close", stream_id="s1")  # b: 0.30 paid, 0.70 back
    assert (a.locked_micro, b.locked_micro) == (500_000, 300_000)
    assert a.locked_micro + b.locked_micro == debited_micro(pf_world, Decimal("100"))
    figures = contexts.figures()
    assert (figures.locked_micro, figures.paid_micro) == (0, 800_000)
    # max_spend: 0.80 paid over the life; 2.70 more may still be committed, across both
    err = refusal(a, "escrow_create", to_agent_id=p, amount="1.500001")  # a's own max_total
    assert err.kind == "cap_exceeded" and "1.50 USDC left" in err.message
    call(a, "escrow_create", to_agent_id=p, amount="1.5")
    call(b, "escrow_create", to_agent_id=p, amount="1.2")
    err = refusal(b, "escrow_create", to_agent_id=p, amount="0.000001")
    assert "max_spend" in err.message
    assert contexts.figures().committed_micro == 3_500_000
    pf_world.sandbox.audit()


# -- what a refusal tells the model to do --------------------------------------------------


def test_max_total_reached_with_nothing_open_says_so_and_names_no_stream(
    pf_world: PFWorld,
) -> None:
    ctx = ToolContext(pf_world.client, caps=Caps(max_total="1"))
    p = pf_world.provider.agent_id
    made = call(ctx, "escrow_create", to_agent_id=p, amount="1")
    call(ctx, "escrow_release", escrow_id=made["escrow_id"])  # paid: stays counted
    err = refusal(ctx, "escrow_create", to_agent_id=p, amount="0.5")
    assert err.kind == "cap_exceeded" and "0.00 USDC left" in err.message
    assert "stream" not in err.message and "escrow_refund" not in err.message
    assert "max_total" in err.message and "raise" in err.message and "user" in err.message


def test_max_total_refusal_names_only_what_is_open(pf_world: PFWorld) -> None:
    ctx = ToolContext(pf_world.client, caps=Caps(max_total="3"))
    p = pf_world.provider.agent_id
    call(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    made = call(ctx, "escrow_create", to_agent_id=p, amount="1.5")
    err = refusal(ctx, "escrow_create", to_agent_id=p, amount="1")
    assert "0.50 USDC left" in err.message and "use at most 0.50 USDC" in err.message
    assert "stream_close" in err.message and "s1" in err.message
    assert "escrow_refund" in err.message and made["escrow_id"] in err.message
    call(ctx, "stream_close", stream_id="s1")
    call(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="1.5")
    call(ctx, "escrow_create", to_agent_id=p, amount="1.5")  # room from the stream's refund
    err = refusal(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    assert "stream_close" not in err.message  # nothing left to close
    assert "escrow_refund" in err.message  # the new escrow can still be given back


def test_max_total_refusal_names_no_refund_where_the_service_has_none() -> None:
    world = DeployedWorld(balance="100")
    try:
        ctx = ToolContext(world.client(), caps=Caps(max_total="1"))
        p = world.provider.agent_id
        call(ctx, "escrow_create", to_agent_id=p, amount="1")
        err = refusal(ctx, "escrow_create", to_agent_id=p, amount="0.5")
        assert "escrow_refund" not in err.message and "stream" not in err.message
        assert "max_total" in err.message and "timeout" in err.message
    finally:
        world.close()


def test_a_closed_streams_tranche_that_came_back_is_given_back() -> None:
    """On the deployed dialect a closed stream leaves its unused tranche locked until its
    timeout; once stream_status sees it came back, the room is given back (less the 1% the
    service kept), once."""
    world = DeployedWorld(balance="100")
    try:
        ctx = ToolContext(world.client(), caps=Caps(max_total="1.3"))
        p = world.provider.agent_id
        call(ctx, "stream_open", provider=p, rate="0.01", budget="1", batch=10)
        call(ctx, "stream_record", stream_id="s1", units=17)
        receipt = call(ctx, "stream_close", stream_id="s1")
        assert (receipt["paid"], receipt["still_locked"]) == ("0.17", "0.10")
        assert ctx.locked_micro == 270_000 == debited_micro(world, Decimal("100"))
        err = refusal(ctx, "escrow_create", to_agent_id=p, amount="1.1")
        assert "1.03 USDC left" in err.message and "0.10 USDC is still locked" in err.message
        assert "s1" in err.message and "stream_status" in err.message
        assert call(ctx, "stream_status", stream_id="s1")["still_locked"] == "0.10"  # not yet
        world.sleep(25 * 3600)
        later = call(ctx, "stream_status", stream_id="s1")
        assert "still_locked" not in later and later["kept_by_service"] == "0.001"
        assert later["refunded"] == "0.099" and later["debited"] == "0.171"
        assert ctx.locked_micro == 171_000 == debited_micro(world, Decimal("100"))
        call(ctx, "stream_status", stream_id="s1")  # seen again: nothing given twice
        assert ctx.locked_micro == 171_000
        assert call(ctx, "stream_list", include_closed=True)["locked"] == "0.00"
        call(ctx, "escrow_create", to_agent_id=p, amount="1.129")
        assert ctx.locked_micro == 1_300_000
    finally:
        world.close()


async def test_a_closed_streams_tranche_that_came_back_is_given_back_async() -> None:
    world = DeployedWorld(balance="100")
    try:
        aclient = world.aclient()
        ctx = ToolContext(async_client=aclient, caps=Caps(max_total="2"))
        p = world.provider.agent_id
        await acall(ctx, "stream_open", provider=p, rate="0.01", budget="1", batch=10)
        await acall(ctx, "stream_record", stream_id="s1", units=17)
        await acall(ctx, "stream_close", stream_id="s1")
        world.sleep(25 * 3600)
        later = await acall(ctx, "stream_status", stream_id="s1")
        assert "still_locked" not in later and later["refunded"] == "0.099"
        assert ctx.locked_micro == 171_000 == debited_micro(world, Decimal("100"))
        await aclient.aclose()
    finally:
        world.close()
