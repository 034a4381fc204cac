"""Resuming a stream after a crash, and flushing live streams when the process is stopped.

Why: with a durable store (SQLite, Redis) the file knows every counted unit and every release
the stream decided to send (an *intent*: sequence number → idempotency key, unit range →
amount). After a crash, :func:`resume_sync` / :func:`resume_async` rebuild the stream from the
store and finish what was started:

1. leases held by the dead process are given back (``reclaim`` / ``take_over`` when the store
   has them);
2. a pending intent whose answer was never seen is *reconciled* against the escrow's
   ``released`` figure: ``released == paid + amount`` means it landed (settled locally, no
   request), ``released == paid`` means it did not (it is resent with the SAME idempotency
   key); anything else is an :class:`~pf_metered.errors.AmbiguousRelease` — never a guess, and
   never a new key;
3. units counted but not released are released (``flush``); a stream that was closing is
   closed (final release, refund: both with their stable keys, so never twice); a closed stream
   is returned with its receipt and no request.

Shutdown: every opened stream is tracked (weakly) by :mod:`pf_metered._lifecycle`, whose one
exit hook (and SIGTERM handler) runs the phases in order; this module supplies the stream
layer's three: CLOSE (streams nothing else could finish — an in-memory store, ``@metered``'s
own — are closed: counted units paid, the rest refunded), FLUSH (journaled streams send their
due batches; the rest stays journaled for ``resume``) and REPORT (a stream still open is
logged with its escrow id and the commands that free its money). All within
``PF_METERED_EXIT_TIMEOUT`` seconds (default 5).

What this module must never do: send a release with a key the store did not derive, settle an
intent it has not seen on the escrow, refund twice, or block shutdown past its deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pf_metered import _lifecycle
from pf_metered.errors import (
    AmbiguousRelease,
    InvalidInput,
    InvalidResponse,
    PFMeteredError,
    StreamBusy,
)
from pf_metered.meter.core import held_in_process
from pf_metered.meter.open import open_store
from pf_metered.meter.store import (
    MemoryStore,
    Store,
    StreamState,
    intent_amount_micro,
    owner_alive,
    owner_in_this_process,
)
from pf_metered.models import Escrow
from pf_metered.money import format_usdc, micro_to_decimal
from pf_metered.stream._base import StreamBase, is_transient

if TYPE_CHECKING:
    from pf_metered.stream._async import AsyncPaymentStream
    from pf_metered.stream._base import AsyncEscrowAPI, EscrowAPI
    from pf_metered.stream._sync import PaymentStream

__all__ = [
    "exit_timeout",
    "reconcile",
    "resume_async",
    "resume_sync",
    "shutdown",
    "track",
]

log = logging.getLogger("pf_metered.stream.recovery")

S = TypeVar("S", bound=StreamBase)


# ---------------------------------------------------------------------------- reconcile
def _prepare(store_spec: object, stream_id: object) -> tuple[Store, StreamState]:
    """Open the store, check the id, take the stream over from dead holders, load it."""
    if not isinstance(stream_id, str) or not stream_id:
        raise InvalidInput("stream_id", "must be the id of a stream in the store")
    store = open_store(store_spec)
    state = store.load(stream_id)
    if state is None:
        raise InvalidInput("stream_id", f"is not a stream in this store: {stream_id!r}")
    if state.pending:
        store.take_over(stream_id, lease_seconds=_takeover_lease(store, stream_id, state))
    store.reclaim(stream_id)
    reloaded = store.load(stream_id)
    assert reloaded is not None
    return store, reloaded


def _takeover_lease(store: Store, stream_id: str, state: StreamState) -> float:
    """How stale the pending intent must be for this resume to take it over: ``0`` when its
    owner is gone (or is this store), else :class:`StreamBusy` — never a live owner's.

    Why refuse rather than take over: the live owner may have the release on the wire right
    now; reading the escrow back cannot see a send that has not landed yet, and a server that
    ignores idempotency keys would then pay the batch twice. On this host the owner's pid
    says whether it is alive; for another host's owner its claim must be older than the
    store's ``intent_lease`` (an owner renews it before every retry).
    """
    info = store.pending_owner(stream_id)
    if info is None:
        return 0.0
    owner, age = info
    if owner is None or owner == store.owner:
        return 0.0
    intent = state.pending[0]
    if owner_in_this_process(owner):
        # Another store object of this process: alive only if a meter here is sending it.
        if not held_in_process(stream_id, intent.seq):
            return 0.0
        raise StreamBusy(
            f"stream {stream_id}: release {intent.idempotency_key} is being sent by a stream "
            "of this process that is still alive; close that stream (or let its send finish) "
            "and retry resume.",
            owner=owner,
        )
    alive = owner_alive(owner)
    if alive is False:
        return 0.0
    lease = float(store.intent_lease)  # ok: seconds
    what = (
        f"stream {stream_id}: release {intent.idempotency_key} (units {intent.units_from + 1}-"
        f"{intent.units_to}) is held by {owner}"
    )
    if alive is True:
        raise StreamBusy(
            f"{what}, a process that is still alive on this host: it may be sending it now, "
            "so resume will not take it over. Stop that process (or let it close the stream) "
            "and retry resume.",
            owner=owner,
        )
    if age < lease:
        wait = lease - age
        raise StreamBusy(
            f"{what} on another host, claimed {age:.0f} s ago: resume will not take over a "
            f"release whose owner may be alive. Retry in {wait:.0f} s (intent_lease="
            f"{lease:g} s): if its owner has not renewed the claim by then it is presumed gone.",
            owner=owner,
            retry_after=wait,
        )
    return lease


def reconcile(store: Store, state: StreamState, escrow: Escrow) -> StreamState:
    """Settle what the escrow shows was paid; refuse to guess when the figures disagree.

    Returns the state after reconciling. Pure bookkeeping: no request is made here.
    """
    if escrow.escrow_id != state.escrow_id:
        raise InvalidResponse(
            f"asked for escrow {state.escrow_id}, the server answered about {escrow.escrow_id}"
        )
    released = escrow.released_micro
    rate = state.config.parsed_rate
    for intent in state.pending:
        amount = intent_amount_micro(rate, intent)
        if released == state.paid_micro + amount:
            log.info(
                "resume: release %s (units %d-%d) had landed; settled from the escrow",
                intent.idempotency_key,
                intent.units_from + 1,
                intent.units_to,
            )
            store.settle(state.config.stream_id, intent.seq, amount)
        elif released != state.paid_micro:
            raise AmbiguousRelease(
                f"escrow {escrow.escrow_id} shows {released} micro-USDC released; the journal "
                f"has {state.paid_micro} paid and {amount} pending: refusing to guess",
                idempotency_key=intent.idempotency_key,
                released_micro=released,
                paid_micro=state.paid_micro,
                pending_micro=amount,
            )
    if not state.pending and released != state.paid_micro:
        log.warning(
            "resume: escrow %s shows %d micro-USDC released, the journal %d paid",
            escrow.escrow_id,
            released,
            state.paid_micro,
        )
    after = store.load(state.config.stream_id)
    assert after is not None
    if not escrow.is_open and after.status != "closed" and not after.pending:
        # Refunded or auto-released behind our back: nothing more can move.
        store.mark_closed(state.config.stream_id, escrow.refunded_micro)
        after = store.load(state.config.stream_id)
        assert after is not None
    return after


def _rebuild(
    cls: Callable[..., S], client: Any, store: Store, state: StreamState, kw: dict[str, Any]
) -> S:
    """A stream object over the stored config (money is always the stored config's)."""
    cfg = state.config
    per = kw.pop("per", "unit")
    clock: Callable[[], float] = kw.pop("clock", time.monotonic)
    stream = cls(
        client,
        cfg.to_agent_id,
        cfg.rate,
        batch=cfg.batch_units,
        every=cfg.every_seconds,
        max_units=cfg.max_units,
        budget=micro_to_decimal(cfg.budget_micro),
        auto_release_hours=cfg.auto_release_hours,
        memo=cfg.memo,
        store=store,
        stream_id=cfg.stream_id,
        clock=clock,
        **kw,
    )
    # The stored config (rate already per unit, budget as locked) is the truth.
    stream.adopt_stored(cfg, per=per, clock=clock)
    return stream


def resume_sync(
    cls: type[PaymentStream],
    store: object,
    stream_id: str,
    client: EscrowAPI,
    *,
    flush: bool = True,
    **kw: Any,
) -> PaymentStream:
    """``PaymentStream.resume``: see the module docstring."""
    store_obj, state = _prepare(store, stream_id)
    if state.escrow_id is not None and state.status != "closed":
        try:
            escrow = client.get_escrow(state.escrow_id)
        except PFMeteredError as exc:
            if not is_transient(exc):
                raise
            log.warning(
                "resume: could not read the escrow (%s); resending with the same keys",
                type(exc).__name__,
            )
        else:
            state = reconcile(store_obj, state, escrow)
    stream = _rebuild(cls, client, store_obj, state, dict(kw))
    if state.status == "closed":
        stream.close()  # no request: the receipt comes from the store
        return stream
    stream.open()  # re-binds the escrow (or re-sends the create with its stable key)
    if state.status == "closing":
        stream.close()
    elif flush:
        try:
            stream.flush()
        except PFMeteredError as exc:
            if not is_transient(exc):
                raise
            stream.note_transient(exc)  # the worker (or close) retries with the same key
    return stream


async def resume_async(
    cls: type[AsyncPaymentStream],
    store: object,
    stream_id: str,
    client: AsyncEscrowAPI,
    *,
    flush: bool = True,
    **kw: Any,
) -> AsyncPaymentStream:
    """``AsyncPaymentStream.resume``: see the module docstring."""
    store_obj, state = _prepare(store, stream_id)
    if state.escrow_id is not None and state.status != "closed":
        try:
            escrow = await client.get_escrow(state.escrow_id)
        except PFMeteredError as exc:
            if not is_transient(exc):
                raise
            log.warning(
                "resume: could not read the escrow (%s); resending with the same keys",
                type(exc).__name__,
            )
        else:
            state = reconcile(store_obj, state, escrow)
    stream = _rebuild(cls, client, store_obj, state, dict(kw))
    if state.status == "closed":
        await stream.close()
        return stream
    await stream.open()
    if state.status == "closing":
        await stream.close()
    elif flush:
        try:
            await stream.flush()
        except PFMeteredError as exc:
            if not is_transient(exc):
                raise
            stream.note_transient(exc)
    return stream


# ---------------------------------------------------------------------------- shutdown
# Exit and SIGTERM run the phases of :mod:`pf_metered._lifecycle`; these are the stream
# layer's hooks in them.


def track(stream: StreamBase, *, close_at_exit: bool | None = None) -> None:
    """Remember an opened stream for exit and SIGTERM (see :mod:`pf_metered._lifecycle`).

    ``close_at_exit`` (default: when nothing else could finish it, i.e. its store is in
    memory) closes it at exit; otherwise its due releases are flushed and, if it is still
    open, it is reported with the commands that free its escrow.
    """
    if close_at_exit is None:
        close_at_exit = isinstance(stream.store, MemoryStore)
    _lifecycle.track(stream, close_at_exit=close_at_exit)
    _lifecycle.install_sigterm()


def exit_timeout() -> float:
    """Seconds shutdown may spend (``PF_METERED_EXIT_TIMEOUT``, default 5)."""
    return _lifecycle.exit_timeout()


def shutdown(timeout: float | None = None) -> bool:
    """Run the exit phases now (close, flush, report, stores) within ``timeout`` seconds."""
    return _lifecycle.run_exit(timeout)


def _live(kind: Literal["close", "flush"]) -> list[StreamBase]:
    return [s for s in _lifecycle.tracked(kind) if isinstance(s, StreamBase) and s.is_open]


def _close_one(stream: StreamBase) -> None:
    from pf_metered.stream._async import AsyncPaymentStream
    from pf_metered.stream._sync import PaymentStream

    if isinstance(stream, PaymentStream):
        stream.close()
    elif isinstance(stream, AsyncPaymentStream):
        asyncio.run(stream.close())


def _phase_close() -> None:
    """Phase CLOSE: streams nothing else could finish are closed (paid, rest refunded)."""
    for stream in _live("close"):
        try:
            _close_one(stream)
        except Exception as exc:  # reported in phase REPORT
            log.warning(
                "shutdown: stream %s not closed (%s)", stream.stream_id[:12], type(exc).__name__
            )


def _phase_flush() -> None:
    """Phase FLUSH: journaled streams send the batches that are due."""
    from pf_metered.stream._sync import PaymentStream

    for stream in _live("flush"):
        if not isinstance(stream, PaymentStream):
            continue  # an async stream needs its loop: reported below
        try:
            stream.flush()
        except Exception as exc:  # shutdown goes on; the journal keeps the rest
            log.warning(
                "shutdown: stream %s not flushed (%s); journaled for resume",
                stream.stream_id[:12],
                type(exc).__name__,
            )


def _phase_report() -> None:
    """Phase REPORT: every stream still open is named with the way to free its money."""
    for stream in _live("close") + _live("flush"):
        try:
            status = stream.status()
            locked = format_usdc(max(0, stream.meter.config.budget_micro - status.released_micro))
        except Exception:  # the store may be gone: say what is known
            locked = "?"
        escrow = stream.escrow_id or "?"
        durable = not isinstance(stream.store, MemoryStore)
        where = stream.store.location or stream.store
        how = (
            f"finish it with PaymentStream.resume({where!r}, {stream.stream_id!r}, "
            "client).close() (pays the counted units, refunds the rest), or"
            if durable
            else "its counted units were held in memory only;"
        )
        log.warning(
            "pf_metered: stream %s was not closed before exit: escrow %s keeps %s USDC locked "
            "(to %s). To free it, %s refund what is left with `pf-metered escrow refund %s`.",
            stream.stream_id,
            escrow,
            locked,
            stream.meter.config.to_agent_id,
            how,
            escrow,
        )


_lifecycle.on(_lifecycle.CLOSE, _phase_close)
_lifecycle.on(_lifecycle.FLUSH, _phase_flush)
_lifecycle.on(_lifecycle.REPORT, _phase_report)
