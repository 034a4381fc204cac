"""The MCP adapter proper: shared tool definitions in, an ``mcp`` low-level ``Server`` out.

Why the low-level server and not ``MCPServer`` (ex-FastMCP): the high-level one builds each
tool's schema from a Python function's signature; ours already exist as pydantic models shared
with LangChain, so the low-level server lets us hand over ``model_json_schema()`` and route
every call to ``ToolDefinition.acall_answer`` — where the allow-list, validation and caps are
enforced — without a second description of any tool.

Tool results carry the answer twice, as the protocol suggests: ``content`` holds the compact
JSON text the model reads (the same text the LangChain tools return) and
``structuredContent`` holds the same figures as an object for programs. A failure is a result
with ``isError`` true and the :class:`~pf_metered.tools.ToolError` message, so the model can
correct itself; an unexpected exception is reported the same way (type only, logged to
stderr) and never takes the server down.

Written for the ``mcp`` 2.x SDK (handlers passed to the ``Server`` constructor, snake_case
fields on the types).

What this module must never do: print to stdout (the protocol's channel), let an exception out
of a handler, or build a tool description anywhere but :meth:`ToolDefinition.describe`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pf_metered.errors import ConfigError, redact
from pf_metered.tools import ToolContext, ToolDefinition, ToolError, render

try:
    import anyio
    import mcp_types as types
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ConfigError(
        "the MCP server needs the optional extra: pip install 'pf-metered[mcp]' "
        f"(mcp >= 2; import failed: {exc})"
    ) from None

__all__ = ["build", "close_open_streams", "serve", "tool_spec"]

_log = logging.getLogger("pf_metered.mcp")


def tool_spec(definition: ToolDefinition[Any], ctx: ToolContext) -> types.Tool:
    """One shared definition as an MCP ``Tool``: its name, description, schema and hints."""
    return types.Tool(
        name=definition.name,
        title=definition.name.replace("_", " "),
        description=definition.describe(ctx),
        input_schema=definition.input_schema(),
        annotations=types.ToolAnnotations(
            read_only_hint=definition.read_only,
            destructive_hint=False,
            idempotent_hint=definition.read_only,
            open_world_hint=True,
        ),
    )


def _error(message: str, kind: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=message)],
        structured_content={"error": kind, "message": message},
        is_error=True,
    )


def build(
    ctx: ToolContext,
    tools: Sequence[ToolDefinition[Any]],
    *,
    name: str = "purple-flea",
    instructions: str | None = None,
) -> Server[Any]:
    """A low-level ``Server`` listing ``tools`` and running them over ``ctx``."""
    from pf_metered import __version__

    by_name = {t.name: t for t in tools}
    specs = [tool_spec(t, ctx) for t in tools]

    async def list_tools(
        _rctx: Any, _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=specs)

    async def call_tool(_rctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        definition = by_name.get(params.name)
        if definition is None:
            return _error(
                f"Unknown tool {params.name!r}. Available tools: {', '.join(by_name)}.",
                "unknown_tool",
            )
        try:
            answer = await definition.acall_answer(ctx, params.arguments or {})
        except ToolError as exc:
            return _error(exc.message, exc.kind)
        except Exception as exc:  # a bug must not take the agent's session down
            _log.error(
                "tool %s failed unexpectedly: %s",
                params.name,
                redact(f"{type(exc).__name__}: {exc}"),
            )
            return _error(
                f"{params.name} failed with an unexpected {type(exc).__name__}; nothing more is "
                "known. Check with a status tool before retrying anything that moves money.",
                "internal_error",
            )
        return types.CallToolResult(
            content=[types.TextContent(text=render(answer))],
            structured_content=answer,
        )

    return Server(
        name,
        version=__version__,
        title="Purple Flea metered payments",
        instructions=instructions,
        get_tool_input_schema=lambda tool: (
            by_name[tool].input_schema() if tool in by_name else None
        ),
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def close_open_streams(ctx: ToolContext) -> int:
    """Close every stream still open (pay what is owed, refund the rest); how many closed.

    Why at shutdown: a stream left open keeps its budget locked until auto-release, which
    pays the *provider* the unused rest — the opposite of what an agent that walked away wants.
    """
    from pf_metered.tools import get_definition

    close = get_definition("stream_close")
    closed = 0
    for entry in ctx.entries():
        if entry.receipt is not None:
            continue
        try:
            await close.acall_answer(ctx, {"stream_id": entry.handle})
            closed += 1
        except Exception as exc:
            _log.error("could not close stream %s at shutdown: %s", entry.handle, redact(str(exc)))
    return closed


async def serve(
    ctx: ToolContext, tools: Sequence[ToolDefinition[Any]], *, instructions: str | None = None
) -> None:
    """Serve over stdin/stdout until the client disconnects, then close open streams."""
    server = build(ctx, tools, instructions=instructions)
    try:
        async with stdio_server() as (read_stream, write_stream):
            await server.run(read_stream, write_stream, server.create_initialization_options())
    finally:
        with anyio.CancelScope(shield=True):
            await close_open_streams(ctx)
