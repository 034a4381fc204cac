"""Streams on the full-release dialect: a chain of tranche escrows behind the partial-release face.

Why an adapter: the stream layer speaks "lock, release an amount, read, refund" (DESIGN.md).
On the deployed service an escrow can only be released whole, so :class:`TrancheChain` (sync)
and :class:`AsyncTrancheChain` present exactly that face to ``PaymentStream`` /
``AsyncPaymentStream`` and do it with tranches (see :mod:`._tranche_plan` for the sizes and the
exactness argument):

* ``create_escrow(budget)`` plans the tranches, reports what the service's minimum and rate
  limits mean for this stream (logged at open, kept in :attr:`TrancheChain.plan`), and locks the
  first tranche;
* ``release_partial(amount)`` — a batch the meter decided — is *accrued* (idempotently, by its
  key) into what the stream owes; then every whole tranche whose units are used is released and
  the next one is locked ahead of need. Recording never waits on any of it (the stream calls
  this from its background sender);
* ``closing()`` (the stream calls it before its final release) stops locking: from then on
  the chain only releases, so close never locks a tranche it will not release;
* ``finish()`` at close reads every live tranche back (one may have timed out, been released
  or disputed under the stream), pays exactly what is still owed from live tranches and one
  right-sized final escrow (≥ the minimum), and lets the unused tranches go (the service hands
  them back, less 1%, when their ``timeout_hours`` pass). The receipt says so: such money is
  *still locked* (which escrows, until when, what comes back), never "refunded".

At most one tranche is locked ahead of need (:data:`LOCK_AHEAD_TRANCHES`): the next batch's
units are covered before they are counted, and at close that one tranche is all that is left
locked (plus, at most, the partly used current one).

Failures: transient ones (429, 5xx, lost answers) leave the book as it was and are retried at
the next batch, ``flush()`` or ``close()``; a create whose answer was lost and could not be
reconciled is recorded as *ambiguous* (its nonce and amount kept for the report) and a fresh
tranche is locked in its place — never silently, and at most :data:`MAX_AMBIGUOUS` times; a
tranche that expired or was disputed under the stream is set aside and replaced; anything else
stops the stream (:class:`TrancheFailure`).

What this module must never do: release a tranche before its units were counted, pay more than
``half_up(rate × units)``, lock beyond the budget (the final escrow at close excepted), or
hold its lock across a request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any, Final, Literal

from pf_metered.errors import (
    AmbiguousCreate,
    AmbiguousOutcome,
    APIConnectionError,
    Conflict,
    PFMeteredError,
    RateLimited,
    ServerError,
    UnsupportedByDialect,
)
from pf_metered.meter.receipt import LockedEscrow, Receipt
from pf_metered.models import Escrow, Release
from pf_metered.money import fee_micro, format_usdc, micro_to_decimal
from pf_metered.stream._tranche_plan import (
    DEPLOYED_MINIMUM_MICRO,
    TranchePlan,
    next_lock_micro,
    plan_tranches,
    releasable,
    settle_close,
)

__all__ = [
    "MAX_AMBIGUOUS",
    "AsyncTrancheChain",
    "Tranche",
    "TrancheBook",
    "TrancheChain",
    "TrancheFailure",
    "TrancheReport",
    "adapt_client",
    "adjust_receipt",
    "needs_tranches",
    "returned_micro",
    "still_locked",
]

log = logging.getLogger("pf_metered.stream.tranches")

MAX_AMBIGUOUS: Final = 2
"""Creates whose outcome stayed unknown before the stream stops locking tranches."""

LOCK_AHEAD_TRANCHES: Final = 1
"""Whole tranches kept locked ahead of need (beyond what counted units use), so the next
batch's units are covered before they are counted (the chain only hears of units a batch at a
time). It is left locked at close, and comes back less 1% after ``timeout_hours``."""

DEFAULT_TRANCHE_TIMEOUT_HOURS: Final = 24
"""``timeout_hours`` of each tranche when the stream sets no ``auto_release_hours``."""

TrancheState = Literal["live", "released", "let_go", "ambiguous", "expired", "disputed"]
_TRANSIENT = (APIConnectionError, RateLimited, ServerError, AmbiguousOutcome)


class TrancheFailure(PFMeteredError):
    """The chain cannot go on (funds, auth, a refused request); ``__cause__`` says why."""


@dataclass(slots=True)
class Tranche:
    """One escrow of the chain."""

    seq: int
    amount_micro: int
    escrow_id: str | None
    state: TrancheState
    final: bool = False
    nonce: str | None = None
    until: str | None = None
    """When the service hands it back if it is not released (its ``auto_release_at``)."""

    @property
    def amount(self) -> Decimal:
        return micro_to_decimal(self.amount_micro)


@dataclass(frozen=True, slots=True)
class TrancheReport:
    """What a tranche stream did, beyond the receipt's shape.

    ``let_go_micro``: unused tranches left to expire (the service returns them less
    ``expiry_commission_micro``); ``unpaid_micro``: owed but under the service's minimum (only
    when a whole stream costs less than it); ``ambiguous``: tranches whose create may or may not
    have happened (amount, nonce) — look for the nonce in the escrow descriptions.
    """

    tranches: tuple[Tranche, ...]
    owed_micro: int
    paid_micro: int
    let_go_micro: int
    unpaid_micro: int
    releases: int
    notes: tuple[str, ...]
    ambiguous: tuple[tuple[int, str | None], ...] = ()

    @property
    def expiry_commission_micro(self) -> int:
        """The 1% the service keeps on tranches it hands back by expiry: let go at close,
        expired under the stream, and an ambiguous one (if its create did happen)."""
        return sum(
            fee_micro(t.amount_micro)
            for t in self.tranches
            if t.state in ("let_go", "expired", "ambiguous")
        )

    @property
    def provider_net_micro(self) -> int:
        """What the provider received: Σ (tranche − its 1%), exactly as the service pays it."""
        return sum(
            t.amount_micro - fee_micro(t.amount_micro)
            for t in self.tranches
            if t.state == "released"
        )


# -- the book: sans-I/O state and decisions ----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Lock:
    seq: int
    amount_micro: int
    final: bool = False


@dataclass(frozen=True, slots=True)
class _Release:
    tranche: Tranche


_Step = _Lock | _Release


@dataclass
class TrancheBook:
    """The chain's figures and the decision of what to do next. No I/O; one lock for all.

    ``owed`` is what the meter has decided to pay (Σ accrued batches), ``paid`` what left live
    tranches for the provider. The decisions (:meth:`next_step`, :meth:`close_steps`) follow
    :mod:`._tranche_plan`.
    """

    plan: TranchePlan
    owed_micro: int = 0
    paid_micro: int = 0
    tranches: list[Tranche] = field(default_factory=list)
    accrued: dict[str, tuple[int, str]] = field(default_factory=dict)
    unpaid_micro: int = 0
    finished: bool = False
    closing: bool = False
    """Set by :meth:`_ChainBase.closing`: only releases from now on, no more locks."""
    last_error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def live(self) -> list[Tranche]:
        return [t for t in self.tranches if t.state == "live"]

    @property
    def live_micro(self) -> int:
        return sum(t.amount_micro for t in self.live())

    @property
    def locked_total_micro(self) -> int:
        """What counts against the budget: paid plus live (not let go, expired or unknown)."""
        return self.paid_micro + self.live_micro

    def accrue(self, key: str, amount_micro: int, memo: str) -> bool:
        """Count a batch the meter decided; ``False`` if this key was counted already."""
        with self.lock:
            if key in self.accrued:
                return False
            self.accrued[key] = (amount_micro, memo)
            self.owed_micro += amount_micro
            return True

    def next_step(self) -> _Step | None:
        """The next request of a running chain, or ``None`` when nothing is due."""
        with self.lock:
            if self.finished:
                return None
            due = self.owed_micro - self.paid_micro
            for t in self.live():
                if releasable(self.owed_micro, self.paid_micro, t.amount_micro, self.plan):
                    return _Release(t)
                break  # oldest first: a younger tranche never overtakes
            if self.closing:
                return None  # close pays the rest with one final escrow it releases at once
            ahead = self.live_micro - due  # locked for units not counted yet
            if ahead < LOCK_AHEAD_TRANCHES * self.plan.tranche_micro:
                size = next_lock_micro(
                    self.plan,
                    owed_micro=self.owed_micro,
                    paid_micro=self.paid_micro,
                    live_micro=self.live_micro,
                    locked_total_micro=self.locked_total_micro,
                )
                if size >= self.plan.minimum_micro:
                    return _Lock(self._next_seq(), size)
            return None

    def close_plan(self) -> tuple[list[_Step], list[Tranche], int]:
        """``(steps, tranches to let go, unpaid)`` that settle what is still owed exactly."""
        with self.lock:
            live = self.live()
            settlement = settle_close(
                self.owed_micro - self.paid_micro,
                [t.amount_micro for t in live],
                self.plan.minimum_micro,
            )
            steps: list[_Step] = [_Release(live[i]) for i in settlement.release]
            if settlement.final_micro:
                steps.append(_Lock(self._next_seq(), settlement.final_micro, final=True))
            return steps, [live[i] for i in settlement.let_go], settlement.unpaid_micro

    def _next_seq(self) -> int:
        return len(self.tranches) + 1

    # -- outcomes ------------------------------------------------------------------------

    def locked(
        self, step: _Lock, escrow_id: str, nonce: str | None, until: str | None = None
    ) -> Tranche:
        with self.lock:
            tranche = Tranche(
                step.seq, step.amount_micro, escrow_id, "live", step.final, nonce, until
            )
            self.tranches.append(tranche)
            return tranche

    def lock_unknown(self, step: _Lock, nonce: str | None) -> None:
        with self.lock:
            self.tranches.append(
                Tranche(step.seq, step.amount_micro, None, "ambiguous", step.final, nonce)
            )

    def released(self, tranche: Tranche) -> None:
        with self.lock:
            if tranche.state == "live":
                tranche.state = "released"
                self.paid_micro += tranche.amount_micro

    def set_aside(self, tranche: Tranche, state: TrancheState) -> None:
        with self.lock:
            if tranche.state == "live":
                tranche.state = state

    @property
    def ambiguous_count(self) -> int:
        return sum(1 for t in self.tranches if t.state == "ambiguous")

    def report(self) -> TrancheReport:
        with self.lock:
            return TrancheReport(
                tranches=tuple(replace(t) for t in self.tranches),
                owed_micro=self.owed_micro,
                paid_micro=self.paid_micro,
                let_go_micro=sum(t.amount_micro for t in self.tranches if t.state == "let_go"),
                unpaid_micro=self.unpaid_micro,
                releases=sum(1 for t in self.tranches if t.state == "released"),
                notes=self.plan.notes,
                ambiguous=tuple(
                    (t.amount_micro, t.nonce) for t in self.tranches if t.state == "ambiguous"
                ),
            )


# -- the I/O plan, shared by the sync and async chains ------------------------------------

Call = tuple[str, dict[str, Any]]
"""A request for the driver: ``("create" | "release" | "get", kwargs)``."""

_Plan = Generator[Call, Any, None]


class _ChainBase:
    """Everything but the I/O: the plan of requests for a step, as a generator of calls."""

    def __init__(self, client: Any, meter: Any) -> None:
        self._client = client
        self._meter = meter
        cfg = meter.config
        self._to = cfg.to_agent_id
        self._memo = cfg.memo
        self._hours = cfg.auto_release_hours or DEFAULT_TRANCHE_TIMEOUT_HOURS
        self._budget: int = cfg.budget_micro
        self._batch = cfg.batch_units
        self._every = Decimal(cfg.every_seconds) if cfg.every_seconds else None
        self._rate = meter.rate
        self.book: TrancheBook | None = None
        self.chain_id: str | None = None

    def _calls(self) -> dict[str, Any]:
        """The client method behind each call a plan yields (its drivers differ only in I/O)."""
        return {
            "create": self._client.create_escrow,
            "release": self._client.release,
            "get": self._client.get_escrow,
        }

    # -- the face the stream sees ------------------------------------------------------

    @property
    def capabilities(self) -> Any:
        return getattr(self._client, "capabilities", None)

    @property
    def plan(self) -> TranchePlan | None:
        return self.book.plan if self.book is not None else None

    def report(self) -> TrancheReport | None:
        return self.book.report() if self.book is not None else None

    def _make_plan(self) -> TranchePlan:
        # the client's public capabilities: its dialect's minimum and the create pacing
        caps = self._client.capabilities
        minimum = caps.min_escrow_micro or DEPLOYED_MINIMUM_MICRO
        creates = caps.creates_per_minute
        plan = plan_tranches(
            self._rate,
            budget_micro=self._budget,
            batch_units=self._batch,
            every_seconds=self._every,
            minimum_micro=minimum,
            creates_per_minute=creates,
        )
        for note in plan.notes:
            level = logging.WARNING if "asks for" in note or "under the" in note else logging.INFO
            log.log(level, "tranche stream %s: %s", self._meter.stream_id[:12], note)
        return plan

    def _view(self, *, closed: bool = False) -> Escrow:
        """The chain as one escrow: what the stream's own bookkeeping expects to read."""
        assert self.book is not None and self.chain_id is not None
        book = self.book
        with book.lock:
            owed = book.owed_micro
            releases = tuple(
                Release(amount=micro_to_decimal(a), memo=m) for a, m in book.accrued.values()
            )
        released = min(owed, self._budget)
        rest = self._budget - released
        return Escrow(
            escrow_id=self.chain_id,
            status="refunded" if closed else "locked",
            amount=micro_to_decimal(self._budget),
            released=micro_to_decimal(released),
            remaining=micro_to_decimal(0 if closed else rest),
            refunded=micro_to_decimal(rest if closed else 0),
            to_agent_id=self._to,
            memo=self._memo,
            releases=releases,
        )

    def _tranche_memo(self, step: _Lock) -> str:
        kind = "final tranche" if step.final else f"tranche {step.seq}"
        return f"{self._memo[:400]} {kind}".strip()

    # -- the plan of one step ------------------------------------------------------------

    def _do(self, step: _Step) -> _Plan:
        assert self.book is not None
        book = self.book
        if isinstance(step, _Lock):
            try:
                escrow = yield (
                    "create",
                    {
                        "to_agent_id": self._to,
                        "amount": format_usdc(step.amount_micro),
                        "memo": self._tranche_memo(step),
                        "auto_release_hours": self._hours,
                    },
                )
            except AmbiguousCreate as exc:
                book.lock_unknown(step, exc.idempotency_key)
                log.warning(
                    "tranche %d (%s USDC) may or may not have been locked: its answer was lost "
                    "and could not be reconciled (nonce %s); locking a fresh tranche instead",
                    step.seq,
                    format_usdc(step.amount_micro),
                    exc.idempotency_key,
                )
                if book.ambiguous_count > MAX_AMBIGUOUS:
                    raise TrancheFailure(
                        f"{book.ambiguous_count} tranche creates ended ambiguous; stopping"
                    ) from exc
                return
            book.locked(
                step,
                escrow.escrow_id,
                getattr(escrow, "nonce", None),
                getattr(escrow, "auto_release_at", None),
            )
            return
        tranche = step.tranche
        assert tranche.escrow_id is not None
        try:
            yield ("release", {"escrow_id": tranche.escrow_id})
        except Conflict:
            escrow = yield ("get", {"escrow_id": tranche.escrow_id})
            if escrow.status == "released":
                book.released(tranche)
            elif escrow.status == "refunded":
                log.warning(
                    "tranche %s expired before its release; replacing it", tranche.escrow_id
                )
                book.set_aside(tranche, "expired")
            elif escrow.status == "disputed":
                log.warning("tranche %s is disputed; its money stays locked", tranche.escrow_id)
                book.set_aside(tranche, "disputed")
            else:
                raise
            return
        book.released(tranche)

    def _open_plan(self, amount_micro: int) -> _Plan:
        if self.book is None:
            self.book = TrancheBook(self._make_plan())
        book = self.book
        while not book.tranches or not (book.live() or book.paid_micro):
            step = book.next_step()
            if step is None:  # pragma: no cover - a fresh book always locks
                break
            yield from self._do(step)
        first = next((t for t in book.tranches if t.escrow_id), None)
        if first is None:  # pragma: no cover - only ambiguous creates, already raised
            raise TrancheFailure("no tranche could be locked")
        self.chain_id = f"chain:{first.escrow_id}"

    def _pump_plan(self) -> _Plan:
        assert self.book is not None
        while (step := self.book.next_step()) is not None:
            yield from self._do(step)

    def _finish_plan(self) -> _Plan:
        assert self.book is not None
        book = self.book
        if book.finished:
            return
        yield from self._refresh_live()
        steps, let_go, unpaid = book.close_plan()
        for step in steps:
            if isinstance(step, _Lock):
                yield from self._do(step)
                final = next(
                    (t for t in book.tranches if t.seq == step.seq and t.state == "live"), None
                )
                if final is None:  # ambiguous: the next close() locks another final tranche
                    raise TrancheFailure("the final tranche's create ended ambiguous; retry close")
                yield from self._do(_Release(final))
            else:
                yield from self._do(step)
        with book.lock:
            if book.owed_micro - book.paid_micro != unpaid:
                raise TrancheFailure("the close did not settle; retry close")
            for t in let_go:
                if t.state == "live":
                    t.state = "let_go"
            book.unpaid_micro = unpaid
            book.finished = True
        if unpaid:
            log.warning(
                "tranche stream %s owes %s USDC, under the service's minimum escrow of %s: "
                "it cannot be paid on this dialect and is reported as unpaid",
                self._meter.stream_id[:12],
                format_usdc(unpaid),
                format_usdc(book.plan.minimum_micro),
            )
        let = sum(t.amount_micro for t in let_go)
        if let:
            log.info(
                "tranche stream %s: %s USDC in %d unused tranche(s) left to expire "
                "(returned less 1%% after %d h)",
                self._meter.stream_id[:12],
                format_usdc(let),
                len(let_go),
                self._hours,
            )

    def _refresh_live(self) -> _Plan:
        """Read every live tranche back before settling a close: one may have timed out back
        to the payer, been released (a lost answer) or disputed under the stream. Reads are
        not rate limited on this service; a read that fails leaves the tranche as it was."""
        assert self.book is not None
        book = self.book
        for tranche in book.live():
            assert tranche.escrow_id is not None
            try:
                escrow = yield ("get", {"escrow_id": tranche.escrow_id})
            except PFMeteredError:
                continue
            if escrow.status == "released":
                book.released(tranche)
            elif escrow.status == "refunded":
                log.warning("tranche %s timed out back to the payer (less 1%%)", tranche.escrow_id)
                book.set_aside(tranche, "expired")
            elif escrow.status == "disputed":
                book.set_aside(tranche, "disputed")
            elif escrow.auto_release_at:
                tranche.until = escrow.auto_release_at

    def closing(self) -> None:
        """The stream is closing: lock nothing more (see the module docstring)."""
        if self.book is not None:
            with self.book.lock:
                self.book.closing = True

    def _refunded_micro(self) -> int:
        """What came back to the payer: tranches the service handed back at timeout, less
        its commission. Let-go tranches are still locked, never refunded."""
        assert self.book is not None
        return returned_micro(self.book.report())


def _no_book(what: str) -> UnsupportedByDialect:
    return UnsupportedByDialect(
        f"{what}: this tranche chain was not opened by this process. Resuming a stream on the "
        "full-release dialect after a crash is not supported yet (its tranches are kept in "
        "memory); its live tranches go back to the payer, less 1%, after timeout_hours"
    )


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT)


class TrancheChain(_ChainBase):
    """The blocking chain over an ``EscrowClient`` (see the module docstring)."""

    def _run(self, plan: _Plan) -> None:
        calls = self._calls()
        outcome: Any = None
        error: BaseException | None = None
        while True:
            try:
                call = plan.throw(error) if error is not None else plan.send(outcome)
            except StopIteration:
                return
            error = None
            name, kwargs = call
            try:
                outcome = calls[name](**kwargs)
            except PFMeteredError as exc:
                outcome, error = None, exc

    # -- EscrowAPI ---------------------------------------------------------------------

    def create_escrow(
        self,
        to_agent_id: str,
        amount: Any,
        memo: str = "",
        auto_release_hours: int | None = None,
        idempotency_key: str | None = None,
    ) -> Escrow:
        self._run(self._open_plan(self._budget))
        self.pump()  # the next tranche, ahead of need (a transient failure waits)
        return self._view()

    def release_partial(
        self,
        escrow_id: str,
        amount: Any,
        memo: str = "",
        idempotency_key: str | None = None,
    ) -> Escrow:
        if self.book is None:
            raise _no_book("release")
        key = idempotency_key or memo
        self.book.accrue(key, _micro(amount), memo)
        self.pump()
        return self._view()

    def pump(self) -> None:
        """Release what is used up and lock ahead; transient failures wait for the next call."""
        assert self.book is not None
        try:
            self._run(self._pump_plan())
        except PFMeteredError as exc:
            self.book.last_error = exc
            if not _is_transient(exc):
                raise TrancheFailure(f"the tranche chain stopped: {exc}") from exc
            log.info("tranche chain: %s; retrying at the next batch", type(exc).__name__)

    def get_escrow(self, escrow_id: str) -> Escrow:
        if self.chain_id is None and escrow_id.startswith("chain:"):
            raise _no_book("read")
        if self.chain_id is not None and escrow_id == self.chain_id:
            return self._view(closed=bool(self.book and self.book.finished))
        return self._client.get_escrow(escrow_id)  # type: ignore[no-any-return]

    def finish(self) -> int:
        """Settle the chain at close; returns what the receipt reports as refunded."""
        if self.book is None:
            raise _no_book("close")
        self._run(self._finish_plan())
        return self._refunded_micro()

    def refund(self, escrow_id: str, idempotency_key: str | None = None) -> Escrow:
        self.finish()
        return self._view(closed=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


class AsyncTrancheChain(_ChainBase):
    """The asyncio chain over an ``AsyncEscrowClient``."""

    async def _run(self, plan: _Plan) -> None:
        calls = self._calls()
        outcome: Any = None
        error: BaseException | None = None
        while True:
            try:
                call = plan.throw(error) if error is not None else plan.send(outcome)
            except StopIteration:
                return
            error = None
            name, kwargs = call
            try:
                outcome = await calls[name](**kwargs)
            except PFMeteredError as exc:
                outcome, error = None, exc

    async def create_escrow(
        self,
        to_agent_id: str,
        amount: Any,
        memo: str = "",
        auto_release_hours: int | None = None,
        idempotency_key: str | None = None,
    ) -> Escrow:
        await self._run(self._open_plan(self._budget))
        await self.pump()
        return self._view()

    async def release_partial(
        self,
        escrow_id: str,
        amount: Any,
        memo: str = "",
        idempotency_key: str | None = None,
    ) -> Escrow:
        if self.book is None:
            raise _no_book("release")
        self.book.accrue(idempotency_key or memo, _micro(amount), memo)
        await self.pump()
        return self._view()

    async def pump(self) -> None:
        assert self.book is not None
        try:
            await self._run(self._pump_plan())
        except PFMeteredError as exc:
            self.book.last_error = exc
            if not _is_transient(exc):
                raise TrancheFailure(f"the tranche chain stopped: {exc}") from exc
            log.info("tranche chain: %s; retrying at the next batch", type(exc).__name__)

    async def get_escrow(self, escrow_id: str) -> Escrow:
        if self.chain_id is None and escrow_id.startswith("chain:"):
            raise _no_book("read")
        if self.chain_id is not None and escrow_id == self.chain_id:
            return self._view(closed=bool(self.book and self.book.finished))
        return await self._client.get_escrow(escrow_id)  # type: ignore[no-any-return]

    async def finish(self) -> int:
        if self.book is None:
            raise _no_book("close")
        await self._run(self._finish_plan())
        return self._refunded_micro()

    async def refund(self, escrow_id: str, idempotency_key: str | None = None) -> Escrow:
        await self.finish()
        return self._view(closed=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def _micro(amount: Any) -> int:
    from pf_metered.money import parse_amount

    return parse_amount(amount, "amount")


# -- hooks for the stream drivers ---------------------------------------------------------


def needs_tranches(client: Any) -> bool:
    """Whether ``client`` speaks a dialect without partial releases (so: tranches)."""
    caps = getattr(client, "capabilities", None)
    return caps is not None and getattr(caps, "supports_partial_release", True) is False


def adapt_client(client: Any, meter: Any, *, is_async: bool = False) -> Any:
    """The client a stream should use: ``client`` itself, or a tranche chain over it."""
    if isinstance(client, _ChainBase) or not needs_tranches(client):
        return client
    return AsyncTrancheChain(client, meter) if is_async else TrancheChain(client, meter)


def returned_micro(report: TrancheReport) -> int:
    """What the service handed back to the payer: expired tranches less its commission."""
    return sum(
        t.amount_micro - fee_micro(t.amount_micro) for t in report.tranches if t.state == "expired"
    )


def still_locked(report: TrancheReport) -> tuple[LockedEscrow, ...]:
    """The tranches of a settled chain that still hold the payer's money."""
    held = []
    for t in report.tranches:
        if t.escrow_id is None:
            continue
        if t.state in ("let_go", "live"):
            back = t.amount_micro - fee_micro(t.amount_micro)
            held.append(LockedEscrow(t.escrow_id, t.amount_micro, t.until, back))
        elif t.state == "disputed":
            held.append(LockedEscrow(t.escrow_id, t.amount_micro, None, None, "disputed"))
    return tuple(held)


def adjust_receipt(client: Any, receipt: Receipt) -> Receipt:
    """The receipt of a tranche stream, from the chain's own book: what the provider was paid
    (and the fee, escrow by escrow, as the service charged it), what came back to the payer
    (expired tranches, less the commission the service kept), and which tranches are still
    locked — never the unused budget counted as a refund (it never left the payer)."""
    if not isinstance(client, _ChainBase) or client.book is None:
        return receipt
    report = client.book.report()
    paid = report.paid_micro
    expired = [t for t in report.tranches if t.state == "expired"]
    notes = []
    if expired:
        notes.append(
            f"{len(expired)} tranche(s) of {format_usdc(sum(t.amount_micro for t in expired))} "
            "USDC timed out before release and went back to the payer less the service's 1% "
            "commission"
        )
    for amount, nonce in report.ambiguous:
        notes.append(
            f"a tranche create of {format_usdc(amount)} USDC may have happened (its answer was "
            f"lost; description nonce {nonce}): if it did, it is locked until its timeout and "
            "comes back less 1%"
        )
    if report.unpaid_micro:
        notes.append(
            f"{format_usdc(report.unpaid_micro)} USDC owed is under the service's minimum "
            "escrow and could not be paid"
        )
    return replace(
        receipt,
        paid_micro=paid,
        releases=report.releases,
        refunded_micro=returned_micro(report),
        kept_by_service_micro=sum(fee_micro(t.amount_micro) for t in expired),
        still_locked=still_locked(report),
        unpaid_micro=report.unpaid_micro,
        fee_override_micro=paid - report.provider_net_micro,
        notes=receipt.notes + tuple(notes),
    )
