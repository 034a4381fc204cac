"""``MeteredMiddleware``'s streams: opened per run or per thread, from the runtime context, in
state, stacked with the stock limit middlewares, in every way an agent runs.

Every figure is read back from the embedded Sandbox's ledger: each escrow released exactly
rate × units billed, the provider got that less the 1% fee (half-up to the micro-USDC), the
payer was refunded the rest of the budget, and the sandbox's books balance (``audit``).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import (
    AgentMiddleware,
    ModelCallLimitMiddleware,
    ToolCallLimitMiddleware,
)
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from pf_metered.errors import BudgetExhausted, ConfigError, InvalidInput
from pf_metered.langchain import MeteredMiddleware
from pf_metered.langchain.middleware import MeterConfigError
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.money import fee_micro, micro_to_decimal
from pf_metered.stream import AsyncPaymentStream, PaymentStream

NAME = "MeteredMiddleware"


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def _asks(calls: int) -> list[Any]:
    return [AIMessage("", tool_calls=[tool_call("weather", city=f"c{i}")]) for i in range(calls)]


def _bill(state: dict[str, Any], name: str = NAME) -> dict[str, Any]:
    return state["pf_metered"][name]


def _paid(rate: str, units: int) -> Decimal:
    return Decimal(rate) * units


def _check_escrow(world: Any, escrow_id: str, rate: str, units: int, budget: str) -> None:
    """The escrow released rate × units and refunded the rest of its budget."""
    escrow = world.sandbox.escrow(escrow_id)
    assert escrow.released == _paid(rate, units)
    assert escrow.refunded == Decimal(budget) - _paid(rate, units)
    assert escrow.remaining == 0


def _check_totals(world: Any, paid: Decimal, *, releases: list[Decimal] | None = None) -> None:
    """The payer lost exactly what was paid; the provider got it less the fee."""
    fee = sum(
        (micro_to_decimal(fee_micro(int(p * 1_000_000))) for p in (releases or [paid])),
        Decimal(0),
    )
    assert world.balance() == Decimal("100.00") - paid
    assert world.balance("provider") == paid - fee
    world.sandbox.audit()


def _sync_opener(world: Any, rate: str, budget: str, opened: list[PaymentStream]) -> Any:
    def factory(key: str) -> PaymentStream:
        stream = PaymentStream(
            world.client, world.provider.agent_id, rate, budget=budget, batch=5, memo=key[:20]
        )
        opened.append(stream)
        return stream

    return factory


# ----------------------------------------------------------------- one stream per run


def test_per_run_streams_are_opened_closed_and_their_receipts_put_in_state(pf_world):
    opened: list[PaymentStream] = []
    model = ScriptedChatModel(script=_asks(2))  # run 1: 3 model calls; run 2: 1
    meter = MeteredMiddleware(
        open_stream=_sync_opener(pf_world, "0.01", "1.00", opened), tools={"weather": 2}
    )
    agent = create_agent(model, [weather], middleware=[meter])
    first = agent.invoke({"messages": [("human", "two cities")]})
    second = agent.invoke({"messages": [("human", "hello")]})
    assert len(opened) == 2 and all(s.closed for s in opened)
    assert meter.open_streams() == {}
    one, two = _bill(first), _bill(second)
    # run 1: 3 model calls × 1 + 2 weather calls × 2 = 7 units; run 2: 1 model call
    assert (one["model_calls"], one["tool_calls"], one["units"]) == (3, 2, 7)
    assert (two["model_calls"], two["tool_calls"], two["units"]) == (1, 0, 1)
    assert one["cost"] == "0.07" and one["closed"] and one["source"] == "opened"
    assert one["receipt"]["units"] == 7 and one["receipt"]["paid"] == "0.07"
    assert one["receipt"]["refunded"] == "0.93" and one["receipt"]["provider_net"] == "0.0693"
    assert two["receipt"]["paid"] == "0.01" and one["stream_id"] != two["stream_id"]
    assert one["stopped"] is None
    _check_escrow(pf_world, one["escrow_id"], "0.01", 7, "1.00")
    _check_escrow(pf_world, two["escrow_id"], "0.01", 1, "1.00")
    _check_totals(pf_world, Decimal("0.08"), releases=[Decimal("0.07"), Decimal("0.01")])


async def test_per_run_async_streams_on_ainvoke(pf_world):
    opened: list[AsyncPaymentStream] = []

    def factory(key: str) -> AsyncPaymentStream:
        opened.append(
            AsyncPaymentStream(pf_world.aclient, pf_world.provider.agent_id, "0.5", max_units=2)
        )
        return opened[-1]

    model = ScriptedChatModel(script=_asks(5))
    meter = MeteredMiddleware(open_stream=factory)
    agent = create_agent(model, [weather], middleware=[meter])
    state = await agent.ainvoke({"messages": [("human", "weather")]})
    bill = _bill(state)
    assert bill["stopped"].startswith("Budget exhausted") and model.calls == 2
    assert state["messages"][-1].content == bill["stopped"]
    assert bill["receipt"]["units"] == 2 and bill["receipt"]["refunded"] == "0.00"
    assert opened[0].closed and meter.open_streams() == {}
    _check_escrow(pf_world, bill["escrow_id"], "0.5", 2, "1.00")
    _check_totals(pf_world, Decimal("1.00"))
    await pf_world.aclient.aclose()


def test_error_mode_closes_the_run_stream_before_raising(pf_world):
    opened: list[PaymentStream] = []
    model = ScriptedChatModel(script=_asks(5))
    meter = MeteredMiddleware(
        open_stream=_sync_opener(pf_world, "0.25", "1.00", opened), exit_behavior="error"
    )
    agent = create_agent(model, [weather], middleware=[meter])
    with pytest.raises(BudgetExhausted, match="Budget exhausted"):
        agent.invoke({"messages": [("human", "weather")]})
    assert opened[0].closed and meter.open_streams() == {}
    receipt = opened[0].receipt
    assert receipt is not None and receipt.units == 4 and model.calls == 4
    _check_escrow(pf_world, receipt.escrow_id or "", "0.25", 4, "1.00")
    _check_totals(pf_world, Decimal("1.00"))


# -------------------------------------------------------------- one stream per thread


def test_per_thread_budgets_with_a_checkpointer_and_two_threads(pf_world):
    opened: list[PaymentStream] = []
    model = ScriptedChatModel()  # every call answers "Done.": one model call per run
    meter = MeteredMiddleware(
        open_stream=_sync_opener(pf_world, "0.25", "1.00", opened), budget_per="thread"
    )
    agent = create_agent(model, [weather], middleware=[meter], checkpointer=InMemorySaver())
    a = {"configurable": {"thread_id": "alice"}}
    b = {"configurable": {"thread_id": "bob"}}

    bills = []
    for config in (a, a, b, a, a):  # alice: four runs (4 units = her budget); bob: one
        state = agent.invoke({"messages": [("human", "hi")]}, config)
        bills.append(_bill(state))
    assert [x["units"] for x in bills] == [1, 1, 1, 1, 1]
    assert [x["units_left"] for x in bills] == [3, 2, 3, 1, 0]
    assert len(opened) == 2 and not any(s.closed for s in opened)  # open across runs
    assert bills[0]["stream_id"] == bills[1]["stream_id"] == bills[4]["stream_id"]
    assert bills[2]["stream_id"] != bills[0]["stream_id"]
    assert all(x["receipt"] is None and not x["closed"] for x in bills)
    assert set(meter.open_streams()) == {"alice", "bob"}

    # alice's fifth run is refused before the model runs; bob's thread is untouched
    calls = model.calls
    refused = agent.invoke({"messages": [("human", "more")]}, a)
    assert model.calls == calls
    assert refused["messages"][-1].content.startswith("Budget exhausted")
    assert "This thread's budget is spent" in refused["messages"][-1].content
    assert _bill(refused)["units"] == 0 and _bill(refused)["stopped"]
    again = agent.invoke({"messages": [("human", "hi")]}, b)
    assert _bill(again)["units"] == 1 and _bill(again)["units_left"] == 2
    # the thread's history is checkpointed: alice's thread holds all her turns
    assert len(refused["messages"]) == 2 * 5

    alice = meter.close_thread("alice")
    assert alice is not None and alice.units == 4 and alice.paid == Decimal("1.00")
    assert meter.close_thread("alice") is None
    (bob,) = meter.close_all()
    assert bob.units == 2 and meter.open_streams() == {}
    _check_escrow(pf_world, alice.escrow_id or "", "0.25", 4, "1.00")
    _check_escrow(pf_world, bob.escrow_id or "", "0.25", 2, "1.00")
    _check_totals(pf_world, Decimal("1.50"), releases=[Decimal("1.00"), Decimal("0.50")])


async def test_per_thread_async_streams_on_astream_messages(pf_world):
    def factory(thread_id: str) -> AsyncPaymentStream:
        return AsyncPaymentStream(
            pf_world.aclient, pf_world.provider.agent_id, "0.001", budget="1.00", batch=20
        )

    model = ScriptedChatModel(script=_asks(1))
    meter = MeteredMiddleware(open_stream=factory, budget_per="thread", per="token")
    agent = create_agent(model, [weather], middleware=[meter], checkpointer=InMemorySaver())
    reported = {"t1": 0, "t2": 0}
    for thread in ("t1", "t2", "t1"):
        config = {"configurable": {"thread_id": thread}}
        final = None
        async for mode, item in agent.astream(
            {"messages": [("human", "weather")]}, config, stream_mode=["messages", "values"]
        ):
            if mode == "values":
                final = item
        assert final is not None
    for thread in reported:
        state = await agent.aget_state({"configurable": {"thread_id": thread}})
        reported[thread] = sum(
            m.usage_metadata["total_tokens"]
            for m in state.values["messages"]
            if isinstance(m, AIMessage) and m.usage_metadata
        )
    assert reported["t1"] > 0 and reported["t2"] > 0
    streams = {thread: s.stream_id for thread, s in meter.open_streams().items()}
    assert set(streams) == {"t1", "t2"}  # t1's second run used t1's stream again
    receipts = {r.stream_id: r for r in await meter.aclose_all()}
    assert {t: receipts[streams[t]].units for t in streams} == reported
    total = sum(reported.values())
    _check_totals(
        pf_world,
        _paid("0.001", total),
        releases=[_paid("0.001", reported["t1"]), _paid("0.001", reported["t2"])],
    )
    await pf_world.aclient.aclose()


def test_per_thread_needs_a_thread_id(pf_world):
    meter = MeteredMiddleware(
        open_stream=_sync_opener(pf_world, "0.01", "1", []), budget_per="thread"
    )
    agent = create_agent(ScriptedChatModel(), [weather], middleware=[meter])
    with pytest.raises(MeterConfigError, match="thread_id") as caught:
        agent.invoke({"messages": [("human", "hi")]})
    assert caught.value.field == "budget_per"


# --------------------------------------------------------------- from the run's context


@dataclass
class Payer:
    user: str
    payment: PaymentStream


def test_each_run_pays_from_the_stream_its_context_brings(pf_world):
    model = ScriptedChatModel(script=_asks(1))
    meter = MeteredMiddleware(context_field="payment", rate="0.01", tools={"weather": "0.03"})
    agent = create_agent(model, [weather], middleware=[meter], context_schema=Payer)
    with (
        PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as ann,
        PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as ben,
    ):
        first = agent.invoke({"messages": [("human", "w")]}, context=Payer("ann", ann))
        second = agent.invoke({"messages": [("human", "w")]}, context=Payer("ben", ben))
        assert _bill(first)["source"] == "context" and not _bill(first)["closed"]
    # ann: 2 model calls + 1 weather at 3 units; ben: 1 model call
    assert ann.receipt is not None and ann.receipt.units == 5
    assert ben.receipt is not None and ben.receipt.units == 1
    assert _bill(first)["units"] == 5 and _bill(second)["units"] == 1
    assert _bill(first)["receipt"] is None  # the program owns it: it closed it
    _check_totals(pf_world, Decimal("0.06"), releases=[Decimal("0.05"), Decimal("0.01")])


def test_a_context_without_the_stream_or_at_another_rate_is_a_config_error(pf_world):
    meter = MeteredMiddleware(context_field="payment", rate="0.02", tools={"weather": "0.04"})
    agent = create_agent(ScriptedChatModel(), [weather], middleware=[meter], context_schema=Payer)
    with pytest.raises(MeterConfigError) as caught:
        agent.invoke({"messages": [("human", "w")]}, context=Payer("x", None))
    assert caught.value.field == "context_field" and "'payment'" in str(caught.value)
    with (
        PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s,
        pytest.raises(MeterConfigError) as caught,
    ):
        agent.invoke({"messages": [("human", "w")]}, context=Payer("x", s))
    assert caught.value.field == "rate" and "0.01" in str(caught.value)
    assert s.receipt is not None and s.receipt.units == 0


# ---------------------------------------------------------- input and output tokens apart


async def test_input_and_output_tokens_priced_apart(pf_world):
    model = ScriptedChatModel(script=_asks(2))
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.000002", budget="1", batch=100
    ) as stream:
        meter = MeteredMiddleware(
            stream, per="token", token_prices={"input": "0.000002", "output": 4}
        )
        agent = create_agent(model, [weather], middleware=[meter])
        state = await agent.ainvoke({"messages": [("human", "two cities please")]})
    answers = [m for m in state["messages"] if isinstance(m, AIMessage) and m.usage_metadata]
    tokens_in = sum(m.usage_metadata["input_tokens"] for m in answers)
    tokens_out = sum(m.usage_metadata["output_tokens"] for m in answers)
    assert len(answers) == 3 and tokens_in > 0 and tokens_out > 0
    units = tokens_in * 1 + tokens_out * 4
    assert stream.receipt is not None and stream.receipt.units == units
    assert _bill(state)["units"] == units
    assert Decimal(_bill(state)["cost"]) == _paid("0.000002", units)
    _check_escrow(pf_world, stream.receipt.escrow_id or "", "0.000002", units, "1")
    _check_totals(pf_world, _paid("0.000002", units))
    await pf_world.aclient.aclose()


# ------------------------------------------------------ a tool call refused as it starts


class SpendsFirst(AgentMiddleware):
    """Another user of the shared stream spends it just before each tool call starts."""

    def __init__(self, stream: PaymentStream, units: int) -> None:
        super().__init__()
        self.stream, self.units = stream, units

    def wrap_tool_call(self, request: Any, handler: Any) -> Any:
        self.stream.record(self.units)
        return handler(request)


@pytest.mark.parametrize("exit_behavior", ["end", "error"])
def test_a_tool_call_refused_as_it_starts_ends_the_run(pf_world, exit_behavior):
    model = ScriptedChatModel(script=_asks(3))
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.1", max_units=10, batch=100
    ) as stream:
        meter = MeteredMiddleware(stream, tools={"weather": 3}, exit_behavior=exit_behavior)
        # after_model sees 9 units left for a 3-unit call; then 7 are spent before it starts
        agent = create_agent(model, [weather], middleware=[SpendsFirst(stream, 7), meter])
        if exit_behavior == "error":
            with pytest.raises(BudgetExhausted, match="the tool call weather needs 3"):
                agent.invoke({"messages": [("human", "weather")]})
            state = None
        else:
            state = agent.invoke({"messages": [("human", "weather")]})
    assert model.calls == 1  # the run ended before the next model call
    if state is not None:
        refused = [m for m in state["messages"] if isinstance(m, ToolMessage)]
        assert len(refused) == 1 and refused[0].status == "error"
        assert "the tool call weather needs 3" in refused[0].content
        assert state["messages"][-1].content == refused[0].content
        assert _bill(state)["tool_calls"] == 0 and _bill(state)["stopped"]
    # 1 model call + the 7 units the other user spent; the refused call paid nothing
    assert stream.receipt is not None and stream.receipt.units == 8
    _check_totals(pf_world, Decimal("0.8"))


# ------------------------------------------------------ stacked with the stock limits


@pytest.mark.parametrize("ours_first", [True, False])
def test_stacks_with_model_call_limit_in_either_order(pf_world, ours_first):
    model = ScriptedChatModel(script=_asks(5))
    limit = ModelCallLimitMiddleware(run_limit=2, exit_behavior="end")
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        meter = MeteredMiddleware(s, tools="all")
        stack: list[Any] = [meter, limit] if ours_first else [limit, meter]
        state = agent_state = create_agent(model, [weather], middleware=stack).invoke(
            {"messages": [("human", "weather")]}
        )
    assert model.calls == 2 and meter.model_calls == 2 and meter.tool_calls == 2
    assert "limit" in agent_state["messages"][-1].content.lower()
    assert _bill(state)["units"] == 4 and _bill(state)["stopped"] is None
    assert s.receipt is not None and s.receipt.units == 4
    _check_totals(pf_world, Decimal("0.04"))


@pytest.mark.parametrize("ours_first", [True, False])
@pytest.mark.parametrize("limit_exit", ["continue", "end"])
def test_stacks_with_tool_call_limit_in_either_order(pf_world, ours_first, limit_exit):
    # one answer asking for three weather calls; the limit lets one run per run
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[tool_call("weather", city=c) for c in "xyz"])]
    )
    limit = ToolCallLimitMiddleware(run_limit=1, exit_behavior=limit_exit)
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        meter = MeteredMiddleware(s, tools={"weather": 5})
        stack: list[Any] = [meter, limit] if ours_first else [limit, meter]
        state = create_agent(model, [weather], middleware=stack).invoke(
            {"messages": [("human", "three cities")]}
        )
    answers = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert len(answers) == 3  # one per call: none answered twice, none left unanswered
    assert len({m.tool_call_id for m in answers}) == 3
    ran = [m for m in answers if m.status != "error"]
    if limit_exit == "continue":  # one runs, the model hears about the two others and ends
        assert len(ran) == 1 and model.calls == 2
        units = 2 + 5
    else:  # the limit ends the run before any tool runs
        assert ran == [] and model.calls == 1
        units = 1
    assert meter.tool_calls == len(ran) and _bill(state)["units"] == units
    assert s.receipt is not None and s.receipt.units == units
    _check_totals(pf_world, _paid("0.01", units))


# ---------------------------------------------- every way to run × every way to price


def _drive(
    agent: Any, how: str, inputs: dict[str, Any], aclients: list[Any]
) -> tuple[dict[str, Any], int]:
    """Run the agent as ``how`` says; the final state and the number of messages streamed.
    Async runs close the async clients their streams used, on their own loop."""
    if how == "invoke":
        return agent.invoke(inputs), 0
    if how == "stream":
        final, chunks = None, 0
        for mode, item in agent.stream(inputs, stream_mode=["messages", "values"]):
            chunks += mode == "messages"
            final = item if mode == "values" else final
        assert final is not None
        return final, chunks

    async def run() -> tuple[dict[str, Any], int]:
        try:
            if how == "ainvoke":
                return await agent.ainvoke(inputs), 0
            final, chunks = None, 0
            async for mode, item in agent.astream(inputs, stream_mode=["messages", "values"]):
                chunks += mode == "messages"
                final = item if mode == "values" else final
            assert final is not None
            return final, chunks
        finally:
            for client in aclients:
                await client.aclose()

    return asyncio.run(run())


PRICINGS: dict[str, dict[str, Any]] = {
    "per-call": {"per": "call"},
    "per-token": {"per": "token", "token_prices": {"input": 1, "output": 3}, "reserve_tokens": 20},
    "tool-call": {"meter_model": False, "tools": {"weather": 5}},
}


def expected_units(pricing: str, state: dict[str, Any]) -> int:
    """What the run should cost, from its own messages (the model's usage reports)."""
    answers = [m for m in state["messages"] if isinstance(m, AIMessage) and m.usage_metadata]
    tools_ran = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    if pricing == "per-call":
        return len(answers)
    if pricing == "per-token":
        return sum(
            m.usage_metadata["input_tokens"] + 3 * m.usage_metadata["output_tokens"]
            for m in answers
        )
    return 5 * len(tools_ran)


def run_case(world: Any, how: str, pricing: str) -> dict[str, Any]:
    """One agent run on a stream the middleware opens for it (sync streams for sync runs,
    async for async); its bill, the units its messages account for, and what it streamed.
    The model asks for three lookups at once (run in parallel), then one more."""
    asynchronous = how.startswith("a")
    aclients: list[Any] = []

    def factory(key: str) -> PaymentStream | AsyncPaymentStream:
        if not asynchronous:
            return PaymentStream(
                world.client, world.provider.agent_id, "0.001", budget="1.00", batch=25
            )
        aclients.append(world.sandbox.async_client(world.payer.api_key))
        return AsyncPaymentStream(
            aclients[-1], world.provider.agent_id, "0.001", budget="1.00", batch=25
        )

    batch = AIMessage("", tool_calls=[tool_call("weather", city=c) for c in ("x", "y", "z")])
    model = ScriptedChatModel(script=[batch, *_asks(1)])
    meter = MeteredMiddleware(open_stream=factory, **PRICINGS[pricing])
    agent = create_agent(model, [weather], middleware=[meter])
    state, chunks = _drive(
        agent, how, {"messages": [("human", "weather in four cities")]}, aclients
    )
    bill = _bill(state)
    return {"bill": bill, "expected": expected_units(pricing, state), "chunks": chunks}


@pytest.mark.parametrize("pricing", list(PRICINGS))
@pytest.mark.parametrize("how", ["invoke", "ainvoke", "stream", "astream"])
def test_every_mode_and_pricing_bills_exactly_on_the_ledger(pf_world, how, pricing):
    case = run_case(pf_world, how, pricing)
    bill, units = case["bill"], case["expected"]
    assert units > 0 and bill["units"] == units and bill["unpaid_units"] == 0
    assert bill["receipt"]["units"] == units
    assert (case["chunks"] > 0) == how.endswith("stream")
    if pricing == "per-call":
        assert units == 3
    if pricing == "tool-call":
        assert units == 20  # 4 lookups × 5 units, three of them in parallel
    paid = _paid("0.001", units)
    assert Decimal(bill["receipt"]["paid"]) == paid
    _check_escrow(pf_world, bill["escrow_id"], "0.001", units, "1.00")
    _check_totals(pf_world, paid)


# --------------------------------------------------------------------- configuration


def test_bad_arguments_are_config_errors_naming_the_argument(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.03", budget="1") as s:
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "stream"),
            ({"stream": s, "context_field": "payment"}, "stream"),
            ({"stream": s, "budget_per": "thread"}, "budget_per"),
            ({"stream": s, "budget_per": "user"}, "budget_per"),
            ({"stream": s, "token_prices": {"input": 1, "output": 2}}, "token_prices"),
            ({"stream": s, "per": "token", "token_prices": {"input": 1}}, "token_prices"),
            (
                {"stream": s, "per": "token", "token_prices": {"input": 1, "output": 0.5}},
                "token_prices['output']",
            ),
            (
                {"stream": s, "per": "token", "token_prices": {"input": "0.01", "output": 1}},
                "token_prices['input']",
            ),
            ({"stream": s, "rate": "0.01"}, "rate"),
            ({"stream": s, "reserve_tokens": 0}, "reserve_tokens"),
            ({"stream": s, "name": ""}, "name"),
            ({"context_field": "payment", "tools": {"weather": "0.05"}}, "tools['weather']"),
            ({"context_field": ""}, "context_field"),
            ({"open_stream": "not callable"}, "open_stream"),
            ({"context_field": "payment", "rate": 0.01}, "rate"),
        ]
        for kwargs, field in cases:
            with pytest.raises(MeterConfigError) as caught:
                MeteredMiddleware(**kwargs)
            assert caught.value.field == field, kwargs
            assert isinstance(caught.value, ConfigError | InvalidInput)
            assert field.split("[")[0] in str(caught.value)
        ok = MeteredMiddleware(s, tools={"weather": "0.09", "*": 1})
        assert ok.tool_units("weather") == 3 and ok.tool_units("other") == 1


def test_an_async_stream_factory_in_a_sync_run_is_a_config_error(pf_world):
    def factory(key: str) -> AsyncPaymentStream:
        return AsyncPaymentStream(pf_world.aclient, pf_world.provider.agent_id, "0.5", max_units=2)

    meter = MeteredMiddleware(open_stream=factory)
    agent = create_agent(ScriptedChatModel(), [weather], middleware=[meter])
    with pytest.raises(MeterConfigError, match="ainvoke/astream") as caught:
        agent.invoke({"messages": [("human", "hi")]})
    assert caught.value.field == "open_stream" and meter.open_streams() == {}
    assert pf_world.balance() == Decimal("100.00")  # nothing was locked


@pytest.mark.parametrize("ours_first", [True, False])
def test_a_tight_budget_with_tool_call_limit_counts_only_calls_that_will_run(pf_world, ours_first):
    """after_model hooks run last-listed first. Listed first, the meter checks the batch after
    the limit answered the calls it blocks, so only the call that will run is priced (5 of 9
    units left: it runs). Listed after the limit, it checks first and prices all three (15):
    the batch is refused and the run ends on the budget. README: list the meter first."""
    model = ScriptedChatModel(
        script=[AIMessage("", tool_calls=[tool_call("weather", city=c) for c in "xyz"])]
    )
    limit = ToolCallLimitMiddleware(run_limit=1, exit_behavior="continue")
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.1", max_units=10, batch=100
    ) as s:
        meter = MeteredMiddleware(s, tools={"weather": 5})
        stack: list[Any] = [meter, limit] if ours_first else [limit, meter]
        state = create_agent(model, [weather], middleware=stack).invoke(
            {"messages": [("human", "three cities")]}
        )
    answers = [m for m in state["messages"] if isinstance(m, ToolMessage)]
    assert len({m.tool_call_id for m in answers}) == len(answers) == 3
    if ours_first:
        assert meter.tool_calls == 1 and model.calls == 2 and _bill(state)["stopped"] is None
        units = 1 + 5 + 1
    else:
        assert meter.tool_calls == 0 and model.calls == 1
        assert "(weather, weather, weather) needs 15" in state["messages"][-1].content
        units = 1
    assert s.receipt is not None and s.receipt.units == units
    _check_totals(pf_world, _paid("0.1", units))


# ------------------------------------------------- what a run that did not finish leaves


@pytest.mark.parametrize("exit_behavior", ["end", "error"])
def test_a_payer_who_cannot_lock_the_budget_ends_the_run_before_the_model(exit_behavior):
    from pf_metered.errors import InsufficientFunds
    from pf_metered.sandbox import Sandbox

    sandbox = Sandbox()
    payer, provider = sandbox.add_agent(balance="0.50"), sandbox.add_agent()
    client = sandbox.client(payer.api_key)
    model = ScriptedChatModel()
    meter = MeteredMiddleware(
        open_stream=lambda key: PaymentStream(client, provider.agent_id, "0.01", budget="1.00"),
        exit_behavior=exit_behavior,
    )
    agent = create_agent(model, [weather], middleware=[meter])
    if exit_behavior == "error":
        with pytest.raises(InsufficientFunds):
            agent.invoke({"messages": [("human", "hi")]})
    else:
        state = agent.invoke({"messages": [("human", "hi")]})
        said = state["messages"][-1].content
        assert said.startswith("No payment stream could be opened") and "1.00 USDC" in said
        assert _bill(state)["stopped"] == said and _bill(state)["units_left"] == 0
        assert _bill(state)["receipt"] is None and _bill(state)["escrow_id"] is None
    assert model.calls == 0 and meter.open_streams() == {}
    assert sandbox.balance(payer.agent_id) == Decimal("0.50")
    sandbox.audit()
    client.close()
    sandbox.close()


def test_a_run_that_raises_leaves_its_stream_listed_and_close_all_pays_it(pf_world):
    """A model error ends the run before after_agent: the middleware cannot know whether an
    outer middleware retries it, so the stream stays open, listed, and close_all settles it."""
    opened: list[PaymentStream] = []

    def flaky(messages: Any) -> AIMessage:
        raise RuntimeError("the model's host is down")

    model = ScriptedChatModel(script=[*_asks(1), flaky])
    meter = MeteredMiddleware(
        open_stream=_sync_opener(pf_world, "0.01", "1.00", opened), tools="all"
    )
    agent = create_agent(model, [weather], middleware=[meter])
    with pytest.raises(RuntimeError, match="host is down"):
        agent.invoke({"messages": [("human", "weather")]})
    assert list(meter.open_streams().values()) == opened and opened[0].is_open
    (receipt,) = meter.close_all()
    assert receipt.units == 2  # the first model call and its tool call; the failed call: 0
    assert meter.open_streams() == {}
    _check_escrow(pf_world, receipt.escrow_id or "", "0.01", 2, "1.00")
    _check_totals(pf_world, Decimal("0.02"))


def test_a_stream_abandoned_midway_is_settled_by_close_all(pf_world):
    opened: list[PaymentStream] = []
    model = ScriptedChatModel(script=_asks(5))
    meter = MeteredMiddleware(open_stream=_sync_opener(pf_world, "0.01", "1.00", opened))
    agent = create_agent(model, [weather], middleware=[meter])
    for _chunk in agent.stream({"messages": [("human", "weather")]}, stream_mode="messages"):
        break  # the consumer leaves after the first answer's first chunk
    assert model.calls == 1 and opened[0].is_open
    (receipt,) = meter.close_all()
    assert receipt.units == 1  # the answer was generated: it is paid
    _check_totals(pf_world, Decimal("0.01"))


def test_a_sub_micro_cost_is_shown_exactly(pf_world):
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.0000005", budget="1.00"
    ) as stream:
        agent = create_agent(
            ScriptedChatModel(script=_asks(2)), [weather], middleware=[MeteredMiddleware(stream)]
        )
        state = agent.invoke({"messages": [("human", "weather")]})
    assert _bill(state)["units"] == 3 and _bill(state)["cost"] == "0.0000015"
    assert stream.receipt is not None and stream.receipt.paid == Decimal("0.000002")  # half-up
    _check_totals(pf_world, Decimal("0.000002"))
