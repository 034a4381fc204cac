"""gate_tool: a provider agent's LangChain tool served only while the caller's stream pays;
the stream comes in the run's metadata, never from the model's arguments."""

from __future__ import annotations

import json

import pytest
from langchain_core.tools import tool

from pf_metered import AsyncPaymentStream, PaymentStream, Sandbox
from pf_metered.errors import InvalidInput
from pf_metered.provider import AsyncPaymentGate, PaymentGate
from pf_metered.provider.langchain import gate_tool


@pytest.fixture
def world():
    sb = Sandbox()
    payer, me = sb.add_agent(balance="20.00"), sb.add_agent()
    ran: list[str] = []

    @tool
    def lookup(symbol: str) -> str:
        """The price of a symbol."""
        ran.append(symbol)
        return f"{symbol}: 101.5"

    gate = PaymentGate(sb.client(me.api_key), me.agent_id, "0.01", batch=3)
    agate = AsyncPaymentGate(sb.async_client(me.api_key), me.agent_id, "0.01", batch=3)
    yield sb, payer, me, lookup, gate, agate, ran
    sb.close()


def test_the_gated_tool_keeps_the_schema_and_is_served_while_paid(world):
    sb, payer, me, lookup, gate, _, ran = world
    paid = gate_tool(lookup, gate=gate)
    assert (paid.name, paid.description, paid.args) == (
        lookup.name,
        lookup.description,
        lookup.args,
    )
    with PaymentStream(sb.client(payer.api_key), me.agent_id, "0.01", batch=3, budget="1.00") as s:
        for sym in ("AAA", "BBB", "CCC", "DDD"):
            assert (
                paid.invoke({"symbol": sym}, {"metadata": s.provider_headers()}) == f"{sym}: 101.5"
            )
            s.record()
    assert gate.reconcile(s.escrow_id).ok and ran == ["AAA", "BBB", "CCC", "DDD"]


def test_an_unpaid_call_answers_the_refusal_and_does_not_run(world):
    _, _, _, lookup, gate, _, ran = world
    answer = gate_tool(lookup, gate=gate).invoke({"symbol": "AAA"})
    assert json.loads(answer)["error"] == "missing_escrow" and ran == []


async def test_the_async_gate_refuses_past_the_credit_with_what_is_owed(world):
    sb, payer, me, lookup, _, agate, ran = world
    paid = gate_tool(lookup, agate=agate)
    s = AsyncPaymentStream(
        sb.async_client(payer.api_key), me.agent_id, "0.01", batch=3, budget="1.00"
    )
    await s.open()
    answers = [
        await paid.ainvoke({"symbol": "X"}, {"metadata": s.provider_headers()}) for _ in range(7)
    ]
    assert answers[:6] == ["X: 101.5"] * 6  # the credit: two batches of 3, never paid
    assert json.loads(answers[6]) | {"message": ""} == {
        "error": "unpaid",
        "message": "",
        "owed": "0.06",
        "escrow_id": s.escrow_id,
    }
    assert len(ran) == 6  # the refused call did not run
    s.record(6)
    await s.close()


def test_gate_tool_needs_a_gate(world):
    with pytest.raises(InvalidInput):
        gate_tool(world[3])
