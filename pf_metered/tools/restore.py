"""Taking back, after a restart, what an earlier run of the tools left in the state file.

Why: the state file (:mod:`pf_metered.tools.state`) remembers every escrow and stream the tools
made, and the streams' meter journal sits in the same file. A restarted server must be able to
release, refund and close all of it. Escrows need nothing here: ``escrow_release`` and
``escrow_refund`` ask the book whether an escrow is theirs. Streams are resumed through the
stream layer's own recovery (``PaymentStream.resume``: pending releases reconciled against the
escrow, never resent with a new key) and put back under the short id the model knew
(``s2`` stays ``s2``).

Streams of *other* owners (a streamable-HTTP session that is gone) can never be fed again —
nobody can reach them — so with ``close_orphans`` they are resumed and closed at once: what was
counted is paid, the rest refunded.

What this module must never do: open a new stream or escrow, send a release the journal did not
derive, or stop at the first stream that cannot be resumed (it is reported and stays journaled).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from pf_metered.money import format_usdc, parse_rate
from pf_metered.stream import AsyncPaymentStream, PaymentStream
from pf_metered.tools.context import ToolContext
from pf_metered.tools.state import Book, StreamRecord

__all__ = ["Restored", "arestore", "restore"]

log = logging.getLogger("pf_metered.mcp")  # a logger the secrets filter already covers


@dataclass
class Restored:
    """What a restore found: streams taken back, orphans closed, escrows open, problems."""

    streams: list[str] = field(default_factory=list)
    orphans_closed: list[str] = field(default_factory=list)
    escrows: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = []
        if self.streams:
            parts.append(f"streams taken back: {', '.join(self.streams)}")
        if self.escrows:
            parts.append(f"escrows you made that are still open: {', '.join(self.escrows)}")
        if self.orphans_closed:
            parts.append(f"streams of ended sessions closed: {len(self.orphans_closed)}")
        if self.problems:
            parts.append("not resumed (still journaled): " + "; ".join(self.problems))
        return "; ".join(parts) if parts else "nothing left open by an earlier run"


def _closed(book: Book, rec: StreamRecord, stream: PaymentStream | AsyncPaymentStream) -> bool:
    receipt = stream.receipt
    if receipt is None:
        return False
    book.stream_closed(
        rec.handle,
        paid_micro=receipt.released_micro,
        refunded_micro=receipt.refunded_micro,
        still_locked_micro=receipt.still_locked_micro,
    )
    return True


def _adopt(ctx: ToolContext, rec: StreamRecord, stream: PaymentStream | AsyncPaymentStream) -> None:
    ctx.adopt(
        stream,
        handle=rec.handle,
        provider=rec.provider,
        rate=parse_rate(rec.rate),
        budget_micro=rec.budget_micro,
        max_units=rec.max_units,
        is_async=isinstance(stream, AsyncPaymentStream),
    )


def _problem(out: Restored, rec: StreamRecord, exc: BaseException) -> None:
    what = f"{rec.handle} of {rec.owner} ({format_usdc(rec.budget_micro)} USDC): {exc}"
    log.warning("restore: stream %s", what)
    out.problems.append(what)


def _orphans(ctx: ToolContext) -> list[StreamRecord]:
    mine = ctx.book.owner
    return [s for s in ctx.book.state.streams(open_only=True) if s.owner != mine]


def restore(ctx: ToolContext, *, close_orphans: bool = False) -> Restored:
    """Resume this owner's open streams into ``ctx`` (sync clients); see the module docstring."""
    if ctx.client is None:
        return Restored(problems=["no sync client to resume streams with"])
    for made in ctx.book.escrows(open_only=True):  # released or refunded behind our back?
        try:
            ctx.book.escrow_seen(ctx.client.get_escrow(made.escrow_id))
        except Exception as exc:  # the row stands as last seen
            log.warning("restore: escrow %s not read back: %s", made.escrow_id, exc)
    out = Restored(escrows=[e.escrow_id for e in ctx.book.escrows(open_only=True)])
    store = ctx.book.state.meter_store
    for rec in ctx.book.streams(open_only=True):
        try:
            stream = PaymentStream.resume(store, rec.stream_id, ctx.client)
        except Exception as exc:
            _problem(out, rec, exc)
            continue
        if not _closed(ctx.book, rec, stream):
            _adopt(ctx, rec, stream)
            out.streams.append(rec.handle)
    if close_orphans:
        for rec in _orphans(ctx):
            try:
                stream = PaymentStream.resume(store, rec.stream_id, ctx.client)
                if stream.receipt is None:
                    stream.close()
            except Exception as exc:
                _problem(out, rec, exc)
                continue
            _closed(ctx.book.state.book(rec.owner), rec, stream)
            out.orphans_closed.append(rec.handle)
    return out


async def arestore(ctx: ToolContext, *, close_orphans: bool = False) -> Restored:
    """:func:`restore` with the async client (or the sync one in a thread)."""
    client = ctx.async_client
    if client is None:
        return await asyncio.to_thread(restore, ctx, close_orphans=close_orphans)
    for made in ctx.book.escrows(open_only=True):  # released or refunded behind our back?
        try:
            ctx.book.escrow_seen(await client.get_escrow(made.escrow_id))
        except Exception as exc:  # the row stands as last seen
            log.warning("restore: escrow %s not read back: %s", made.escrow_id, exc)
    out = Restored(escrows=[e.escrow_id for e in ctx.book.escrows(open_only=True)])
    store = ctx.book.state.meter_store
    for rec in ctx.book.streams(open_only=True):
        try:
            stream = await AsyncPaymentStream.resume(store, rec.stream_id, client)
        except Exception as exc:
            _problem(out, rec, exc)
            continue
        if not _closed(ctx.book, rec, stream):
            _adopt(ctx, rec, stream)
            out.streams.append(rec.handle)
    if close_orphans:
        for rec in _orphans(ctx):
            try:
                orphan = await AsyncPaymentStream.resume(store, rec.stream_id, client)
                if orphan.receipt is None:
                    await orphan.close()
            except Exception as exc:
                _problem(out, rec, exc)
                continue
            _closed(ctx.book.state.book(rec.owner), rec, orphan)
            out.orphans_closed.append(rec.handle)
    return out
