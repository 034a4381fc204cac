"""``pf-metered mcp`` driven by the official MCP client over stdio.

The server must list exactly the shared tool definitions (names, descriptions, schemas), run
each of them, and answer every failure as a tool error (``isError``), never by crashing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from pf_metered.tools import ALL_TOOL_NAMES, TOOLS, Caps, get_definition

BIN = Path(sys.executable).with_name("pf-metered")
pytestmark = pytest.mark.skipif(not BIN.exists(), reason="pf-metered is not installed in the venv")


@asynccontextmanager
async def session(*args: str) -> AsyncIterator[tuple[ClientSession, str]]:
    """An initialised client session with ``pf-metered mcp --sandbox ARGS``, and its instructions."""
    params = StdioServerParameters(command=str(BIN), args=["mcp", "--sandbox", *args])
    with open(os.devnull, "w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as s,
        ):
            init = await s.initialize()
            yield s, init.instructions or ""


async def call(s: ClientSession, name: str, **arguments: Any) -> tuple[bool, Any, str]:
    """(is_error, structured answer, text) of one tool call."""
    result = await s.call_tool(name, arguments)
    text = result.content[0].text  # type: ignore[union-attr]
    if not result.is_error:
        assert json.loads(text) == result.structured_content  # the text is the same figures
    return result.is_error, result.structured_content, text


async def test_lists_exactly_the_shared_definitions_and_runs_each() -> None:
    async with session() as (s, instructions):
        listed = (await s.list_tools()).tools
        assert [t.name for t in listed] == [*ALL_TOOL_NAMES, "sandbox_agents"]  # --sandbox only
        for tool in listed[:-1]:
            definition = get_definition(tool.name)
            # what the tool does on the server's dialect (the sandbox speaks v1 here)
            expected = (definition.by_dialect or {}).get("v1", definition.description)
            assert tool.description == expected
            assert tool.input_schema == definition.input_schema()
            assert tool.annotations is not None
            assert tool.annotations.read_only_hint is definition.read_only

        provider = re.search(r"agent (\S+) is a provider", instructions).group(1)
        err, agents, _ = await call(s, "sandbox_agents")
        assert not err and agents["provider"]["agent_id"] == provider
        assert agents["payer"]["balance"] == "100.00" and agents["provider"]["balance"] == "0.00"

        err, claim, _ = await call(s, "faucet_claim")
        assert not err and claim["credited"] == "1.00"

        err, created, _ = await call(
            s, "escrow_create", to_agent_id=provider, amount="5.00", memo="job"
        )
        assert not err and (created["amount"], created["remaining"]) == ("5.00", "5.00")
        escrow_id = created["escrow_id"]

        err, released, _ = await call(s, "escrow_release", escrow_id=escrow_id, amount="1.25")
        assert not err and (released["released"], released["remaining"]) == ("1.25", "3.75")

        err, status, _ = await call(s, "escrow_status", escrow_id=escrow_id)
        assert not err and status["releases"] == 1

        err, listing, _ = await call(s, "escrow_list")
        assert not err and listing["count"] == 1
        assert listing["escrows"][0]["memo"] == "job"  # as written: no [idem:...] tag

        err, refunded, _ = await call(s, "escrow_refund", escrow_id=escrow_id)
        assert not err and (refunded["status"], refunded["released"], refunded["refunded"]) == (
            "refunded",
            "1.25",
            "3.75",
        )

        err, opened, _ = await call(
            s, "stream_open", provider=provider, rate="0.01", budget="2.00", batch=5
        )
        assert not err, opened
        stream_id = opened["stream_id"]

        err, recorded, _ = await call(s, "stream_record", stream_id=stream_id, units=12)
        assert not err, recorded

        err, st, _ = await call(s, "stream_status", stream_id=stream_id)
        assert not err and st["units"] == 12

        err, streams, _ = await call(s, "stream_list")
        assert not err and stream_id in json.dumps(streams)

        err, receipt, _ = await call(s, "stream_close", stream_id=stream_id)
        assert not err, receipt
        assert (receipt["units"], receipt["paid"], receipt["refunded"]) == (12, "0.12", "1.88")

        called = {
            "faucet_claim",
            "escrow_create",
            "escrow_release",
            "escrow_status",
            "escrow_list",
            "stream_open",
            "stream_record",
            "stream_status",
            "stream_list",
            "stream_close",
            "escrow_refund",
        }
        assert called == set(ALL_TOOL_NAMES)


async def test_failures_are_tool_errors_and_the_server_lives_on() -> None:
    narrowed = [n for n in ALL_TOOL_NAMES if n != "faucet_claim"]
    async with session("--max-budget", "3.00", "--tools", ",".join(narrowed)) as (s, instr):
        provider = re.search(r"agent (\S+) is a provider", instr).group(1)
        listed = {t.name: t for t in (await s.list_tools()).tools}
        assert list(listed) == [*narrowed, "sandbox_agents"]  # the narrowing hides faucet_claim
        assert "max budget 3.00 USDC" in listed["stream_open"].description
        assert Caps(max_budget="3.00").describe() in listed["escrow_create"].description

        cases = [
            ("escrow_create", {"to_agent_id": provider, "amount": "abc"}, "amount"),
            ("escrow_create", {"to_agent_id": provider, "amount": "1.00", "bogus": 1}, "bogus"),
            ("escrow_create", {"to_agent_id": provider, "amount": "10.00"}, "Cap exceeded"),
            ("escrow_status", {"escrow_id": "esc_missing"}, "ot found"),
            # refused before any request: not an escrow these tools created
            (
                "escrow_release",
                {"escrow_id": "esc_missing", "amount": "1.00"},
                "not created with escrow_create",
            ),
            ("stream_status", {"stream_id": "s99"}, "Unknown stream"),
            ("stream_open", {"provider": provider, "rate": "0.01"}, "budget"),
            ("faucet_claim", {}, "Unknown tool"),
            ("no_such_tool", {}, "Unknown tool"),
        ]
        for name, arguments, needle in cases:
            result = await s.call_tool(name, arguments)
            assert result.is_error, (name, arguments)
            text = result.content[0].text  # type: ignore[union-attr]
            assert needle in text, (name, text)
            assert "Traceback" not in text and "pf_test_" not in text

        err, listing, _ = await call(s, "escrow_list")  # still serving after all of that
        assert not err and listing["count"] == 0


def test_without_key_or_sandbox_exits_4_before_serving() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    proc = subprocess.run(
        [str(BIN), "mcp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 4
    assert proc.stdout == ""  # stdout belongs to the protocol
    assert "PF_API_KEY" in proc.stderr and "--sandbox" in proc.stderr


def test_shared_definitions_are_the_only_source() -> None:
    from pf_metered.mcp import offered_tools
    from pf_metered.sandbox import Sandbox
    from pf_metered.tools import ToolContext

    with Sandbox() as sb:
        agent = sb.add_agent(balance="1.00")
        with sb.client(agent.api_key) as client:
            ctx = ToolContext(client, caps=Caps(allowed_tools=["escrow_list"]))
            assert offered_tools(ctx) == [get_definition("escrow_list")]
            ctx_all = ToolContext(client)
            assert offered_tools(ctx_all) == list(TOOLS)


async def test_live_config_from_env_and_open_streams_closed_on_disconnect(tmp_path: Path) -> None:
    """The runtime snippet's way: PF_API_KEY (+ PF_BASE_URL) in "env"; no --sandbox."""
    from pf_metered.sandbox import Sandbox

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
        server = sb.serve(port=0)
        params = StdioServerParameters(
            command=str(BIN),
            args=["mcp", "--max-budget", "5.00"],
            env={
                "PF_API_KEY": payer.api_key,
                "PF_BASE_URL": server.base_url,
                "XDG_DATA_HOME": str(tmp_path),  # the default state file lands in the test's dir
            },
        )
        with open(os.devnull, "w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                err, opened, _ = await call(
                    s, "stream_open", provider=provider.agent_id, rate="0.01", budget="2.00"
                )
                assert not err, opened
                err, _, _ = await call(s, "stream_record", stream_id=opened["stream_id"], units=7)
                assert not err
                escrow_id = opened["escrow_id"]
                # the agent walks away without stream_close
        escrow = sb.escrow(escrow_id)
        assert (escrow.status, escrow.released, escrow.refunded) == (
            "refunded",
            Decimal("0.07"),
            Decimal("1.93"),
        )
        assert sb.balance(payer.agent_id) + sb.balance(provider.agent_id) + sb.fees() == 10


async def test_escrow_and_stream_tools_over_mcp_on_the_deployed_dialect(tmp_path: Path) -> None:
    """The deployed dialect over MCP (issue 11 item 5): escrow_release pays the escrow whole
    and says so in its description; a stream opens, records and closes on tranches."""
    from pf_metered.sandbox import Sandbox

    with Sandbox(dialect="deployed") as sb:
        payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
        server = sb.serve(port=0)
        params = StdioServerParameters(
            command=str(BIN),
            args=["mcp"],
            env={
                "PF_API_KEY": payer.api_key,
                "PF_BASE_URL": f"{server.url}/deployed",
                "XDG_DATA_HOME": str(tmp_path),  # the default state file lands in the test's dir
            },
        )
        with open(os.devnull, "w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                listed = {t.name: t for t in (await s.list_tools()).tools}
                assert "only whole escrows" in (listed["escrow_release"].description or "")
                p = provider.agent_id
                err, made, _ = await call(s, "escrow_create", to_agent_id=p, amount="2.00")
                assert not err, made
                err, paid, _ = await call(s, "escrow_release", escrow_id=made["escrow_id"])
                assert not err and paid["released_now"] == "2.00", paid
                err, opened, _ = await call(  # few creates: the client paces them
                    s, "stream_open", provider=p, rate="0.01", budget="1.00", batch=100
                )
                assert not err, opened
                err, _, _ = await call(s, "stream_record", stream_id=opened["stream_id"], units=23)
                assert not err
                err, receipt, _ = await call(s, "stream_close", stream_id=opened["stream_id"])
                assert not err and receipt["paid"] == "0.23" and receipt["refunded"] == "0.00"
                [held] = receipt["still_locked_escrows"]  # the tranche locked ahead, unused
                assert held["amount"] == "1.00" and held["returns"] == "0.99" and held["until"]
        debited = Decimal(receipt["debited"])
        assert debited == Decimal("1.23")
        assert Decimal("10.00") - sb.balance(payer.agent_id) == Decimal("2.00") + debited
        assert sb.balance(provider.agent_id) == Decimal("1.98") + Decimal(receipt["provider_net"])
        sb.audit()
