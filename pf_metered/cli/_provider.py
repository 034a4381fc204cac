"""``pf-metered provider watch URL``: a provider's incoming streams, live.

Why a URL and not a key: the gate's counts (served, paid, owed, refusals) live in the
provider's service process, not in the escrow service; the service publishes them as JSON
(:func:`pf_metered.provider.asgi.accounts_json`, e.g. ``GET /_gate`` in
``examples/provider_service.py``) on an address only its operator can reach. This command reads
that JSON every ``--interval`` seconds and prints one table per change (``--json``: the JSON).

What this module must never do: send anything but a GET to the URL given, follow redirects, or
accept plain http to anything but loopback.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import httpx

from pf_metered.cli._exit import EXIT_API, EXIT_OK, EXIT_USAGE
from pf_metered.cli._format import Output

__all__ = ["add_provider", "render_accounts", "run_provider_watch"]

_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_COLUMNS = (
    ("escrow_id", "STREAM"),
    ("status", "STATUS"),
    ("served", "SERVED"),
    ("paid_units", "PAID UNITS"),
    ("paid", "PAID"),
    ("owed", "OWED"),
    ("max_unpaid", "MAX UNPAID"),
    ("refusals", "REFUSALS"),
)


def add_provider(
    commands: Any,
    common: argparse.ArgumentParser,
    sub: Callable[..., argparse.ArgumentParser],
    seconds: Callable[[str], float],
    parser_class: type[argparse.ArgumentParser],
) -> None:
    """Register ``provider watch`` (the helpers come from ``_args`` to keep one style)."""
    provider = sub(
        commands,
        "provider",
        common,
        help="watch the streams paying your service (the provider's side)",
        description="A provider's payment gate counts, per paying stream, the units served, "
        "the units paid and what is owed; these commands show it.",
        epilog="example:\n  pf-metered provider watch http://127.0.0.1:8900/_gate\n",
    )
    actions = provider.add_subparsers(dest="action", metavar="ACTION", parser_class=parser_class)
    actions.required = True
    watch = sub(
        actions,
        "watch",
        common,
        help="live table of incoming streams: served, paid, owed, status",
        description=(
            "Read the gate's figures from your service's stats URL (the JSON of "
            "pf_metered.provider.asgi.accounts_json) and print them as a table each time they "
            "change, until Ctrl-C. Plain http only to loopback."
        ),
        epilog=(
            "examples:\n"
            "  pf-metered provider watch http://127.0.0.1:8900/_gate\n"
            "  pf-metered provider watch http://127.0.0.1:8900/_gate --once --json\n"
        ),
    )
    watch.add_argument("url", metavar="URL", help="the service's gate stats URL")
    watch.add_argument(
        "--interval",
        type=seconds,
        default=2.0,
        metavar="SECONDS",
        help="seconds between refreshes (default 2; at least 0.2)",
    )
    watch.add_argument("--once", action="store_true", help="print the figures once and exit")
    watch.add_argument(
        "--timeout",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="stop after SECONDS (exit 0); default: until Ctrl-C",
    )


def render_accounts(payload: dict[str, Any]) -> str:
    """The accounts as an aligned table (refusals as ``reason×n``)."""
    accounts = payload.get("accounts") or []
    if not accounts:
        return "No paying streams yet."
    rows = []
    for a in accounts:
        refusals = a.get("refusals") or {}
        cells = {**a, "refusals": ", ".join(f"{k}×{v}" for k, v in sorted(refusals.items()))}
        rows.append([str(cells.get(key, "")) for key, _ in _COLUMNS])
    heads = [title for _, title in _COLUMNS]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines) + f"\ncredit: {payload.get('credit')} units per stream"


def _check_url(url: str) -> str | None:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return f"not a URL: {url!r}"
    if parsed.scheme == "https" and parsed.host:
        return None
    if parsed.scheme == "http" and parsed.host in _LOOPBACK:
        return None
    return "the stats URL must be https, or http to loopback (127.0.0.1, localhost, ::1)"


def run_provider_watch(args: argparse.Namespace, out: Output) -> int:
    problem = _check_url(args.url)
    if problem is not None:
        out.error(problem, kind="usage", code=EXIT_USAGE)
        return EXIT_USAGE
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    last: str | None = None
    with httpx.Client(timeout=10, follow_redirects=False, trust_env=False) as http:
        while True:
            try:
                r = http.get(args.url)
                r.raise_for_status()
                payload = r.json()
                if not isinstance(payload, dict):
                    raise ValueError("not a JSON object")
            except (httpx.HTTPError, ValueError) as exc:
                out.error(
                    f"cannot read {args.url}: {type(exc).__name__}", kind="api", code=EXIT_API
                )
                return EXIT_API
            shown = (
                json.dumps(payload, ensure_ascii=False) if out.json else render_accounts(payload)
            )
            if shown != last:
                out.write(shown)
                last = shown
            if args.once or (deadline is not None and time.monotonic() >= deadline):
                return EXIT_OK
            try:
                time.sleep(args.interval)
            except KeyboardInterrupt:
                return EXIT_OK
