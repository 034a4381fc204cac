"""An MCP server exposing the Purple Flea tools to any MCP-compatible agent runtime.

The tools are exactly the shared definitions of :mod:`pf_metered.tools` (the ones the
LangChain toolkit wraps): the same names, descriptions, argument schemas
(``model_json_schema()`` of the same pydantic models) and operator caps. This package only
adapts them to the protocol, so there is no second copy to drift.

::

    pf-metered mcp                 # PF_API_KEY (+ PF_BASE_URL) from the environment
    pf-metered mcp --sandbox       # an in-memory sandbox with a funded demo agent

    # programmatic use
    from pf_metered.mcp import build_server, serve_stdio
    from pf_metered.tools import Caps, ToolContext
    ctx = ToolContext(client, async_client, caps=Caps(max_budget="5.00"))
    anyio.run(serve_stdio, ctx)

The ``mcp`` SDK is an optional extra (``pip install 'pf-metered[mcp]'``) imported only when a
server is built; importing this package never needs it.

What this package must never do: crash the server on a tool failure (every failure comes back
as a tool result with ``isError`` true, whose text the model can act on), write anything to
stdout but protocol messages, or put the API key in a message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pf_metered.mcp._config import (
    SANDBOX_BALANCE,
    ServerSetup,
    context_from_env,
    sandbox_setup,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pf_metered.tools import ToolContext, ToolDefinition

__all__ = [
    "SANDBOX_BALANCE",
    "ServerSetup",
    "build_server",
    "context_from_env",
    "offered_tools",
    "sandbox_setup",
    "serve_stdio",
]


def offered_tools(
    ctx: ToolContext, tools: Sequence[ToolDefinition[Any]] | None = None
) -> list[ToolDefinition[Any]]:
    """The shared definitions this server lists: all of them, less what the caps disallow."""
    from pf_metered.tools import TOOLS

    chosen = list(TOOLS if tools is None else tools)
    return [t for t in chosen if ctx.caps.allows(t.name)]


def build_server(
    ctx: ToolContext,
    *,
    tools: Sequence[ToolDefinition[Any]] | None = None,
    name: str = "purple-flea",
    instructions: str | None = None,
) -> Any:
    """An ``mcp.server.lowlevel.Server`` serving ``tools`` over ``ctx`` (needs the extra)."""
    from pf_metered.mcp._server import build

    return build(ctx, offered_tools(ctx, tools), name=name, instructions=instructions)


async def serve_stdio(
    ctx: ToolContext,
    *,
    tools: Sequence[ToolDefinition[Any]] | None = None,
    instructions: str | None = None,
) -> None:
    """Serve over stdin/stdout until the client disconnects; then close the open streams."""
    from pf_metered.mcp._server import serve

    await serve(ctx, offered_tools(ctx, tools), instructions=instructions)
