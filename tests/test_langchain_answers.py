"""What a LangChain tool answers: a sentence for the model and the figures for the program.

Every tool is ``response_format="content_and_artifact"``: ``ToolMessage.content`` is one short
sentence (ids, state, amounts with their unit), ``ToolMessage.artifact`` the answer's dict
(money as decimal strings; on a failure ``{"error": kind, "message": text}``). These tests run
each tool on the embedded Sandbox and check both against the ledger, then follow the artifact
through a real ``create_agent`` loop: into the agent's state, through a checkpointer, out of
``stream(stream_mode="messages")``, and *not* into what a provider is sent.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.messages.utils import convert_to_openai_messages
from langchain_core.tools import BaseTool
from langgraph.checkpoint.memory import InMemorySaver

from pf_metered.langchain import Caps, PurpleFleaToolkit
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.tools import summarize


def _call(tool: BaseTool, **args: Any) -> ToolMessage:
    msg = tool.invoke({"name": tool.name, "args": args, "id": "call_1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    return msg


def _ids(value: Any) -> set[str]:
    """Every id in an answer (stream, escrow and claim ids, however deeply nested)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_id") and isinstance(item, str):
                found.add(item)
            found |= _ids(item)
    elif isinstance(value, list):
        for item in value:
            found |= _ids(item)
    return found


def _check(msg: ToolMessage) -> dict[str, Any]:
    """A successful answer: a dict artifact, and a sentence (not JSON) naming all its ids."""
    assert msg.status == "success", msg.content
    assert isinstance(msg.artifact, dict) and "error" not in msg.artifact
    assert isinstance(msg.content, str) and not msg.content.startswith("{")
    assert msg.content == summarize(msg.name or "", msg.artifact)
    for ident in _ids(msg.artifact):
        assert ident in msg.content, (ident, msg.content)
    json.dumps(msg.artifact)  # JSON-ready: what a checkpointer or a log must be able to store
    return msg.artifact


def test_every_tool_answers_a_sentence_and_the_figures(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client)
    tool = toolkit.get_tool
    p = pf_world.provider.agent_id

    opened = _check(_call(tool("stream_open"), provider=p, rate="0.01", budget="1", batch=5))
    assert opened["stream_id"] == "s1" and opened["units_left"] == 100
    sid = opened["stream_id"]
    recorded = _check(_call(tool("stream_record"), stream_id=sid, units=7))
    assert recorded["recorded"] == 7 and recorded["units_left"] == 93
    assert "Recorded 7 units" in summarize("stream_record", recorded)
    status = _check(_call(tool("stream_status"), stream_id=sid))
    assert status["units"] == 7 and status["budget"] == "1.00"
    listed = _check(_call(tool("stream_list")))
    assert listed["open_streams"] == 1 and listed["streams"][0]["stream_id"] == sid
    msg = _call(tool("stream_close"), stream_id=sid)
    receipt = _check(msg)
    assert receipt["paid"] == "0.07" and receipt["refunded"] == "0.93"
    assert "paid 0.07 USDC" in msg.content and "refunded 0.93 USDC" in msg.content
    escrow = pf_world.sandbox.escrow(receipt["escrow_id"])  # the ledger agrees
    assert escrow.released == Decimal(receipt["paid"])
    assert escrow.refunded == Decimal(receipt["refunded"])

    made = _check(_call(tool("escrow_create"), to_agent_id=p, amount="5", memo="job 7"))
    eid = made["escrow_id"]
    released = _check(_call(tool("escrow_release"), escrow_id=eid, amount="1.25"))
    assert released["released_now"] == "1.25" and released["remaining"] == "3.75"
    read = _check(_call(tool("escrow_status"), escrow_id=eid))
    assert read["releases"] == 1 and read["last_releases"][0]["amount"] == "1.25"
    assert _check(_call(tool("escrow_list"), limit=5))["count"] == 2
    refunded = _check(_call(tool("escrow_refund"), escrow_id=eid))
    assert refunded["refunded_now"] == "3.75"
    claimed = _check(_call(tool("faucet_claim")))
    assert claimed["credited"] == "1.00"
    assert pf_world.balance() == Decimal(100) - Decimal("0.07") - Decimal("1.25") + 1


def test_a_failure_carries_its_kind_as_the_artifact(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client, caps=Caps(max_budget="2"))
    p = pf_world.provider.agent_id
    msg = _call(toolkit.get_tool("stream_open"), provider=p, rate="0.01", budget="1000")
    assert msg.status == "error"
    assert msg.artifact == {"error": "cap_exceeded", "message": msg.content}
    msg = _call(toolkit.get_tool("stream_open"), provider=p, rate="x", budget="1")
    assert msg.status == "error" and msg.artifact["error"] == "invalid_argument"
    msg = _call(toolkit.get_tool("stream_status"), stream_id="s9")
    assert msg.artifact == {"error": "unknown_stream", "message": msg.content}
    assert pf_world.balance() == 100


async def test_async_answers_carry_the_same_artifact(pf_world):
    toolkit = PurpleFleaToolkit(async_client=pf_world.aclient)
    p = pf_world.provider.agent_id
    tool = toolkit.get_tool("stream_open")
    msg = await tool.ainvoke(
        tool_call("stream_open", provider=p, rate="0.01", budget="1") | {"name": "stream_open"}
    )
    assert _check(msg)["stream_id"] == "s1"
    bad = await tool.ainvoke(tool_call("stream_open", provider=p, rate="0.01"))
    assert bad.status == "error" and bad.artifact["error"] == "invalid_argument"
    await toolkit.tool_context.aclose_all()
    await pf_world.aclient.aclose()


def test_invoked_without_a_tool_call_a_tool_returns_the_sentence(pf_world):
    toolkit = PurpleFleaToolkit(client=pf_world.client)
    text = toolkit.get_tool("stream_list").invoke({})
    assert text == "0 streams open; this session has 0.00 USDC locked, 0.00 USDC paid, " + (
        "0.00 USDC refunded. No streams to list."
    )


# -- in a create_agent loop ----------------------------------------------------------------


def _artifact_of(messages: list[BaseMessage], name: str) -> dict[str, Any]:
    for m in reversed(messages):
        if isinstance(m, ToolMessage) and m.name == name and m.status == "success":
            assert isinstance(m.artifact, dict)
            return m.artifact
    raise AssertionError(f"no {name} answer")


def _script(provider: str, seen: list[list[BaseMessage]]) -> list[Any]:
    """Open a stream, count 12 units on the id the open's artifact gave, close it."""

    def record(messages: list[BaseMessage]) -> AIMessage:
        seen.append(list(messages))
        sid = _artifact_of(messages, "stream_open")["stream_id"]
        return AIMessage("", tool_calls=[tool_call("stream_record", stream_id=sid, units=12)])

    def close(messages: list[BaseMessage]) -> AIMessage:
        seen.append(list(messages))
        sid = _artifact_of(messages, "stream_open")["stream_id"]
        return AIMessage("", tool_calls=[tool_call("stream_close", stream_id=sid)])

    opening = tool_call("stream_open", provider=provider, rate="0.01", budget="1", batch=5)
    return [AIMessage("", tool_calls=[opening]), record, close, "Paid."]


def _check_run(messages: list[BaseMessage], world: Any) -> dict[str, Any]:
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert [m.name for m in tool_messages] == ["stream_open", "stream_record", "stream_close"]
    for m in tool_messages:
        _check(m)
    receipt = _artifact_of(messages, "stream_close")
    assert receipt["units"] == 12 and receipt["paid"] == "0.12" and receipt["refunded"] == "0.88"
    assert world.sandbox.escrow(receipt["escrow_id"]).released == Decimal("0.12")
    return receipt


def test_the_artifact_stays_in_the_agents_state_and_never_reaches_the_provider(pf_world):
    seen: list[list[BaseMessage]] = []
    model = ScriptedChatModel(script=_script(pf_world.provider.agent_id, seen))
    toolkit = PurpleFleaToolkit(client=pf_world.client, allowed=["stream"])
    agent = create_agent(model, toolkit.get_tools(), checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t1"}}
    result = agent.invoke({"messages": [("human", "pay for 12 units")]}, config)
    receipt = _check_run(result["messages"], pf_world)

    # the checkpoint holds the artifacts as they were
    saved = agent.get_state(config).values["messages"]
    assert _artifact_of(saved, "stream_close") == receipt
    # the model is handed the ToolMessage objects; what a provider is sent is content only
    last_seen = seen[-1]
    recorded = next(
        m for m in last_seen if isinstance(m, ToolMessage) and m.name == "stream_record"
    )
    wire = [w for w in convert_to_openai_messages(last_seen) if w["role"] == "tool"]
    assert wire and all(set(w) <= {"role", "name", "content", "tool_call_id"} for w in wire)
    assert wire[-1]["content"] == recorded.content  # the sentence, nothing else
    assert "artifact" not in json.dumps(wire) and '"budget"' not in json.dumps(wire)
    assert pf_world.balance() == Decimal("99.88")


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_the_artifact_comes_out_of_messages_streaming(pf_world, mode):
    seen: list[list[BaseMessage]] = []
    model = ScriptedChatModel(script=_script(pf_world.provider.agent_id, seen))
    toolkit = PurpleFleaToolkit(
        client=pf_world.client, async_client=pf_world.aclient, allowed=["stream"]
    )
    agent = create_agent(model, toolkit.get_tools())
    inputs = {"messages": [("human", "pay for 12 units")]}
    streamed: list[BaseMessage] = []
    if mode == "stream":
        for chunk, _meta in agent.stream(inputs, stream_mode="messages"):
            streamed.append(chunk)
    else:
        async for chunk, _meta in agent.astream(inputs, stream_mode="messages"):
            streamed.append(chunk)
    _check_run([m for m in streamed if isinstance(m, ToolMessage)], pf_world)
    assert pf_world.balance() == Decimal("99.88")
    await pf_world.aclient.aclose()
