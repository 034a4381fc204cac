"""What an MCP server runs against: live clients from the environment, or an in-memory sandbox,
and the state file where the tools' escrows, streams and lifetime spend are kept.

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
from typing import TYPE_CHECKING, Any, Final

from pf_metered.errors import ConfigError
from pf_metered.tools import Caps, ToolContext, ToolState

if TYPE_CHECKING:
    from pf_metered.client import AsyncEscrowClient, EscrowClient

__all__ = ["SANDBOX_BALANCE", "ServerSetup", "context_from_env", "sandbox_setup"]

SANDBOX_BALANCE: Final = "100.00"
"""What the sandbox's demo payer starts with."""

_INSTRUCTIONS: Final = (
    "Tools to pay other agents from a Purple Flea escrow. For work paid per unit (per call, "
    "token, data point or second) open a stream with stream_open, count units with "
    "stream_record (or let a metered tool count them), check it with stream_status, and close "
    "it with stream_close when done: unused budget is refunded. For one-off jobs use "
    "escrow_create and escrow_release (escrow_refund gives back one you no longer need). "
    'Amounts are USDC as decimal strings ("0.25").'
)


@dataclass
class ServerSetup:
    """The clients, caps and state file behind a server; :meth:`context` makes one session's
    tool context, the instructions the runtime shows the model, and how to clean up."""

    client: EscrowClient | None
    async_client: AsyncEscrowClient | None
    caps: Caps
    instructions: str
    state: ToolState
    auto_release_hours: int | None = None
    sandbox_agents: Callable[[], dict[str, Any]] | None = None
    _closers: list[Callable[[], object]] = field(default_factory=list)
    _first: ToolContext | None = None

    def context(self, owner: str) -> ToolContext:
        """A tool context for one session (``owner`` names its book in the state file)."""
        return ToolContext(
            self.client,
            self.async_client,
            caps=self.caps,
            store=self.state.meter_store,
            auto_release_hours=self.auto_release_hours,
            book=self.state.book(owner),
        )

    @property
    def ctx(self) -> ToolContext:
        """The stdio session's context (what a one-session server uses)."""
        if self._first is None:
            self._first = self.context("stdio")
        return self._first

    @property
    def sandbox_agents_answer(self) -> Callable[[], dict[str, Any]] | None:
        return self.sandbox_agents

    async def aclose(self) -> None:
        """Close the clients (async first), the sandbox if any, and the state file."""
        if self.async_client is not None:
            await self.async_client.aclose()
        for closer in reversed(self._closers):
            closer()
        self.state.close()


def _state(state: ToolState | str | os.PathLike[str] | None, default: str) -> ToolState:
    if isinstance(state, ToolState):
        return state
    return ToolState(default if state is None else state)


def context_from_env(
    caps: Caps | None = None,
    *,
    base_url: str | None = None,
    state: ToolState | str | os.PathLike[str] | None = None,
    auto_release_hours: int | None = None,
) -> ServerSetup:
    """Live clients for ``PF_API_KEY`` (and ``PF_BASE_URL`` unless ``base_url`` is given);
    ``state``: a file path (default: the user's data directory) or ``":memory:"``."""
    from pf_metered.client import AsyncEscrowClient, EscrowClient
    from pf_metered.tools.state import default_state_path

    key = os.environ.get("PF_API_KEY", "").strip()
    if not key:
        raise ConfigError(
            "no API key: set PF_API_KEY in the MCP server's environment (the runtime's "
            '"env": {"PF_API_KEY": "pf_live_..."}), or run \'pf-metered mcp --sandbox\' to '
            "try the tools with no key"
        )
    tool_state = _state(state, str(default_state_path()))
    client = EscrowClient(key, base_url=base_url)
    async_client = AsyncEscrowClient(key, base_url=base_url)
    return ServerSetup(
        client,
        async_client,
        caps if caps is not None else Caps(),
        _INSTRUCTIONS,
        tool_state,
        auto_release_hours,
        _closers=[client.close],
    )


def sandbox_setup(
    caps: Caps | None = None,
    *,
    state: ToolState | str | os.PathLike[str] | None = None,
    auto_release_hours: int | None = None,
) -> ServerSetup:
    """An in-memory sandbox with a payer funded with 100.00 USDC and a provider to pay.

    The state defaults to memory: the sandbox is new on every start, so escrows an earlier
    sandbox made cannot be found again.
    """
    from pf_metered.sandbox import Sandbox

    sandbox = Sandbox(":memory:")
    try:
        payer = sandbox.add_agent(balance=SANDBOX_BALANCE)
        provider = sandbox.add_agent()
        client = sandbox.client(payer.api_key)
        async_client = sandbox.async_client(payer.api_key)
        tool_state = _state(state, ":memory:")
    except BaseException:
        sandbox.close()
        raise

    def agents() -> dict[str, Any]:
        from pf_metered.money import decimal_to_micro, format_usdc

        def figures(agent_id: str) -> dict[str, str]:
            micro = decimal_to_micro(sandbox.balance(agent_id))
            return {"agent_id": agent_id, "balance": format_usdc(micro)}

        return {
            "sandbox": True,
            "payer": {**figures(payer.agent_id), "role": "you: the tools pay from this agent"},
            "provider": {**figures(provider.agent_id), "role": "an agent you can pay"},
        }

    instructions = (
        f"{_INSTRUCTIONS} SANDBOX: this is test money in a local sandbox. You are agent "
        f"{payer.agent_id} with {SANDBOX_BALANCE} USDC; agent {provider.agent_id} is a provider "
        "you can pay (the sandbox_agents tool lists both)."
    )
    return ServerSetup(
        client,
        async_client,
        caps if caps is not None else Caps(),
        instructions,
        tool_state,
        auto_release_hours,
        agents,
        _closers=[sandbox.close, client.close],
    )
