"""What an MCP server runs against: live clients from the environment, or an in-memory sandbox.

Why the key comes only from the environment here: an MCP runtime starts the server with
``{"command": "pf-metered", "args": ["mcp"], "env": {"PF_API_KEY": "..."}}`` and talks to it
over stdin/stdout, so there is no terminal to prompt on and ``argv`` is visible to every
process on the machine.

What this module must never do: read a key from anywhere but ``PF_API_KEY``, prompt (stdin
belongs to the protocol), or import the ``mcp`` SDK.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from pf_metered.errors import ConfigError
from pf_metered.tools import Caps, ToolContext

__all__ = ["SANDBOX_BALANCE", "ServerSetup", "context_from_env", "sandbox_setup"]

SANDBOX_BALANCE: Final = "100.00"
"""What the sandbox's demo payer starts with."""

_INSTRUCTIONS: Final = (
    "Tools to pay other agents from a Purple Flea escrow. For work paid per unit (per call, "
    "token, data point or second) open a stream with stream_open, count units with "
    "stream_record (or let a metered tool count them), check it with stream_status, and close "
    "it with stream_close when done: unused budget is refunded. For one-off jobs use "
    'escrow_create and escrow_release. Amounts are USDC as decimal strings ("0.25").'
)


@dataclass
class ServerSetup:
    """A tool context, the instructions the runtime shows the model, and how to clean up."""

    ctx: ToolContext
    instructions: str
    _closers: list[Callable[[], object]] = field(default_factory=list)

    async def aclose(self) -> None:
        """Close the clients (async first) and the sandbox, if any."""
        if self.ctx.async_client is not None:
            await self.ctx.async_client.aclose()
        for closer in reversed(self._closers):
            closer()


def context_from_env(caps: Caps | None = None, *, base_url: str | None = None) -> ServerSetup:
    """Live clients for ``PF_API_KEY`` (and ``PF_BASE_URL`` unless ``base_url`` is given)."""
    from pf_metered.client import AsyncEscrowClient, EscrowClient

    key = os.environ.get("PF_API_KEY", "").strip()
    if not key:
        raise ConfigError(
            "no API key: set PF_API_KEY in the MCP server's environment (the runtime's "
            '"env": {"PF_API_KEY": "pf_live_..."}), or run \'pf-metered mcp --sandbox\' to '
            "try the tools with no key"
        )
    client = EscrowClient(key, base_url=base_url)
    async_client = AsyncEscrowClient(key, base_url=base_url)
    ctx = ToolContext(client, async_client, caps=caps)
    return ServerSetup(ctx, _INSTRUCTIONS, [client.close])


def sandbox_setup(caps: Caps | None = None) -> ServerSetup:
    """An in-memory sandbox with a payer funded with 100.00 USDC and a provider to pay."""
    from pf_metered.sandbox import Sandbox

    sandbox = Sandbox(":memory:")
    try:
        payer = sandbox.add_agent(balance=SANDBOX_BALANCE)
        provider = sandbox.add_agent()
        client = sandbox.client(payer.api_key)
        async_client = sandbox.async_client(payer.api_key)
    except BaseException:
        sandbox.close()
        raise
    ctx = ToolContext(client, async_client, caps=caps)
    instructions = (
        f"{_INSTRUCTIONS} SANDBOX: this is test money in a local sandbox. You are agent "
        f"{payer.agent_id} with {SANDBOX_BALANCE} USDC; agent {provider.agent_id} is a provider "
        "you can pay."
    )
    return ServerSetup(ctx, instructions, [sandbox.close, client.close])
