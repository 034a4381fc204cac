"""``escrow_refund``: give back an escrow the tools made and the agent no longer needs.

Why it exists: an agent that locks money for a job that falls through must be able to get it
back itself. Without it the escrow stays locked until ``auto_release_hours``, which pays the
*provider* what is left — the opposite of what the payer wants. It refunds only escrows this
server made with ``escrow_create`` (in this run or an earlier one: the state file remembers),
never a stream's budget (``stream_close`` refunds that), under the same caps as the release.

What this module must never do: refund an escrow the tools did not make (unless the operator
set ``release_any_escrow``), refund a stream's escrow behind the stream, or retry a refund whose
outcome was lost with a new key (the client reads the escrow back first).
"""

from __future__ import annotations

import asyncio

from pf_metered.errors import UnsupportedByDialect
from pf_metered.models import Escrow
from pf_metered.tools._base import Answer, ToolDefinition
from pf_metered.tools.context import ToolContext
from pf_metered.tools.errors import ToolError, offers, sync_call_without_client
from pf_metered.tools.escrow import escrow_figures
from pf_metered.tools.schemas import EscrowStatusArgs

__all__ = ["ESCROW_REFUND", "EscrowRefundArgs"]


class EscrowRefundArgs(EscrowStatusArgs):
    """Give back what is still locked in an escrow you made."""


def _prepare(ctx: ToolContext, args: EscrowRefundArgs) -> None:
    owner = ctx.owner_of_escrow(args.escrow_id)
    if owner is not None:
        raise ToolError(
            f"Escrow {args.escrow_id} is the budget of stream {owner.handle}, so escrow_refund "
            "may not give it back.",
            next_step="Close the stream with stream_close: it pays what was counted and refunds "
            "the rest."
            if offers("stream_close")
            else "Its unused rest is refunded when the stream closes; do not call escrow_refund "
            "for it again.",
            kind="owned_by_stream",
        )
    if not ctx.caps.release_any_escrow and not ctx.created_escrow(args.escrow_id):
        raise ToolError(
            f"Escrow {args.escrow_id} was not created with escrow_create by these tools, and "
            "the operator lets escrow_refund give back only those. Do not call escrow_refund "
            "for it again.",
            kind="not_allowed",
        )


def _no_refund() -> ToolError:
    return ToolError(
        "escrow_refund is not available with this escrow service: it has no refund call. An "
        "escrow you made comes back to you (less the service's 1%) when its timeout passes.",
        next_step="Do not call escrow_refund again"
        + ("; to pay it instead, use escrow_release." if offers("escrow_release") else "."),
        kind="unsupported",
    )


def _refunded(ctx: ToolContext, escrow: Escrow) -> Answer:
    ctx.escrow_seen(escrow)  # what came back is given back to max_total
    return {"refunded_now": escrow_figures(escrow)["refunded"], **escrow_figures(escrow)}


def _refund(ctx: ToolContext, args: EscrowRefundArgs) -> Answer:
    if ctx.client is None:
        raise sync_call_without_client("escrow_refund")  # the developer's to fix
    _prepare(ctx, args)
    try:
        escrow = ctx.client.refund(args.escrow_id)
    except UnsupportedByDialect:
        raise _no_refund() from None
    return _refunded(ctx, escrow)


async def _arefund(ctx: ToolContext, args: EscrowRefundArgs) -> Answer:
    client = ctx.async_client
    if client is None:
        return await asyncio.to_thread(_refund, ctx, args)
    _prepare(ctx, args)
    try:
        escrow = await client.refund(args.escrow_id)
    except UnsupportedByDialect:
        raise _no_refund() from None
    return _refunded(ctx, escrow)


ESCROW_REFUND: ToolDefinition[EscrowRefundArgs] = ToolDefinition(
    name="escrow_refund",
    family="escrow",
    description=(
        "Give back an escrow you created with escrow_create and no longer need: what is still "
        "locked returns to you (releases already made stay paid) and the escrow closes. A "
        "stream's escrow is refused (close the stream instead). Returns the escrow's figures."
    ),
    args_schema=EscrowRefundArgs,
    run=_refund,
    arun=_arefund,
)
