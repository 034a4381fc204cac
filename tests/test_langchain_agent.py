"""End to end: a real LangChain/LangGraph agent loop, driven by a scripted chat model, opens a
payment stream, calls a paid tool many times, checks and closes the stream; the sandbox ledger
shows the exact amounts. Plus ``@metered`` under ``@tool``, and the example program."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from decimal import Decimal
from pathlib import Path

import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from pf_metered.decorators import metered
from pf_metered.errors import BudgetExhausted, InvalidInput
from pf_metered.langchain import Caps, MeteredCallbackHandler, PurpleFleaToolkit, pay_per_call
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.stream import AsyncPaymentStream, PaymentStream

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "langchain_agent.py"


def _agent(model, tools):
    from langgraph.prebuilt import create_react_agent

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_react_agent(model, tools)


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def _stream_id(messages) -> str:
    for m in reversed(messages):
        if isinstance(m, ToolMessage) and m.name == "stream_open" and m.status != "error":
            return json.loads(m.content)["stream_id"]
    raise AssertionError("no stream opened")


def _script(provider: str, calls: int, per_message: int):
    steps = [
        AIMessage(
            "",
            tool_calls=[
                tool_call(
                    "stream_open",
                    provider=provider,
                    rate="1000",
                    budget="1.5",
                    max_units=1,
                    batch=4,
                    escrow_override=True,
                )
            ],
        ),
        AIMessage(
            "",
            tool_calls=[
                tool_call("stream_open", provider=provider, rate="0.02", budget="1.50", batch=4)
            ],
        ),
    ]
    cities = [f"city{i}" for i in range(calls)]
    steps += [
        AIMessage(
            "", tool_calls=[tool_call("weather", city=c) for c in cities[i : i + per_message]]
        )
        for i in range(0, calls, per_message)
    ]
    steps.append(
        lambda ms: AIMessage("", tool_calls=[tool_call("stream_status", stream_id=_stream_id(ms))])
    )
    steps.append(
        lambda ms: AIMessage("", tool_calls=[tool_call("stream_close", stream_id=_stream_id(ms))])
    )
    steps.append("All done.")
    return steps


def test_agent_loop_pays_exactly(pf_world):
    provider = pf_world.provider.agent_id
    toolkit = PurpleFleaToolkit(
        client=pf_world.client, caps=Caps(max_budget="2", max_rate="0.05"), allowed=["stream"]
    )
    tools = [
        *toolkit.get_tools(),
        pay_per_call(weather, context=toolkit.tool_context, provider=provider),
    ]
    model = ScriptedChatModel(script=_script(provider, calls=30, per_message=5))
    result = _agent(model, tools).invoke(
        {"messages": [("human", "weather for 30 cities")]}, {"recursion_limit": 50}
    )
    messages = result["messages"]
    by_name: dict[str, list[ToolMessage]] = {}
    for m in messages:
        if isinstance(m, ToolMessage):
            by_name.setdefault(m.name, []).append(m)
    first_open, second_open = by_name["stream_open"]
    assert first_open.status == "error" and "escrow_override: not an argument" in first_open.content
    assert second_open.status != "error"
    assert len(by_name["weather"]) == 30 and all(m.status != "error" for m in by_name["weather"])
    status = json.loads(by_name["stream_status"][0].content)
    assert status["units"] == 30 and status["units_left"] == 45
    receipt = json.loads(by_name["stream_close"][0].content)
    assert receipt["paid"] == "0.60" and receipt["refunded"] == "0.90"
    assert receipt["fee"] == "0.006" and receipt["provider_net"] == "0.594"
    assert messages[-1].content == "All done."
    # the ledger agrees to the micro-USDC
    assert pf_world.balance() == Decimal("99.40")
    assert pf_world.balance("provider") == Decimal("0.594")
    assert pf_world.sandbox.fees() == Decimal("0.006")
    escrow = pf_world.sandbox.escrow(receipt["escrow_id"])
    assert escrow.released == Decimal("0.60") and escrow.refunded == Decimal("0.90")
    pf_world.sandbox.audit()


async def test_async_agent_loop_with_token_metering_while_streaming(pf_world):
    provider = pf_world.provider.agent_id
    host = pf_world.sandbox.add_agent()
    toolkit = PurpleFleaToolkit(async_client=pf_world.aclient, caps=Caps(max_budget="2"))
    tools = [
        *toolkit.get_tools(),
        pay_per_call(weather, context=toolkit.tool_context, provider=provider),
    ]
    model = ScriptedChatModel(script=_script(provider, calls=12, per_message=4))
    async with AsyncPaymentStream(
        pf_world.aclient, host.agent_id, "0.0001", budget="1", batch=100
    ) as llm:
        handler = MeteredCallbackHandler(llm, unit="token")
        agent = _agent(model, tools)
        final = None
        async for _mode, chunk in agent.astream(
            {"messages": [("human", "weather please")]},
            {"callbacks": [handler], "recursion_limit": 50},
            stream_mode=["messages", "values"],
        ):
            if _mode == "values":
                final = chunk
    ai = [m for m in final["messages"] if isinstance(m, AIMessage)]
    reported = sum(m.usage_metadata["total_tokens"] for m in ai)
    assert reported > 0
    assert handler.calls == len(ai) == model.calls
    assert handler.input_tokens + handler.output_tokens == reported
    assert llm.receipt.units == reported
    assert llm.receipt.paid == Decimal("0.0001") * reported
    closed = [
        m for m in final["messages"] if isinstance(m, ToolMessage) and m.name == "stream_close"
    ]
    assert json.loads(closed[0].content)["paid"] == "0.24"
    assert pf_world.balance("provider") == Decimal("0.2376")
    assert pf_world.balance() == Decimal(100) - Decimal("0.24") - llm.receipt.paid
    await pf_world.aclient.aclose()


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
    result = _agent(model, toolkit.get_tools()).invoke({"messages": [("human", "spend")]})
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    ok = [m for m in answers if m.status != "error"]
    assert len(answers) == 10 and len(ok) == 2
    assert pf_world.balance() == Decimal("98")
    assert toolkit.tool_context.locked_micro == 2_000_000
    for m in answers:
        if m.status == "error":
            assert "Cap exceeded" in m.content or "Invalid arguments" in m.content, m.content


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


# -- the example ---------------------------------------------------------------------------


def _load_example():
    spec = importlib.util.spec_from_file_location("langchain_agent_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_run_shows_exact_ledger(monkeypatch):
    for var in ("PF_API_KEY", "PF_LLM"):
        monkeypatch.delenv(var, raising=False)
    summary = _load_example().run(verbose=False)
    assert summary["tool_errors"] == 3
    assert summary["price_calls"] == summary["stream_units"] == 12
    assert summary["paid"] == Decimal("0.12") and summary["refunded"] == Decimal("0.88")
    assert summary["provider_balance"] == Decimal("0.1188")
    assert summary["llm_tokens"] > 0
    assert summary["llm_paid"] == Decimal("0.00001") * summary["llm_tokens"]
    assert summary["payer_spent"] == Decimal("0.12") + summary["llm_paid"]


def test_example_runs_as_a_program():
    env = {k: v for k, v in os.environ.items() if k not in ("PF_API_KEY", "PF_LLM")}
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "provider net" in done.stdout and "0.1188 USDC" in done.stdout
    assert "Cap exceeded" in done.stdout
