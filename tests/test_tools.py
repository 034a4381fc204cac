"""The framework-neutral tool layer: definitions, caps, answers and errors, on the sandbox."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pf_metered.errors import ConfigError, InvalidInput
from pf_metered.tools import (
    ALL_TOOL_NAMES,
    TOOLS,
    Caps,
    ToolContext,
    ToolError,
    get_definition,
)
from pf_metered.tools.schemas import StreamOpenArgs


def call(ctx, name, **args):
    return json.loads(get_definition(name).call(ctx, args))


async def acall(ctx, name, **args):
    return json.loads(await get_definition(name).acall(ctx, args))


def error_of(ctx, name, **args) -> ToolError:
    with pytest.raises(ToolError) as info:
        get_definition(name).call(ctx, args)
    return info.value


# -- definitions ---------------------------------------------------------------------------


def test_every_tool_is_defined_once_in_order():
    assert tuple(t.name for t in TOOLS) == ALL_TOOL_NAMES
    assert len(set(ALL_TOOL_NAMES)) == 11
    with pytest.raises(KeyError, match="known"):
        get_definition("escrow_cancel")


@pytest.mark.parametrize("definition", TOOLS, ids=lambda d: d.name)
def test_schemas_describe_every_field_and_forbid_extras(definition):
    schema = definition.input_schema()
    assert schema["type"] == "object"
    assert schema.get("additionalProperties") is False
    for name, prop in schema.get("properties", {}).items():
        assert prop.get("description"), f"{definition.name}.{name} has no description"
    assert len(definition.description) > 40
    assert issubclass(definition.args_schema, BaseModel)


@pytest.mark.parametrize("definition", TOOLS, ids=lambda d: d.name)
def test_every_argument_has_one_top_level_type(definition):
    """Generic clients convert a typed argument by the property's top-level ``type`` (the MCP
    Inspector's CLI sent ``batch="10"`` for ``anyOf [integer, null]``, which the strict counts
    refuse); an optional argument is one that may be left out, and ``null`` is still taken."""
    schema = definition.input_schema()
    for name, prop in schema.get("properties", {}).items():
        assert "type" in prop and "anyOf" not in prop, f"{definition.name}.{name}: {prop}"


def test_an_optional_count_may_still_be_sent_as_null():
    args = StreamOpenArgs.model_validate(
        {"provider": "ag_x", "rate": "0.01", "budget": "1", "batch": None}
    )
    assert args.batch is None
    assert StreamOpenArgs.model_json_schema()["properties"]["batch"]["type"] == "integer"


def test_amounts_accept_numbers_but_never_floats_in_arithmetic():
    args = get_definition("stream_open").parse({"provider": "a", "rate": 0.00001, "budget": 2})
    assert args.rate == "0.00001" and args.budget == "2"


# -- caps ----------------------------------------------------------------------------------


def test_caps_parse_at_construction():
    with pytest.raises(InvalidInput, match="max_budget"):
        Caps(max_budget=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="allowed_tools"):
        Caps(allowed_tools=["escrow_create", "steal_money"])
    assert Caps().describe() == "no caps"
    assert "max budget 5.00" in Caps(max_budget="5").describe()


def test_stream_caps(pf_world):
    ctx = ToolContext(
        pf_world.client,
        caps=Caps(max_budget="5", max_rate="0.01", max_total="6", max_open_streams=2),
    )
    p = pf_world.provider.agent_id
    assert error_of(ctx, "stream_open", provider=p, rate="0.02", budget="1").kind == "cap_exceeded"
    err = error_of(ctx, "stream_open", provider=p, rate="0.01", budget="5.000001")
    assert err.kind == "cap_exceeded" and "5.00" in str(err)
    # max_units implies a budget: 0.01 x 501 = 5.01 > 5
    assert (
        error_of(ctx, "stream_open", provider=p, rate="0.01", max_units=501).kind == "cap_exceeded"
    )
    call(ctx, "stream_open", provider=p, rate="0.01", budget="4")
    err = error_of(ctx, "stream_open", provider=p, rate="0.01", budget="3")
    assert err.kind == "cap_exceeded" and "2.00 USDC left" in str(err)
    call(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    assert error_of(ctx, "stream_open", provider=p, rate="0.01", budget="1").kind == "cap_exceeded"
    # closing refunds the unused budget, which makes room again
    call(ctx, "stream_record", stream_id="s1", units=10)
    receipt = call(ctx, "stream_close", stream_id="s1")
    assert receipt["refunded"] == "3.90"
    assert ctx.locked_micro == 1_100_000
    call(ctx, "stream_open", provider=p, rate="0.01", budget="4.9")
    assert pf_world.balance() == Decimal("100") - Decimal("0.10") - Decimal("1") - Decimal("4.9")


def test_escrow_caps_and_allowed_providers(pf_world):
    p = pf_world.provider.agent_id
    ctx = ToolContext(pf_world.client, caps=Caps(max_budget="2", allowed_providers=[p]))
    assert error_of(ctx, "escrow_create", to_agent_id=p, amount="2.01").kind == "cap_exceeded"
    err = error_of(ctx, "escrow_create", to_agent_id="agent_evil", amount="1")
    assert err.kind == "cap_exceeded" and "agent_evil" in str(err)
    assert (
        error_of(ctx, "stream_open", provider="agent_evil", rate="1", budget="1").kind
        == "cap_exceeded"
    )
    assert call(ctx, "escrow_create", to_agent_id=p, amount="2")["amount"] == "2.00"
    assert pf_world.balance() == Decimal("98")


def test_allowed_tools_refused_at_call_time(pf_world):
    ctx = ToolContext(pf_world.client, caps=Caps(allowed_tools=["escrow_list"]))
    err = error_of(ctx, "faucet_claim")
    assert err.kind == "not_allowed" and "faucet_claim" in str(err)
    assert call(ctx, "escrow_list")["count"] == 0


_invented = st.fixed_dictionaries(
    {"provider": st.sampled_from(["P", "agent_x"])},
    optional={
        "rate": st.one_of(
            st.decimals(min_value=0, max_value=10, places=6).map(str),
            st.floats(min_value=0, max_value=10),
            st.integers(-5, 10),
            st.text(max_size=6),
        ),
        "budget": st.one_of(
            st.decimals(min_value=0, max_value=100, places=7).map(str),
            st.integers(-5, 1000),
            st.floats(allow_nan=True),
            st.none(),
        ),
        "max_units": st.one_of(st.integers(-5, 10**7), st.none()),
        "batch": st.one_of(st.integers(-1, 50), st.none()),
        "budget_override": st.just("1000"),
    },
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(invented=st.lists(_invented, min_size=1, max_size=6))
def test_no_invented_arguments_exceed_the_caps(pf_world, invented):
    ctx = ToolContext(pf_world.client, caps=Caps(max_budget="3", max_rate="0.5", max_total="5"))
    before = pf_world.balance()
    for raw in invented:
        args = {
            **raw,
            "provider": pf_world.provider.agent_id if raw["provider"] == "P" else raw["provider"],
        }
        try:
            answer = call(ctx, "stream_open", **args)
        except ToolError as exc:
            assert exc.kind in {"cap_exceeded", "invalid_argument", "insufficient_funds"}, exc
            assert str(exc)
            continue
        assert Decimal(answer["budget"]) <= 3
        assert Decimal(answer["rate"]) <= Decimal("0.5")
    locked = before - pf_world.balance()
    assert locked <= 5
    assert Decimal(ctx.locked_micro) / 10**6 == locked
    for entry in ctx.entries():
        call(ctx, "stream_close", stream_id=entry.handle)
    assert pf_world.balance() == before


# -- answers and errors an agent can act on ---------------------------------------------


def test_stream_life_cycle_figures_are_exact(pf_world):
    ctx = ToolContext(pf_world.client)
    p = pf_world.provider.agent_id
    opened = call(ctx, "stream_open", provider=p, rate="0.0015", budget="1", batch=4)
    assert opened["stream_id"] == "s1" and opened["units_left"] == 666
    for _ in range(7):
        call(ctx, "stream_record", stream_id="s1", units=3)
    status = call(ctx, "stream_status", stream_id="s1")
    assert status["units"] == 21 and status["units_left"] == 645
    receipt = call(ctx, "stream_close", stream_id="s1")
    assert receipt == {
        "stream_id": "s1",
        "provider": p,
        "status": "closed",
        "units": 21,
        "releases": receipt["releases"],
        "budget": "1.00",
        "paid": "0.0315",
        "fee": "0.000315",
        "provider_net": "0.031185",
        "refunded": "0.9685",
        "escrow_id": opened["escrow_id"],
    }
    assert receipt["releases"] >= 1  # batching itself is the stream's business
    assert call(ctx, "stream_close", stream_id="s1") == receipt  # idempotent
    assert pf_world.balance("provider") == Decimal("0.031185")
    assert pf_world.balance() == Decimal("100") - Decimal("0.0315")
    listed = call(ctx, "stream_list")
    assert listed["open_streams"] == 0 and listed["streams"][0]["paid"] == "0.0315"
    assert call(ctx, "stream_list", include_closed=False)["streams"] == []
    pf_world.sandbox.audit()


def test_budget_exhausted_and_closed_streams_say_what_to_do(pf_world):
    ctx = ToolContext(pf_world.client)
    call(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.5", max_units=3)
    call(ctx, "stream_record", stream_id="s1", units=2)
    err = error_of(ctx, "stream_record", stream_id="s1", units=2)
    assert err.kind == "budget_exhausted" and "1 unit left" in str(err)
    assert "stream_close" in str(err)
    assert call(ctx, "stream_status", stream_id="s1")["units"] == 2  # nothing was counted
    call(ctx, "stream_close", stream_id="s1")
    err = error_of(ctx, "stream_record", stream_id="s1")
    assert err.kind == "stream_closed" and "stream_open" in str(err)


def test_unknown_stream_lists_known_ones(pf_world):
    ctx = ToolContext(pf_world.client)
    err = error_of(ctx, "stream_status", stream_id="s7")
    assert err.kind == "unknown_stream" and "stream_open" in str(err)
    call(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.01", budget="1")
    assert "s1" in str(error_of(ctx, "stream_close", stream_id="s2"))
    call(ctx, "stream_close", stream_id="s1")


@pytest.mark.parametrize(
    ("name", "args", "field"),
    [
        ("stream_open", {"provider": "a", "rate": "cheap", "budget": "1"}, "rate"),
        ("stream_open", {"provider": "a", "rate": "0.1", "budget": "-1"}, "budget"),
        ("stream_open", {"provider": "a", "rate": "0.1"}, "or max_units"),
        ("stream_open", {"rate": "0.1", "budget": "1"}, "provider: required"),
        ("stream_open", {"provider": "a", "rate": "0.1", "budget": "1", "cap": "9"}, "cap: not an"),
        ("stream_open", {"provider": "a", "rate": "0.1", "budget": "1.0000001"}, "6 decimal"),
        ("stream_record", {"stream_id": "s1", "units": 0}, "units"),
        ("stream_record", {"stream_id": "s1", "units": "many"}, "units"),
        ("escrow_create", {"to_agent_id": "a b", "amount": "1"}, "to_agent_id"),
        ("escrow_release", {"escrow_id": "esc_1", "amount": True}, "amount"),
        ("escrow_list", {"limit": 1000}, "limit"),
    ],
)
def test_invalid_arguments_name_the_field(pf_world, name, args, field):
    ctx = ToolContext(pf_world.client)
    err = error_of(ctx, name, **args)
    assert err.kind == "invalid_argument"
    assert field in str(err), str(err)
    assert "again" in str(err)


def test_insufficient_funds_and_faucet(pf_world):
    poor = pf_world.sandbox.add_agent(balance="0.50")
    ctx = ToolContext(pf_world.sandbox.client(poor.api_key))
    err = error_of(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.1", budget="1")
    assert err.kind == "insufficient_funds" and "faucet_claim" in str(err)
    assert ctx.locked_micro == 0 and ctx.entries() == []
    assert call(ctx, "faucet_claim")["credited"] == "1.00"
    assert error_of(ctx, "faucet_claim").kind == "already_claimed"
    call(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.1", budget="1")
    call(ctx, "stream_close", stream_id="s1")


def test_escrow_tools(pf_world):
    ctx = ToolContext(pf_world.client)
    p = pf_world.provider.agent_id
    created = call(ctx, "escrow_create", to_agent_id=p, amount="5", memo="job 7")
    eid = created["escrow_id"]
    released = call(ctx, "escrow_release", escrow_id=eid, amount="1.25", memo="half")
    assert released["released_now"] == "1.25" and released["remaining"] == "3.75"
    status = call(ctx, "escrow_status", escrow_id=eid)
    assert status["releases"] == 1 and status["last_releases"][0]["amount"] == "1.25"
    assert call(ctx, "escrow_list", status="locked")["count"] == 1
    assert call(ctx, "escrow_list", status="refunded")["count"] == 0
    assert error_of(ctx, "escrow_status", escrow_id="esc_nope").kind == "not_found"
    err = error_of(ctx, "escrow_release", escrow_id=eid, amount="10")
    assert err.kind == "invalid_argument", err
    assert pf_world.balance("provider") == Decimal("1.2375")


def test_a_streams_escrow_cannot_be_released_behind_its_back(pf_world):
    ctx = ToolContext(pf_world.client)
    opened = call(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.1", budget="2")
    err = error_of(ctx, "escrow_release", escrow_id=opened["escrow_id"], amount="2")
    assert err.kind == "owned_by_stream" and "s1" in str(err)
    call(ctx, "stream_close", stream_id="s1")
    assert pf_world.balance() == Decimal("100")


def test_release_is_refused_for_escrows_the_tools_did_not_create(pf_world):
    p = pf_world.provider.agent_id
    own = pf_world.client.create_escrow(p, "3").escrow_id  # the program's, not the agent's
    ctx = ToolContext(pf_world.client)
    err = error_of(ctx, "escrow_release", escrow_id=own, amount="1")
    assert err.kind == "not_allowed" and own in str(err) and "escrow_create" in str(err)
    assert pf_world.client.get_escrow(own).released_micro == 0
    # a closed stream's escrow is not the agent's to release either
    opened = call(ctx, "stream_open", provider=p, rate="0.1", budget="2")
    call(ctx, "stream_close", stream_id="s1")
    err = error_of(ctx, "escrow_release", escrow_id=opened["escrow_id"], amount="1")
    assert err.kind == "not_allowed"
    # one made by escrow_create through another context is not this context's
    other = call(ToolContext(pf_world.client), "escrow_create", to_agent_id=p, amount="1")
    assert (
        error_of(ctx, "escrow_release", escrow_id=other["escrow_id"], amount="1").kind
        == "not_allowed"
    )
    assert pf_world.balance("provider") == Decimal("0")


def test_release_any_escrow_is_the_operators_opt_in(pf_world):
    p = pf_world.provider.agent_id
    own = pf_world.client.create_escrow(p, "3").escrow_id
    ctx = ToolContext(pf_world.client, caps=Caps(release_any_escrow=True))
    assert call(ctx, "escrow_release", escrow_id=own, amount="1")["released_now"] == "1.00"
    opened = call(ctx, "stream_open", provider=p, rate="0.1", budget="2")
    err = error_of(ctx, "escrow_release", escrow_id=opened["escrow_id"], amount="2")
    assert err.kind == "owned_by_stream"  # a stream's books stay the stream's
    call(ctx, "stream_close", stream_id="s1")
    with pytest.raises(InvalidInput, match="release_any_escrow"):
        Caps(release_any_escrow="yes")  # type: ignore[arg-type]


def test_key_never_reaches_answers_errors_or_repr(pf_world):
    key = pf_world.payer.api_key
    ctx = ToolContext(pf_world.client, caps=Caps(max_budget="1"))
    texts = [repr(ctx), get_definition("stream_open").describe(ctx)]
    texts.append(
        get_definition("stream_open").call(
            ctx, {"provider": pf_world.provider.agent_id, "rate": "0.1", "budget": "1"}
        )
    )
    for name, args in [
        ("stream_open", {"provider": key, "rate": "1", "budget": "9"}),
        ("escrow_status", {"escrow_id": key}),
        ("stream_status", {"stream_id": key[:60]}),
    ]:
        try:
            get_definition(name).call(ctx, args)
        except ToolError as exc:
            texts.append(str(exc))
    texts.append(get_definition("stream_close").call(ctx, {"stream_id": "s1"}))
    for text in texts:
        assert key not in text
        assert key[8:] not in text


# -- async twins ---------------------------------------------------------------------------


async def test_async_tools_on_async_client(pf_world):
    ctx = ToolContext(async_client=pf_world.aclient, caps=Caps(max_budget="3"))
    p = pf_world.provider.agent_id
    opened = await acall(ctx, "stream_open", provider=p, rate="0.001", budget="2", batch=50)
    assert ctx.entries()[0].is_async

    async def work():
        for _ in range(20):
            await acall(ctx, "stream_record", stream_id="s1", units=2)

    await asyncio.gather(*(work() for _ in range(5)))
    receipt = await acall(ctx, "stream_close", stream_id="s1")
    assert receipt["units"] == 200 and receipt["paid"] == "0.20" and receipt["refunded"] == "1.80"
    # a sync call on a context with only an async client: the developer's mistake, raised
    await acall(ctx, "stream_open", provider=p, rate="0.001", budget="1")
    locked = ctx.locked_micro
    with pytest.raises(ConfigError, match=r"only an async_client.*client=EscrowClient"):
        get_definition("stream_open").call(ctx, {"provider": p, "rate": "0.001", "budget": "1"})
    assert len(ctx.entries()) == 2 and ctx.locked_micro == locked  # nothing more locked
    await acall(ctx, "stream_close", stream_id="s2")
    e = await acall(ctx, "escrow_create", to_agent_id=p, amount="1")
    assert (await acall(ctx, "escrow_status", escrow_id=e["escrow_id"]))["amount"] == "1.00"
    assert (await acall(ctx, "escrow_list"))["count"] == 3
    assert (await acall(ctx, "escrow_release", escrow_id=e["escrow_id"], amount="1"))[
        "status"
    ] == "released"
    assert opened["escrow_id"]
    await pf_world.aclient.aclose()


async def test_async_release_is_refused_for_escrows_the_tools_did_not_create(pf_world):
    p = pf_world.provider.agent_id
    own = (await pf_world.aclient.create_escrow(p, "3")).escrow_id
    for ctx in (ToolContext(async_client=pf_world.aclient), ToolContext(pf_world.client)):
        with pytest.raises(ToolError) as caught:
            await acall(ctx, "escrow_release", escrow_id=own, amount="1")
        assert caught.value.kind == "not_allowed" and own in str(caught.value)
        made = await acall(ctx, "escrow_create", to_agent_id=p, amount="1")
        released = await acall(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="1")
        assert released["status"] == "released"
    assert (await pf_world.aclient.get_escrow(own)).released_micro == 0
    ctx = ToolContext(async_client=pf_world.aclient, caps=Caps(release_any_escrow=True))
    assert (await acall(ctx, "escrow_release", escrow_id=own, amount="1"))["released_now"] == "1.00"
    await pf_world.aclient.aclose()


async def test_async_calls_on_a_sync_only_context_run_in_threads(pf_world):
    ctx = ToolContext(pf_world.client)
    p = pf_world.provider.agent_id
    await acall(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    await acall(ctx, "stream_record", stream_id="s1", units=5)
    receipt = await acall(ctx, "stream_close", stream_id="s1")
    assert receipt["paid"] == "0.05"
    assert (await acall(ctx, "faucet_claim"))["credited"] == "1.00"


def test_context_needs_a_client():
    from pf_metered.errors import ConfigError

    with pytest.raises(ConfigError):
        ToolContext()


def test_a_budget_under_the_escrow_minimum_is_explained_as_a_budget(pf_world):
    ctx = ToolContext(pf_world.client)
    err = error_of(
        ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.001", max_units=10
    )
    assert err.kind == "invalid_argument" and "budget" in str(err) and "1.00" in str(err)
    assert ctx.locked_micro == 0


def test_close_all_refunds_what_the_agent_left_open(pf_world):
    ctx = ToolContext(pf_world.client)
    p = pf_world.provider.agent_id
    call(ctx, "stream_open", provider=p, rate="0.01", budget="1")
    call(ctx, "stream_open", provider=p, rate="0.02", budget="2")
    call(ctx, "stream_record", stream_id="s2", units=5)
    call(ctx, "stream_close", stream_id="s1")
    receipts = ctx.close_all()
    assert [r.units for r in receipts] == [0, 5]
    assert ctx.locked_micro == 100_000
    assert pf_world.balance() == Decimal("99.90")


async def test_aclose_all(pf_world):
    ctx = ToolContext(pf_world.client, pf_world.aclient)
    await acall(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.01", budget="1")
    call(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.01", budget="1")
    assert len(await ctx.aclose_all()) == 2
    assert pf_world.balance() == Decimal("100")
    await pf_world.aclient.aclose()


@pytest.mark.parametrize("dialect", ["v1", "deployed"])
async def test_an_unknown_provider_is_named_as_such(pf_world, dialect):
    kw = {"dialect": dialect, "rate_limits": False}  # no client-side pacing: keep it fast
    client = pf_world.sandbox.client(pf_world.payer.api_key, **kw)
    aclient = pf_world.sandbox.async_client(pf_world.payer.api_key, **kw)
    ctx = ToolContext(client, aclient, caps=Caps(max_total="5", max_open_streams=1))
    cases = [
        ("stream_open", {"provider": "ag_ghost", "rate": "0.01", "budget": "1"}),
        ("escrow_create", {"to_agent_id": "ag_ghost", "amount": "1"}),
    ]
    for name, args in cases:
        with pytest.raises(ToolError) as sync_info:
            get_definition(name).call(ctx, args)
        with pytest.raises(ToolError) as async_info:
            await get_definition(name).acall(ctx, args)
        for err in (sync_info.value, async_info.value):
            assert err.kind == "unknown_provider", err
            assert str(err).startswith("Unknown provider") and "'ag_ghost'" in str(err)
            assert "escrow_list" not in str(err) and f"call {name} again" in str(err)
    if dialect == "deployed":  # no keyed faucet there: the model is told not to retry
        with pytest.raises(ToolError) as async_info:
            await get_definition("faucet_claim").acall(ctx, {})
        for err in (error_of(ctx, "faucet_claim"), async_info.value):
            assert err.kind == "unsupported" and "Do not call" in str(err)
            assert "pf_metered" not in str(err)
    # the failures held nothing back: the caps' room and the open-stream slot are free
    assert ctx.locked_micro == 0 and ctx.entries() == []
    call(ctx, "stream_open", provider=pf_world.provider.agent_id, rate="0.01", budget="5")
    assert ctx.locked_micro == 5_000_000
    ctx.close_all()
    client.close()
    await aclient.aclose()


# -- integer arguments are strict (issue 13 item 10) ----------------------------------------


@pytest.mark.parametrize(
    ("tool", "args", "field"),
    [
        ("stream_record", {"stream_id": "s1", "units": "5"}, "units"),
        ("stream_record", {"stream_id": "s1", "units": True}, "units"),
        ("stream_record", {"stream_id": "s1", "units": 5.0}, "units"),
        ("stream_open", {"provider": "a", "rate": "0.1", "max_units": "5"}, "max_units"),
        ("stream_open", {"provider": "a", "rate": "0.1", "max_units": True}, "max_units"),
        ("stream_open", {"provider": "a", "rate": "0.1", "budget": "1", "batch": "5"}, "batch"),
        ("stream_open", {"provider": "a", "rate": "0.1", "budget": "1", "batch": True}, "batch"),
        ("escrow_create", {"to_agent_id": "a", "amount": "1", "auto_release_hours": "2"}, "auto"),
        ("escrow_list", {"limit": "5"}, "limit"),
    ],
)
def test_integer_arguments_refuse_strings_bools_and_floats(tool, args, field):
    with pytest.raises(ToolError) as info:
        get_definition(tool).parse(args)
    assert info.value.kind == "invalid_argument"
    assert field in str(info.value)


def test_integer_arguments_accept_ints():
    args = get_definition("stream_record").parse({"stream_id": "s1", "units": 5})
    assert args.units == 5


# -- a create whose answer was lost (issue 13 item 4) ----------------------------------------


def test_a_lost_create_keeps_its_reservation_and_close_all_settles_it(pf_world):
    from conftest import LoseAnswers

    lose = LoseAnswers(pf_world.sandbox.transport())
    client = pf_world.sandbox.client(pf_world.payer.api_key, transport=lose, max_retries=1)
    ctx = ToolContext(client, caps=Caps(max_total="30"))
    p = pf_world.provider.agent_id
    lose.rules[("POST", "/api/v1/escrow")] = 4  # every attempt's answer lost: landed, unknown
    err = error_of(ctx, "escrow_create", to_agent_id=p, amount="20")
    assert err.kind == "ambiguous" and "20.00" in str(err) and "again" in str(err)
    lose.rules[("POST", "/api/v1/escrow")] = 4
    err = error_of(ctx, "stream_open", provider=p, rate="0.01", budget="5")
    assert err.kind == "ambiguous"
    lose.rules.clear()
    assert pf_world.balance() == Decimal("75")  # both escrows were in fact made
    # the room they may hold is still held: 20 more would pass max_total (40 of 30)
    assert ctx.locked_micro == 25_000_000
    assert error_of(ctx, "escrow_create", to_agent_id=p, amount="20").kind == "cap_exceeded"
    pending = ctx.pending_creates()
    assert [(c.tool, c.amount_micro) for c in pending] == [
        ("escrow_create", 20_000_000),
        ("stream_open", 5_000_000),
    ]
    assert call(ctx, "stream_list")["unsettled_creates"] == 2
    ctx.close_all()  # reconciles each by its key: the stream is closed, the escrow refunded
    assert ctx.pending_creates() == []
    assert ctx.locked_micro == 0
    assert pf_world.balance() == Decimal("100")
    assert all(e.status == "refunded" for e in client.list_escrows())
    pf_world.sandbox.audit()
    client.close()


def test_a_lost_create_that_cannot_be_reconciled_stays_held_and_reported(caplog):
    from conftest import DeployedWorld, LoseAnswers

    w = DeployedWorld(balance="100")
    try:
        lose = LoseAnswers(w.sandbox.transport(), {("POST", "/escrow/create"): 4})
        client = w.client(transport=lose, max_retries=1)
        ctx = ToolContext(client, caps=Caps(max_total="30"))
        p = w.provider.agent_id
        assert error_of(ctx, "escrow_create", to_agent_id=p, amount="20").kind == "ambiguous"
        lose.rules.clear()
        assert error_of(ctx, "escrow_create", to_agent_id=p, amount="20").kind == "cap_exceeded"
        caplog.set_level("WARNING", "pf_metered.tools")
        ctx.close_all()  # no listing and no refund on this dialect: held, and said so
        [left] = ctx.pending_creates()
        assert left.amount_micro == 20_000_000 and ctx.locked_micro == 20_000_000
        assert any("20.00" in m and "may" in m for m in caplog.messages)
    finally:
        w.close()


# -- the deployed dialect (issue 11 item 5) ----------------------------------------------------


def test_escrow_release_describes_what_it_does_on_each_dialect(pf_world):
    from conftest import DeployedWorld

    v1 = get_definition("escrow_release").describe(ToolContext(pf_world.client))
    assert "part" in v1 and "whole" not in v1
    w = DeployedWorld()
    try:
        dep = get_definition("escrow_release").describe(ToolContext(w.client()))
        assert "whole" in dep and "part" not in dep
        generic = get_definition("escrow_release").describe()
        assert "whole" in generic and "part" in generic
    finally:
        w.close()


def test_escrow_and_stream_tools_end_to_end_on_the_deployed_dialect():
    from conftest import DeployedWorld

    w = DeployedWorld(balance="100")
    try:
        client = w.client()
        ctx = ToolContext(client)
        p = w.provider.agent_id
        start = w.balance()
        made = call(ctx, "escrow_create", to_agent_id=p, amount="2", memo="one job")
        assert made["status"] == "locked" and made["amount"] == "2.00"
        paid = call(ctx, "escrow_release", escrow_id=made["escrow_id"])  # whole, no amount
        assert paid["released_now"] == "2.00" and paid["status"] == "released"
        assert w.balance("provider") == Decimal("1.98")
        other = call(ctx, "escrow_create", to_agent_id=p, amount="1")
        err = error_of(ctx, "escrow_release", escrow_id=other["escrow_id"], amount="0.50")
        assert err.kind == "invalid_argument" and "whole" in str(err) and "1.00" in str(err)
        again = call(ctx, "escrow_release", escrow_id=other["escrow_id"], amount="1.00")
        assert again["released_now"] == "1.00"
        assert w.balance("provider") == Decimal("2.97")
        # a stream: open, record, status, close, all on tranches
        opened = call(ctx, "stream_open", provider=p, rate="0.01", budget="2", batch=10)
        handle = opened["stream_id"]
        for _ in range(7):
            call(ctx, "stream_record", stream_id=handle, units=5)
        assert call(ctx, "stream_status", stream_id=handle)["units"] == 35
        receipt = call(ctx, "stream_close", stream_id=handle)
        assert receipt["paid"] == "0.35" and receipt["refunded"] == "0.00"
        locked = Decimal(receipt.get("still_locked", "0"))
        debited = Decimal(receipt.get("debited", receipt["paid"]))
        assert debited == Decimal("0.35") + locked
        # the sandbox ledger agrees: 3.00 of escrows + the stream's debit left the payer
        assert start - w.balance() == Decimal("3.00") + debited
        assert w.balance("provider") == Decimal("2.97") + Decimal(receipt["provider_net"])
        assert ctx.locked_micro == 3_000_000 + int(debited * 10**6)
        w.sandbox.audit()
    finally:
        w.close()


async def test_escrow_release_whole_on_the_deployed_dialect_async():
    from conftest import DeployedWorld

    w = DeployedWorld(balance="100")
    try:
        ctx = ToolContext(async_client=w.aclient())
        p = w.provider.agent_id
        made = await acall(ctx, "escrow_create", to_agent_id=p, amount="1")
        paid = await acall(ctx, "escrow_release", escrow_id=made["escrow_id"])
        assert paid["released_now"] == "1.00" and w.balance("provider") == Decimal("0.99")
        opened = await acall(ctx, "stream_open", provider=p, rate="0.01", budget="1", batch=10)
        await acall(ctx, "stream_record", stream_id=opened["stream_id"], units=12)
        receipt = await acall(ctx, "stream_close", stream_id=opened["stream_id"])
        assert receipt["paid"] == "0.12" and receipt["refunded"] == "0.00"
    finally:
        w.close()


async def test_a_lost_create_is_settled_by_aclose_all(pf_world):
    from conftest import LoseAnswers

    lose = LoseAnswers(pf_world.sandbox.transport())
    aclient = pf_world.sandbox.async_client(pf_world.payer.api_key, transport=lose, max_retries=1)
    ctx = ToolContext(async_client=aclient, caps=Caps(max_total="10"))
    p = pf_world.provider.agent_id
    lose.rules[("POST", "/api/v1/escrow")] = 4
    with pytest.raises(ToolError) as info:
        await get_definition("stream_open").acall(
            ctx, {"provider": p, "rate": "0.01", "budget": "6"}
        )
    assert info.value.kind == "ambiguous"
    lose.rules[("POST", "/api/v1/escrow")] = 4
    with pytest.raises(ToolError) as info:
        await get_definition("escrow_create").acall(ctx, {"to_agent_id": p, "amount": "3"})
    assert info.value.kind == "ambiguous"
    lose.rules.clear()
    with pytest.raises(ToolError) as info:  # 6 + 3 held: 2 more would pass 10
        await get_definition("escrow_create").acall(ctx, {"to_agent_id": p, "amount": "2"})
    assert info.value.kind == "cap_exceeded"
    await ctx.aclose_all()
    assert ctx.pending_creates() == [] and ctx.locked_micro == 0
    assert pf_world.balance() == Decimal("100")
    pf_world.sandbox.audit()
    await aclient.aclose()
