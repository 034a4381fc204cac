"""Paid MCP tools on a real ``MCPServer`` (in-process ``mcp.Client``): the caller's stream in
the call's ``_meta`` or a ``payment`` argument; refusals come back as tool errors, before the
tool runs; the gate's count matches the consumer's receipt."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mcp")

from mcp import Client
from mcp.server.mcpserver import Context, MCPServer

from pf_metered import PaymentStream, Sandbox
from pf_metered.errors import InvalidInput
from pf_metered.provider import AsyncPaymentGate
from pf_metered.provider.mcp import paid_tool


class World:
    def __init__(self) -> None:
        self.sandbox = Sandbox()
        self.payer = self.sandbox.add_agent(balance="20.00")
        self.provider = self.sandbox.add_agent()
        self.gate = AsyncPaymentGate(
            self.sandbox.async_client(self.provider.api_key),
            self.provider.agent_id,
            "0.002",
            batch=5,
        )
        self.ran: list[str] = []
        self.server = MCPServer("paid")

        @self.server.tool()
        @paid_tool(self.gate)
        async def infer(prompt: str, ctx: Context) -> str:
            self.ran.append(prompt)
            return prompt.upper()

        @self.server.tool()
        @paid_tool(self.gate, units=len)
        async def rows(n: int, payment: dict[str, str] | None = None) -> list[int]:
            self.ran.append(f"rows {n}")
            return list(range(n))

    def stream(self) -> PaymentStream:
        return PaymentStream(
            self.sandbox.client(self.payer.api_key),
            self.provider.agent_id,
            "0.002",
            batch=5,
            budget="2.00",
        )


@pytest.fixture
def world():
    w = World()
    yield w
    w.sandbox.close()


async def test_a_paying_caller_is_served_through_meta_and_reconciles(world):
    s = world.stream().open()
    async with Client(world.server) as client:
        for i in range(12):
            r = await client.call_tool("infer", {"prompt": f"q{i}"}, meta=s.provider_headers())
            assert not r.is_error and r.content[0].text == f"Q{i}"
            s.record()
    s.close()
    rec = await world.gate.reconcile(s.escrow_id)
    assert rec.ok and rec.served == 12 == s.receipt.units


async def test_units_from_the_result_and_the_payment_argument(world):
    s = world.stream().open()
    async with Client(world.server) as client:
        r = await client.call_tool("rows", {"n": 4, "payment": s.provider_headers()})
        assert not r.is_error
    s.record(4)
    s.close()
    assert world.gate.account(s.escrow_id).served == 4


async def test_a_call_without_a_stream_is_a_tool_error_and_runs_nothing(world):
    async with Client(world.server) as client:
        r = await client.call_tool("infer", {"prompt": "free?"})
    assert r.is_error and "missing_escrow" in r.content[0].text and world.ran == []


async def test_a_caller_past_its_credit_is_told_what_it_owes(world):
    s = world.stream().open()
    async with Client(world.server) as client:
        for i in range(10):  # served, never recorded
            assert not (
                await client.call_tool("infer", {"prompt": "x"}, meta=s.provider_headers())
            ).is_error
        r = await client.call_tool("infer", {"prompt": "x"}, meta=s.provider_headers())
    assert (
        r.is_error
        and "unpaid" in r.content[0].text
        and json.loads(r.content[0].text.partition(": ")[2])["owed"] == "0.02"
    )
    assert len(world.ran) == 10
    s.record(10)
    s.close()


def test_paid_tool_refuses_a_sync_function(world):
    with pytest.raises(InvalidInput):
        paid_tool(world.gate)(lambda: None)  # type: ignore[arg-type]
