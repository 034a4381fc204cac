"""The escrow, faucet and register commands: one function each, from parsed arguments to output.

Why thin: each command validates its input with the library's own parsers (so the CLI refuses
exactly what the client would), makes one client call, and hands plain data to
:class:`~pf_metered.cli._format.Output`. Retries, idempotency and answer validation belong to
the client; the CLI adds nothing that could make a release happen twice.

What this module must never do: take the API key from anywhere but
:func:`~pf_metered.cli._secrets.resolve_api_key`, print it, or format money through ``float``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pf_metered.cli._exit import EXIT_OK, EXIT_USAGE, CLIError
from pf_metered.cli._format import (
    ESCROW_COLUMNS,
    RELEASE_COLUMNS,
    Output,
    escrow_detail,
    escrow_row,
    progress_bar,
    render_kv,
    render_table,
    share_text,
    shown_memo,
)
from pf_metered.cli._secrets import resolve_api_key
from pf_metered.errors import UnsupportedByDialect
from pf_metered.models import Escrow
from pf_metered.money import format_usdc, parse_amount

if TYPE_CHECKING:
    from pf_metered.client import EscrowClient

__all__ = ["COMMANDS", "open_client"]

Command = Callable[[argparse.Namespace, Output], int]


def open_client(args: argparse.Namespace) -> EscrowClient:
    """A client for the key in the environment (or prompt) and the chosen base URL."""
    from pf_metered.client import EscrowClient

    key = resolve_api_key()
    return EscrowClient(key, base_url=getattr(args, "base_url", None) or None)


def escrow_block(escrow: Escrow) -> str:
    """An escrow's figures as aligned ``label  value`` lines with a progress bar."""
    amount = escrow.amount_micro
    pairs: list[tuple[str, Any]] = [
        ("escrow", escrow.escrow_id),
        ("status", escrow.status),
        ("payer", escrow.from_agent_id),
        ("provider", escrow.to_agent_id),
        ("amount", f"{format_usdc(amount)} USDC"),
        (
            "released",
            f"{format_usdc(escrow.released_micro)} USDC "
            f"({share_text(escrow.released_micro, amount)})",
        ),
        ("remaining", f"{format_usdc(escrow.remaining_micro)} USDC"),
        ("refunded", f"{format_usdc(escrow.refunded_micro)} USDC"),
        ("progress", progress_bar(escrow.released_micro, escrow.refunded_micro, amount)),
    ]
    if shown_memo(escrow.memo):
        pairs.append(("memo", shown_memo(escrow.memo)))
    if escrow.auto_release_at:
        pairs.append(("auto-release", escrow.auto_release_at))
    return render_kv(pairs)


def _escrow_list(args: argparse.Namespace, out: Output) -> int:
    with open_client(args) as client:
        escrows = client.list_escrows()
    if args.status:
        escrows = [e for e in escrows if e.status == args.status]
    rows = [escrow_row(e) for e in escrows]
    if not rows:
        table = "No escrows" + (f" in status {args.status}." if args.status else " yet.")
    else:
        table = render_table(ESCROW_COLUMNS, rows)
        locked = sum(e.remaining_micro for e in escrows if e.is_open)
        table += f"\n\n{len(rows)} escrow(s); {format_usdc(locked)} USDC still locked."
    out.data({"escrows": rows, "count": len(rows)}, table)
    return EXIT_OK


def _escrow_status(args: argparse.Namespace, out: Output) -> int:
    with open_client(args) as client:
        escrow = client.get_escrow(args.escrow_id)
    detail = escrow_detail(escrow)
    text = escrow_block(escrow)
    if detail["releases"]:
        total = detail["release_count"]
        first = total - len(detail["releases"]) + 1
        rows = [{"n": i, **r} for i, r in enumerate(detail["releases"], first)]
        shown = f"{total}" if first == 1 else f"{total}, the last {len(rows)} shown"
        text += f"\n\nreleases ({shown}):\n" + render_table(RELEASE_COLUMNS, rows)
    else:
        text += "\n\nno releases yet"
    out.data(detail, text)
    return EXIT_OK


def _escrow_create(args: argparse.Namespace, out: Output) -> int:
    amount = parse_amount(args.amount, "AMOUNT")
    with open_client(args) as client:
        escrow = client.create_escrow(
            args.to_agent_id,
            format_usdc(amount),
            memo=args.memo,
            auto_release_hours=args.auto_release_hours,
        )
    out.data(
        escrow_detail(escrow),
        f"Locked {format_usdc(amount)} USDC for {escrow.to_agent_id}.\n\n{escrow_block(escrow)}",
    )
    return EXIT_OK


def _escrow_release(args: argparse.Namespace, out: Output) -> int:
    amount = parse_amount(args.amount, "AMOUNT")
    with open_client(args) as client:
        escrow = client.release_partial(args.escrow_id, format_usdc(amount), memo=args.memo)
    detail = {"released_now": format_usdc(amount), **escrow_detail(escrow)}
    out.data(
        detail,
        f"Released {format_usdc(amount)} USDC to {escrow.to_agent_id} "
        f"(the 1% fee is taken from it).\n\n{escrow_block(escrow)}",
    )
    return EXIT_OK


def _escrow_refund(args: argparse.Namespace, out: Output) -> int:
    with open_client(args) as client:
        escrow = client.refund(args.escrow_id)
    out.data(
        escrow_detail(escrow),
        f"Refunded {format_usdc(escrow.refunded_micro)} USDC; the "
        f"escrow is {escrow.status}.\n\n{escrow_block(escrow)}",
    )
    return EXIT_OK


def _faucet_claim(args: argparse.Namespace, out: Output) -> int:
    if args.faucet_url and not args.agent_id:
        raise CLIError(
            "--faucet-url goes with --agent-id (the separate faucet service)",
            EXIT_USAGE,
            kind="usage",
        )
    if args.agent_id:
        from pf_metered.client import claim_faucet_for

        claim = claim_faucet_for(args.agent_id, base_url=args.faucet_url or None)
    else:
        with open_client(args) as client:
            try:
                claim = client.claim_faucet()
            except UnsupportedByDialect:
                raise CLIError(
                    "this escrow service's faucet is a separate service that takes an agent "
                    "id: run 'pf-metered faucet claim --agent-id YOUR_AGENT_ID'",
                    EXIT_USAGE,
                    kind="usage",
                ) from None
    data = {
        "credited": format_usdc(claim.credited_micro),
        "claim_id": claim.claim_id,
        "agent_id": claim.agent_id,
    }
    out.data(
        data,
        render_kv(
            [
                ("credited", f"{data['credited']} USDC"),
                ("claim", claim.claim_id),
                ("agent", claim.agent_id),
            ]
        ),
    )
    return EXIT_OK


def _register(args: argparse.Namespace, out: Output) -> int:
    """Register a new agent; its key goes to ``--keys-file`` (mode 600), never the terminal."""
    from pf_metered.cli._sandbox import open_keys_file, write_keys
    from pf_metered.client import register_agent

    if not args.keys_file:  # argparse requires it; a second lock on the door
        raise CLIError(
            "register needs --keys-file FILE: the new key is written there, never printed",
            EXIT_USAGE,
            kind="usage",
        )
    # The file is claimed before the agent exists: a new key has no other copy, so it must
    # never overwrite another file's keys, nor be made with nowhere to go.
    fd = open_keys_file(args.keys_file, exclusive=True)
    try:
        try:
            registration = register_agent()
        except BaseException:
            os.unlink(args.keys_file)
            raise
        key = registration.api_key.get_secret_value()
        write_keys(fd, [("PF_API_KEY", key, registration.agent_id)], base_url=None)
    finally:
        os.close(fd)
    out.data(
        {"agent_id": registration.agent_id, "keys_file": args.keys_file},
        f"Registered agent {registration.agent_id}; its key is in {args.keys_file} "
        f"(source it to use it). Registration credits the faucet's one-time 1.00 USDC grant: "
        f"no faucet claim is needed.",
    )
    return EXIT_OK


COMMANDS: dict[tuple[str, str | None], Command] = {
    ("escrow", "list"): _escrow_list,
    ("escrow", "status"): _escrow_status,
    ("escrow", "create"): _escrow_create,
    ("escrow", "release"): _escrow_release,
    ("escrow", "refund"): _escrow_refund,
    ("faucet", "claim"): _faucet_claim,
    ("register", None): _register,
}
"""Commands by (command, action); ``stream``, ``sandbox`` and ``mcp`` live in their own modules."""
