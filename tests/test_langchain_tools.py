"""The LangChain tools and toolkit: langchain-tests standard suites for every tool, narrowing,
caps, errors as tool messages, and the key kept out of every repr."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from conftest import PFWorld
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from lc_suites import standard_suites

from pf_metered.errors import InvalidInput
from pf_metered.langchain import (
    TOOL_CLASSES,
    Caps,
    PurpleFleaToolkit,
    ToolContext,
)
from pf_metered.tools import ALL_TOOL_NAMES, TOOLS

# -- the standard suites, one pair of classes per tool -------------------------------------

_SHARED: dict[str, PFWorld] = {}
_CONTEXTS: list[ToolContext] = []


def _world() -> PFWorld:
    if "world" not in _SHARED:
        world = PFWorld(balance="10000.00")
        world.escrow_id = world.client.create_escrow(  # type: ignore[attr-defined]
            world.provider.agent_id, "500.00"
        ).escrow_id
        _SHARED["world"] = world
    return _SHARED["world"]


def _fresh_context() -> ToolContext:
    """A context with stream s1 open, as an agent would have after stream_open."""
    world = _world()
    # release_any_escrow: the escrow_release example pays the world's escrow, made outside
    # the tools
    ctx = ToolContext(world.client, caps=Caps(max_budget="50", release_any_escrow=True))
    TOOLS[5].call(ctx, {"provider": world.provider.agent_id, "rate": "0.001", "budget": "1"})
    _CONTEXTS.append(ctx)
    return ctx


@pytest.fixture(scope="module", autouse=True)
def _close_everything():
    yield
    for ctx in _CONTEXTS:
        for entry in ctx.entries():
            if entry.receipt is None:
                TOOLS[8].call(ctx, {"stream_id": entry.handle})
    if "world" in _SHARED:
        _SHARED["world"].sandbox.audit()
        _SHARED.pop("world").close()


def _example(name: str) -> dict[str, Any]:
    world = _world()
    if name == "escrow_refund":  # a fresh escrow each time (release_any_escrow lets it refund)
        return {"escrow_id": world.client.create_escrow(world.provider.agent_id, "1.00").escrow_id}
    return {
        "escrow_create": {"to_agent_id": world.provider.agent_id, "amount": "1.00"},
        "escrow_release": {"escrow_id": world.escrow_id, "amount": "0.01"},  # type: ignore[attr-defined]
        "escrow_status": {"escrow_id": world.escrow_id},  # type: ignore[attr-defined]
        "escrow_list": {"limit": 5},
        "faucet_claim": {},
        "stream_open": {
            "provider": world.provider.agent_id,
            "rate": "0.001",
            "budget": "1.00",
            "batch": 10,
        },
        "stream_status": {"stream_id": "s1"},
        "stream_record": {"stream_id": "s1", "units": 3},
        "stream_close": {"stream_id": "s1"},
        "stream_list": {},
    }[name]


globals().update(
    standard_suites(
        TOOL_CLASSES,
        params=lambda: {"context": _fresh_context()},
        example=_example,
        env=lambda name: ({"PF_API_KEY": "pf_test_fromenv0123456789abcdef"}, {}, {"name": name}),
    )
)


# -- one source of truth -------------------------------------------------------------------


def test_tool_classes_mirror_the_shared_definitions(pf_world):
    ctx = ToolContext(pf_world.client)
    assert [c.definition for c in TOOL_CLASSES] == list(TOOLS)
    for cls, definition in zip(TOOL_CLASSES, TOOLS, strict=True):
        tool = cls(context=ctx)
        assert tool.name == definition.name
        assert tool.description == definition.describe(ctx)  # as the MCP server says it
        assert tool.args_schema is definition.args_schema
        assert tool.handle_tool_error is True
        assert type(tool)._arun is not BaseTool._arun  # native async


def test_descriptions_state_the_operator_caps(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client, caps=Caps(max_budget="5", max_rate="0.01"))
    tools = {t.name: t for t in toolkit.get_tools()}
    assert "max budget 5.00 USDC" in tools["stream_open"].description
    assert "max rate 0.01" in tools["stream_open"].description
    assert "max budget 5.00 USDC" in tools["escrow_create"].description
    assert tools["stream_status"].description == TOOLS[6].description


# -- the toolkit ---------------------------------------------------------------------------


def test_toolkit_offers_every_tool_sharing_one_context(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client)
    tools = toolkit.get_tools()
    assert [t.name for t in tools] == list(ALL_TOOL_NAMES)
    assert all(t.context is toolkit.tool_context for t in tools)  # type: ignore[attr-defined]
    opened = _call(
        toolkit.get_tool("stream_open"),
        provider=pf_world.provider.agent_id,
        rate="0.01",
        budget="1",
    ).artifact
    closed = _call(toolkit.get_tool("stream_close"), stream_id=opened["stream_id"]).artifact
    assert closed["refunded"] == "1.00"


def test_toolkit_narrows_by_family_and_name(pf_world):
    pay_only = PurpleFleaToolkit(client=pf_world.client, allowed=["escrow", "stream"])
    names = [t.name for t in pay_only.get_tools()]
    assert "faucet_claim" not in names and "escrow_create" in names and "stream_open" in names
    read_only = PurpleFleaToolkit(
        client=pf_world.client, allowed=["escrow_status", "escrow_list", "stream_status"]
    )
    assert [t.name for t in read_only.get_tools()] == [
        "escrow_status",
        "escrow_list",
        "stream_status",
    ]
    assert [
        t.name for t in PurpleFleaToolkit(client=pf_world.client, allowed="faucet").get_tools()
    ] == ["faucet_claim"]
    with pytest.raises(InvalidInput, match="allowed"):
        PurpleFleaToolkit(client=pf_world.client, allowed=["escrow", "rob_bank"])
    capped = PurpleFleaToolkit(client=pf_world.client, caps=Caps(allowed_tools=["escrow_list"]))
    assert [t.name for t in capped.get_tools()] == ["escrow_list"]
    with pytest.raises(KeyError):
        pay_only.get_tool("faucet_claim")


def test_a_tool_built_by_hand_still_obeys_the_allow_list(pf_world):
    from pf_metered.langchain import FaucetClaimTool

    ctx = ToolContext(pf_world.client, caps=Caps(allowed_tools=["escrow_list"]))
    answer = FaucetClaimTool(context=ctx).invoke({})
    assert "does not allow faucet_claim" in answer
    assert pf_world.balance() == 100


# -- errors come back as tool messages the model can act on ------------------------------


def _call(tool: BaseTool, **args: Any) -> ToolMessage:
    msg = tool.invoke({"name": tool.name, "args": args, "id": "call_1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    return msg


async def _acall(tool: BaseTool, **args: Any) -> ToolMessage:
    msg = await tool.ainvoke({"name": tool.name, "args": args, "id": "c1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    return msg


def test_cap_exceeded_is_an_error_message_not_a_crash(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client, caps=Caps(max_budget="2"))
    msg = _call(
        toolkit.get_tool("stream_open"),
        provider=pf_world.provider.agent_id,
        rate="0.01",
        budget="1000",
    )
    assert msg.status == "error"
    assert "Cap exceeded" in msg.content and "2.00 USDC" in msg.content
    assert pf_world.balance() == 100


def test_validation_errors_name_the_field(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client)
    msg = _call(
        toolkit.get_tool("stream_open"),
        provider=pf_world.provider.agent_id,
        rate="about a cent",
        budget="1",
        please="yes",
    )
    assert msg.status == "error"
    assert "rate" in msg.content and "please: not an argument" in msg.content
    assert "call the tool again" in msg.content
    msg = _call(toolkit.get_tool("stream_record"), stream_id="s1", units=-4)
    assert msg.status == "error" and "units" in msg.content
    msg = _call(toolkit.get_tool("stream_status"), stream_id="s1")
    assert msg.status == "error" and "Unknown stream" in msg.content


async def test_async_invocation_is_native(pf_world):
    toolkit = PurpleFleaToolkit(async_client=pf_world.aclient, caps=Caps(max_budget="3"))
    opened = (
        await _acall(
            toolkit.get_tool("stream_open"),
            provider=pf_world.provider.agent_id,
            rate="0.01",
            max_units=100,
        )
    ).artifact
    assert toolkit.tool_context.entries()[0].is_async
    await toolkit.get_tool("stream_record").ainvoke({"stream_id": opened["stream_id"], "units": 7})
    closed = (
        await _acall(toolkit.get_tool("stream_close"), stream_id=opened["stream_id"])
    ).artifact
    assert closed["paid"] == "0.07" and closed["refunded"] == "0.93"
    msg = await toolkit.get_tool("stream_open").ainvoke(
        {
            "name": "stream_open",
            "args": {"provider": "x", "rate": "1", "budget": "9"},
            "id": "c2",
            "type": "tool_call",
        }
    )
    assert msg.status == "error" and "Cap exceeded" in msg.content
    await pf_world.aclient.aclose()


# -- secrets -------------------------------------------------------------------------------


def test_the_api_key_is_in_no_repr(pf_world, monkeypatch):
    key = pf_world.payer.api_key
    toolkit = PurpleFleaToolkit(client=pf_world.client, async_client=pf_world.aclient)
    texts = [repr(toolkit), str(toolkit), toolkit.model_dump_json()]
    for tool in toolkit.get_tools():
        texts += [
            repr(tool),
            str(tool),
            json.dumps(tool.model_dump(), default=repr),
            json.dumps(tool.tool_call_schema.model_json_schema()),
        ]
    secret = "pf_live_ENVKEY0123456789abcdefSECRET"
    monkeypatch.setenv("PF_API_KEY", secret)
    from_env = PurpleFleaToolkit()
    texts += [repr(from_env), from_env.model_dump_json()]
    texts += [repr(t) for t in from_env.get_tools()]
    for text in texts:
        assert key not in text and key[8:] not in text
        assert secret not in text and "ENVKEY" not in text


def test_import_pf_metered_does_not_import_langchain_or_langgraph():
    import subprocess
    import sys

    code = (
        "import sys, pf_metered, pf_metered.tools; "
        "bad = [m for m in sys.modules if m.startswith(('langchain', 'langgraph'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    code = (
        "import sys, pf_metered.langchain; "
        "sys.exit(1 if any(m.startswith('langgraph') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# -- the deployed dialect (issue 11 item 5) --------------------------------------------------


def test_escrow_tools_on_the_deployed_dialect_release_whole():
    from conftest import DeployedWorld

    w = DeployedWorld(balance="100")
    try:
        toolkit = PurpleFleaToolkit(client=w.client())
        release = toolkit.get_tool("escrow_release")
        assert "only whole escrows" in release.description
        p = w.provider.agent_id
        made = _call(toolkit.get_tool("escrow_create"), to_agent_id=p, amount="3").artifact
        msg = _call(release, escrow_id=made["escrow_id"], amount="1")  # a part: refused
        assert msg.status == "error" and "whole" in msg.content and "3.00" in msg.content
        paid = _call(release, escrow_id=made["escrow_id"]).artifact
        assert paid["released_now"] == "3.00" and paid["status"] == "released"
        opened = _call(
            toolkit.get_tool("stream_open"), provider=p, rate="0.01", budget="1", batch=10
        ).artifact
        _call(toolkit.get_tool("stream_record"), stream_id=opened["stream_id"], units=17)
        closed = _call(toolkit.get_tool("stream_close"), stream_id=opened["stream_id"]).artifact
        assert closed["paid"] == "0.17" and closed["refunded"] == "0.00"
        assert w.balance("provider") == Decimal("2.97") + Decimal(closed["provider_net"])
        w.sandbox.audit()
    finally:
        w.close()
