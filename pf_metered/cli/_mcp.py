"""``pf-metered mcp``: serve the shared agent tools over MCP on stdin/stdout.

Why a separate module: it is the only command that needs the optional ``mcp`` extra, so its
import happens here, when the command runs, and a missing extra is a configuration error
(exit 4) with the install line rather than a traceback.

What this module must never do: print to stdout (once serving, stdout is the protocol's), or
read the key from anywhere but ``PF_API_KEY`` (no prompt: stdin is the protocol's too).
"""

from __future__ import annotations

import argparse

from pf_metered.cli._exit import EXIT_OK
from pf_metered.cli._format import Output
from pf_metered.cli._secrets import remember_secret

__all__ = ["run_mcp"]


def _caps(args: argparse.Namespace) -> object:
    from pf_metered.tools import Caps

    tools = None
    if args.tools:
        tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    return Caps(
        max_budget=args.max_budget,
        max_rate=args.max_rate,
        max_total=args.max_total,
        max_open_streams=args.max_open_streams,
        allowed_tools=tools,
        release_any_escrow=args.release_any_escrow,
    )


def run_mcp(args: argparse.Namespace, out: Output) -> int:
    """Build the tool context (live or sandbox) and serve until the client disconnects."""
    import os

    import anyio

    from pf_metered.mcp import context_from_env, sandbox_setup, serve_stdio
    from pf_metered.tools import Caps

    caps = _caps(args)
    assert isinstance(caps, Caps)
    remember_secret(os.environ.get("PF_API_KEY"))
    # Fail on a missing extra before touching stdin/stdout.
    import pf_metered.mcp._server  # noqa: F401

    setup = (
        sandbox_setup(caps)
        if args.sandbox
        else context_from_env(caps, base_url=getattr(args, "base_url", None) or None)
    )

    async def _serve() -> None:
        try:
            await serve_stdio(setup.ctx, instructions=setup.instructions)
        finally:
            with anyio.CancelScope(shield=True):
                await setup.aclose()

    out.note("pf-metered mcp: serving on stdio" + (" (sandbox)" if args.sandbox else ""))
    anyio.run(_serve)
    return EXIT_OK
