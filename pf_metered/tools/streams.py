"""The stream tools: an agent opens, feeds, reads and closes its own metered payment streams.

Why the agent gets these: it knows when it starts buying from a provider and when it is done;
the stream does the exact accounting (batches, remainders, refund) in between. The model sees
short ids (``s1``) and figures as decimal strings; the budget it asks for is checked against
the operator's caps before anything is locked.

What this module must never do: lock a budget the caps do not allow, close a stream twice,
count a unit the budget cannot pay (the stream refuses it and the model is told how many are
left), or run an async stream's I/O outside an event loop (a sync close hands it to one:
:func:`~pf_metered.tools.context.run_async_close`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any

from pf_metered.errors import InvalidInput, PFMeteredError
from pf_metered.meter.receipt import Receipt, StatusReport
from pf_metered.money import MAX_UNITS, Rate, format_usdc, parse_amount, parse_rate
from pf_metered.stream import AsyncPaymentStream, PaymentStream
from pf_metered.tools._base import Answer, ToolDefinition
from pf_metered.tools.context import StreamEntry, ToolContext, await_on_loop, run_async_close
from pf_metered.tools.errors import ToolError, offers, sync_call_without_client
from pf_metered.tools.schemas import (
    StreamCloseArgs,
    StreamListArgs,
    StreamOpenArgs,
    StreamRecordArgs,
    StreamStatusArgs,
)

__all__ = [
    "STREAM_CLOSE",
    "STREAM_LIST",
    "STREAM_OPEN",
    "STREAM_RECORD",
    "STREAM_STATUS",
    "receipt_figures",
    "status_figures",
]

log = logging.getLogger("pf_metered.tools")


def _units_cap(rate: Rate, budget_micro: int, max_units: int | None) -> int:
    affordable = rate.units_affordable(budget_micro)
    return min(affordable, max_units) if max_units is not None else affordable


def status_figures(entry: StreamEntry, report: StatusReport) -> Answer:
    """A stream's figures as the model reads them."""
    cap = _units_cap(entry.rate, report.budget_micro, entry.max_units)
    return {
        "stream_id": entry.handle,
        "provider": entry.provider,
        "status": report.state,
        "rate": str(entry.rate),
        "units": report.units,
        "units_left": max(cap - report.units, 0) if cap < MAX_UNITS else None,
        "budget": format_usdc(report.budget_micro),
        "released": format_usdc(report.released_micro),
        "unreleased_units": report.pending_units,
        "remaining": format_usdc(report.remaining_micro),
        "escrow_id": report.escrow_id,
    }


def receipt_figures(entry: StreamEntry, receipt: Receipt) -> Answer:
    """A closed stream's receipt as the model reads it.

    Beyond paid and refunded, only the figures that apply: money still locked (each escrow,
    until when, what comes back to the payer), what the service released or kept on its own,
    and what the payer's balance went down by when that differs from paid.
    """
    answer: Answer = {
        "stream_id": entry.handle,
        "provider": entry.provider,
        "status": "closed",
        **receipt.figures(),
        "escrow_id": receipt.escrow_id,
    }
    if receipt.auto_released_micro:
        answer["auto_released"] = format_usdc(receipt.auto_released_micro)
    if receipt.kept_by_service_micro:
        answer["kept_by_service"] = format_usdc(receipt.kept_by_service_micro)
    if receipt.unpaid_micro:
        answer["unpaid"] = format_usdc(receipt.unpaid_micro)
    if receipt.still_locked:
        answer["still_locked"] = format_usdc(receipt.still_locked_micro)
        answer["still_locked_escrows"] = [
            {
                "escrow_id": h.escrow_id,
                "amount": format_usdc(h.amount_micro),
                "until": h.until,
                "returns": None if h.returns_micro is None else format_usdc(h.returns_micro),
                "why": h.why,
            }
            for h in receipt.still_locked
        ]
    if receipt.debited_micro != receipt.paid_micro:
        answer["debited"] = format_usdc(receipt.debited_micro)
    if receipt.notes:
        answer["notes"] = list(receipt.notes)
    return answer


def _figures(entry: StreamEntry) -> Answer:
    if entry.receipt is not None:
        return receipt_figures(entry, entry.receipt)
    return status_figures(entry, entry.stream.status())


# -- stream_open ------------------------------------------------------------------------


def _open_prepare(ctx: ToolContext, args: StreamOpenArgs) -> tuple[Rate, int]:
    rate = parse_rate(args.rate, "rate")
    ctx.check_rate(rate)
    if args.budget is not None:
        budget_micro = parse_amount(args.budget, "budget")
    elif args.max_units is not None:
        budget_micro = rate.micro_half_up(args.max_units)
        if budget_micro == 0:
            raise ToolError(
                "Invalid arguments for stream_open: rate x max_units is less than 0.000001 "
                "USDC; give a larger max_units or a budget and call it again.",
                kind="invalid_argument",
            )
    else:
        raise ToolError(
            'Invalid arguments for stream_open: give budget (USDC to lock, e.g. "2.00") or '
            "max_units (the most units to pay for), and call stream_open again.",
            kind="invalid_argument",
        )
    ctx.reserve(budget_micro, what="stream budget", provider=args.provider, stream=True)
    return rate, budget_micro


def _budget_problem(exc: InvalidInput) -> Exception:
    """The escrow's ``amount`` is the stream's budget: say so in the model's terms."""
    if exc.field == "amount":
        return ToolError(
            f"Invalid argument budget: the escrow amount {exc.problem} (the service's minimum "
            "escrow). Give a larger budget (or max_units) and call stream_open again.",
            kind="invalid_argument",
        )
    return exc


def _stream_kwargs(ctx: ToolContext, args: StreamOpenArgs, budget_micro: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "batch": args.batch,
        "budget": format_usdc(budget_micro),
        "max_units": args.max_units,
        "memo": args.memo or None,
    }
    if ctx.store is not None:
        kwargs["store"] = ctx.store
    if ctx.auto_release_hours is not None:
        kwargs["auto_release_hours"] = ctx.auto_release_hours
    return kwargs


def _opened(
    ctx: ToolContext,
    stream: Any,
    args: StreamOpenArgs,
    rate: Rate,
    budget_micro: int,
    *,
    is_async: bool,
) -> Answer:
    entry = ctx.register(
        stream,
        provider=args.provider,
        rate=rate,
        budget_micro=budget_micro,
        max_units=args.max_units,
        is_async=is_async,
    )
    return status_figures(entry, stream.status())


def _open(ctx: ToolContext, args: StreamOpenArgs) -> Answer:
    if ctx.client is None:
        raise sync_call_without_client("stream_open")  # the developer's to fix
    rate, budget_micro = _open_prepare(ctx, args)
    with ctx.locking(
        budget_micro, stream=True, provider=args.provider, tool_name="stream_open"
    ) as attempt:
        try:
            stream = PaymentStream(
                ctx.client, args.provider, str(rate), **_stream_kwargs(ctx, args, budget_micro)
            )
            attempt.stream = stream  # opened again by the same key if the answer is lost
            stream.open()
        except InvalidInput as exc:
            raise _budget_problem(exc) from None
    return _opened(ctx, stream, args, rate, budget_micro, is_async=False)


async def _aopen(ctx: ToolContext, args: StreamOpenArgs) -> Answer:
    if ctx.async_client is None:
        return await asyncio.to_thread(_open, ctx, args)
    rate, budget_micro = _open_prepare(ctx, args)
    with ctx.locking(
        budget_micro, stream=True, provider=args.provider, tool_name="stream_open"
    ) as attempt:
        try:
            astream = AsyncPaymentStream(
                ctx.async_client,
                args.provider,
                str(rate),
                **_stream_kwargs(ctx, args, budget_micro),
            )
            attempt.stream = astream  # opened again by the same key if the answer is lost
            await astream.open()
        except InvalidInput as exc:
            raise _budget_problem(exc) from None
    return _opened(ctx, astream, args, rate, budget_micro, is_async=True)


STREAM_OPEN: ToolDefinition[StreamOpenArgs] = ToolDefinition(
    name="stream_open",
    family="stream",
    description=(
        "Open a metered payment stream to a provider agent: locks a budget in escrow, then pays "
        "the provider a fixed rate per unit of work (per call, token, data point or second) in "
        'batches as units are counted. Returns a stream_id (e.g. "s1") to use with '
        "stream_record, stream_status and stream_close. Close the stream when done: the unused "
        "budget is refunded."
    ),
    args_schema=StreamOpenArgs,
    run=_open,
    arun=_aopen,
    uses_caps=True,
)


# -- stream_status ----------------------------------------------------------------------


def _still_locked(entry: StreamEntry) -> list[str]:
    """The escrows a closed stream left locked (worth reading back: one may have come back)."""
    return [] if entry.receipt is None else [h.escrow_id for h in entry.receipt.still_locked]


def _reread_failed(entry: StreamEntry, exc: PFMeteredError) -> None:
    # the receipt as last seen is still true (the money was locked then); say why it stands
    log.warning("stream %s: still-locked escrows not read back: %s", entry.handle, exc)


def _status(ctx: ToolContext, args: StreamStatusArgs) -> Answer:
    entry = ctx.entry(args.stream_id)
    held = _still_locked(entry)
    if held and ctx.client is not None:
        try:
            ctx.still_locked_seen(entry, [ctx.client.get_escrow(e) for e in held])
        except PFMeteredError as exc:
            _reread_failed(entry, exc)
    return _figures(entry)


async def _astatus(ctx: ToolContext, args: StreamStatusArgs) -> Answer:
    entry = ctx.entry(args.stream_id)
    held = _still_locked(entry)
    client = ctx.async_client
    if held and client is None:
        return await asyncio.to_thread(_status, ctx, args)
    if held and client is not None:
        try:
            ctx.still_locked_seen(entry, [await client.get_escrow(e) for e in held])
        except PFMeteredError as exc:
            _reread_failed(entry, exc)
    return _figures(entry)


STREAM_STATUS: ToolDefinition[StreamStatusArgs] = ToolDefinition(
    name="stream_status",
    family="stream",
    description=(
        "Read a payment stream's figures: units counted, units_left in the budget, released "
        "(paid to the provider so far), unreleased_units and remaining budget; for a closed "
        "stream its receipt, with escrows it left still_locked read again (what came back since "
        "shows as refunded)."
    ),
    args_schema=StreamStatusArgs,
    run=_status,
    arun=_astatus,
    read_only=True,
)


# -- stream_record ----------------------------------------------------------------------


def _record(ctx: ToolContext, args: StreamRecordArgs) -> Answer:
    entry = ctx.entry(args.stream_id)
    if entry.receipt is not None or entry.closing:
        raise ToolError(
            f"Stream {entry.handle} is closed and takes no more units.",
            next_step="Open a new stream with stream_open to pay for more units."
            if offers("stream_open")
            else "Tell the user if more work must be paid for.",
            kind="stream_closed",
        )
    result = entry.stream.record(args.units)
    if inspect.isawaitable(result):  # pragma: no cover - record() does no I/O on either stream
        raise ToolError("internal: record() must not await", kind="error")
    return {"recorded": args.units, **status_figures(entry, entry.stream.status())}


async def _arecord(ctx: ToolContext, args: StreamRecordArgs) -> Answer:
    return _record(ctx, args)


STREAM_RECORD: ToolDefinition[StreamRecordArgs] = ToolDefinition(
    name="stream_record",
    family="stream",
    description=(
        "Count units of work you received from the provider on a stream (e.g. 25 data points), "
        "when nothing counts them for you. Payment follows in batches. Fails without counting "
        "anything if the budget cannot pay for them; the answer says how many units are left."
    ),
    args_schema=StreamRecordArgs,
    run=_record,
    arun=_arecord,
)


# -- stream_close -----------------------------------------------------------------------


def _begin_close(ctx: ToolContext, args: StreamCloseArgs) -> tuple[StreamEntry, bool]:
    """Claim the close of a stream: ``(entry, True)`` if this call must close it."""
    entry = ctx.entry(args.stream_id)
    with entry.lock:
        if entry.receipt is not None:
            return entry, False
        if entry.closing:
            raise ToolError(
                f"Stream {entry.handle} is being closed by another call.",
                next_step="Check it with stream_status in a moment."
                if offers("stream_status")
                else "Do not close it again: that call returns its receipt.",
                kind="closing",
            )
        entry.closing = True
        return entry, True


def _finish_close(ctx: ToolContext, entry: StreamEntry, receipt: Receipt) -> Answer:
    ctx.closed(entry, receipt)
    entry.closing = False
    return receipt_figures(entry, receipt)


def _close(ctx: ToolContext, args: StreamCloseArgs) -> Answer:
    entry, mine = _begin_close(ctx, args)
    if not mine:
        return _figures(entry)
    stream = entry.stream
    try:
        if isinstance(stream, AsyncPaymentStream):  # on its own loop, or a private one
            receipt = run_async_close(entry.loop, stream.close, what=f"stream {entry.handle}")
        else:
            receipt = stream.close()
    except BaseException:
        entry.closing = False
        raise
    return _finish_close(ctx, entry, receipt)


async def _aclose(ctx: ToolContext, args: StreamCloseArgs) -> Answer:
    entry, mine = _begin_close(ctx, args)
    if not mine:
        return _figures(entry)
    stream = entry.stream
    try:
        if isinstance(stream, AsyncPaymentStream):
            receipt = await await_on_loop(entry.loop, stream.close)
        else:
            receipt = await asyncio.to_thread(stream.close)
    except BaseException:
        entry.closing = False
        raise
    return _finish_close(ctx, entry, receipt)


STREAM_CLOSE: ToolDefinition[StreamCloseArgs] = ToolDefinition(
    name="stream_close",
    family="stream",
    description=(
        "Close a payment stream when you are done with the provider: pays for every unit "
        "counted, gives the unused budget back to you, and returns the receipt (units, paid, "
        "fee, provider_net, refunded, and still_locked: escrows still holding your money, "
        "until when, and what comes back then). Closing an already closed stream returns its "
        "receipt again."
    ),
    args_schema=StreamCloseArgs,
    run=_close,
    arun=_aclose,
)


# -- stream_list ------------------------------------------------------------------------


def _list(ctx: ToolContext, args: StreamListArgs) -> Answer:
    rows = []
    for entry in ctx.entries():
        if entry.receipt is not None and not args.include_closed:
            continue
        figures = _figures(entry)
        # open: what it released so far; closed: where its budget went, as it really is
        money = ("released",) if entry.receipt is None else ("paid", "refunded", "still_locked")
        rows.append(
            {
                k: figures[k]
                for k in ("stream_id", "provider", "status", "units", "budget", *money)
                if k in figures
            }
        )
    return {**ctx.streams_summary(), "streams": rows}


async def _alist(ctx: ToolContext, args: StreamListArgs) -> Answer:
    return _list(ctx, args)


STREAM_LIST: ToolDefinition[StreamListArgs] = ToolDefinition(
    name="stream_list",
    family="stream",
    description=(
        "List the payment streams opened in this conversation, with their status, units and "
        "money: released so far for an open stream; paid, refunded and still_locked (held by "
        "the service until an escrow's timeout) for a closed one. The totals say what is "
        "locked now, paid and refunded."
    ),
    args_schema=StreamListArgs,
    run=_list,
    arun=_alist,
    read_only=True,
)
