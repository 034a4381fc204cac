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

Shutdown: every opened ``PaymentStream`` is tracked (weakly). At interpreter exit, and on
SIGTERM (a handler is installed only when the main thread opens a stream and SIGTERM still has
its default action; ``PF_METERED_SIGTERM=0`` opts out), due releases are flushed within
``PF_METERED_EXIT_TIMEOUT`` seconds (default 5) on a helper thread; what cannot be sent in
that time stays journaled in a durable store for ``resume``. The SIGTERM handler then restores
the default action and re-raises the signal, so the process still dies of SIGTERM.

What this module must never do: send a release with a key the store did not derive, settle an
intent it has not seen on the escrow, refund twice, or block shutdown past its deadline.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from pf_metered.errors import (
    AmbiguousRelease,
    InvalidInput,
    InvalidResponse,
    PFMeteredError,
    StreamBusy,
)
from pf_metered.meter.core import Meter, held_in_process
from pf_metered.meter.open import open_store
from pf_metered.meter.store import (
    Store,
    StreamState,
    intent_amount_micro,
    owner_alive,
    owner_in_this_process,
)
from pf_metered.models import Escrow
from pf_metered.money import micro_to_decimal
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
    take_over = getattr(store, "take_over", None)
    if callable(take_over) and state.pending:
        take_over(stream_id, lease_seconds=_takeover_lease(store, stream_id, state))
    reclaim = getattr(store, "reclaim", None)
    if callable(reclaim):
        reclaim(stream_id)
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
    info_of = getattr(store, "pending_owner", None)
    info = info_of(stream_id) if callable(info_of) else None
    if info is None:
        return 0.0
    owner, age = info
    if owner is None or owner == getattr(store, "owner", None):
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
    lease = float(getattr(store, "intent_lease", 30.0))  # ok: seconds
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
    stream._meter = Meter(store, cfg, stream._meter.policy, per=per, clock=clock)
    stream._meter.takeover = True  # its holders are gone: finish a close they started
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
            stream._last_error = exc  # the worker (or close) retries with the same key
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
            stream._last_error = exc
    return stream


# ---------------------------------------------------------------------------- shutdown
_STREAMS: weakref.WeakSet[PaymentStream] = weakref.WeakSet()
_REGISTERED = False
_REG_LOCK = threading.Lock()


def exit_timeout() -> float:
    """Seconds shutdown may spend flushing (``PF_METERED_EXIT_TIMEOUT``, default 5)."""
    try:
        value = float(os.environ.get("PF_METERED_EXIT_TIMEOUT", "5"))  # ok: seconds
    except ValueError:
        return 5.0
    return value if 0 <= value <= 600 else 5.0


def track(stream: PaymentStream) -> None:
    """Remember an opened stream so exit and SIGTERM flush its due releases."""
    global _REGISTERED  # noqa: PLW0603 - one process-wide registration
    _STREAMS.add(stream)
    if _REGISTERED:
        return
    with _REG_LOCK:
        if _REGISTERED:
            return
        _REGISTERED = True
        # Registered after the stream's store exists, so this runs before the store's own
        # exit hook (atexit is last-in, first-out) and the store is still open.
        atexit.register(shutdown)
        _install_sigterm()


def _flush_all() -> None:
    for stream in list(_STREAMS):
        if not stream.is_open:
            continue
        try:
            stream.flush()
        except Exception as exc:  # shutdown goes on; the journal keeps the rest
            log.warning(
                "shutdown: stream %s not flushed (%s); journaled for resume",
                stream.stream_id[:12],
                type(exc).__name__,
            )
    from sys import modules

    sqlite_mod = modules.get("pf_metered.meter.sqlite_store")
    if sqlite_mod is not None:
        for store in list(sqlite_mod._LIVE):
            with contextlib.suppress(Exception):
                store.sync()


def shutdown(timeout: float | None = None) -> bool:
    """Flush due releases of every live stream within ``timeout`` seconds; True if done."""
    limit = exit_timeout() if timeout is None else timeout
    worker = threading.Thread(target=_flush_all, name="pf-metered-shutdown", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        log.warning("shutdown: flushing took more than %.1f s; the rest stays journaled", limit)
        return False
    return True


def _on_sigterm(signum: int, frame: object) -> None:
    shutdown()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _install_sigterm() -> None:
    if os.environ.get("PF_METERED_SIGTERM", "1") == "0":
        return
    if threading.current_thread() is not threading.main_thread():
        return
    with contextlib.suppress(ValueError, OSError):
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
