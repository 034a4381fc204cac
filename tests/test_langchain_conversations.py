"""Per-conversation tool state through real ``create_agent`` loops (issue 15 item 3): each
``thread_id`` (or user of the runtime context) has its own streams and caps; what a finished
run left open is closed or reported by ``SettleConversationMiddleware``; the money is read off
the embedded sandbox ledger."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from conftest import PFWorld
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver
from lc_suites import standard_suites

from pf_metered.errors import InvalidInput
from pf_metered.langchain import (
    TOOL_CLASSES,
    Caps,
    Conversations,
    PurpleFleaToolkit,
    SettleConversationMiddleware,
    ToolContexts,
    by_configurable,
    by_context,
    by_thread,
    pay_per_call,
)
from pf_metered.langchain.conversations import ConversationTool, conversation_tool_class
from pf_metered.langchain.testing import ScriptedChatModel, tool_call


def thread(name: str) -> dict[str, Any]:
    return {"configurable": {"thread_id": name}}


def answers(result: dict[str, Any], name: str) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage) and m.name == name]


def figures(message: ToolMessage) -> dict[str, Any]:
    """A tool answer's figures: its artifact (the content is a sentence for the model)."""
    assert isinstance(message.artifact, dict), message
    return message.artifact


def say(*calls: dict[str, Any]) -> AIMessage:
    return AIMessage("", tool_calls=list(calls))


# -- isolation between threads --------------------------------------------------------------


def test_thread_b_cannot_list_or_close_thread_a_stream(pf_world: PFWorld) -> None:
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(client=pf_world.client, allowed=["stream"], conversations=by_thread)
    model = ScriptedChatModel(
        script=[
            say(tool_call("stream_open", provider=p, rate="0.01", budget="2", batch=5)),
            say(tool_call("stream_record", stream_id="s1", units=12)),
            "A: stream s1 is open.",
            say(tool_call("stream_list"), tool_call("stream_close", stream_id="s1")),
            say(tool_call("stream_status", stream_id="s1")),
            "B: nothing of mine.",
            say(tool_call("stream_close", stream_id="s1")),
            "A: closed.",
        ]
    )
    agent = create_agent(model, toolkit.get_tools(), checkpointer=InMemorySaver())

    a1 = agent.invoke({"messages": [("human", "open a stream")]}, thread("A"))
    assert figures(answers(a1, "stream_open")[0])["stream_id"] == "s1"

    b = agent.invoke({"messages": [("human", "close every stream you see")]}, thread("B"))
    listing = figures(answers(b, "stream_list")[0])
    assert (listing["open_streams"], listing["streams"], listing["locked"]) == (0, [], "0.00")
    [closing] = answers(b, "stream_close")
    assert closing.status == "error"
    assert "Unknown stream 's1'" in closing.content and "this conversation" in closing.content
    assert closing.artifact == {"error": "unknown_stream", "message": closing.content}
    assert answers(b, "stream_status")[0].status == "error"
    assert pf_world.balance() == Decimal("98.00")  # A's budget is still locked, untouched

    a2 = agent.invoke({"messages": [("human", "now close it")]}, thread("A"))
    receipt = figures(answers(a2, "stream_close")[-1])
    assert (receipt["units"], receipt["paid"], receipt["refunded"]) == (12, "0.12", "1.88")
    assert len(a2["messages"]) == len(a1["messages"]) + 4  # A's history was kept
    assert toolkit.conversations is not None
    assert toolkit.conversations.contexts.keys() == ["default", "A", "B"]
    assert pf_world.balance() == Decimal("99.88")
    assert pf_world.balance("provider") == Decimal("0.1188")
    pf_world.sandbox.audit()


@dataclass
class UserContext:
    user_id: str


def test_by_context_keys_conversations_by_the_runtime_user(pf_world: PFWorld) -> None:
    """Two threads of one user share that user's streams; another user sees none."""
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(
        client=pf_world.client, allowed=["stream"], conversations=by_context("user_id")
    )
    model = ScriptedChatModel(
        script=[
            say(tool_call("stream_open", provider=p, rate="0.01", budget="1")),
            "opened",
            say(tool_call("stream_list")),
            "listed",
            say(tool_call("stream_list")),
            "listed",
        ]
    )
    agent = create_agent(
        model, toolkit.get_tools(), context_schema=UserContext, checkpointer=InMemorySaver()
    )
    agent.invoke({"messages": [("human", "open")]}, thread("t1"), context=UserContext("ann"))
    same = agent.invoke({"messages": [("human", "list")]}, thread("t2"), context=UserContext("ann"))
    other = agent.invoke(
        {"messages": [("human", "list")]}, thread("t3"), context=UserContext("bob")
    )
    assert figures(answers(same, "stream_list")[0])["open_streams"] == 1
    assert figures(answers(other, "stream_list")[0])["open_streams"] == 0
    assert toolkit.context_for("ann").entries()[0].handle == "s1"
    assert toolkit.context_for("bob").entries() == []
    assert toolkit.conversations is not None
    toolkit.conversations.contexts.close_all()
    assert pf_world.balance() == Decimal("100.00")


def test_key_functions() -> None:
    assert by_thread({"configurable": {"thread_id": " t9 "}}) == "t9"
    assert by_thread({}) is None and by_thread({"configurable": {"thread_id": ""}}) is None
    assert by_configurable("user_id")({"configurable": {"user_id": 42}}) == "42"
    assert by_context("user_id")({}) is None  # no agent run, no runtime
    with pytest.raises(InvalidInput):
        by_configurable("")


# -- caps per conversation and across them --------------------------------------------------


def test_caps_per_conversation_and_across_all(pf_world: PFWorld) -> None:
    """``max_total`` 2.50 binds each thread; ``max_locked`` 3.50 binds them together."""
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(
        client=pf_world.client,
        allowed=["stream"],
        caps=Caps(max_total="2.5", max_locked="3.5"),
        conversations=by_thread,
    )
    one = {"provider": p, "rate": "0.01", "budget": "1"}
    model = ScriptedChatModel(
        script=[
            # A asks for three at once (run in parallel): any two fit its 2.50, never three
            say(*(tool_call("stream_open", **one) for _ in range(3))),
            "A done",
            say(tool_call("stream_open", **one)),  # B: 1.00 of its own 2.50
            say(tool_call("stream_open", **{**one, "budget": "1.5"})),  # B 2.50, all 4.50
            "B done",
            say(tool_call("stream_open", **one)),  # C: nothing of its own, but 4.00 in all
            "C done",
        ]
    )
    agent = create_agent(model, toolkit.get_tools(), checkpointer=InMemorySaver())
    a = agent.invoke({"messages": [("human", "go")]}, thread("A"))
    b = agent.invoke({"messages": [("human", "go")]}, thread("B"))
    c = agent.invoke({"messages": [("human", "go")]}, thread("C"))
    a_opens = answers(a, "stream_open")
    assert sorted(m.status for m in a_opens) == ["error", "success", "success"]
    [a_refused] = [m for m in a_opens if m.status == "error"]
    assert "total of 2.50 USDC" in a_refused.content and "0.50 USDC left" in a_refused.content
    b_opens = answers(b, "stream_open")
    assert [m.status for m in b_opens] == ["success", "error"]
    assert "max_locked" in b_opens[1].content and "0.50 USDC free" in b_opens[1].content
    [c_open] = answers(c, "stream_open")
    assert c_open.status == "error" and "max_locked" in c_open.content
    assert pf_world.balance() == Decimal("97.00")
    assert toolkit.conversations is not None
    assert toolkit.conversations.contexts.figures().locked_micro == 3_000_000
    closed = toolkit.conversations.contexts.close_all()
    assert {k: len(v) for k, v in closed.items()} == {"default": 0, "A": 2, "B": 1, "C": 0}
    assert pf_world.balance() == Decimal("100.00")


# -- close_all after ainvoke, and settling what a run left open -----------------------------


def test_close_all_after_an_async_agent_run(pf_world: PFWorld) -> None:
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(
        client=pf_world.client, async_client=pf_world.aclient, conversations=by_thread
    )
    model = ScriptedChatModel(
        script=[
            say(tool_call("stream_open", provider=p, rate="0.02", budget="1")),
            say(tool_call("stream_record", stream_id="s1", units=7)),
            "left it open",
        ]
    )
    agent = create_agent(model, toolkit.get_tools(), checkpointer=InMemorySaver())
    asyncio.run(agent.ainvoke({"messages": [("human", "go")]}, thread("T")))
    ctx = toolkit.context_for("T")
    assert [e.is_async for e in ctx.entries()] == [True]
    [receipt] = ctx.close_all()  # sync, after the loop that opened it is gone
    assert (receipt.paid_micro, receipt.refunded_micro) == (140_000, 860_000)
    assert pf_world.balance() == Decimal("99.86")
    pf_world.sandbox.audit()


def _leaver(p: str) -> list[Any]:
    """A script whose every run opens a stream, counts 25 units and forgets to close it."""
    return [
        say(tool_call("stream_open", provider=p, rate="0.01", budget="1", batch=10)),
        say(tool_call("stream_record", stream_id="s1", units=25)),
        "bye",
    ]


def test_after_agent_closes_what_the_run_left_open_sync_and_async(pf_world: PFWorld) -> None:
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(
        client=pf_world.client, async_client=pf_world.aclient, conversations=by_thread
    )
    assert toolkit.conversations is not None
    settle = SettleConversationMiddleware(toolkit.conversations)
    tools = toolkit.get_tools()
    # a stream of thread "other", opened outside these runs: never touched by them
    other = toolkit.context_for("other")
    tools[5].invoke({"provider": p, "rate": "0.01", "budget": "1"}, thread("other"))
    model = ScriptedChatModel(script=_leaver(p) + _leaver(p))
    agent = create_agent(model, tools, middleware=[settle], checkpointer=InMemorySaver())

    done = agent.invoke({"messages": [("human", "go")]}, thread("S"))
    report = done["conversation_settlement"]
    assert (report["conversation"], report["on_exit"], report["problems"]) == ("S", "close", [])
    [closed] = report["closed"]
    assert (closed["units"], closed["paid"], closed["refunded"]) == (25, "0.25", "0.75")
    assert (report["open_streams"], report["locked"], report["paid"]) == ([], "0.00", "0.25")

    adone = asyncio.run(agent.ainvoke({"messages": [("human", "go")]}, thread("AS")))
    areport = adone["conversation_settlement"]
    assert areport["conversation"] == "AS" and areport["closed"][0]["paid"] == "0.25"
    assert toolkit.context_for("AS").entries()[0].is_async

    assert other.entries()[0].receipt is None  # the other thread's stream stays open
    assert pf_world.balance() == Decimal("100") - Decimal("0.50") - Decimal("1.00")
    assert pf_world.balance("provider") == Decimal("0.495")  # 0.50 less the 1% fee
    toolkit.conversations.contexts.close_all()
    assert pf_world.balance() == Decimal("99.50")
    pf_world.sandbox.audit()


def test_report_mode_closes_nothing_and_says_what_is_open(pf_world: PFWorld) -> None:
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(client=pf_world.client, conversations=by_thread)
    assert toolkit.conversations is not None
    settle = SettleConversationMiddleware(toolkit.conversations, on_exit="report")
    model = ScriptedChatModel(
        script=[
            # batch 50: no release is due, so the figures do not wait on the sender
            say(tool_call("stream_open", provider=p, rate="0.01", budget="1", batch=50)),
            say(tool_call("stream_record", stream_id="s1", units=25)),
            say(tool_call("escrow_create", to_agent_id=p, amount="1")),
            "bye",
            "nothing to do",
        ]
    )
    agent = create_agent(model, toolkit.get_tools(), middleware=[settle])
    report = agent.invoke({"messages": [("human", "go")]}, thread("R"))["conversation_settlement"]
    assert report["closed"] == [] and report["on_exit"] == "report"
    [left] = report["open_streams"]
    assert (left["stream_id"], left["units"], left["budget"]) == ("s1", 25, "1.00")
    [escrow] = report["open_escrows"]
    assert (escrow["remaining"], escrow["provider"]) == ("1.00", p)
    assert (report["locked"], report["paid"]) == ("2.00", "0.00")  # the budget and the escrow
    assert pf_world.balance() == Decimal("98.00")
    empty = agent.invoke({"messages": [("human", "hi")]}, thread("Q"))["conversation_settlement"]
    assert (empty["conversation"], empty["open_streams"], empty["locked"]) == ("Q", [], "0.00")
    assert toolkit.conversations.contexts.find("Q") is None  # a report makes no context
    toolkit.conversations.contexts.close_all()


def test_settle_rejects_what_it_cannot_use(pf_world: PFWorld) -> None:
    with pytest.raises(InvalidInput, match="conversations"):
        SettleConversationMiddleware(pf_world.client)  # type: ignore[arg-type]
    contexts = Conversations(ToolContexts(pf_world.client))
    with pytest.raises(InvalidInput, match="on_exit"):
        SettleConversationMiddleware(contexts, on_exit="refund")  # type: ignore[arg-type]


# -- a paid tool pays from its own conversation's stream -----------------------------------


@tool
def quote(symbol: str) -> str:
    """Today's price of a symbol."""
    return f"{symbol}: 101.5"


def test_pay_per_call_pays_from_the_calling_conversation_stream(pf_world: PFWorld) -> None:
    p = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(client=pf_world.client, allowed=["stream"], conversations=by_thread)
    assert toolkit.conversations is not None
    paid = pay_per_call(quote, toolkit=toolkit, provider=p)
    model = ScriptedChatModel(
        script=[
            say(tool_call("stream_open", provider=p, rate="0.05", budget="1")),
            say(tool_call("quote", symbol="X"), tool_call("quote", symbol="Y")),
            "A priced",
            say(tool_call("quote", symbol="Z")),  # B opened nothing: refused, not paid by A
            "B refused",
        ]
    )
    agent = create_agent(model, [*toolkit.get_tools(), paid], checkpointer=InMemorySaver())
    a = agent.invoke({"messages": [("human", "price X and Y")]}, thread("A"))
    b = agent.invoke({"messages": [("human", "price Z")]}, thread("B"))
    assert [m.status for m in answers(a, "quote")] == ["success", "success"]
    [refused] = answers(b, "quote")
    assert refused.status == "error" and refused.artifact["error"] == "no_stream"
    assert "Open one with stream_open" in refused.content  # the toolkit offers it
    [receipt] = toolkit.context_for("A").close_all()
    assert (receipt.units, receipt.paid_micro) == (2, 100_000)
    assert pf_world.balance() == Decimal("99.90")


# -- the twins are the tools: the standard suites, and construction -------------------------

_WORLD: dict[str, Any] = {}


def _conversations() -> Conversations:
    if "c" not in _WORLD:
        world = PFWorld(balance="10000.00")
        _WORLD["world"] = world
        _WORLD["escrow"] = world.client.create_escrow(world.provider.agent_id, "50").escrow_id
        _WORLD["c"] = Conversations(
            ToolContexts(world.client, caps=Caps(max_budget="50", release_any_escrow=True))
        )
    conversations: Conversations = _WORLD["c"]
    return conversations


@pytest.fixture(scope="module", autouse=True)
def _settle_the_suites():
    yield
    if "c" in _WORLD:
        _WORLD["c"].contexts.close_all()
        _WORLD["world"].sandbox.audit()
        _WORLD.pop("world").close()
        _WORLD.clear()


def _example(name: str) -> dict[str, Any]:
    world = _WORLD["world"]
    p = world.provider.agent_id
    if name == "escrow_refund":
        return {"escrow_id": world.client.create_escrow(p, "1.00").escrow_id}
    if name in ("stream_status", "stream_record", "stream_close"):
        ctx = _conversations().default
        opened = (
            TOOL_CLASSES[5](context=ctx)
            .invoke(
                {
                    "name": "stream_open",
                    "args": {"provider": p, "rate": "0.001", "budget": "1"},
                    "id": "c0",
                    "type": "tool_call",
                }
            )
            .artifact
        )
        extra = {"units": 3} if name == "stream_record" else {}
        return {"stream_id": opened["stream_id"], **extra}
    return {
        "escrow_create": {"to_agent_id": p, "amount": "1.00"},
        "escrow_release": {"escrow_id": _WORLD["escrow"], "amount": "0.01"},
        "escrow_status": {"escrow_id": _WORLD["escrow"]},
        "escrow_list": {"limit": 5},
        "faucet_claim": {},
        "stream_open": {"provider": p, "rate": "0.001", "budget": "1.00"},
        "stream_list": {},
    }[name]


def _conversation_params() -> dict[str, Any]:
    conversations = _conversations()
    return {"context": conversations.default, "conversations": conversations}


def _example_in_world(name: str) -> dict[str, Any]:
    _conversations()
    return _example(name)


globals().update(
    standard_suites(
        [conversation_tool_class(cls) for cls in TOOL_CLASSES],
        params=_conversation_params,
        example=_example_in_world,
    )
)


def test_twins_mirror_their_tools(pf_world: PFWorld) -> None:
    toolkit = PurpleFleaToolkit(client=pf_world.client, conversations=by_thread)
    plain = PurpleFleaToolkit(client=pf_world.client)
    for twin, tool_ in zip(toolkit.get_tools(), plain.get_tools(), strict=True):
        assert isinstance(twin, ConversationTool) and isinstance(twin, type(tool_))
        assert (twin.name, twin.description, twin.args_schema) == (
            tool_.name,
            tool_.description,
            tool_.args_schema,
        )
        assert twin.tool_call_schema.model_json_schema() == (
            tool_.tool_call_schema.model_json_schema()
        )
    assert conversation_tool_class(TOOL_CLASSES[0]) is conversation_tool_class(TOOL_CLASSES[0])
    with pytest.raises(InvalidInput, match="not both"):
        PurpleFleaToolkit(context=plain.tool_context, conversations=by_thread)
    assert "Conversations(key=by_configurable('thread_id')" in repr(toolkit.conversations)
