"""The MCP adapter proper: shared tool definitions in, an ``mcp`` low-level ``Server`` out.

Why the low-level server and not ``MCPServer`` (ex-FastMCP): the high-level one builds each
tool's schema from a Python function's signature; ours already exist as pydantic models shared
with LangChain, so the low-level server lets us hand over ``model_json_schema()`` and route
every call to ``ToolDefinition.acall_answer`` — where the allow-list, validation and caps are
enforced — without a second description of any tool.

Tool results carry the answer twice, as the protocol suggests: ``content`` holds the compact
JSON text the model reads and ``structuredContent`` the same figures as an object for programs
(the dict a LangChain tool puts in ``ToolMessage.artifact``; the protocol asks a tool with
structured content to send it serialized as text too, so the text stays JSON here, where a
LangChain tool's content is a sentence). A failure is a result
with ``isError`` true and the :class:`~pf_metered.tools.ToolError` message, so the model can
correct itself; an unexpected exception is reported the same way (type only, logged to
stderr) and never takes the server down.

Sessions: each MCP session has its own :class:`~pf_metered.tools.ToolContext` (its own streams,
its own book in the state file), picked per request by :class:`Sessions` — stdio has one
session; streamable HTTP one per ``Mcp-Session-Id`` (an unguessable id the SDK's session
manager hands out and checks). A session's streams are closed when it ends (HTTP ``DELETE``)
and every session's at shutdown (client gone, SIGTERM, Ctrl-C); what cannot be closed stays
journaled in the state file for the next start.

Written for the ``mcp`` 2.x SDK (handlers passed to the ``Server`` constructor, snake_case
fields on the types, ``Server.streamable_http_app``).

What this module must never do: print to stdout (the protocol's channel on stdio), let an
exception out of a handler, serve a non-loopback address without a bearer token, or build a
tool description anywhere but :meth:`ToolDefinition.describe`.
"""

from __future__ import annotations

import hmac
import json
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from pf_metered.errors import ConfigError, redact
from pf_metered.tools import ToolContext, ToolDefinition, ToolError, explain, render

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

if TYPE_CHECKING:
    from pf_metered.mcp._config import ServerSetup

__all__ = [
    "SANDBOX_AGENTS_TOOL",
    "Sessions",
    "build",
    "close_open_streams",
    "serve",
    "serve_http",
    "tool_spec",
]

_log = logging.getLogger("pf_metered.mcp")

SANDBOX_AGENTS_TOOL = "sandbox_agents"
STDIO_OWNER = "stdio"
_SESSION_HEADER = "mcp-session-id"


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


def _sandbox_spec() -> types.Tool:
    return types.Tool(
        name=SANDBOX_AGENTS_TOOL,
        title="sandbox agents",
        description=(
            "SANDBOX ONLY: the funded payer agent you act as and a provider agent you can pay, "
            "with their balances. Use the provider's agent_id as to_agent_id (escrow_create) or "
            "provider (stream_open)."
        ),
        input_schema={"type": "object", "properties": {}, "additionalProperties": False},
        annotations=types.ToolAnnotations(
            read_only_hint=True, destructive_hint=False, idempotent_hint=True
        ),
    )


def _error(message: str, kind: str) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=message)],
        structured_content={"error": kind, "message": message},
        is_error=True,
    )


def _ok(answer: dict[str, Any]) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=render(answer))], structured_content=answer
    )


class Sessions:
    """One tool context per MCP session, made on first use and closed when it ends."""

    def __init__(self, make: Callable[[str], ToolContext]) -> None:
        self._make = make
        self._contexts: dict[str, ToolContext] = {}

    @staticmethod
    def key_of(rctx: Any) -> str:
        """The session a request belongs to: its ``Mcp-Session-Id``, or stdio's one session."""
        request = getattr(rctx, "request", None)
        headers = getattr(request, "headers", None)
        session_id = headers.get(_SESSION_HEADER) if headers is not None else None
        return f"http:{session_id}" if session_id else STDIO_OWNER

    def context(self, key: str) -> ToolContext:
        ctx = self._contexts.get(key)
        if ctx is None:
            ctx = self._contexts[key] = self._make(key)
        return ctx

    def adopt(self, key: str, ctx: ToolContext) -> None:
        self._contexts[key] = ctx

    def keys(self) -> list[str]:
        return list(self._contexts)

    async def end(self, key: str) -> int:
        """Close the streams of session ``key`` and forget it; how many were closed."""
        ctx = self._contexts.pop(key, None)
        if ctx is None:
            return 0
        with anyio.CancelScope(shield=True):
            closed = await close_open_streams(ctx)
        return closed

    async def end_all(self) -> int:
        closed = 0
        for key in self.keys():
            closed += await self.end(key)
        return closed


def build(
    sessions: Sessions,
    tools: Sequence[ToolDefinition[Any]],
    *,
    template: ToolContext,
    name: str = "purple-flea",
    instructions: str | None = None,
    sandbox_agents: Callable[[], dict[str, Any]] | None = None,
) -> Server[Any]:
    """A low-level ``Server`` listing ``tools`` and running them over each session's context."""
    from pf_metered import __version__

    by_name = {t.name: t for t in tools}
    specs = [tool_spec(t, template) for t in tools]
    if sandbox_agents is not None:
        specs.append(_sandbox_spec())

    async def list_tools(
        _rctx: Any, _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=specs)

    async def call_tool(rctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == SANDBOX_AGENTS_TOOL and sandbox_agents is not None:
            return _ok(sandbox_agents())
        definition = by_name.get(params.name)
        if definition is None:
            return _error(
                f"Unknown tool {params.name!r}. Available tools: {', '.join(by_name)}.",
                "unknown_tool",
            )
        ctx = sessions.context(Sessions.key_of(rctx))
        try:
            answer = await definition.acall_answer(ctx, params.arguments or {}, offered=by_name)
        except ToolError as exc:
            return _error(exc.message, exc.kind)
        except ConfigError as exc:  # the operator's to fix: said on stderr, and to the model
            _log.error("tool %s cannot run as configured: %s", params.name, redact(str(exc)))
            told = explain(exc, tool_name=params.name)
            return _error(told.message, told.kind)
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
        return _ok(answer)

    def schema(tool: str) -> dict[str, Any] | None:
        if tool in by_name:
            return by_name[tool].input_schema()
        if tool == SANDBOX_AGENTS_TOOL and sandbox_agents is not None:
            return dict(_sandbox_spec().input_schema)
        return None

    return Server(
        name,
        version=__version__,
        title="Purple Flea metered payments",
        instructions=instructions,
        get_tool_input_schema=schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


async def close_open_streams(ctx: ToolContext) -> int:
    """Close every stream still open (pay what is owed, refund the rest); how many closed.

    Why at shutdown: a stream left open keeps its budget locked until auto-release, which
    pays the *provider* the unused rest — the opposite of what an agent that walked away wants.
    A stream that cannot be closed now stays journaled in the state file for the next start.
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
            _log.error(
                "could not close stream %s at shutdown (journaled for the next start): %s",
                entry.handle,
                redact(str(exc)),
            )
    return closed


def _note(text: str) -> None:
    """A line for the operator on stderr (never stdout: on stdio it is the protocol's)."""
    import sys

    sys.stderr.write(redact(text) + "\n")
    sys.stderr.flush()


async def _startup(setup: ServerSetup, owner: str | None) -> tuple[str, ToolContext | None]:
    """Take back what an earlier run left (``owner``'s streams; other owners' closed)."""
    from pf_metered.tools.restore import arestore

    found = setup.state.describe_found()
    _note(f"pf-metered mcp: {found}")
    ctx = setup.context(owner or "startup")
    restored = await arestore(ctx, close_orphans=True)
    _note(f"pf-metered mcp: {restored.describe()}")
    head = found.splitlines()[0].split(": ", 1)[-1]  # the counts, without the file's path
    return f"{head}; {restored.describe()}", (ctx if owner is not None else None)


async def _until_signal(sessions: Sessions) -> None:
    """On SIGTERM/SIGHUP/SIGINT: close every session's streams while the transport is still up (so a
    client that sees the server go has seen its streams settled), then die of the signal.

    Why not just cancel and return: the stdio transport reads stdin on a worker thread that
    only a line or EOF wakes, so a cancelled server would linger until the client spoke. All
    that matters is on disk by now (every state and journal write is a committed transaction).
    """
    import os

    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP, signal.SIGINT) as signals:
        async for signum in signals:
            with anyio.CancelScope(shield=True):
                closed = await sessions.end_all()
            _note(f"pf-metered mcp: stopped by signal {signum}; {closed} open stream(s) closed")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return


async def serve(
    setup: ServerSetup, tools: Sequence[ToolDefinition[Any]], *, instructions: str | None = None
) -> None:
    """Serve over stdin/stdout until the client disconnects (or a signal), then close streams."""
    found, ctx = await _startup(setup, STDIO_OWNER)
    sessions = Sessions(setup.context)
    assert ctx is not None
    sessions.adopt(STDIO_OWNER, ctx)
    text = instructions if instructions is not None else setup.instructions
    server = build(
        sessions,
        tools,
        template=ctx,
        instructions=f"{text} State: {found}.",
        sandbox_agents=setup.sandbox_agents_answer,
    )
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signal, sessions)
            async with stdio_server() as (read_stream, write_stream):
                await server.run(read_stream, write_stream, server.create_initialization_options())
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await sessions.end_all()


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _BearerAuth:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer <token>``.

    Why not the SDK's OAuth resource-server support: an operator who exposes the server on a
    LAN needs one shared secret, not an authorization server. Compared in constant time; the
    token never appears in an answer or a log line.
    """

    def __init__(self, app: Any, token: str) -> None:
        self._app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = b""
            for key, value in scope.get("headers", []):
                if key == b"authorization":
                    given = value
            if not hmac.compare_digest(given, self._expected):
                body = json.dumps(
                    {
                        "error": "unauthorized",
                        "message": "this MCP server needs 'Authorization: Bearer <token>' "
                        "(the operator's --auth-token / PF_MCP_AUTH_TOKEN)",
                    }
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b'Bearer realm="pf-metered"'),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self._app(scope, receive, send)


class _SessionEnd:
    """ASGI middleware: when a client ends its session (``DELETE``), close its streams first,
    so the client's ``DELETE`` answers only once its money is settled."""

    def __init__(self, app: Any, on_end: Callable[[str], Awaitable[int]]) -> None:
        self._app = app
        self._on_end = on_end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") == "DELETE":
            for key, value in scope.get("headers", []):
                if key == _SESSION_HEADER.encode():
                    await self._on_end(f"http:{value.decode('latin-1')}")
        await self._app(scope, receive, send)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free one, read back by the caller)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


async def serve_http(
    setup: ServerSetup,
    tools: Sequence[ToolDefinition[Any]],
    *,
    host: str = "127.0.0.1",
    port: int = 8788,
    auth_token: str | None = None,
    path: str = "/mcp",
) -> None:
    """Serve over streamable HTTP on ``host:port`` until SIGINT/SIGTERM; one context per
    session; every session's open streams closed at shutdown."""
    import uvicorn

    if not is_loopback(host) and not auth_token:
        raise ConfigError(
            f"refusing to serve on {host}, which is not a loopback address, without a bearer "
            "token: set PF_MCP_AUTH_TOKEN (or --auth-token) so only your clients can spend "
            "through this server"
        )
    await _startup(setup, None)
    sessions = Sessions(setup.context)
    server = build(
        sessions,
        tools,
        template=setup.context("template"),
        instructions=setup.instructions,
        sandbox_agents=setup.sandbox_agents_answer,
    )
    app: Any = server.streamable_http_app(
        streamable_http_path=path, host=host, session_idle_timeout=None
    )
    app = _SessionEnd(app, sessions.end)
    if auth_token:
        app = _BearerAuth(app, auth_token)
    sock = bind(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    _note(
        f"pf-metered mcp: serving streamable HTTP on http://{shown}:{bound}{path}"
        + (" (bearer token required)" if auth_token else "")
    )

    class _Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            closed = await sessions.end_all()
            _note(f"pf-metered mcp: shut down; {closed} open stream(s) closed")

    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    try:
        await _Server(config).serve(sockets=[sock])
    finally:
        sock.close()
