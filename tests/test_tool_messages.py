"""Every error a tool answers names what is wrong and a next step the model can really take.

"Really take" is checked mechanically: a tool a message names must be one the model was given
(the toolkit's tools, the MCP server's list, less what the escrow service cannot run), and a
step needing no tool is asking the user, waiting, or fixing the call's own arguments. A
developer's mistake (a sync call on an async-only toolkit) is not a message for the model at
all: it raises ``ConfigError`` naming what to change. No message carries a key.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from conftest import DeployedWorld
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import ValidationError

from pf_metered import TrancheFailure, errors
from pf_metered.errors import ConfigError, InvalidInput, PFMeteredError
from pf_metered.langchain import Caps, PurpleFleaToolkit, pay_per_call
from pf_metered.langchain._paid_messages import no_stream, refused
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.stream import PaymentStream
from pf_metered.tools import ALL_TOOL_NAMES, ToolError, explain
from pf_metered.tools.errors import offering
from pf_metered.tools.schemas import StreamOpenArgs

KEY = "pf_live_" + "Zq7" * 11
_TOOL = re.compile(r"\b(" + "|".join(ALL_TOOL_NAMES) + r")\b")


def _instances() -> list[BaseException]:
    """One of every error the tools can meet, each carrying a live-shaped key in its text."""
    made: list[BaseException] = []
    classes = [getattr(errors, n) for n in errors.__all__]
    for cls in [c for c in classes if isinstance(c, type) and issubclass(c, PFMeteredError)]:
        said = f"the server said {KEY}"
        if cls is errors.InvalidInput:
            made.append(cls("budget", f"must be a decimal ({KEY})"))
        elif cls is errors.MissingExtra:
            made.append(cls("redis", "RedisStore"))
        elif cls is errors.RateLimited:
            made += [cls(said, retry_after=3), cls(said)]
        elif cls is errors.StreamBusy:
            made += [cls(said, owner="host:1", retry_after=2.5), cls(said, owner="host:1")]
        elif cls is errors.BudgetExhausted:
            made += [cls(said, remaining_units=1), cls(said)]
        elif cls is errors.Conflict:
            made += [cls(said, code="invalid_status"), cls(said, code="already_claimed")]
        elif cls is errors.AmbiguousOutcome or issubclass(cls, errors.AmbiguousOutcome):
            made.append(cls(said, idempotency_key="idem_1"))
        elif issubclass(cls, errors.APIError):
            made.append(cls(said, status=500, code="x", request_id="req_1"))
        else:
            made.append(cls(said))
    made.append(TrancheFailure(f"chain stopped {KEY}"))
    stopped = TrancheFailure("the next escrow of the chain could not be locked")
    stopped.__cause__ = errors.InsufficientFunds(f"balance too low {KEY}", status=402)
    made.append(stopped)
    try:
        StreamOpenArgs.model_validate({"provider": "p", "rate": KEY})
    except ValidationError as exc:
        made.append(exc)
    assert len(made) > 25
    return made


TOOLSETS: dict[str, frozenset[str]] = {
    "all": frozenset(ALL_TOOL_NAMES),
    "no faucet": frozenset(ALL_TOOL_NAMES) - {"faucet_claim"},
    "streams": frozenset(n for n in ALL_TOOL_NAMES if n.startswith("stream")),
    "escrows": frozenset(n for n in ALL_TOOL_NAMES if n.startswith("escrow")),
    "pay only": frozenset({"stream_open", "stream_record", "escrow_create"}),
}
_NO_TOOL_STEPS = ("the user", "Wait ", "Fix ", "Record at most", "Copy the escrow id")


@pytest.mark.parametrize("toolset", TOOLSETS, ids=list(TOOLSETS))
def test_every_mapped_error_names_a_next_step_within_the_toolkit(toolset):
    offered = TOOLSETS[toolset]
    seen_kinds: set[str] = set()
    for exc in _instances():
        for tool_name in sorted(offered):
            with offering(offered):
                err = explain(exc, tool_name=tool_name)
            text = err.message
            assert KEY not in text and KEY[8:20] not in text, text  # keys are masked
            assert err.kind and text.strip(), (type(exc).__name__, text)
            named = set(_TOOL.findall(text))
            assert named <= offered, (toolset, tool_name, type(exc).__name__, text)
            step = err.next_step or text  # a validation error's steps are in its one text
            assert step in text
            assert named & offered or tool_name in step or any(s in step for s in _NO_TOOL_STEPS), (
                type(exc).__name__,
                text,
            )
            seen_kinds.add(err.kind)
    assert {"insufficient_funds", "ambiguous", "budget_exhausted", "config"} <= seen_kinds


def test_a_failure_with_a_known_cause_is_explained_by_it():
    stopped = TrancheFailure("the next escrow of the chain could not be locked")
    stopped.__cause__ = errors.InsufficientFunds("balance too low", status=402)
    with offering(TOOLSETS["streams"]):
        err = explain(stopped, tool_name="stream_record")
    assert err.kind == "insufficient_funds"
    assert err.message.startswith("stream_record could not go on (the next escrow")
    assert "ask the user to add funds" in err.message and "faucet_claim" not in err.message


def test_a_message_without_an_adapter_may_name_any_tool():
    err = explain(errors.InsufficientFunds("no"), tool_name="stream_open")
    assert "faucet_claim" in err.message  # no adapter said which tools: all of them
    assert isinstance(err, ToolError)


# -- the three messages the issue names, end to end on the Sandbox --------------------------


def _call(tool: Any, **args: Any) -> ToolMessage:
    msg = tool.invoke({"name": tool.name, "args": args, "id": "c1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    return msg


@pytest.mark.parametrize(
    ("allowed", "faucet"), [(None, True), (["escrow", "stream"], False), (["stream"], False)]
)
def test_insufficient_funds_suggests_the_faucet_only_where_it_is_offered(pf_world, allowed, faucet):
    poor = pf_world.sandbox.add_agent(balance="0.50")
    toolkit = PurpleFleaToolkit(client=pf_world.sandbox.client(poor.api_key), allowed=allowed)
    msg = _call(
        toolkit.get_tool("stream_open"), provider=pf_world.provider.agent_id, rate="1", budget="1"
    )
    assert msg.status == "error" and msg.artifact["error"] == "insufficient_funds"
    assert ("faucet_claim" in msg.content) is faucet, msg.content
    assert "ask the user to add funds" in msg.content and "smaller amount" in msg.content
    assert toolkit.tool_context.locked_micro == 0


def test_insufficient_funds_on_the_deployed_service_never_suggests_its_faucet():
    w = DeployedWorld(balance="0.50")
    try:
        toolkit = PurpleFleaToolkit(client=w.client())  # every tool, faucet_claim included
        msg = _call(toolkit.get_tool("escrow_create"), to_agent_id=w.provider.agent_id, amount="5")
        assert msg.artifact["error"] == "insufficient_funds", msg.content
        assert "faucet_claim" not in msg.content and "ask the user" in msg.content
    finally:
        w.close()


def test_a_provider_the_operator_does_not_allow_gets_the_allowed_ones_and_a_next_step(pf_world):
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(client=pf_world.client, caps=Caps(allowed_providers=[p]))
    for name, args in (
        ("stream_open", {"provider": "ag_other", "rate": "0.01", "budget": "1"}),
        ("escrow_create", {"to_agent_id": "ag_other", "amount": "1"}),
    ):
        msg = _call(toolkit.get_tool(name), **args)
        assert msg.artifact["error"] == "cap_exceeded"
        assert repr(p) in msg.content and "'ag_other'" in msg.content
        assert "ask the user to have the operator allow 'ag_other'" in msg.content
        assert f"do not call {name} for 'ag_other' again" in msg.content
    assert pf_world.balance() == 100


def test_budget_exhausted_names_stream_close_only_where_it_is_offered(pf_world):
    p = pf_world.provider.agent_id
    for allowed, names_close in ((["stream"], True), (["stream_open", "stream_record"], False)):
        toolkit = PurpleFleaToolkit(client=pf_world.client, allowed=allowed)
        sid = _call(toolkit.get_tool("stream_open"), provider=p, rate="0.5", max_units=2).artifact[
            "stream_id"
        ]
        msg = _call(toolkit.get_tool("stream_record"), stream_id=sid, units=3)
        assert msg.artifact["error"] == "budget_exhausted"
        assert ("stream_close" in msg.content) is names_close, msg.content
        assert "Record at most the units left" in msg.content
        toolkit.tool_context.close_all()


def test_handler_messages_name_only_the_tools_of_their_toolkit(pf_world):
    from pf_metered.tools import ToolContext

    p = pf_world.provider.agent_id
    ctx = ToolContext(pf_world.client)
    full = PurpleFleaToolkit(context=ctx)
    escrow_only = PurpleFleaToolkit(context=ctx, allowed=["escrow_release", "escrow_refund"])
    eid = _call(full.get_tool("stream_open"), provider=p, rate="0.01", budget="1").artifact[
        "escrow_id"
    ]
    for toolkit, offered in ((full, True), (escrow_only, False)):
        names = {t.name for t in toolkit.get_tools()}
        for name in ("escrow_release", "escrow_refund"):
            msg = _call(toolkit.get_tool(name), escrow_id=eid)
            assert msg.artifact["error"] == "owned_by_stream", msg.content
            assert set(_TOOL.findall(msg.content)) <= names, msg.content
            assert ("stream_close" in msg.content) is offered, msg.content
    ctx.close_all()


def _within(msg: ToolMessage, toolkit: PurpleFleaToolkit, kind: str) -> str:
    """The error's text, after checking its kind and that it names only the toolkit's tools."""
    assert msg.status == "error" and msg.artifact["error"] == kind, msg.content
    names = {t.name for t in toolkit.get_tools()}
    assert set(_TOOL.findall(msg.content)) <= names, (sorted(names), msg.content)
    return str(msg.content)


def test_cap_and_stream_messages_name_only_the_tools_of_their_toolkit(pf_world):
    from pf_metered.tools import ToolContext

    p = pf_world.provider.agent_id
    caps = Caps(max_open_streams=1, max_total="3", max_locked="2.5")
    ctx = ToolContext(pf_world.client, caps=caps)
    full = PurpleFleaToolkit(context=ctx)
    opener = PurpleFleaToolkit(context=ctx, allowed=["stream_open"])
    reader = PurpleFleaToolkit(context=ctx, allowed=["stream_status", "stream_record"])
    open_args = {"provider": p, "rate": "0.01", "budget": "1"}

    text = _within(
        _call(reader.get_tool("stream_status"), stream_id="s1"), reader, "unknown_stream"
    )
    assert "Ask the user which stream" in text
    text = _within(_call(full.get_tool("stream_status"), stream_id="s1"), full, "unknown_stream")
    assert "Open one with stream_open first" in text
    _call(full.get_tool("stream_open"), **open_args)
    for toolkit, close in ((full, True), (opener, False)):
        text = _within(_call(toolkit.get_tool("stream_open"), **open_args), toolkit, "cap_exceeded")
        assert ("stream_close" in text) is close and "at most 1 stream may be open" in text
    ctx2 = ToolContext(pf_world.client, caps=Caps(max_locked="1.5"))
    _call(PurpleFleaToolkit(context=ctx2).get_tool("stream_open"), **open_args)  # 1.00 locked
    for allowed, close in ((None, True), (["stream_open"], False)):
        toolkit = PurpleFleaToolkit(context=ctx2, allowed=allowed)
        text = _within(_call(toolkit.get_tool("stream_open"), **open_args), toolkit, "cap_exceeded")
        assert ("stream_close: s1" in text) is close, text
        assert "use at most 0.50 USDC" in text
    ctx2.close_all()
    _call(full.get_tool("stream_close"), stream_id="s1")
    text = _within(_call(reader.get_tool("stream_record"), stream_id="s1"), reader, "stream_closed")
    assert "Tell the user" in text
    assert pf_world.balance() == 100


# -- a pay_per_call tool refuses within the toolkit it serves --------------------------------


@tool
def quote(symbol: str) -> str:
    """Today's price of a symbol."""
    return f"{symbol}: 101.5"


def _paid_refusal(text: str, offered: frozenset[str]) -> str:
    """``text`` names only tools in ``offered`` and gives a next step (one of them, calling the
    paid tool again after that, or asking the user)."""
    named = set(_TOOL.findall(text))
    assert named <= offered, (sorted(offered), text)
    assert named or "the user" in text, text
    assert "not run" in text, text
    return text


@pytest.mark.parametrize("toolset", [*TOOLSETS, "none"], ids=[*TOOLSETS, "none"])
def test_every_paid_call_refusal_names_a_next_step_within_the_toolkit(toolset):
    offered = TOOLSETS.get(toolset, frozenset())
    kinds: set[str] = set()
    for handle in ("s1", None):  # the agent's stream, the program's
        for exc in _instances():
            err = refused(
                exc, tool_name="quote", units=2, provider="ag_p", handle=handle, offered=offered
            )
            assert KEY not in err.message and KEY[8:20] not in err.message, err.message
            assert err.kind and err.next_step in err.message
            _paid_refusal(err.message, offered if handle else frozenset())
            kinds.add(err.kind)
    err = no_stream("quote", provider="ag_p", offered=offered)
    _paid_refusal(err.message, offered)
    assert ("stream_open" in err.message) is ("stream_open" in offered), err.message
    assert {"budget_exhausted", "stream_closed", "ambiguous"} <= kinds


@pytest.mark.parametrize("toolset", TOOLSETS, ids=list(TOOLSETS))
def test_a_paid_tool_refuses_within_its_toolkit(pf_world, toolset):
    from pf_metered.tools import ToolContext

    offered = TOOLSETS[toolset]
    p = pf_world.provider.agent_id
    ctx = ToolContext(pf_world.client)
    toolkit = PurpleFleaToolkit(context=ctx, allowed=offered)
    assert toolkit.tool_names == offered
    paid = pay_per_call(quote, toolkit=toolkit, provider=p, units=2)
    blind = pay_per_call(quote, context=ctx, provider=p, units=2)  # which tools: not known

    msg = _call(paid, symbol="X")
    assert msg.status == "error" and msg.artifact["error"] == "no_stream", msg.content
    text = _paid_refusal(msg.content, offered)
    assert ("with stream_open" in text) is ("stream_open" in offered), text
    assert "Ask the user to open a payment stream" in _paid_refusal(
        _call(blind, symbol="X").content, frozenset()
    )

    full = PurpleFleaToolkit(context=ctx)  # the program opens the stream the agent pays from
    _call(full.get_tool("stream_open"), provider=p, rate="0.5", max_units=3)
    assert _call(paid, symbol="X").content == "X: 101.5"
    for tool_, names in ((paid, offered), (blind, frozenset())):
        msg = _call(tool_, symbol="Y")
        assert msg.artifact == {"error": "budget_exhausted", "message": msg.content}
        text = _paid_refusal(msg.content, names)
        assert "Budget exhausted (1 unit left)" in text and "stream s1" in text
        assert ("stream_close" in text) is ("stream_close" in names), text
        assert ("stream_open" in text) is ("stream_open" in names), text
    [receipt] = ctx.close_all()
    assert receipt.units == 2 and pf_world.balance() == 99


def test_a_paid_tool_on_a_closed_program_stream_asks_the_user(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client)  # every tool: none acts on this stream
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.5", max_units=2) as stream:
        paid = pay_per_call(quote, stream=stream)
        assert _call(paid, symbol="X").content == "X: 101.5"
    msg = _call(paid, symbol="Y")
    assert msg.artifact["error"] == "stream_closed", msg.content
    assert "Tell the user the tool's stream is closed" in _paid_refusal(msg.content, frozenset())
    with pytest.raises(InvalidInput):
        pay_per_call(quote, stream=stream, offered=toolkit.tool_names)  # the model has no say
    with pytest.raises(InvalidInput):
        pay_per_call(quote, toolkit=toolkit)  # whom to pay?
    with pytest.raises(InvalidInput):
        pay_per_call(quote, context=toolkit.tool_context, provider="p", offered=["stream_opn"])
    assert stream.receipt.units == 1


def _answers(result: dict[str, Any], name: str) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage) and m.name == name]


def test_an_agent_whose_paid_tool_is_spent_is_told_a_step_it_can_take(pf_world):
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(client=pf_world.client, allowed=["stream_open", "stream_record"])
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("stream_open", provider=p, rate="1", max_units=1)]),
            AIMessage("", tool_calls=[tool_call("quote", symbol="X")]),
            AIMessage("", tool_calls=[tool_call("quote", symbol="Y")]),
            "Priced X; Y needs a new stream.",
        ]
    )
    paid = pay_per_call(quote, toolkit=toolkit, provider=p)
    result = create_agent(model, [*toolkit.get_tools(), paid]).invoke(
        {"messages": [("human", "price X and Y")]}
    )
    ok, spent = _answers(result, "quote")
    assert ok.status == "success" and ok.content == "X: 101.5"
    assert spent.status == "error" and spent.artifact["error"] == "budget_exhausted"
    text = _paid_refusal(str(spent.content), toolkit.tool_names)
    assert "Open a new stream to provider" in text and "with stream_open" in text
    assert "stream_close" not in text
    [receipt] = toolkit.tool_context.close_all()
    assert receipt.units == 1 and model.calls == 4


async def test_an_agent_without_stream_tools_is_told_to_ask_the_user(pf_world):
    toolkit = PurpleFleaToolkit(async_client=pf_world.aclient, allowed=["escrow"])
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[tool_call("quote", symbol="X")]), "I must ask."]
    )
    paid = pay_per_call(quote, toolkit=toolkit, provider=pf_world.provider.agent_id)
    result = await create_agent(model, [*toolkit.get_tools(), paid]).ainvoke(
        {"messages": [("human", "price X")]}
    )
    [refusal] = _answers(result, "quote")
    assert refusal.status == "error" and refusal.artifact["error"] == "no_stream"
    text = _paid_refusal(str(refusal.content), toolkit.tool_names)
    assert not _TOOL.findall(text) and "Ask the user to open a payment stream" in text
    assert pf_world.balance() == 100
    await pf_world.aclient.aclose()


# -- a developer's mistake is raised to the developer ----------------------------------------


def test_a_sync_call_on_an_async_only_toolkit_raises_a_config_error(pf_world):
    toolkit = PurpleFleaToolkit(async_client=pf_world.aclient)
    p = pf_world.provider.agent_id
    for name, args in (
        ("stream_open", {"provider": p, "rate": "0.01", "budget": "1"}),
        ("escrow_create", {"to_agent_id": p, "amount": "1"}),
        ("escrow_list", {}),
        ("faucet_claim", {}),
    ):
        with pytest.raises(ConfigError, match=r"only an async_client.*client=EscrowClient"):
            _call(toolkit.get_tool(name), **args)  # not a ToolMessage the model would read
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[tool_call("escrow_list")]), "never reached"]
    )
    agent = create_agent(model, toolkit.get_tools())
    with pytest.raises(ConfigError, match=r"agent\.ainvoke"):
        agent.invoke({"messages": [("human", "list my escrows")]})
    assert model.calls == 1 and pf_world.balance() == 100


async def test_the_same_toolkit_run_asynchronously_works(pf_world):
    toolkit = PurpleFleaToolkit(async_client=pf_world.aclient)
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=[tool_call("escrow_list")])])
    result = await create_agent(model, toolkit.get_tools()).ainvoke(
        {"messages": [("human", "list my escrows")]}
    )
    listed = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert listed[0].status == "success" and listed[0].artifact["count"] == 0
    await pf_world.aclient.aclose()


# -- the MCP server tells its client the same, within the tools it lists ---------------------


async def test_mcp_names_only_the_tools_it_lists(pf_world):
    from mcp import Client

    from pf_metered.mcp import build_server
    from pf_metered.tools import TOOLS, ToolContext

    poor = pf_world.sandbox.add_agent(balance="0.50")
    ctx = ToolContext(pf_world.sandbox.client(poor.api_key))
    listed = [t for t in TOOLS if t.name != "faucet_claim"]
    async with Client(build_server(ctx, tools=listed)) as client:
        result = await client.call_tool(
            "stream_open", {"provider": pf_world.provider.agent_id, "rate": "1", "budget": "1"}
        )
    assert result.is_error and result.structured_content["error"] == "insufficient_funds"
    text = result.content[0].text
    assert "faucet_claim" not in text and "ask the user to add funds" in text


async def test_mcp_answers_a_configuration_problem_as_the_operators_to_fix(caplog):
    import httpx
    from mcp import Client

    from pf_metered.client import EscrowClient
    from pf_metered.mcp import build_server
    from pf_metered.tools import TOOLS, ToolContext

    # a real client whose dialect probe finds no escrow service there: the operator's mistake
    nothing_there = httpx.MockTransport(lambda req: httpx.Response(404, json={"error": "nf"}))
    with EscrowClient("pf_test_probeprobe0123", transport=nothing_there) as client:
        async with Client(build_server(ToolContext(client), tools=TOOLS)) as mcp_client:
            result = await mcp_client.call_tool("escrow_list", {})
    text = result.content[0].text
    assert result.is_error and result.structured_content["error"] == "config"
    assert "not usable as configured" in text and "tell the user" in text
    assert "PF_BASE_URL" in text and "pf_test_probeprobe0123" not in text
    assert "cannot run as configured" in caplog.text
