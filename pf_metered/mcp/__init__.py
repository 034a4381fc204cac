"""An MCP server exposing the Purple Flea tools to any MCP-compatible agent runtime.

The tools are exactly the shared definitions of :mod:`pf_metered.tools` (the ones the
LangChain toolkit wraps): the same names, descriptions, argument schemas
(``model_json_schema()`` of the same pydantic models) and operator caps. This package only
adapts them to the protocol, so there is no second copy to drift.

::

    pf-metered mcp                 # PF_API_KEY (+ PF_BASE_URL) from the environment, stdio
    pf-metered mcp --sandbox       # an in-memory sandbox with a funded payer and a provider
    pf-metered mcp --transport streamable-http --port 8788   # http://127.0.0.1:8788/mcp

    # programmatic use
    from pf_metered.mcp import context_from_env, serve_stdio
    from pf_metered.tools import Caps
    setup = context_from_env(Caps(max_budget="5.00", max_locked="20.00"), state=":memory:")
    anyio.run(serve_stdio, setup)

Each MCP session gets its own tool context (its own streams); the escrows and streams the
tools make, and the money the caps count, are kept in a state file
(:class:`~pf_metered.tools.ToolState`) so a restarted server can release, refund and close them.

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
    "serve_http",
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
    """An ``mcp.server.lowlevel.Server`` serving ``tools`` over the one context ``ctx`` (needs
    the extra); for one session per context use :func:`serve_stdio` / :func:`serve_http`."""
    from pf_metered.mcp._server import Sessions, build

    sessions = Sessions(lambda _key: ctx)
    return build(
        sessions, offered_tools(ctx, tools), template=ctx, name=name, instructions=instructions
    )


async def serve_stdio(
    setup: ServerSetup,
    *,
    tools: Sequence[ToolDefinition[Any]] | None = None,
    instructions: str | None = None,
) -> None:
    """Serve over stdin/stdout until the client disconnects; then close the open streams."""
    from pf_metered.mcp._server import serve

    await serve(setup, offered_tools(setup.ctx, tools), instructions=instructions)


async def serve_http(
    setup: ServerSetup,
    *,
    host: str = "127.0.0.1",
    port: int = 8788,
    auth_token: str | None = None,
    tools: Sequence[ToolDefinition[Any]] | None = None,
) -> None:
    """Serve over streamable HTTP (``http://HOST:PORT/mcp``), one tool context per session,
    until SIGINT/SIGTERM; a non-loopback ``host`` needs ``auth_token``."""
    from pf_metered.mcp._server import serve_http as _serve_http

    await _serve_http(
        setup, offered_tools(setup.ctx, tools), host=host, port=port, auth_token=auth_token
    )
