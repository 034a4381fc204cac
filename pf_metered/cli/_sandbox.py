"""``pf-metered sandbox serve``: a local escrow service with two demo agents, on loopback only.

Why it prints what it prints: the person who starts it wants to run the next command in
another terminal, so the first lines are the base URL, the agent ids and the exact ``export``
lines to type. The keys are shown only when asked (``--print-keys``) or written to a file only
the user can read (``--keys-file``), because terminals are recorded and logs are shared.

The first line on stdout is always ``pf-metered sandbox serving <base_url>``, flushed, so a
script (or a test) can wait for it and read the URL.

What this module must never do: bind anything but a loopback address, print a key without
``--print-keys``, or write a keys file others can read.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import threading
from collections.abc import Sequence
from types import FrameType
from typing import TYPE_CHECKING

from pf_metered.cli._exit import EXIT_OK, EXIT_USAGE, CLIError
from pf_metered.cli._format import Output
from pf_metered.cli._secrets import ENV_BASE_URL, ENV_KEY, remember_secret
from pf_metered.money import format_usdc, parse_amount

if TYPE_CHECKING:
    from pf_metered.sandbox import Sandbox, SandboxAgent, SandboxServer

__all__ = ["open_keys_file", "run_sandbox_serve", "write_keys", "write_keys_file"]

_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def write_keys_file(
    path: str,
    keys: Sequence[tuple[str, str, str]],
    *,
    base_url: str | None,
    urls: Sequence[tuple[str, str]] = (),
) -> None:
    """Write ``export NAME=key  # agent`` lines to ``path``, created with mode 600.

    ``base_url`` and ``urls`` (``(variable, url)`` pairs) are exported first.
    """
    fd = open_keys_file(path, exclusive=False)
    try:
        write_keys(fd, keys, base_url=base_url, urls=urls)
    finally:
        os.close(fd)


def open_keys_file(path: str, *, exclusive: bool) -> int:
    """Open ``path`` for keys with mode 600. ``exclusive``: refuse a file that exists, so a
    key that cannot be recovered (a new agent's) never overwrites another."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise CLIError(
            f"keys file {path!r} already exists; choose a new file (its keys may be the only copy)",
            EXIT_USAGE,
            kind="usage",
        ) from None
    except OSError as exc:
        raise CLIError(
            f"cannot write keys file {path!r}: {exc.strerror}", EXIT_USAGE, kind="usage"
        ) from None
    os.fchmod(fd, 0o600)
    return fd


def write_keys(
    fd: int,
    keys: Sequence[tuple[str, str, str]],
    *,
    base_url: str | None,
    urls: Sequence[tuple[str, str]] = (),
) -> None:
    """Write the ``export`` lines of :func:`write_keys_file` to an open file."""
    lines = ["# pf-metered: API keys. Keep this file private; 'source' it to use them."]
    if base_url:
        lines.append(f"export {ENV_BASE_URL}={base_url}")
    lines.extend(f"export {name}={url}" for name, url in urls)
    lines.extend(f"export {name}={key}  # {agent}" for name, key, agent in keys)
    os.write(fd, ("\n".join(lines) + "\n").encode())


def run_sandbox_serve(args: argparse.Namespace, out: Output) -> int:
    """Serve until Ctrl-C or SIGTERM; see the module docstring for what is printed."""
    from pf_metered.sandbox import Sandbox

    if args.host not in _LOOPBACK:  # argparse already restricts it; a second lock on the door
        raise CLIError("the sandbox serves on loopback only", EXIT_USAGE, kind="usage")
    balance = parse_amount(args.balance, "--balance", allow_zero=True)
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        with Sandbox(args.ledger or ":memory:") as sandbox:
            payer = sandbox.add_agent(balance=format_usdc(balance))
            provider = sandbox.add_agent()
            remember_secret(payer.api_key)
            remember_secret(provider.api_key)
            server = _serve(sandbox, args.host, args.port)
            base_url = server.base_url
            if args.keys_file:
                write_keys_file(
                    args.keys_file,
                    [
                        (ENV_KEY, payer.api_key, f"payer {payer.agent_id}"),
                        ("PF_PROVIDER_API_KEY", provider.api_key, f"provider {provider.agent_id}"),
                    ],
                    base_url=base_url,
                    # PF_PROVIDER_ID: the examples (./scripts/demo) pay this agent when a key is set
                    urls=[*_service_urls(base_url), ("PF_PROVIDER_ID", provider.agent_id)],
                )
            _announce(
                out,
                args,
                base_url=base_url,
                balance=format_usdc(balance),
                payer=payer,
                provider=provider,
            )
            try:
                while not stop.wait(0.25):
                    pass
            except KeyboardInterrupt:
                pass
            out.note("pf-metered sandbox: stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


def _serve(sandbox: Sandbox, host: str, port: int) -> SandboxServer:
    """Bind the port, or say how to pick another: a port in use is a usage error (exit 2)."""
    try:
        return sandbox.serve(host, port)
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            why = "is in use" if exc.errno == errno.EADDRINUSE else "needs privileges"
            raise CLIError(
                f"port {port} on {host} {why}: choose another with --port N, or --port 0 "
                "to have a free one picked (the URL is printed on start)",
                EXIT_USAGE,
                kind="usage",
            ) from None
        raise


def _service_urls(base_url: str) -> list[tuple[str, str]]:
    """The sandbox's faucet and registration services (served beside v1 on the same port)."""
    from pf_metered.client.deployed import ENV_CASINO_URL, ENV_FAUCET_URL

    root = base_url.removesuffix("/api/v1")
    return [(ENV_FAUCET_URL, f"{root}/faucet"), (ENV_CASINO_URL, f"{root}/casino")]


def _announce(
    out: Output,
    args: argparse.Namespace,
    *,
    base_url: str,
    balance: str,
    payer: SandboxAgent,
    provider: SandboxAgent,
) -> None:
    """Print the ready line, then how to use the sandbox (or one JSON object with --json)."""
    payer_key, provider_key = payer.api_key, provider.api_key
    ledger = args.ledger or "memory (gone when stopped)"
    if out.json:
        data: dict[str, object] = {
            "base_url": base_url,
            "ledger": args.ledger,
            **{name.removeprefix("PF_").lower(): url for name, url in _service_urls(base_url)},
            "payer": {"agent_id": payer.agent_id, "balance": balance},
            "provider": {"agent_id": provider.agent_id, "balance": "0.00"},
            "keys_file": args.keys_file,
        }
        if args.print_keys:
            data["payer"]["api_key"] = payer_key  # type: ignore[index]
            data["provider"]["api_key"] = provider_key  # type: ignore[index]
        _emit(out, json.dumps(data, ensure_ascii=False), keys_asked=args.print_keys)
        return
    lines = [
        f"pf-metered sandbox serving {base_url}",
        f"  ledger    {ledger}",
        f"  payer     {payer.agent_id}  balance {balance} USDC",
        f"  provider  {provider.agent_id}  balance 0.00 USDC",
        "",
        "Use it from another terminal:",
        f"  export {ENV_BASE_URL}={base_url}",
    ]
    if args.print_keys:
        lines += [
            f"  export {ENV_KEY}={payer_key}   # the payer",
            f"  # provider key: {provider_key}",
        ]
    elif args.keys_file:
        lines += [f"  source {args.keys_file}         # sets {ENV_KEY} to the payer's key"]
    else:
        lines += [
            f"  export {ENV_KEY}=...   # keys are hidden: restart with --keys-file FILE "
            "or --print-keys"
        ]
    lines += [
        "  pf-metered faucet claim",
        f"  pf-metered escrow create {provider.agent_id} 5.00 --memo demo",
        "  pf-metered escrow list",
        "",
        "Ctrl-C stops the sandbox.",
    ]
    _emit(out, "\n".join(lines), keys_asked=args.print_keys)


def _emit(out: Output, text: str, *, keys_asked: bool) -> None:
    """To stdout: scrubbed as always, unless the keys were asked for with --print-keys."""
    if keys_asked:
        out.out.write(text + "\n")
        out.out.flush()
    else:
        out.write(text)
