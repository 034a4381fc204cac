"""The escrow tools: create, release, read and list escrows, and claim the faucet.

Why these exist next to the streams: some payments are one-off (a fixed price for a job), and
agents already know the escrow vocabulary (``escrow_create``, ``escrow_release``) from the
service's own tools. Every amount is parsed exactly and checked against the operator's caps
before any request leaves.

What this module must never do: release an escrow this context did not create with
``escrow_create`` unless the operator opted in (``Caps(release_any_escrow=True)``): the program
that holds the key may have escrows of its own, whose books are not the agent's; release through
a stream's escrow behind the stream's back (an escrow that belongs to an open stream is refused
even then: its books are the stream's); or lock money without first holding it against
``max_total``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pf_metered.errors import UnsupportedByDialect
from pf_metered.models import Escrow
from pf_metered.money import format_usdc, parse_amount
from pf_metered.tools._base import Answer, ToolDefinition
from pf_metered.tools.context import ToolContext
from pf_metered.tools.errors import ToolError, offers, sync_call_without_client
from pf_metered.tools.schemas import (
    EscrowCreateArgs,
    EscrowListArgs,
    EscrowReleaseArgs,
    EscrowStatusArgs,
    FaucetClaimArgs,
)
from pf_metered.tools.state import strip_memo_tag

if TYPE_CHECKING:
    from pf_metered.client import AsyncEscrowClient, EscrowClient

__all__ = [
    "ESCROW_CREATE",
    "ESCROW_LIST",
    "ESCROW_RELEASE",
    "ESCROW_STATUS",
    "FAUCET_CLAIM",
    "escrow_figures",
]

_HISTORY = 10


def escrow_figures(escrow: Escrow, *, history: bool = False) -> Answer:
    """An escrow as the model reads it: ids, status and every figure as a decimal string."""
    answer: Answer = {
        "escrow_id": escrow.escrow_id,
        "status": escrow.status,
        "to_agent_id": escrow.to_agent_id,
        "amount": format_usdc(escrow.amount_micro),
        "released": format_usdc(escrow.released_micro),
        "remaining": format_usdc(escrow.remaining_micro),
        "refunded": format_usdc(escrow.refunded_micro),
    }
    memo = strip_memo_tag(escrow.memo)  # the caller's words, without the client's [idem:] tag
    if memo:
        answer["memo"] = memo
    if history:
        answer["releases"] = escrow.total_releases
        answer["last_releases"] = [
            {"amount": format_usdc(r.amount_micro), "memo": strip_memo_tag(r.memo)}
            for r in escrow.releases[-_HISTORY:]
        ]
    return answer


def _sync(ctx: ToolContext, tool_name: str) -> EscrowClient:
    if ctx.client is None:
        raise sync_call_without_client(tool_name)  # the developer's to fix, not the model's
    return ctx.client


def _async(ctx: ToolContext) -> AsyncEscrowClient | None:
    return ctx.async_client


# -- escrow_create ----------------------------------------------------------------------


def _create_prepare(ctx: ToolContext, args: EscrowCreateArgs) -> int:
    amount = parse_amount(args.amount, "amount")
    ctx.reserve(amount, what="escrow amount", provider=args.to_agent_id, stream=False)
    return amount


def _create(ctx: ToolContext, args: EscrowCreateArgs) -> Answer:
    client = _sync(ctx, "escrow_create")
    amount = _create_prepare(ctx, args)
    with ctx.locking(
        amount, stream=False, provider=args.to_agent_id, tool_name="escrow_create"
    ) as attempt:
        attempt.memo, attempt.auto_release_hours = args.memo, _hours(ctx, args)
        escrow = client.create_escrow(
            args.to_agent_id,
            format_usdc(amount),
            memo=args.memo,
            auto_release_hours=_hours(ctx, args),
        )
    return _created(ctx, escrow, args, amount)


def _hours(ctx: ToolContext, args: EscrowCreateArgs) -> int | None:
    """The model's hours, else the operator's default: nothing stays locked forever."""
    return (
        args.auto_release_hours if args.auto_release_hours is not None else ctx.auto_release_hours
    )


def _created(ctx: ToolContext, escrow: Escrow, args: EscrowCreateArgs, amount: int) -> Answer:
    ctx.escrow_made(escrow, provider=args.to_agent_id, amount_micro=amount)
    return escrow_figures(escrow)


async def _acreate(ctx: ToolContext, args: EscrowCreateArgs) -> Answer:
    client = _async(ctx)
    if client is None:
        return await asyncio.to_thread(_create, ctx, args)
    amount = _create_prepare(ctx, args)
    with ctx.locking(
        amount, stream=False, provider=args.to_agent_id, tool_name="escrow_create"
    ) as attempt:
        attempt.memo, attempt.auto_release_hours = args.memo, _hours(ctx, args)
        escrow = await client.create_escrow(
            args.to_agent_id,
            format_usdc(amount),
            memo=args.memo,
            auto_release_hours=_hours(ctx, args),
        )
    return _created(ctx, escrow, args, amount)


ESCROW_CREATE: ToolDefinition[EscrowCreateArgs] = ToolDefinition(
    name="escrow_create",
    family="escrow",
    description=(
        "Lock USDC in a new Purple Flea escrow for another agent (the provider), to pay them "
        "for a job in one or more releases. Returns the escrow_id and its figures. For work "
        "paid per unit (per call, token or data point) prefer stream_open."
    ),
    args_schema=EscrowCreateArgs,
    run=_create,
    arun=_acreate,
    uses_caps=True,
)


# -- escrow_release ---------------------------------------------------------------------


def _release_prepare(ctx: ToolContext, args: EscrowReleaseArgs) -> int | None:
    amount = None if args.amount is None else parse_amount(args.amount, "amount")
    owner = ctx.owner_of_escrow(args.escrow_id)
    if owner is not None:
        through = [t for t in ("stream_record", "stream_close") if offers(t)]
        raise ToolError(
            f"Escrow {args.escrow_id} is the budget of stream {owner.handle}, so escrow_release "
            "may not pay it.",
            next_step=f"Pay through the stream ({', '.join(through)})."
            if through
            else "It is paid when the stream closes; do not call escrow_release for it again.",
            kind="owned_by_stream",
        )
    if not ctx.caps.release_any_escrow and not ctx.created_escrow(args.escrow_id):
        raise ToolError(
            f"Escrow {args.escrow_id} was not created with escrow_create by these tools, and "
            "the operator lets escrow_release pay only those. Do not call escrow_release for "
            "it again.",
            kind="not_allowed",
        )
    if amount is not None and not ctx.created_escrow(args.escrow_id):
        ctx.book.check_spend(amount, ctx.caps, what="releasing")  # not in the book's locked
    return amount


def _whole_amount(ctx: ToolContext, escrow: Escrow, amount: int | None, partial: bool) -> None:
    """On a service that releases only whole escrows, an ``amount`` must be all of it (and
    releasing all of an escrow the tools did not make must fit ``max_spend``)."""
    if amount is None and not ctx.created_escrow(escrow.escrow_id):
        ctx.book.check_spend(escrow.remaining_micro, ctx.caps, what="releasing")
    if partial or amount is None or amount == escrow.remaining_micro:
        return
    raise ToolError(
        f"Invalid argument amount: this escrow service releases only whole escrows, and "
        f"escrow {escrow.escrow_id} holds {format_usdc(escrow.remaining_micro)} USDC. Call "
        "escrow_release again without amount (or with the whole amount) to pay all of it.",
        kind="invalid_argument",
    )


def _booked(ctx: ToolContext, escrow: Escrow, released_now: int) -> Answer:
    """Keep the book's figures of an escrow the tools made, or count a release of another."""
    if ctx.created_escrow(escrow.escrow_id):
        ctx.escrow_seen(escrow)
    else:
        ctx.book.other_release(escrow.escrow_id, released_now)
    return {"released_now": format_usdc(released_now), **escrow_figures(escrow)}


def _released(ctx: ToolContext, before: Escrow, after: Escrow) -> Answer:
    return _booked(ctx, after, after.released_micro - before.released_micro)


def _release(ctx: ToolContext, args: EscrowReleaseArgs) -> Answer:
    client = _sync(ctx, "escrow_release")
    amount = _release_prepare(ctx, args)
    before = client.get_escrow(args.escrow_id)  # first: a client that probes its dialect has
    partial = client.capabilities.supports_partial_release  # found it by now
    if partial and amount is not None:
        escrow = client.release_partial(args.escrow_id, format_usdc(amount), memo=args.memo)
        return _booked(ctx, escrow, amount)
    _whole_amount(ctx, before, amount, partial)
    return _released(ctx, before, client.release(args.escrow_id, memo=args.memo))


async def _arelease(ctx: ToolContext, args: EscrowReleaseArgs) -> Answer:
    client = _async(ctx)
    if client is None:
        return await asyncio.to_thread(_release, ctx, args)
    amount = _release_prepare(ctx, args)
    before = await client.get_escrow(args.escrow_id)  # resolves a probed dialect first
    partial = client.capabilities.supports_partial_release
    if partial and amount is not None:
        escrow = await client.release_partial(args.escrow_id, format_usdc(amount), memo=args.memo)
        return _booked(ctx, escrow, amount)
    _whole_amount(ctx, before, amount, partial)
    return _released(ctx, before, await client.release(args.escrow_id, memo=args.memo))


_RELEASE_RULES = (
    "A stream's escrow is refused, and so are other escrows unless the operator allows them. "
    "The 1% fee is taken from what is released. Returns the escrow's figures after the "
    "release. Do not repeat a release whose outcome was unclear: check escrow_status first."
)

ESCROW_RELEASE: ToolDefinition[EscrowReleaseArgs] = ToolDefinition(
    name="escrow_release",
    family="escrow",
    description=(
        "Pay an escrow you created with escrow_create to its provider. Where the escrow "
        "service allows partial releases, give amount to pay part of it (or leave amount out "
        "to pay all that remains); where it releases only whole escrows, the whole amount is "
        "paid at once. " + _RELEASE_RULES
    ),
    args_schema=EscrowReleaseArgs,
    run=_release,
    arun=_arelease,
    by_dialect={
        "v1": (
            "Pay part (or all) of an escrow you created with escrow_create to its provider: "
            "give amount to release that much now, or leave it out to release all that "
            "remains. " + _RELEASE_RULES
        ),
        "deployed": (
            "Pay an escrow you created with escrow_create to its provider. This escrow "
            "service releases only whole escrows: all of it goes to the provider at once "
            "(leave amount out, or give the escrow's whole amount). " + _RELEASE_RULES
        ),
    },
)


# -- escrow_status ----------------------------------------------------------------------


def _seen(ctx: ToolContext, escrow: Escrow) -> Answer:
    ctx.escrow_seen(escrow)  # an escrow of the book's: keep its figures (and max_total) current
    return escrow_figures(escrow, history=True)


def _status(ctx: ToolContext, args: EscrowStatusArgs) -> Answer:
    return _seen(ctx, _sync(ctx, "escrow_status").get_escrow(args.escrow_id))


async def _astatus(ctx: ToolContext, args: EscrowStatusArgs) -> Answer:
    client = _async(ctx)
    if client is None:
        return await asyncio.to_thread(_status, ctx, args)
    return _seen(ctx, await client.get_escrow(args.escrow_id))


ESCROW_STATUS: ToolDefinition[EscrowStatusArgs] = ToolDefinition(
    name="escrow_status",
    family="escrow",
    description=(
        "Read one escrow: status, amount, released, remaining, refunded and its latest releases."
    ),
    args_schema=EscrowStatusArgs,
    run=_status,
    arun=_astatus,
    read_only=True,
)


# -- escrow_list ------------------------------------------------------------------------


def _list_answer(escrows: list[Escrow] | tuple[Escrow, ...], args: EscrowListArgs) -> Answer:
    # the service lists oldest first; the model is promised newest first
    chosen = [e for e in reversed(escrows) if args.status is None or e.status == args.status]
    return {
        "count": len(chosen),
        "escrows": [escrow_figures(e) for e in chosen[: args.limit]],
        **({"shown": args.limit} if len(chosen) > args.limit else {}),
    }


def _list(ctx: ToolContext, args: EscrowListArgs) -> Answer:
    return _list_answer(_sync(ctx, "escrow_list").list_escrows(), args)


async def _alist(ctx: ToolContext, args: EscrowListArgs) -> Answer:
    client = _async(ctx)
    if client is None:
        return await asyncio.to_thread(_list, ctx, args)
    return _list_answer(await client.list_escrows(), args)


ESCROW_LIST: ToolDefinition[EscrowListArgs] = ToolDefinition(
    name="escrow_list",
    family="escrow",
    description=(
        "List your escrows (as payer or provider) with their figures, newest first, optionally "
        "only those in one status."
    ),
    args_schema=EscrowListArgs,
    run=_list,
    arun=_alist,
    read_only=True,
)


# -- faucet_claim -----------------------------------------------------------------------


def _no_keyed_faucet() -> ToolError:
    """The deployed dialect's faucet takes an agent id, which the tools do not know."""
    return ToolError(
        "faucet_claim is not available with this escrow service: its faucet is a separate "
        "service that takes the agent id, which only the operator can claim for.",
        next_step="Do not call faucet_claim again; if funds are needed, ask the user to have the "
        "operator claim it ('pf-metered faucet claim --agent-id ...') or fund the account.",
        kind="unsupported",
    )


def _claim(ctx: ToolContext, args: FaucetClaimArgs) -> Answer:
    try:
        claim = _sync(ctx, "faucet_claim").claim_faucet()
    except UnsupportedByDialect:
        raise _no_keyed_faucet() from None
    return {"credited": format_usdc(claim.credited_micro), "claim_id": claim.claim_id}


async def _aclaim(ctx: ToolContext, args: FaucetClaimArgs) -> Answer:
    client = _async(ctx)
    if client is None:
        return await asyncio.to_thread(_claim, ctx, args)
    try:
        claim = await client.claim_faucet()
    except UnsupportedByDialect:
        raise _no_keyed_faucet() from None
    return {"credited": format_usdc(claim.credited_micro), "claim_id": claim.claim_id}


FAUCET_CLAIM: ToolDefinition[FaucetClaimArgs] = ToolDefinition(
    name="faucet_claim",
    family="faucet",
    description=(
        "Claim the one-time free 1.00 USDC credit for a new agent. Works once per agent; a "
        "second claim fails with already_claimed."
    ),
    args_schema=FaucetClaimArgs,
    run=_claim,
    arun=_aclaim,
)
