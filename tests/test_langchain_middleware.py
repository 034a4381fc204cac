"""``MeteredMiddleware`` inside real ``langchain.agents.create_agent`` loops.

A scripted tool-calling chat model (``ScriptedChatModel``: ``bind_tools``, ``usage_metadata``
on ``invoke`` and on the last streamed chunk) drives the agent; the payment stream is a real
one on the embedded Sandbox, and every figure is checked against the sandbox ledger: the
escrow released exactly rate × units, the provider got that less the 1% fee, and the payer the
rest back. A run whose budget runs out ends with an ``AIMessage`` saying why and does not
raise (``exit_behavior="end"``), or raises ``BudgetExhausted`` (``"error"``).
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import ToolException, tool

from pf_metered.errors import BudgetExhausted, InvalidInput
from pf_metered.langchain import MeteredMiddleware
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.stream import AsyncPaymentStream, PaymentStream

FEE = Decimal("0.01")


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


@tool
def broken(city: str) -> str:
    """A tool that always fails (its answer is an error ToolMessage)."""
    raise ToolException(f"no data for {city}")


broken.handle_tool_error = True


def _script(calls: int) -> list[AIMessage | str]:
    """``calls`` answers that each ask for one weather lookup, then a final text."""
    return [AIMessage("", tool_calls=[tool_call("weather", city=f"c{i}")]) for i in range(calls)]


def _model_answers(messages) -> list[AIMessage]:
    """The AIMessages the model itself produced (they carry usage_metadata)."""
    return [m for m in messages if isinstance(m, AIMessage) and m.usage_metadata]


def _check_ledger(world, receipt, rate: str, units: int, spent_before=Decimal(0)) -> None:
    paid = Decimal(rate) * units
    assert receipt.units == units
    assert receipt.paid == paid
    escrow = world.sandbox.escrow(receipt.escrow_id)
    assert escrow.released == paid
    assert escrow.refunded == receipt.budget - paid
    assert world.balance("provider") == paid - paid * FEE
    assert world.balance() == Decimal(100) - spent_before - paid
    world.sandbox.audit()


def test_sync_invoke_pays_per_model_call_and_per_tool_call(pf_world):
    model = ScriptedChatModel(script=_script(3))
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.01", budget="1", batch=4
    ) as stream:
        meter = MeteredMiddleware(stream, per="call", tools={"weather": 2})
        agent = create_agent(model, [weather], middleware=[meter])
        result = agent.invoke({"messages": [("human", "weather in three cities")]})
    messages = result["messages"]
    assert messages[-1].content == "Done."
    tools_ok = [m for m in messages if isinstance(m, ToolMessage) and m.status != "error"]
    assert len(tools_ok) == 3
    assert model.calls == 4 and meter.model_calls == 4 and meter.tool_calls == 3
    # 4 model calls × 1 unit + 3 weather calls × 2 units = 10 units of 0.01
    _check_ledger(pf_world, stream.receipt, "0.01", 10)
    assert stream.receipt.paid == Decimal("0.10")


def test_sync_budget_runs_out_ends_the_run_with_a_message(pf_world):
    model = ScriptedChatModel(script=_script(6))
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.5", max_units=3, batch=2
    ) as stream:
        meter = MeteredMiddleware(stream)
        agent = create_agent(model, [weather], middleware=[meter])
        result = agent.invoke({"messages": [("human", "weather everywhere")]})
    last = result["messages"][-1]
    assert isinstance(last, AIMessage) and not last.tool_calls
    assert last.content.startswith("Budget exhausted")
    assert "0 more unit(s) at 0.5 USDC" in last.content
    assert model.calls == 3  # the fourth call was refused before the model ran
    tools_ran = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert len(tools_ran) == 3
    _check_ledger(pf_world, stream.receipt, "0.5", 3)
    assert stream.receipt.paid == Decimal("1.50") and stream.receipt.refunded == 0


def test_exit_behavior_error_raises_budget_exhausted(pf_world):
    model = ScriptedChatModel(script=_script(6))
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.5", max_units=2, batch=2
    ) as stream:
        meter = MeteredMiddleware(stream, exit_behavior="error")
        agent = create_agent(model, [weather], middleware=[meter])
        with pytest.raises(BudgetExhausted, match="Budget exhausted"):
            agent.invoke({"messages": [("human", "weather everywhere")]})
    assert model.calls == 2
    _check_ledger(pf_world, stream.receipt, "0.5", 2)


def test_tool_batch_the_budget_cannot_pay_runs_no_tool(pf_world):
    # one model call (1 unit), then an answer asking for 3 weather calls at 2 units each
    # while only 4 units are left: none runs, each gets an error ToolMessage, the run ends
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[tool_call("weather", city=c) for c in "xyz"])]
    )
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.2", max_units=5, batch=10
    ) as stream:
        meter = MeteredMiddleware(stream, tools={"weather": "0.4"})
        agent = create_agent(model, [weather], middleware=[meter])
        result = agent.invoke({"messages": [("human", "three cities")]})
    messages = result["messages"]
    stopped = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(stopped) == 3 and all(m.status == "error" for m in stopped)
    assert all("Not run" in m.content for m in stopped)
    assert messages[-1].content.startswith("Budget exhausted")
    assert "(weather, weather, weather) needs 6" in messages[-1].content
    assert meter.tool_calls == 0 and model.calls == 1
    _check_ledger(pf_world, stream.receipt, "0.2", 1)


def test_a_failed_tool_call_costs_nothing(pf_world):
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("broken", city="x")]),
            AIMessage("", tool_calls=[tool_call("weather", city="y")]),
        ]
    )
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.01", budget="1", batch=10
    ) as stream:
        meter = MeteredMiddleware(stream, tools="all")
        agent = create_agent(model, [weather, broken], middleware=[meter])
        result = agent.invoke({"messages": [("human", "go")]})
    answers = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [m.status for m in answers] == ["error", "success"]
    # 3 model calls + 1 successful tool call; the failed one was given back
    assert meter.tool_calls == 1
    _check_ledger(pf_world, stream.receipt, "0.01", 4)


async def test_async_ainvoke_pays_per_token_from_usage_metadata(pf_world):
    model = ScriptedChatModel(script=_script(3))
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.0001", budget="1", batch=50
    ) as stream:
        meter = MeteredMiddleware(stream, per="token", tools={"weather": 100})
        agent = create_agent(model, [weather], middleware=[meter])
        result = await agent.ainvoke({"messages": [("human", "weather in three cities")]})
    answers = _model_answers(result["messages"])
    reported = sum(m.usage_metadata["total_tokens"] for m in answers)
    assert len(answers) == model.calls == meter.model_calls == 4
    assert reported > 0 and meter.unpaid_units == 0
    # tokens of every answer + 3 weather calls × 100 units
    _check_ledger(pf_world, stream.receipt, "0.0001", reported + 300)
    await pf_world.aclient.aclose()


async def test_async_token_budget_runs_out_ends_cleanly(pf_world):
    model = ScriptedChatModel(script=_script(50))
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.01", max_units=150, batch=1000
    ) as stream:
        meter = MeteredMiddleware(stream, per="token", reserve_tokens=5)
        agent = create_agent(model, [weather], middleware=[meter])
        result = await agent.ainvoke(
            {"messages": [("human", "weather everywhere")]}, {"recursion_limit": 200}
        )
    last = result["messages"][-1]
    assert isinstance(last, AIMessage) and last.content.startswith("Budget exhausted")
    answers = _model_answers(result["messages"])
    reported = sum(m.usage_metadata["total_tokens"] for m in answers)
    assert model.calls == len(answers) < 50
    # the budget pays what it can of the last answer, never more; the rest is reported
    assert reported > 150
    assert meter.unpaid_units == reported - stream.receipt.units
    assert stream.receipt.units <= 150
    assert stream.receipt.units > 150 - 5  # the next call was refused: < 5 tokens left
    _check_ledger(pf_world, stream.receipt, "0.01", stream.receipt.units)
    await pf_world.aclient.aclose()


def test_sync_stream_messages_mode_pays_per_token(pf_world):
    model = ScriptedChatModel(script=_script(2))
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.0001", budget="1", batch=50
    ) as stream:
        meter = MeteredMiddleware(stream, per="token")
        agent = create_agent(model, [weather], middleware=[meter])
        chunks = 0
        final = None
        for mode, item in agent.stream(
            {"messages": [("human", "weather please")]}, stream_mode=["messages", "values"]
        ):
            if mode == "messages":
                chunks += 1
            else:
                final = item
    assert chunks > 0 and final is not None
    answers = _model_answers(final["messages"])
    reported = sum(m.usage_metadata["total_tokens"] for m in answers)
    assert len(answers) == model.calls == 3 and reported > 0
    _check_ledger(pf_world, stream.receipt, "0.0001", reported)


async def test_async_stream_messages_mode_budget_ends_cleanly(pf_world):
    model = ScriptedChatModel(script=_script(10))
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.5", max_units=2, batch=1
    ) as stream:
        meter = MeteredMiddleware(stream, per="call")
        agent = create_agent(model, [weather], middleware=[meter])
        texts = []
        async for message, _meta in agent.astream(
            {"messages": [("human", "weather")]}, stream_mode="messages"
        ):
            texts.append(message.content)
    assert any(str(t).startswith("Budget exhausted") for t in texts)
    assert model.calls == 2
    _check_ledger(pf_world, stream.receipt, "0.5", 2)
    await pf_world.aclient.aclose()


def test_bad_configuration_names_the_field(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.03", budget="1") as s:
        with pytest.raises(InvalidInput) as caught:
            MeteredMiddleware(s, tools={"weather": "0.05"})
        assert caught.value.field == "tools['weather']"
        with pytest.raises(InvalidInput) as caught:
            MeteredMiddleware(s, tools={"weather": 0})
        assert caught.value.field == "tools['weather']"
        with pytest.raises(InvalidInput) as caught:
            MeteredMiddleware(s, per="second")  # type: ignore[arg-type]
        assert caught.value.field == "per"
        with pytest.raises(InvalidInput) as caught:
            MeteredMiddleware(s, exit_behavior="continue")  # type: ignore[arg-type]
        assert caught.value.field == "exit_behavior"
        assert MeteredMiddleware(s, tools={"weather": "0.09"}).tool_units("weather") == 3
    with pytest.raises(InvalidInput) as caught:
        MeteredMiddleware(object())  # type: ignore[arg-type]
    assert caught.value.field == "stream"


def test_example_program_two_conversations_with_their_own_budgets():
    """examples/langchain_middleware.py, run as a user would (own process, sandbox, no key)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("PF_API_KEY", "PF_PROVIDER_ID")}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "langchain_middleware.py")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=root,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    pairs = (line.split(" : ", 1) for line in proc.stdout.splitlines() if " : " in line)
    lines = {key.strip(): value.strip() for key, value in pairs}
    # alice asks one price per run: 2 model calls (1 unit) + 1 lookup (2 units) = 4 units
    assert lines["alice run 1"].startswith("4 units, 0.04 USDC (2 model calls, 1 tool calls), 96")
    assert lines["alice run 1 said"] == "BTC costs 1087 USD."
    # bob asks for every price: 1.00 USDC at 0.01 = 100 units = 34 model calls + 33 lookups
    assert lines["bob run 1"] == "100 units, 1.00 USDC (34 model calls, 33 tool calls), 0 left"
    assert lines["bob run 1 said"].startswith("Budget exhausted")
    # bob's spent budget leaves alice's conversation (same stream, 4 more units) untouched
    assert lines["alice run 2"].endswith("(2 model calls, 1 tool calls), 92 left")
    assert lines["bob run 2"].startswith("0 units, 0.00 USDC")
    assert "the next model call needs 1" in lines["bob run 2 said"]
    assert lines["alice receipt"] == "8 units, 0.08 paid, 0.92 refunded"
    assert lines["bob receipt"] == "100 units, 1.00 paid, 0.00 refunded"
    # 1.08 released to the provider, less the 1% fee
    assert lines["provider balance"] == "1.0692 USDC"
    assert lines["payer balance"] == "98.92 USDC"
