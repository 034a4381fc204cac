"""End to end on the current agent API: ``langchain.agents.create_agent`` drives the Purple Flea
tools with a scripted tool-calling chat model, in every way a program runs an agent — ``invoke``,
``ainvoke``, ``stream(stream_mode="messages")`` and ``astream`` — and the embedded sandbox ledger
shows the exact money: the payer debited, the provider credited net of the 1% fee, the fees, and
the refunds.

One run (the same script in each mode) makes the mistake models make (an invented argument),
opens a payment stream, buys twelve paid tool calls in parallel batches, records units it
measured itself, reads the stream, makes, part-pays, reads and refunds a one-off escrow, closes
the stream and lists it. Sync modes use the sync client, async modes only the async one (the
tools' native async path).

Also: the caps hold whatever a model invents, ``MeteredCallbackHandler`` bills the agent's own
tokens exactly while it streams, ``@metered`` under ``@tool``, and one run on LangGraph's
deprecated ``create_react_agent`` (what the ``langgraph`` extra alone offers) with its
deprecation warning asserted, not silenced.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from langchain_core.tools import BaseTool, tool

from pf_metered.decorators import metered
from pf_metered.errors import BudgetExhausted, InvalidInput
from pf_metered.langchain import (
    Caps,
    MeteredCallbackHandler,
    MeteredMiddleware,
    PurpleFleaToolkit,
    pay_per_call,
)
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.stream import AsyncPaymentStream, PaymentStream

FEE = Decimal("0.01")
PAY_TOOLS = (
    "escrow_create",
    "escrow_release",
    "escrow_status",
    "escrow_list",
    "stream_open",
    "stream_status",
    "stream_record",
    "stream_close",
    "stream_list",
    "escrow_refund",
)
"""The toolkit's tools for an agent that may pay but not claim the faucet, in toolkit order."""


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def answer(message: ToolMessage) -> dict[str, Any]:
    """A pay tool's answer as figures: its artifact (``response_format="content_and_artifact"``:
    the content is the sentence the model reads, the artifact the figures a program reads)."""
    assert isinstance(message.artifact, dict), f"{message.name} answered without an artifact"
    assert isinstance(message.content, str) and not message.content.startswith("{")
    return message.artifact


def _answer_of(messages: Sequence[BaseMessage], name: str, key: str) -> str:
    """``key`` from the newest successful answer of tool ``name`` in the conversation."""
    for message in reversed(messages):
        if isinstance(message, ToolMessage) and message.name == name and message.status != "error":
            return str(answer(message)[key])
    raise AssertionError(f"the script expected a successful {name} before this step")


def _on_stream(name: str, **args: Any) -> Any:
    """A step calling ``name`` on the stream the agent opened (its id read from stream_open)."""

    def step(messages: Sequence[BaseMessage]) -> AIMessage:
        stream_id = _answer_of(messages, "stream_open", "stream_id")
        return AIMessage("", tool_calls=[tool_call(name, stream_id=stream_id, **args)])

    return step


def _on_escrow(name: str, **args: Any) -> Any:
    """A step calling ``name`` on the escrow the agent made (its id read from escrow_create)."""

    def step(messages: Sequence[BaseMessage]) -> AIMessage:
        escrow_id = _answer_of(messages, "escrow_create", "escrow_id")
        return AIMessage("", tool_calls=[tool_call(name, escrow_id=escrow_id, **args)])

    return step


def _calls(*calls: dict[str, Any]) -> AIMessage:
    return AIMessage("", tool_calls=list(calls))


def pay_script(provider: str) -> list[Any]:
    """The run every mode plays: 14 model answers: 13 ask for 23 tool calls, the last is text."""
    cities = [f"city{i}" for i in range(12)]
    return [
        # an invented argument: refused by the schema, naming it; nothing is locked
        _calls(
            tool_call(
                "stream_open", provider=provider, rate="0.02", budget="1.50", escrow_override=True
            )
        ),
        _calls(tool_call("stream_open", provider=provider, rate="0.02", budget="1.50", batch=4)),
        # twelve paid calls, four at a time (the agent runs each batch in parallel)
        *[_calls(*[tool_call("weather", city=c) for c in cities[i : i + 4]]) for i in (0, 4, 8)],
        _on_stream("stream_record", units=5),  # five units the agent measured itself
        _on_stream("stream_status"),
        _calls(tool_call("escrow_create", to_agent_id=provider, amount="2.00", memo="one job")),
        _on_escrow("escrow_release", amount="0.50"),
        _on_escrow("escrow_status"),
        _on_escrow("escrow_refund"),
        _on_stream("stream_close"),
        _calls(tool_call("escrow_list", status="refunded"), tool_call("stream_list")),
        "All done.",
    ]


def pay_tools(toolkit: PurpleFleaToolkit, provider: str) -> list[BaseTool]:
    return [
        *toolkit.get_tools(),
        pay_per_call(weather, toolkit=toolkit, provider=provider),
    ]


def _toolkit(pf_world: Any, *, is_async: bool) -> PurpleFleaToolkit:
    clients = {"async_client": pf_world.aclient} if is_async else {"client": pf_world.client}
    return PurpleFleaToolkit(
        **clients, caps=Caps(max_budget="2", max_rate="0.05"), allowed=["escrow", "stream"]
    )


def check_pay_run(
    pf_world: Any,
    model: ScriptedChatModel,
    answers: list[ToolMessage],
    *,
    also_paid: Decimal = Decimal(0),
) -> dict[str, Decimal]:
    """Every answer of the scripted run, and the money on the ledger; returns the figures.

    ``also_paid``: what the payer paid elsewhere in the same run (its 1% fee is counted too).
    """
    by_name: dict[str, list[ToolMessage]] = {}
    for m in answers:
        by_name.setdefault(str(m.name), []).append(m)
    assert sorted(by_name) == sorted([*PAY_TOOLS, "weather"])
    assert model.calls == 14
    assert model.offered == [(*PAY_TOOLS, "weather")] * 14  # create_agent offered every tool

    refused, opened = by_name["stream_open"]
    assert refused.status == "error" and "escrow_override: not an argument" in refused.content
    assert answer(refused)["error"] == "invalid_argument"
    assert opened.status != "error" and answer(opened)["units"] == 0
    assert [m.status for m in by_name["weather"]] == ["success"] * 12
    assert sorted(str(m.content) for m in by_name["weather"]) == sorted(
        f"sunny in city{i}" for i in range(12)
    )
    ok = [m for m in answers if m.status != "error"]
    assert len(answers) == 23 and len(ok) == 22

    (record,) = by_name["stream_record"]
    assert answer(record)["recorded"] == 5 and answer(record)["units"] == 17
    (status,) = by_name["stream_status"]
    assert answer(status)["units"] == 17 and answer(status)["units_left"] == 75 - 17

    (created,) = by_name["escrow_create"]
    escrow_id = answer(created)["escrow_id"]
    assert Decimal(answer(created)["amount"]) == Decimal("2.00")
    (released,) = by_name["escrow_release"]
    assert Decimal(answer(released)["released_now"]) == Decimal("0.50")
    (looked,) = by_name["escrow_status"]
    assert Decimal(answer(looked)["remaining"]) == Decimal("1.50")
    (refund,) = by_name["escrow_refund"]
    assert Decimal(answer(refund)["refunded_now"]) == Decimal("1.50")

    (closed,) = by_name["stream_close"]
    receipt = answer(closed)
    assert receipt["units"] == 17  # 12 paid calls + 5 recorded, at 0.02
    assert receipt["stream_id"] == answer(opened)["stream_id"] == answer(status)["stream_id"]
    figures = {k: Decimal(receipt[k]) for k in ("paid", "fee", "provider_net", "refunded")}
    assert figures == {
        "paid": Decimal("0.34"),
        "fee": Decimal("0.0034"),
        "provider_net": Decimal("0.3366"),
        "refunded": Decimal("1.16"),
    }
    (streams,) = by_name["stream_list"]
    (row,) = answer(streams)["streams"]
    assert row["stream_id"] == receipt["stream_id"] and row["status"] == "closed"
    assert row["units"] == 17 and Decimal(row["paid"]) == Decimal("0.34")
    (escrows,) = by_name["escrow_list"]
    listed = {e["escrow_id"] for e in answer(escrows)["escrows"]}
    assert listed == {escrow_id, receipt["escrow_id"]}  # both ended refunded (in part)

    # the ledger agrees to the micro-USDC: stream 0.34 paid, escrow 0.50 released
    stream_escrow = pf_world.sandbox.escrow(receipt["escrow_id"])
    assert stream_escrow.released == Decimal("0.34") and stream_escrow.refunded == Decimal("1.16")
    one_off = pf_world.sandbox.escrow(escrow_id)
    assert one_off.released == Decimal("0.50") and one_off.refunded == Decimal("1.50")
    ledger = {
        "payer_debited": Decimal(100) - pf_world.balance(),
        "provider_credited": pf_world.balance("provider"),
        "fees": pf_world.sandbox.fees(),
    }
    assert ledger == {
        "payer_debited": Decimal("0.84") + also_paid,
        "provider_credited": Decimal("0.8316"),  # 0.3366 + 0.495
        "fees": Decimal("0.0084") + also_paid * FEE,  # 1% of 0.34 + 1% of 0.50 (+ 1% of it)
    }
    pf_world.sandbox.audit()
    return {**figures, **ledger}


def _streamed(items: list[tuple[Any, Any]]) -> tuple[list[ToolMessage], dict[str, AIMessageChunk]]:
    """From ``stream_mode="messages"`` items: the tool answers, and each model answer whole
    (its chunks added up, per message id)."""
    answers: list[ToolMessage] = []
    merged: dict[str, AIMessageChunk] = {}
    for message, metadata in items:
        assert "langgraph_node" in metadata
        if isinstance(message, ToolMessage):
            answers.append(message)
        elif isinstance(message, AIMessageChunk):
            key = str(message.id)
            merged[key] = merged[key] + message if key in merged else message
    return answers, merged


def _check_streamed_answers(merged: dict[str, AIMessageChunk], model: ScriptedChatModel) -> None:
    """Streamed, each model answer came whole: its tool calls, and its usage reported once."""
    answers = list(merged.values())
    assert len(answers) == model.calls
    assert answers[-1].content == "All done." and not answers[-1].tool_calls
    assert [len(a.tool_calls) for a in answers[:-1]] == [1, 1, 4, 4, 4, 1, 1, 1, 1, 1, 1, 1, 2]
    assert all(a.usage_metadata and a.usage_metadata["total_tokens"] > 0 for a in answers)


# -- the run in every mode ------------------------------------------------------------------


HOST_RATE = Decimal("0.001")
"""What the model's host charges per model call when the run is also metered by middleware."""


def _check_host(pf_world: Any, host: str, receipt: Any, model: ScriptedChatModel) -> Decimal:
    """The middleware paid the host one unit per model call, exactly; returns what it paid."""
    assert receipt.units == model.calls == 14
    assert receipt.paid == HOST_RATE * 14
    assert pf_world.sandbox.balance(host) == receipt.paid * (1 - FEE)
    return Decimal(receipt.paid)


@pytest.mark.parametrize("metered", [False, True], ids=["tools", "tools+middleware"])
@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_sync_agent_pays_exactly(pf_world, mode, metered):
    provider = pf_world.provider.agent_id
    host = pf_world.sandbox.add_agent().agent_id
    toolkit = _toolkit(pf_world, is_async=False)
    model = ScriptedChatModel(script=pay_script(provider))
    host_stream = PaymentStream(pf_world.client, host, str(HOST_RATE), budget="1", batch=5)
    middleware = [MeteredMiddleware(host_stream.open())] if metered else []
    agent = create_agent(model, pay_tools(toolkit, provider), middleware=middleware)
    request = {"messages": [("human", "weather for 12 cities, and pay for one job")]}
    config: Any = {"recursion_limit": 100}
    if mode == "invoke":
        messages = agent.invoke(request, config)["messages"]
        assert messages[-1].content == "All done."
        answers = [m for m in messages if isinstance(m, ToolMessage)]
    else:
        answers, merged = _streamed(list(agent.stream(request, config, stream_mode="messages")))
        _check_streamed_answers(merged, model)
    also = _check_host(pf_world, host, host_stream.close(), model) if metered else Decimal(0)
    check_pay_run(pf_world, model, answers, also_paid=also)


@pytest.mark.parametrize("metered", [False, True], ids=["tools", "tools+middleware"])
@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
async def test_async_agent_pays_exactly(pf_world, mode, metered):
    provider = pf_world.provider.agent_id
    host = pf_world.sandbox.add_agent().agent_id
    toolkit = _toolkit(pf_world, is_async=True)
    model = ScriptedChatModel(script=pay_script(provider))
    host_stream = AsyncPaymentStream(pf_world.aclient, host, str(HOST_RATE), budget="1", batch=5)
    middleware = [MeteredMiddleware(await host_stream.open())] if metered else []
    agent = create_agent(model, pay_tools(toolkit, provider), middleware=middleware)
    request = {"messages": [("human", "weather for 12 cities, and pay for one job")]}
    config: Any = {"recursion_limit": 100}
    if mode == "ainvoke":
        messages = (await agent.ainvoke(request, config))["messages"]
        assert messages[-1].content == "All done."
        answers = [m for m in messages if isinstance(m, ToolMessage)]
    else:
        items = [item async for item in agent.astream(request, config, stream_mode="messages")]
        answers, merged = _streamed(items)
        _check_streamed_answers(merged, model)
    also = _check_host(pf_world, host, await host_stream.close(), model) if metered else Decimal(0)
    check_pay_run(pf_world, model, answers, also_paid=also)
    await pf_world.aclient.aclose()


def test_create_react_agent_still_runs_the_tools_and_warns_it_is_deprecated(pf_world):
    """The ``langgraph`` extra alone offers only LangGraph's prebuilt ReAct agent: the same run
    pays exactly there too. Its deprecation warning is asserted (it says where to go); when
    LangGraph removes the function this test is the one to delete."""
    from langgraph.prebuilt import create_react_agent
    from langgraph.warnings import LangGraphDeprecatedSinceV10

    provider = pf_world.provider.agent_id
    toolkit = _toolkit(pf_world, is_async=False)
    model = ScriptedChatModel(script=pay_script(provider))
    with pytest.warns(LangGraphDeprecatedSinceV10, match="create_agent"):
        agent = create_react_agent(model, pay_tools(toolkit, provider))
    result = agent.invoke(
        {"messages": [("human", "weather for 12 cities, and pay for one job")]},
        {"recursion_limit": 100},
    )
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    check_pay_run(pf_world, model, answers)


# -- caps, and the agent's own tokens ---------------------------------------------------------


def test_an_agent_cannot_spend_past_the_caps_whatever_it_invents(pf_world):
    provider = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(
        client=pf_world.client, caps=Caps(max_budget="1", max_total="2", max_rate="0.1")
    )
    greedy = [
        tool_call("stream_open", provider=provider, rate="0.1", budget="1000"),
        tool_call("stream_open", provider=provider, rate="5", max_units=1),
        tool_call("stream_open", provider=provider, rate="0.1", max_units=10**9),
        tool_call("stream_open", provider=provider, rate="0.1", budget="1", max_budget="99"),
        tool_call("escrow_create", to_agent_id=provider, amount="1.000001"),
        tool_call("escrow_create", to_agent_id=provider, amount=1e9),
        tool_call("stream_open", provider=provider, rate="0.1", budget="1"),
        tool_call("escrow_create", to_agent_id=provider, amount="1"),
        tool_call("escrow_create", to_agent_id=provider, amount="1"),  # past max_total
        tool_call("stream_open", provider=provider, rate="0.01", budget="1"),  # past max_total
    ]
    model = ScriptedChatModel(script=[AIMessage("", tool_calls=greedy)])
    result = create_agent(model, toolkit.get_tools()).invoke({"messages": [("human", "spend")]})
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    ok = [m for m in answers if m.status != "error"]
    assert len(answers) == 10 and len(ok) == 2
    assert pf_world.balance() == Decimal("98")
    assert toolkit.tool_context.locked_micro == 2_000_000
    for m in answers:
        if m.status == "error":
            assert "Cap exceeded" in m.content or "Invalid arguments" in m.content, m.content
    toolkit.tool_context.close_all()


async def test_async_agent_streams_while_its_tokens_are_metered(pf_world):
    """``MeteredCallbackHandler`` on the run's config bills every model answer's reported
    tokens exactly once while the agent streams (usage arrives on each answer's last chunk)."""
    provider = pf_world.provider.agent_id
    host = pf_world.sandbox.add_agent()
    toolkit = _toolkit(pf_world, is_async=True)
    model = ScriptedChatModel(script=pay_script(provider))
    async with AsyncPaymentStream(
        pf_world.aclient, host.agent_id, "0.0001", budget="1", batch=100
    ) as llm:
        handler = MeteredCallbackHandler(llm, unit="token")
        agent = create_agent(model, pay_tools(toolkit, provider))
        items = [
            item
            async for item in agent.astream(
                {"messages": [("human", "weather for 12 cities, and pay for one job")]},
                {"callbacks": [handler], "recursion_limit": 100},
                stream_mode="messages",
            )
        ]
    answers, merged = _streamed(items)
    _check_streamed_answers(merged, model)
    reported = sum(
        m.usage_metadata["total_tokens"] for m in merged.values() if m.usage_metadata is not None
    )
    assert handler.calls == model.calls == 14
    assert handler.input_tokens + handler.output_tokens == reported
    assert llm.receipt.units == reported
    assert llm.receipt.paid == Decimal("0.0001") * reported
    assert pf_world.sandbox.balance(host.agent_id) == llm.receipt.paid * (1 - FEE)
    check_pay_run(pf_world, model, answers, also_paid=llm.receipt.paid)
    await pf_world.aclient.aclose()


# -- @metered on @tool, and pay_per_call on a program's own stream -------------------------


def test_metered_under_tool_keeps_the_schema(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.5", max_units=2) as stream:

        @tool
        @metered(stream=stream)
        def search(query: str, limit: int = 3) -> str:
            """Search the provider's index."""
            return f"{limit} results for {query}"

        @tool
        def search_plain(query: str, limit: int = 3) -> str:
            """Search the provider's index."""
            return ""

        assert search.name == "search"
        assert search.description == "Search the provider's index."
        assert search.args == search_plain.args
        assert search.tool_call_schema.model_json_schema()["required"] == ["query"]
        assert search.invoke({"query": "flea", "limit": 2}) == "2 results for flea"
        search.invoke({"query": "again"})
        with pytest.raises(BudgetExhausted):
            search.invoke({"query": "one too many"})
    assert stream.receipt.units == 2 and stream.receipt.paid == Decimal("1.00")


async def test_metered_async_tool_keeps_the_schema(pf_world):
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.01", budget="1"
    ) as stream:

        @tool
        @metered(stream=stream)
        async def fetch(url: str) -> str:
            """Fetch a page."""
            return url.upper()

        assert fetch.args == {"url": {"title": "Url", "type": "string"}}
        assert await fetch.ainvoke({"url": "a"}) == "A"
    assert stream.receipt.units == 1
    await pf_world.aclient.aclose()


def test_pay_per_call_on_a_program_stream_answers_the_model(pf_world):
    with pytest.raises(InvalidInput):
        pay_per_call(weather)
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.5", max_units=2) as stream:

        @tool
        def broken(city: str) -> str:
            """Always fails."""
            raise RuntimeError("down")

        with pytest.raises(RuntimeError):  # a failed call costs nothing
            pay_per_call(broken, stream=stream).invoke({"city": "x"})
        paid = pay_per_call(weather, stream=stream)
        assert paid.name == "weather" and paid.args == weather.args
        assert paid.invoke({"city": "Oslo"}) == "sunny in Oslo"
        paid.invoke({"city": "Rome"})
        refused = paid.invoke(
            {"name": "weather", "args": {"city": "Lima"}, "id": "c", "type": "tool_call"}
        )
        assert refused.status == "error" and "Budget exhausted" in refused.content
        assert "not run" in refused.content
    assert stream.receipt.units == 2
