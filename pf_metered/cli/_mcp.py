"""``pf-metered mcp``: serve the shared agent tools over MCP (stdio or streamable HTTP).

Why a separate module: it is the only command that needs the optional ``mcp`` extra, so its
import happens here, when the command runs, and a missing extra is a configuration error
(exit 4) with the install line rather than a traceback.

What this module must never do: print to stdout (once serving on stdio, stdout is the
protocol's), read the API key from anywhere but ``PF_API_KEY`` (no prompt: stdin is the
protocol's too), or serve a non-loopback address without a bearer token.
"""

from __future__ import annotations

import argparse
import os

from pf_metered.cli._exit import EXIT_OK
from pf_metered.cli._format import Output
from pf_metered.cli._secrets import remember_secret
from pf_metered.errors import ConfigError
from pf_metered.tools import Caps

__all__ = ["ENV_AUTH_TOKEN", "run_mcp"]

ENV_AUTH_TOKEN = "PF_MCP_AUTH_TOKEN"


def _caps(args: argparse.Namespace, out: Output | None = None) -> Caps:
    tools = None
    if args.tools:
        tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    max_locked = args.max_locked
    if args.max_total is not None:
        if max_locked is not None:
            raise ConfigError("give --max-locked only (--max-total is its deprecated old name)")
        if out is not None:
            out.note("pf-metered mcp: --max-total is deprecated; it is --max-locked now")
        max_locked = args.max_total
    return Caps(
        max_budget=args.max_budget,
        max_rate=args.max_rate,
        max_locked=max_locked,
        max_spend=args.max_spend,
        max_open_streams=args.max_open_streams,
        allowed_tools=tools,
        release_any_escrow=args.release_any_escrow,
    )


def run_mcp(args: argparse.Namespace, out: Output) -> int:
    """Build the setup (live or sandbox, with its state file) and serve until stopped."""
    import anyio

    from pf_metered.mcp import context_from_env, sandbox_setup, serve_http, serve_stdio

    caps = _caps(args, out)
    remember_secret(os.environ.get("PF_API_KEY"))
    token = args.auth_token or os.environ.get(ENV_AUTH_TOKEN, "").strip() or None
    remember_secret(token)
    http = args.transport == "streamable-http"
    if http:
        from pf_metered.mcp._server import is_loopback

        if not is_loopback(args.host) and not token:
            raise ConfigError(
                f"refusing to serve on {args.host}, which is not a loopback address, without "
                f"a bearer token: set {ENV_AUTH_TOKEN} (or --auth-token)"
            )
    # Fail on a missing extra before touching stdin/stdout.
    import pf_metered.mcp._server  # noqa: F401

    hours = args.default_auto_release_hours
    setup = (
        sandbox_setup(caps, state=args.state, auto_release_hours=hours)
        if args.sandbox
        else context_from_env(
            caps,
            base_url=getattr(args, "base_url", None) or None,
            state=args.state,
            auto_release_hours=hours,
        )
    )
    if args.sandbox and setup.sandbox_agents is not None:
        agents = setup.sandbox_agents()
        out.note(
            f"pf-metered mcp: sandbox payer {agents['payer']['agent_id']} "
            f"({agents['payer']['balance']} USDC), provider {agents['provider']['agent_id']}"
        )

    async def _serve() -> None:
        try:
            if http:
                await serve_http(setup, host=args.host, port=args.port, auth_token=token)
            else:
                await serve_stdio(setup)
        finally:
            with anyio.CancelScope(shield=True):
                await setup.aclose()

    if not http:
        sandbox = " (sandbox)" if args.sandbox else ""
        out.note(f"pf-metered mcp: serving on stdio{sandbox}, pid {os.getpid()}")
    anyio.run(_serve)
    return EXIT_OK
