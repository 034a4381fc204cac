"""``pf-metered mcp`` as a real deployment: streamable HTTP, sessions, a bearer token, restarts.

Every test owns its escrow service (a loopback ``Sandbox`` server), its state file under
``tmp_path`` and its MCP server process, which listens on a free loopback port it picks itself
(``--port 0``) and names on stderr. The client is the official MCP SDK client.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("mcp")

import anyio
import httpx
import httpx2
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from pf_metered.sandbox import Sandbox, SandboxAgent

BIN = Path(sys.executable).with_name("pf-metered")
pytestmark = pytest.mark.skipif(not BIN.exists(), reason="pf-metered is not installed in the venv")


class World:
    """A sandbox escrow service on loopback, a payer with 10.00 USDC and a provider."""

    def __init__(self, sb: Sandbox) -> None:
        self.sb = sb
        self.payer: SandboxAgent = sb.add_agent(balance="10.00")
        self.provider: SandboxAgent = sb.add_agent()
        self.base_url = sb.serve(port=0).base_url

    def env(self, tmp_path: Path, **extra: str) -> dict[str, str]:
        keep = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
        return {
            **keep,
            "PF_API_KEY": self.payer.api_key,
            "PF_BASE_URL": self.base_url,
            "XDG_DATA_HOME": str(tmp_path),
            **extra,
        }

    def ledger_exact(self) -> None:
        """No money made or lost: the payer's 10.00 is now spread over the three accounts."""
        sb = self.sb
        assert sb.balance(self.payer.agent_id) + sb.balance(self.provider.agent_id) + sb.fees() == (
            Decimal("10.00")
        )


@pytest.fixture
def world() -> Iterator[World]:
    with Sandbox() as sb:
        yield World(sb)


@contextmanager
def http_server(
    args: list[str], env: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen[str], list[str]]]:
    """``pf-metered mcp --transport streamable-http --port 0 ARGS``: its URL, process, stderr."""
    proc = subprocess.Popen(
        [str(BIN), "mcp", "--transport", "streamable-http", "--port", "0", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    url = None
    assert proc.stderr is not None
    for line in proc.stderr:  # until it names its port (or dies: the loop ends)
        lines.append(line)
        found = re.search(r"serving streamable HTTP on (http://\S+)", line)
        if found:
            url = found.group(1)
            break
    drain = threading.Thread(target=lambda: lines.extend(proc.stderr or ()), daemon=True)
    drain.start()
    try:
        assert url is not None, "".join(lines)
        yield url, proc, lines
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        drain.join(timeout=60)
        assert proc.stdout is not None
        assert proc.stdout.read() == ""  # nothing but the protocol, and HTTP has none there
        proc.stdout.close()


@asynccontextmanager
async def http_session(
    url: str, token: str | None = None, *, end: bool = True
) -> AsyncIterator[ClientSession]:
    """An initialised official-client session; ``end=False`` leaves without ``DELETE``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as client,
        streamable_http_client(url, http_client=client, terminate_on_close=end) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        yield s


async def call(s: ClientSession, name: str, **arguments: Any) -> tuple[bool, Any]:
    result = await s.call_tool(name, arguments)
    text = result.content[0].text  # type: ignore[union-attr]
    return bool(result.is_error), (text if result.is_error else json.loads(text))


async def test_two_http_sessions_cannot_see_each_others_streams(
    world: World, tmp_path: Path
) -> None:
    state = tmp_path / "state.sqlite3"
    provider = world.provider.agent_id
    with http_server(["--state", str(state)], world.env(tmp_path)) as (url, proc, lines):
        async with http_session(url, end=False) as a:  # a leaves its session open
            err, opened = await call(
                a, "stream_open", provider=provider, rate="0.01", budget="2.00"
            )
            assert not err, opened
            assert opened["stream_id"] == "s1"
            await call(a, "stream_record", stream_id="s1", units=25)

            async with http_session(url) as b:
                err, listing = await call(b, "stream_list")
                assert not err and listing["streams"] == [] and listing["open_streams"] == 0
                err, text = await call(b, "stream_status", stream_id="s1")
                assert err and "Unknown stream 's1'" in text
                err, text = await call(b, "stream_close", stream_id="s1")
                assert err and "Unknown stream" in text
                err, own = await call(
                    b, "stream_open", provider=provider, rate="0.02", budget="1.00"
                )
                assert not err and own["stream_id"] == "s1"  # b's own s1, another escrow
                assert own["escrow_id"] != opened["escrow_id"]
                err, mine = await call(b, "stream_record", stream_id="s1", units=10)
                assert not err and mine["units"] == 10
            # b's session ended (DELETE): its stream was closed, a's is untouched
            b_escrow = world.sb.escrow(own["escrow_id"])
            assert (b_escrow.status, b_escrow.released, b_escrow.refunded) == (
                "refunded",
                Decimal("0.20"),
                Decimal("0.80"),
            )
            err, status = await call(a, "stream_status", stream_id="s1")
            assert not err and (status["status"], status["units"]) == ("open", 25)
            err, listing = await call(a, "stream_list")
            assert [row["stream_id"] for row in listing["streams"]] == ["s1"]
            assert listing["locked"] == "2.00" and listing["paid"] == "0.00"
    # the server stopped (SIGTERM): a's open stream was closed on the way out
    a_escrow = world.sb.escrow(opened["escrow_id"])
    assert (a_escrow.status, a_escrow.released, a_escrow.refunded) == (
        "refunded",
        Decimal("0.25"),
        Decimal("1.75"),
    )
    assert proc.returncode in (0, -signal.SIGTERM)
    assert any("1 open stream(s) closed" in line for line in lines), lines
    world.ledger_exact()


async def test_bearer_token_required_and_checked(world: World, tmp_path: Path) -> None:
    token = "t0k3n-for-this-test-only"
    env = world.env(tmp_path, PF_MCP_AUTH_TOKEN=token)
    with http_server(["--state", ":memory:"], env) as (url, _proc, lines):
        hello = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
        with httpx.Client(timeout=30) as plain:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                refused = plain.post(url, json=hello, headers=headers)
                assert refused.status_code == 401, headers
                assert refused.json()["error"] == "unauthorized"
                assert token not in refused.text
        async with http_session(url, token) as s:
            err, listing = await call(s, "stream_list")
            assert not err and listing["open_streams"] == 0
    assert not any(token in line for line in lines)


def test_non_loopback_bind_is_refused_without_a_token(world: World, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(BIN), "mcp", "--transport", "streamable-http", "--host", "0.0.0.0", "--port", "0"],
        env=world.env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    assert "not a loopback address" in proc.stderr and "PF_MCP_AUTH_TOKEN" in proc.stderr
    assert proc.stdout == ""


async def kill_and_wait(pid: int, signum: int) -> None:
    """Send ``signum`` to ``pid`` (the stdio client's child) and wait until it has exited.

    A pidfd opened *before* the signal becomes readable when the process ends, even if the
    event loop's child watcher reaps it first; no reaping or polling of ours."""
    fd = os.pidfd_open(pid)
    try:
        os.kill(pid, signum)
        await anyio.to_thread.run_sync(select.select, [fd], [], [])
    finally:
        os.close(fd)


@asynccontextmanager
async def stdio_session(
    world: World, tmp_path: Path, state: Path, errlog_path: Path
) -> AsyncIterator[tuple[ClientSession, str]]:
    params = StdioServerParameters(
        command=str(BIN), args=["mcp", "--state", str(state)], env=world.env(tmp_path)
    )
    with open(errlog_path, "w") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as s,
        ):
            init = await s.initialize()
            yield s, init.instructions or ""


async def test_restart_after_kill_releases_refunds_and_closes_with_the_ledger_exact(
    world: World, tmp_path: Path
) -> None:
    state = tmp_path / "state.sqlite3"
    provider = world.provider.agent_id
    errlog = tmp_path / "first.err"
    killed = False
    try:
        async with stdio_session(world, tmp_path, state, errlog) as (s, _):
            err, job = await call(
                s, "escrow_create", to_agent_id=provider, amount="2.50", memo="job"
            )
            assert not err, job
            err, spare = await call(s, "escrow_create", to_agent_id=provider, amount="1.00")
            assert not err, spare
            err, opened = await call(
                s, "stream_open", provider=provider, rate="0.01", budget="2.00"
            )
            assert not err, opened
            err, _ = await call(s, "stream_record", stream_id="s1", units=37)
            assert not err
            pid = int(re.search(r"pid (\d+)", errlog.read_text()).group(1))  # type: ignore[union-attr]
            # no shutdown, no close: only the state file is left
            await kill_and_wait(pid, signal.SIGKILL)
            killed = True
    except BaseException:  # the client notices its server vanished as it leaves
        if not killed:
            raise
    assert killed
    locked = world.sb.escrow(opened["escrow_id"])
    assert (locked.status, locked.released) == ("locked", Decimal("0.00"))
    assert world.sb.balance(world.payer.agent_id) == Decimal("4.50")  # 10 - 2.50 - 1.00 - 2.00

    async with stdio_session(world, tmp_path, state, tmp_path / "second.err") as (s, instr):
        assert "2 open escrow(s), 1 open stream(s)" in instr and "taken back: s1" in instr
        err, released = await call(s, "escrow_release", escrow_id=job["escrow_id"], amount="2.50")
        assert not err and (released["released"], released["remaining"]) == ("2.50", "0.00")
        assert released["memo"] == "job"
        err, refunded = await call(s, "escrow_refund", escrow_id=spare["escrow_id"])
        assert not err and (refunded["status"], refunded["refunded"]) == ("refunded", "1.00")
        err, status = await call(s, "stream_status", stream_id="s1")
        assert not err and status["units"] == 37  # every counted unit survived the kill
        err, receipt = await call(s, "stream_close", stream_id="s1")
        assert not err and (receipt["units"], receipt["paid"], receipt["refunded"]) == (
            37,
            "0.37",
            "1.63",
        )
        err, listing = await call(s, "stream_list")
        assert (listing["locked"], listing["paid"], listing["refunded"]) == ("0.00", "2.87", "2.63")
    sb = world.sb
    assert sb.balance(world.payer.agent_id) == Decimal("7.13")  # 10.00 - 2.50 - 0.37
    assert sb.fees() == Decimal("0.0287") and sb.balance(provider) == Decimal("2.8413")
    world.ledger_exact()


async def test_sigterm_on_stdio_closes_open_streams(world: World, tmp_path: Path) -> None:
    provider = world.provider.agent_id
    errlog = tmp_path / "server.err"
    stopped = False
    try:
        async with stdio_session(world, tmp_path, tmp_path / "state.sqlite3", errlog) as (s, _):
            err, opened = await call(
                s, "stream_open", provider=provider, rate="0.01", budget="2.00"
            )
            assert not err, opened
            err, _ = await call(s, "stream_record", stream_id="s1", units=12)
            assert not err
            pid = int(re.search(r"pid (\d+)", errlog.read_text()).group(1))  # type: ignore[union-attr]
            # the operator stops the server; the client stays; the server settles s1 and exits
            await kill_and_wait(pid, signal.SIGTERM)
            stopped = True
    except BaseException:
        if not stopped:
            raise
    assert stopped
    escrow = world.sb.escrow(opened["escrow_id"])
    assert (escrow.status, escrow.released, escrow.refunded) == (
        "refunded",
        Decimal("0.12"),
        Decimal("1.88"),
    )
    world.ledger_exact()
