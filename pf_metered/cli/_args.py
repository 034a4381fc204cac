"""The argument structure of ``pf-metered``: every command, option and help text.

Why help texts carry examples and the environment: the person reading ``--help`` is usually
about to spend money or wire an agent into a runtime; the page should answer "what do I type"
and "where does the key come from" without a trip to the docs.

``--json`` and ``--base-url`` are accepted before or after the command
(``pf-metered --json escrow list`` and ``pf-metered escrow list --json`` both work): sub-parsers
share a parent whose defaults are suppressed, so a value given on either side wins.

What this module must never do: define an option that takes an API key (keys come from
``PF_API_KEY`` or a no-echo prompt), or let argparse print a message that was not scrubbed.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any, NoReturn

from pf_metered.cli._exit import EXIT_USAGE
from pf_metered.cli._secrets import ENV_BASE_URL, ENV_KEY, scrub
from pf_metered.client import DEFAULT_BASE_URL
from pf_metered.client.deployed import (
    CASINO_BASE_URL,
    ENV_CASINO_URL,
    ENV_FAUCET_URL,
    FAUCET_BASE_URL,
)

__all__ = ["DEFAULT_SANDBOX_PORT", "build_parser"]

DEFAULT_SANDBOX_PORT = 8787
_FMT = argparse.RawDescriptionHelpFormatter


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose error messages are scrubbed and whose usage errors exit 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {scrub(message)}\n")
        sys.stderr.write(f"Run '{self.prog} --help' for the options.\n")
        raise SystemExit(EXIT_USAGE)


_ENVIRONMENT = f"""\
environment:
  {ENV_KEY}      the API key (pf_live_... or a sandbox's pf_test_...). Never passed as an
                  argument; when unset and run in a terminal, you are prompted without echo.
  {ENV_BASE_URL}     the escrow API base URL; --base-url overrides it. Default: the live
                  service, {DEFAULT_BASE_URL}.
                  Plain http is refused except to loopback.
  {ENV_FAUCET_URL}   the faucet service, for 'faucet claim --agent-id' (default
                  {FAUCET_BASE_URL})
  {ENV_CASINO_URL}   the registration service, for 'register' (default
                  {CASINO_BASE_URL})

exit codes:
  0 success · 1 unexpected failure · 2 usage error · 3 API error (auth, not found,
  insufficient funds, invalid status, rate limited, unreachable) · 4 configuration error
  (no key, insecure URL, missing extra) · 130 interrupted
"""

_MAIN_EPILOG = f"""\
examples:
  # try everything locally, no key, no network (terminal 1)
  pf-metered sandbox serve --keys-file demo.env
  # terminal 2: use the demo payer's key and the sandbox's URL
  source demo.env
  pf-metered faucet claim
  pf-metered escrow create agent_2f9c 5.00 --memo "translation job"
  pf-metered escrow list
  pf-metered escrow release esc_1a2b 1.25 --memo "first chapter"
  pf-metered stream watch esc_1a2b
  pf-metered --json escrow status esc_1a2b | jq .remaining

  # serve the agent tools over MCP (stdio) for Claude Desktop, Cursor, ...
  pf-metered mcp                  # uses {ENV_KEY}
  pf-metered mcp --sandbox        # an in-memory sandbox with a funded demo agent

{_ENVIRONMENT}"""


def _common(*, top: bool) -> argparse.ArgumentParser:
    """Options every command accepts, before or after the command name."""
    parent = argparse.ArgumentParser(add_help=False)
    default: Any = None if top else argparse.SUPPRESS
    parent.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help='print results as JSON (errors too, as {"error": {...}} on stderr) instead of tables',
    )
    parent.add_argument(
        "--base-url",
        metavar="URL",
        default=default,
        help=f"escrow API base URL (default: ${ENV_BASE_URL}, else the live service); "
        "e.g. http://127.0.0.1:8787/api/v1 for a local sandbox",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    from pf_metered import __version__

    common = _common(top=False)
    parser = _Parser(
        prog="pf-metered",
        description=_wrap(
            "Pay other AI agents per call, per token, per data point or per second from a "
            "Purple Flea escrow.\n\n"
            "This command inspects and operates escrows (list, status, release, refund), "
            "claims the new-agent faucet, watches a payment stream's escrow live, runs a "
            "local sandbox of the escrow service, and serves the agent tools over MCP."
        ),
        epilog=_MAIN_EPILOG,
        formatter_class=_FMT,
        parents=[_common(top=True)],
    )
    parser.add_argument("--version", action="version", version=f"pf-metered {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    _add_escrow(commands, common)
    _add_faucet(commands, common)
    _add_stream(commands, common)
    _add_sandbox(commands, common)
    _add_mcp(commands, common)
    _add_register(commands, common)
    from pf_metered.cli._provider import add_provider

    add_provider(commands, common, _sub, _seconds, _Parser)
    return parser


def _wrap(text: str, width: int = 88) -> str:
    """Fill each paragraph of ``text``; lines indented by two spaces are kept as written."""
    out = []
    for para in text.split("\n\n"):
        if para.startswith("  "):
            out.append(para)
        else:
            out.append(
                textwrap.fill(
                    " ".join(para.split()), width, break_on_hyphens=False, break_long_words=False
                )
            )
    return "\n\n".join(out)


def _sub(
    group: Any,
    name: str,
    common: argparse.ArgumentParser,
    *,
    help: str,
    description: str,
    epilog: str = "",
) -> argparse.ArgumentParser:
    sub: argparse.ArgumentParser = group.add_parser(
        name,
        help=help,
        description=_wrap(description),
        epilog=epilog or None,
        formatter_class=_FMT,
        parents=[common],
    )
    return sub


def _add_escrow(commands: Any, common: argparse.ArgumentParser) -> None:
    escrow = _sub(
        commands,
        "escrow",
        common,
        help="list, inspect, create, release and refund escrows",
        description=(
            "Escrows hold the budget a payer locked for a provider. Figures are USDC with up to "
            "6 decimals; the 1% fee is taken from what is released."
        ),
        epilog=(
            "examples:\n"
            "  pf-metered escrow list --status locked\n"
            "  pf-metered escrow status esc_1a2b\n"
            "  pf-metered escrow create agent_2f9c 5.00 --memo 'per-call inference'\n"
            "  pf-metered escrow release esc_1a2b 0.25 --memo 'batch 3'\n"
            "  pf-metered escrow refund esc_1a2b\n"
        ),
    )
    actions = escrow.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True

    lst = _sub(
        actions,
        "list",
        common,
        help="list your escrows (as payer or provider)",
        description="List the escrows you pay or are paid from, oldest first.",
        epilog="example:\n  pf-metered escrow list --status locked --json\n",
    )
    lst.add_argument(
        "--status",
        choices=("locked", "completed", "released", "refunded", "disputed"),
        help="show only escrows in this status",
    )

    status = _sub(
        actions,
        "status",
        common,
        help="show one escrow and its releases",
        description="Show an escrow's figures (amount, released, remaining, refunded) and its "
        "release history.",
        epilog="example:\n  pf-metered escrow status esc_1a2b\n",
    )
    status.add_argument("escrow_id", metavar="ESCROW_ID", help="the escrow's id, e.g. esc_1a2b")

    create = _sub(
        actions,
        "create",
        common,
        help="lock USDC in a new escrow for a provider",
        description="Lock AMOUNT USDC from your balance in a new escrow paying TO_AGENT. "
        "Release it in parts with 'escrow release'; refund what is left with "
        "'escrow refund'.",
        epilog="example:\n  pf-metered escrow create agent_2f9c 5.00 --memo 'translation'\n",
    )
    create.add_argument("to_agent_id", metavar="TO_AGENT", help="the provider's agent id")
    create.add_argument(
        "amount",
        metavar="AMOUNT",
        help="USDC to lock, a decimal with at most 6 places, at least 1.00",
    )
    create.add_argument("--memo", default="", help="a note stored with the escrow")
    create.add_argument(
        "--auto-release-hours",
        type=_hours,
        metavar="HOURS",
        default=None,
        help="after HOURS (1-8760) whatever is still locked goes to the provider; default: never",
    )

    release = _sub(
        actions,
        "release",
        common,
        help="pay part of an escrow to its provider",
        description="Release AMOUNT USDC of an escrow you created to its provider (partial "
        "release). The 1% fee is taken from the released amount. Sent once, with "
        "an idempotency key: a retry after a lost answer never pays twice.",
        epilog="example:\n  pf-metered escrow release esc_1a2b 0.25 --memo 'batch 3'\n",
    )
    release.add_argument("escrow_id", metavar="ESCROW_ID", help="the escrow's id")
    release.add_argument(
        "amount", metavar="AMOUNT", help="USDC to release now, at most what remains (e.g. 0.25)"
    )
    release.add_argument("--memo", default="", help="a note stored with this release")

    refund = _sub(
        actions,
        "refund",
        common,
        help="close an escrow and take back what remains",
        description="Close an escrow you created: what was released stays with the provider, "
        "the remaining amount returns to your balance.",
        epilog="example:\n  pf-metered escrow refund esc_1a2b\n",
    )
    refund.add_argument("escrow_id", metavar="ESCROW_ID", help="the escrow's id")


def _add_faucet(commands: Any, common: argparse.ArgumentParser) -> None:
    faucet = _sub(
        commands,
        "faucet",
        common,
        help="claim the one-time 1.00 USDC for a new agent",
        description="The faucet credits a new agent with 1.00 USDC, once.",
        epilog="example:\n  pf-metered faucet claim\n",
    )
    actions = faucet.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    claim = _sub(
        actions,
        "claim",
        common,
        help="claim the one-time 1.00 USDC for a new agent",
        description=(
            f"Claim the one-time 1.00 USDC credit for the agent whose key is in {ENV_KEY}. "
            "A second claim fails with already_claimed (exit 3).\n\n"
            "The deployed Purple Flea service runs its faucet as a separate service that "
            "takes an agent id instead of a key: there, pass --agent-id (no key is needed). "
            f"The faucet's URL is --faucet-url, else ${ENV_FAUCET_URL}, else "
            f"{FAUCET_BASE_URL}."
        ),
        epilog=(
            "examples:\n"
            "  pf-metered faucet claim\n"
            "  pf-metered faucet claim --json\n"
            "  pf-metered faucet claim --agent-id agent_2f9c     # the deployed faucet\n"
        ),
    )
    claim.add_argument(
        "--agent-id",
        metavar="AGENT_ID",
        default=None,
        help="claim on the separate faucet service for this agent id (the deployed "
        "dialect's faucet, which needs no key)",
    )
    claim.add_argument(
        "--faucet-url",
        metavar="URL",
        default=None,
        help=f"with --agent-id: the faucet service's URL (default: ${ENV_FAUCET_URL}, else "
        f"{FAUCET_BASE_URL})",
    )


def _add_stream(commands: Any, common: argparse.ArgumentParser) -> None:
    stream = _sub(
        commands,
        "stream",
        common,
        help="watch a payment stream's escrow live",
        description="A payment stream locks its budget in one escrow and releases it in "
        "batches; these commands follow it from the outside.",
        epilog="example:\n  pf-metered stream watch esc_1a2b --interval 1\n",
    )
    actions = stream.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    watch = _sub(
        actions,
        "watch",
        common,
        help="live view of released / remaining with a progress bar",
        description=(
            "Show an escrow's released and remaining amounts with a progress bar, refreshing "
            "until the escrow is closed (released, refunded or disputed).\n\n"
            "The bar: '#' released to the provider, '~' refunded to the payer, '.' still "
            "locked. In a terminal the line redraws in place; otherwise (a pipe, a log) a line "
            "is printed each time a figure changes. With --json, one JSON object per line."
        ),
        epilog=(
            "examples:\n"
            "  pf-metered stream watch esc_1a2b\n"
            "  pf-metered stream watch esc_1a2b --once --json\n"
            "  pf-metered stream watch esc_1a2b --interval 5 --timeout 600\n"
        ),
    )
    watch.add_argument(
        "escrow_id",
        metavar="ESCROW_ID",
        help="the stream's escrow id (PaymentStream.escrow_id, stream_status)",
    )
    watch.add_argument(
        "--interval",
        type=_seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 2; at least 0.2)",
    )
    watch.add_argument(
        "--once", action="store_true", help="print the current figures once and exit"
    )
    watch.add_argument(
        "--timeout",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop watching after SECONDS even if the escrow is still open "
        "(exit 0); default: until it closes or Ctrl-C",
    )


def _add_sandbox(commands: Any, common: argparse.ArgumentParser) -> None:
    sandbox = _sub(
        commands,
        "sandbox",
        common,
        help="run a local sandbox of the escrow service",
        description="The sandbox is a real escrow ledger in SQLite with the same HTTP API as "
        "the live service: try the CLI, the library and the MCP server with no key "
        "and no network.",
    )
    actions = sandbox.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    actions.required = True
    serve = _sub(
        actions,
        "serve",
        common,
        help="serve the sandbox on loopback with demo agents",
        description=(
            "Serve the sandbox escrow API on 127.0.0.1 (loopback only; it never listens on "
            "another interface) and create two demo agents: a payer funded with --balance "
            "USDC, and a provider. Prints the base URL and the agent ids; the keys are shown "
            "only with --print-keys, or written to --keys-file (mode 600) as lines you can "
            "'source'. Runs until Ctrl-C.\n\n"
            "The ledger is in memory unless --ledger names a SQLite file; with a file, escrows "
            "and balances survive a restart (new demo agents are made on each start; keys are "
            "stored only as hashes)."
        ),
        epilog=(
            "examples:\n"
            "  pf-metered sandbox serve --keys-file demo.env      # then: source demo.env\n"
            "  pf-metered sandbox serve --port 9000 --ledger sandbox.db --print-keys\n"
            "  pf-metered sandbox serve --port 0                  # any free port\n"
        ),
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=DEFAULT_SANDBOX_PORT,
        help=f"TCP port on 127.0.0.1 (default {DEFAULT_SANDBOX_PORT}; 0 = any "
        "free port, printed on start)",
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        choices=("127.0.0.1", "::1", "localhost"),
        help="loopback address to bind (default 127.0.0.1); nothing else is allowed",
    )
    serve.add_argument(
        "--ledger",
        metavar="FILE",
        default=None,
        help="SQLite file for the ledger (created if missing); default: memory",
    )
    serve.add_argument(
        "--balance",
        default="100.00",
        metavar="USDC",
        help="the demo payer's starting balance (default 100.00)",
    )
    serve.add_argument(
        "--print-keys",
        action="store_true",
        help="print the demo agents' API keys (off by default: terminals are "
        "recorded, logs are shared)",
    )
    serve.add_argument(
        "--keys-file",
        metavar="FILE",
        default=None,
        help="write 'export PF_BASE_URL=... PF_API_KEY=...' lines for the demo "
        "agents to FILE, readable only by you",
    )


def _add_mcp(commands: Any, common: argparse.ArgumentParser) -> None:
    mcp = _sub(
        commands,
        "mcp",
        common,
        help="serve the agent tools over MCP (stdio or streamable HTTP)",
        description=(
            "Serve the Purple Flea tools (escrow_create, escrow_release, escrow_refund, "
            "escrow_status, escrow_list, faucet_claim, stream_open, stream_status, "
            "stream_record, stream_close, stream_list) as an MCP server, for any "
            "MCP-compatible runtime. The same definitions as the LangChain toolkit: names, "
            "descriptions, argument schemas and caps.\n\n"
            f'The key comes from {ENV_KEY} (set it in the runtime\'s "env"), or use --sandbox '
            "for an in-memory sandbox with a funded payer and a provider (the sandbox_agents "
            "tool names them). Each MCP session has its own streams; streams still open when "
            "a session ends or the server stops are closed: owed units are paid, the rest "
            "refunded. The escrows and streams the tools made, and the money the caps count, "
            "are kept in the --state file, so a restarted server can release, refund and "
            "close them.\n\n"
            "Runtime configuration (e.g. claude_desktop_config.json):\n\n"
            '  {"mcpServers": {"purple-flea": {"command": "pf-metered", "args": ["mcp"],\n'
            f'     "env": {{"{ENV_KEY}": "pf_live_..."}}}}}}}}\n\n'
            "Needs the optional extra: pip install 'pf-metered[mcp]'."
        ),
        epilog=(
            "examples:\n"
            "  pf-metered mcp --sandbox\n"
            "  pf-metered mcp --max-budget 5.00 --max-locked 20.00 --max-spend 100.00 \\\n"
            "      --default-auto-release-hours 72\n"
            "  pf-metered mcp --transport streamable-http --port 8788   # http://127.0.0.1:8788/mcp\n"
            "  PF_MCP_AUTH_TOKEN=... pf-metered mcp --transport streamable-http --host 0.0.0.0\n"
            "  pf-metered mcp --tools escrow_status,escrow_list,stream_open,stream_record,"
            "stream_close\n"
        ),
    )
    mcp.add_argument(
        "--sandbox",
        action="store_true",
        help="use an in-memory sandbox (a payer funded with 100.00 USDC and a "
        "provider) instead of the live service; no key needed",
    )
    mcp.add_argument(
        "--transport",
        choices=("stdio", "streamable-http"),
        default="stdio",
        help="stdio (default: the runtime starts the server) or streamable-http (a "
        "long-running server at http://HOST:PORT/mcp)",
    )
    mcp.add_argument(
        "--host",
        default="127.0.0.1",
        help="streamable-http: address to listen on (default 127.0.0.1; any non-loopback "
        "address needs a bearer token)",
    )
    mcp.add_argument(
        "--port",
        type=_port,
        default=8788,
        help="streamable-http: port to listen on (default 8788; 0 picks a free one, printed "
        "on stderr)",
    )
    mcp.add_argument(
        "--auth-token",
        metavar="TOKEN",
        default=None,
        help="streamable-http: bearer token every client must send (prefer the environment "
        "variable PF_MCP_AUTH_TOKEN: arguments are visible to other processes); required "
        "for a non-loopback --host",
    )
    mcp.add_argument(
        "--state",
        metavar="PATH",
        default=None,
        help="SQLite file keeping the escrows and streams the tools made and the money the "
        "caps count (default: $XDG_DATA_HOME/pf-metered/mcp-state.sqlite3; with --sandbox: "
        ":memory:); ':memory:' for throwaway state",
    )
    mcp.add_argument(
        "--default-auto-release-hours",
        type=_hours,
        metavar="HOURS",
        default=None,
        help="hours after which an escrow or stream the tools lock without hours of its own "
        "releases what remains to the provider, so nothing stays locked forever",
    )
    mcp.add_argument(
        "--max-budget",
        metavar="USDC",
        default=None,
        help="cap: the most one stream or escrow may lock",
    )
    mcp.add_argument(
        "--max-rate",
        metavar="USDC",
        default=None,
        help="cap: the highest price per unit a stream may be opened at",
    )
    mcp.add_argument(
        "--max-locked",
        metavar="USDC",
        default=None,
        help="cap: the most money locked at once (open escrows and streams; paid and "
        "refunded money counts back)",
    )
    mcp.add_argument(
        "--max-spend",
        metavar="USDC",
        default=None,
        help="cap: the most money paid out over the server's life (kept in the --state file)",
    )
    mcp.add_argument(
        "--max-total",
        metavar="USDC",
        default=None,
        help="deprecated: the old name of --max-locked",
    )
    mcp.add_argument(
        "--max-open-streams",
        type=int,
        metavar="N",
        default=None,
        help="cap: how many streams may be open at once",
    )
    mcp.add_argument(
        "--tools",
        metavar="NAMES",
        default=None,
        help="comma-separated tools to offer (default: all); e.g. leave out faucet_claim",
    )
    mcp.add_argument(
        "--release-any-escrow",
        action="store_true",
        help="let escrow_release and escrow_refund act on any of the key's escrows, not only "
        "those made with escrow_create by this server (a stream's never)",
    )


def _add_register(commands: Any, common: argparse.ArgumentParser) -> None:
    _sub(
        commands,
        "register",
        common,
        help="create a new agent account and save its key",
        description=(
            "Register a new agent with Purple Flea and receive its id and API key. The key is "
            "written to --keys-file (mode 600), never printed; 'source' the file to use it. "
            f"The registration service is ${ENV_CASINO_URL}, else {CASINO_BASE_URL}. "
            "Registration also credits the faucet's one-time 1.00 USDC grant to the new agent: "
            "there is no faucet claim to make afterwards."
        ),
        epilog="example:\n  pf-metered register --keys-file agent.env && source agent.env\n",
    ).add_argument(
        "--keys-file",
        metavar="FILE",
        required=True,
        help="where to write the new agent's 'export PF_API_KEY=...' line",
    )


def _hours(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of hours: {text!r}") from None
    if not 1 <= value <= 8760:
        raise argparse.ArgumentTypeError("must be between 1 and 8760 hours")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)  # ok: a duration, not money
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.2 <= value <= 86_400:
        raise argparse.ArgumentTypeError("must be between 0.2 and 86400 seconds")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65_535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value
