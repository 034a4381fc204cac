"""The ``pf-metered`` command line: escrows, the faucet, a live stream view, a sandbox, MCP.

``main(argv)`` parses, runs one command, and turns whatever happened into an exit code (see
:mod:`pf_metered.cli._exit`): 0 success, 1 unexpected, 2 usage, 3 API, 4 configuration,
130 interrupted. Each command lives in a small module:

* :mod:`._args` the argument tree and every help text;
* :mod:`._commands` escrow list/status/create/release/refund, faucet claim, register;
* :mod:`._watch` ``stream watch``; :mod:`._sandbox` ``sandbox serve``; :mod:`._mcp` ``mcp``;
* :mod:`._format` tables and ``--json``; :mod:`._secrets` the key and the output scrubber.

What this package must never do: accept an API key as an argument, print one (every line goes
through the scrubber), or show a traceback for a failure the user can fix.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pf_metered.cli._exit import (
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    CLIError,
    exit_code_for,
    message_for,
)
from pf_metered.cli._format import Output
from pf_metered.cli._secrets import forbid_key_arguments

__all__ = ["main"]


def _run(args: argparse.Namespace, out: Output) -> int:
    command: str | None = args.command
    action: str | None = getattr(args, "action", None)
    if command == "stream":
        from pf_metered.cli._watch import run_stream_watch

        return run_stream_watch(args, out)
    if command == "sandbox":
        from pf_metered.cli._sandbox import run_sandbox_serve

        return run_sandbox_serve(args, out)
    if command == "mcp":
        from pf_metered.cli._mcp import run_mcp

        return run_mcp(args, out)
    if command == "provider":
        from pf_metered.cli._provider import run_provider_watch

        return run_provider_watch(args, out)
    from pf_metered.cli._commands import COMMANDS

    return COMMANDS[(command or "", action)](args, out)


def _details(exc: BaseException) -> dict[str, Any]:
    """Machine-readable facts about an error for ``--json`` (never the key)."""
    return {
        "type": type(exc).__name__,
        "http_status": getattr(exc, "status", None),
        "api_code": getattr(exc, "code", None),
        "request_id": getattr(exc, "request_id", None),
        "field": getattr(exc, "field", None),
    }


def _kind(exc: BaseException, code: int) -> str:
    if isinstance(exc, CLIError):
        return exc.kind
    return {2: "usage", 3: "api", 4: "config"}.get(code, "unexpected")


def _service_url(args: argparse.Namespace) -> str | None:
    """The service a command talks to, for messages about reaching it (never carries a key)."""
    from pf_metered.client import DEFAULT_BASE_URL
    from pf_metered.client.deployed import (
        CASINO_BASE_URL,
        ENV_CASINO_URL,
        ENV_FAUCET_URL,
        FAUCET_BASE_URL,
    )

    if args.command in ("sandbox", "mcp"):
        return None
    if args.command == "register":
        return os.environ.get(ENV_CASINO_URL) or CASINO_BASE_URL
    if args.command == "faucet" and getattr(args, "agent_id", None):
        return (
            getattr(args, "faucet_url", None) or os.environ.get(ENV_FAUCET_URL) or FAUCET_BASE_URL
        )
    return getattr(args, "base_url", None) or os.environ.get("PF_BASE_URL") or DEFAULT_BASE_URL


class _NoteHandler(logging.Handler):
    """The library's INFO records (retries, pacing, what a long wait waits for) as notes."""

    def __init__(self, out: Output) -> None:
        super().__init__(logging.INFO)
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.note(f"pf-metered: {record.getMessage()}")
        except Exception:  # a note must never break the command
            self.handleError(record)


@contextmanager
def _show_waits(out: Output) -> Iterator[None]:
    """While a command runs, show why it waits: the library logs each retry and pause at INFO.

    Silent under ``--json`` (stderr stays one JSON object per failure). The library's own
    redaction filter has already run on each record, and ``note`` scrubs again.
    """
    if out.json:
        yield
        return
    logger = logging.getLogger("pf_metered")
    handler = _NoteHandler(out)
    previous = logger.level
    logger.addHandler(handler)
    if previous == logging.NOTSET or previous > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pf-metered``; returns the exit status (the console script exits with it)."""
    from pf_metered.cli._args import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    out = Output(json="--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv)
    try:
        forbid_key_arguments(argv)
    except CLIError as exc:
        out.error(exc.message, kind=exc.kind, code=exc.code)
        return exc.code
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out.json = bool(args.json)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _show_waits(out):
            return _run(args, out)
    except KeyboardInterrupt:
        out.note("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `pf-metered escrow list | head`: the reader has gone
        _silence_stdout()
        return 0
    except Exception as exc:
        code = exit_code_for(exc)
        message = message_for(exc, _service_url(args))
        if code == EXIT_UNEXPECTED:
            message = (
                f"unexpected {type(exc).__name__}: {message} "
                "(a bug in pf-metered; please report it with the command you ran)"
            )
        out.error(message, kind=_kind(exc, code), code=code, **_details(exc))
        return code
