"""``pf-metered stream watch ESCROW_ID``: a live view of a payment stream's escrow.

Why it watches the escrow and not the stream: the stream lives in the payer's process; the
escrow is what both parties (and their operators) can see from anywhere. Released, remaining
and refunded are read from the service every ``--interval`` seconds until the escrow closes.

In a terminal the status line is redrawn in place; in a pipe or a log a line is printed only
when a figure changes (so a log of a day-long stream stays short); with ``--json`` each change
is one JSON object per line. Transient failures (rate limits, a dropped connection, a 5xx) are
shown and retried at the next tick; an answer that will not change (unknown escrow, bad key)
stops the watch with exit 3.

What this module must never do: compute money through ``float`` (the release speed is integer
micro-USDC per minute), or spin: every loop waits at least the interval.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from typing import Any, Final

from pf_metered.cli._commands import escrow_block, open_client
from pf_metered.cli._exit import EXIT_OK
from pf_metered.cli._format import BAR_WIDTH, Output, escrow_row, progress_bar, share_text
from pf_metered.cli._secrets import scrub
from pf_metered.errors import APIConnectionError, RateLimited, ServerError
from pf_metered.models import Escrow
from pf_metered.money import format_usdc

__all__ = ["MIN_BAR", "run_stream_watch", "status_line"]

MIN_BAR: Final = 10
"""The narrowest progress bar ``stream watch`` draws before it leaves figures out."""

_TRANSIENT = (APIConnectionError, RateLimited, ServerError)


def status_line(
    escrow: Escrow, speed_micro_per_min: int | None = None, width: int | None = None
) -> str:
    """One line: id, status, bar, share released, figures, releases, and speed if known.

    ``width`` (a terminal's columns) makes the line fit: the bar shrinks from
    :data:`BAR_WIDTH` to :data:`MIN_BAR` characters, then the least needed parts are left out
    (speed, release count, remaining, the id the user typed, refunded), and what still does not
    fit is cut. A line that fits never wraps, so ``\r`` redraws it in place.
    """
    amount = escrow.amount_micro
    head = [("id", escrow.escrow_id), ("status", escrow.status.ljust(8))]
    tail = [
        ("share", share_text(escrow.released_micro, amount).rjust(6)),
        ("released", f"released {format_usdc(escrow.released_micro)} / {format_usdc(amount)} USDC"),
        ("remaining", f"remaining {format_usdc(escrow.remaining_micro)}"),
    ]
    if escrow.refunded_micro:
        tail.append(("refunded", f"refunded {format_usdc(escrow.refunded_micro)}"))
    tail.append(("releases", f"releases {escrow.total_releases}"))
    if speed_micro_per_min is not None and escrow.is_open:
        tail.append(("speed", f"+{format_usdc(speed_micro_per_min)}/min"))

    def line(bar_width: int) -> str:
        bar = progress_bar(escrow.released_micro, escrow.refunded_micro, amount, width=bar_width)
        return "  ".join([*(t for _, t in head), bar, *(t for _, t in tail)])

    if width is None:
        return line(BAR_WIDTH)
    for drop in (None, "speed", "releases", "remaining", "id", "refunded"):
        if drop is not None:
            head = [(k, t) for k, t in head if k != drop]
            tail = [(k, t) for k, t in tail if k != drop]
        spare = width - len(line(MIN_BAR))
        if spare >= 0:
            return line(min(BAR_WIDTH, MIN_BAR + spare))
    return line(MIN_BAR)[:width]


def _columns() -> int:
    """Usable columns of the terminal: one less than its width, so the cursor never wraps."""
    return max(20, shutil.get_terminal_size().columns - 1)


def _snapshot(escrow: Escrow) -> dict[str, Any]:
    data = escrow_row(escrow)
    data["released_share"] = share_text(escrow.released_micro, escrow.amount_micro)
    data["releases"] = escrow.total_releases
    data["open"] = escrow.is_open
    return data


def _figures(escrow: Escrow) -> tuple[Any, ...]:
    return (
        escrow.status,
        escrow.released_micro,
        escrow.remaining_micro,
        escrow.refunded_micro,
        escrow.total_releases,
    )


class _Speed:
    """Release speed since the watch began, in integer micro-USDC per minute."""

    def __init__(self, escrow: Escrow, now: float) -> None:
        self.first_micro = escrow.released_micro
        self.first_at = now

    def per_minute(self, escrow: Escrow, now: float) -> int | None:
        elapsed_ms = int((now - self.first_at) * 1000)
        if elapsed_ms < 1000:
            return None
        return (escrow.released_micro - self.first_micro) * 60_000 // elapsed_ms


def run_stream_watch(args: argparse.Namespace, out: Output) -> int:
    """Watch until the escrow closes, ``--timeout`` passes, or ``--once`` has printed."""
    tty = not out.json and _isatty(out)
    with open_client(args) as client:
        escrow = client.get_escrow(args.escrow_id)
        if args.once:
            out.data(_snapshot(escrow), escrow_block(escrow))
            return EXIT_OK
        started = time.monotonic()
        speed = _Speed(escrow, started)
        last: tuple[Any, ...] | None = None
        drawn = False
        while True:
            now = time.monotonic()
            figures = _figures(escrow)
            if out.json:
                if figures != last:
                    out.write(json.dumps(_snapshot(escrow), ensure_ascii=False))
            elif tty:
                line = status_line(escrow, speed.per_minute(escrow, now), width=_columns())
                out.out.write("\r\x1b[2K" + scrub(line))
                out.out.flush()
                drawn = True
            elif figures != last:
                out.write(status_line(escrow))
            last = figures
            if not escrow.is_open:
                break
            if args.timeout is not None and now - started >= args.timeout:
                if drawn:
                    out.out.write("\n")
                    drawn = False
                out.note(f"still {escrow.status} after {args.timeout:g} s; stopped watching")
                return EXIT_OK
            time.sleep(args.interval)
            try:
                escrow = client.get_escrow(args.escrow_id)
            except _TRANSIENT as exc:
                if drawn:
                    out.out.write("\n")
                    drawn = False
                out.note(f"(will retry: {exc})")
        if drawn:
            out.out.write("\n")
            out.out.flush()
    out.note(
        f"escrow {escrow.escrow_id} is {escrow.status}: released "
        f"{format_usdc(escrow.released_micro)} USDC, refunded "
        f"{format_usdc(escrow.refunded_micro)} USDC of {format_usdc(escrow.amount_micro)}."
    )
    return EXIT_OK


def _isatty(out: Output) -> bool:
    try:
        return out.out.isatty()
    except (AttributeError, ValueError):
        return False
