"""The payment gate's rules, with no I/O: verify a paying stream, meter what is served.

Theory of operation. A request names the stream that pays for it (``X-PF-Escrow``, on a
tranche chain also ``X-PF-Tranche``, and the proof ``X-PF-Proof``; see
:mod:`pf_metered.stream._provider_auth`). Per stream the gate keeps an *account*: the escrows
it has read (one, or a chain's tranches), units served, units admitted and not yet finished,
and what the escrows show as released to this provider.

1. :meth:`GateCore.reads_needed` says which escrows must be read before deciding: any escrow
   never read (verification), any live one whose read is older than ``max_age`` (to notice a
   closed escrow), and — when admitting would leave more than half the credit unpaid — the
   live ones whose read is older than ``min_interval`` (to see fresh releases before refusing).
   Reads are also capped by a token bucket across all accounts (``reads_per_minute``): the
   service's read limits hold however many callers arrive. A driver performs the reads and
   hands each answer to :meth:`GateCore.apply_read`.
2. :meth:`GateCore.decide` admits or refuses. Refusals, checked in this order, before any work:
   ``unknown_escrow`` (not found or not readable), ``wrong_provider`` (pays someone else),
   ``not_payer`` (proof absent or not the one committed in the memo), ``escrow_in_use`` (already
   named by another stream), ``escrow_closed`` (no longer locked), ``insufficient_escrow`` (what
   is left cannot pay for the units), ``unpaid`` (more than ``credit`` units served unpaid),
   ``unverifiable`` (the escrow could not be read and nothing trustworthy is cached).
3. :meth:`GateCore.finish` counts the units actually served (``units`` may differ from the
   estimate admitted: tokens); :meth:`GateCore.cancel` counts nothing (the handler failed, and
   a consumer's ``@metered`` call that raised is not counted either).

Money: integer micro-USDC. Served units cost ``half_up(rate × served)`` (what a consumer's close
settles to); units paid are the most units whose ``floor(rate × units)`` the releases cover
(what a consumer's batches pay). On a chain, a tranche counts as paid once it is released; the
consumer keeps one tranche plus the service's minimum in hand by construction (see
:mod:`pf_metered.stream._tranche_plan`), so the gate adds that much to the credit.

What this module must never do: I/O, floats near money, sleep, or admit a request on an escrow
that failed a check.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Final, Literal, get_args

from pf_metered.errors import InvalidInput, NotFound, PermissionDenied, PFMeteredError
from pf_metered.models import Escrow
from pf_metered.money import MICRO, Rate, format_usdc, micro_to_decimal, parse_count, parse_rate
from pf_metered.stream._provider_auth import (
    HEADER_ESCROW,
    HEADER_PROOF,
    HEADER_TRANCHES,
    MAX_TRANCHES_NAMED,
    proof_matches,
)

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MIN_INTERVAL",
    "DEFAULT_READS_PER_MINUTE",
    "REASONS",
    "AccountView",
    "Admission",
    "Claim",
    "GateCore",
    "PaymentRefused",
    "Reason",
]

DEFAULT_BATCH: Final = 100
"""Units a consumer is expected to pay for at a time; the default credit is two batches."""
DEFAULT_MAX_AGE: Final = 5.0
"""Seconds a live escrow's read is trusted before it is read again (closures show up)."""
DEFAULT_MIN_INTERVAL: Final = 0.2
"""Seconds between two reads of one escrow, however close to its credit a stream runs."""
DEFAULT_READS_PER_MINUTE: Final = 600
"""Escrow reads per minute the gate makes at most, across every stream it serves."""

Reason = Literal[
    "missing_escrow",
    "invalid_claim",
    "unknown_escrow",
    "wrong_provider",
    "not_payer",
    "escrow_in_use",
    "escrow_closed",
    "insufficient_escrow",
    "unpaid",
    "unverifiable",
]
REASONS: Final[tuple[Reason, ...]] = get_args(Reason)  # the Literal is the one list
_BEFORE_WORK: Final = frozenset(REASONS) - {"unpaid", "unverifiable", "insufficient_escrow"}

_ID: Final = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}\Z")
_CHAIN: Final = "chain:"


class PaymentRefused(PFMeteredError):
    """The gate will not serve this request: ``reason`` (one of :data:`REASONS`), a message
    for the caller, what the stream owes (``owed``, USDC) and the escrow named."""

    def __init__(
        self, reason: Reason, message: str, *, owed_micro: int = 0, escrow_id: str | None = None
    ) -> None:
        self.reason: Reason = reason
        self.message = message
        self.owed_micro = owed_micro
        self.escrow_id = escrow_id
        owed = f" (owed {format_usdc(owed_micro)} USDC)" if owed_micro else ""
        super().__init__(f"{reason}: {message}{owed}")

    @property
    def owed(self) -> Decimal:
        return micro_to_decimal(self.owed_micro)

    def to_json(self) -> dict[str, str | None]:
        """The 402 body: ``{error, message, owed, escrow_id}`` (owed as a decimal string)."""
        return {
            "error": self.reason,
            "message": self.message,
            "owed": format_usdc(self.owed_micro),
            "escrow_id": self.escrow_id,
        }


@dataclass(frozen=True)
class Claim:
    """What a request says about who pays: the stream's escrow, a chain's tranches, the proof."""

    escrow_id: str
    tranches: tuple[str, ...] = ()
    proof: str | None = field(default=None, repr=False)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> Claim:
        """Read a claim from request headers (case-insensitive); refuses a malformed one."""
        lower = {k.lower(): v for k, v in headers.items()}
        escrow_id = lower.get(HEADER_ESCROW.lower(), "").strip()
        if not escrow_id:
            raise PaymentRefused(
                "missing_escrow",
                f"this service is paid per use: send {HEADER_ESCROW} naming an escrow (or a "
                "PaymentStream's chain) that pays this provider, and its proof",
            )
        if not _ID.match(escrow_id):
            raise PaymentRefused("invalid_claim", f"{HEADER_ESCROW} is not an escrow id")
        raw = lower.get(HEADER_TRANCHES.lower(), "")
        tranches = tuple(t.strip() for t in raw.split(",") if t.strip()) if raw else ()
        if len(tranches) > MAX_TRANCHES_NAMED or not all(_ID.match(t) for t in tranches):
            raise PaymentRefused(
                "invalid_claim",
                f"{HEADER_TRANCHES} must list at most {MAX_TRANCHES_NAMED} escrow ids",
                escrow_id=escrow_id,
            )
        proof = lower.get(HEADER_PROOF.lower(), "").strip() or None
        return cls(escrow_id, tranches, proof)

    @property
    def is_chain(self) -> bool:
        return self.escrow_id.startswith(_CHAIN)

    def escrow_ids(self) -> tuple[str, ...]:
        """Every escrow this claim names: the escrow, or a chain's first tranche and the rest."""
        if not self.is_chain:
            return (self.escrow_id,)
        first = self.escrow_id[len(_CHAIN) :]
        return (first, *[t for t in self.tranches if t != first])


@dataclass(frozen=True)
class Admission:
    """A request the gate let through: finish it with the units served, or cancel it."""

    key: str
    units: int


@dataclass(frozen=True)
class AccountView:
    """One paying stream as the gate sees it (``provider watch``, reconciliation)."""

    escrow_id: str
    status: str
    served: int
    in_flight: int
    paid_units: int
    paid_micro: int
    owed_micro: int
    max_unpaid: int
    refusals: Mapping[str, int]
    escrows: tuple[str, ...]

    @property
    def unpaid(self) -> int:
        return max(self.served - self.paid_units, 0)

    @property
    def paid(self) -> Decimal:
        return micro_to_decimal(self.paid_micro)

    @property
    def owed(self) -> Decimal:
        return micro_to_decimal(self.owed_micro)


@dataclass
class _Read:
    escrow: Escrow | None
    at: float
    problem: Reason | None = None
    message: str = ""
    verified: bool = False
    """Passed every check for a request with the right proof: only these count as paid."""


@dataclass
class _Account:
    key: str
    reads: dict[str, _Read] = field(default_factory=dict)
    served: int = 0
    in_flight: int = 0
    max_unpaid: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # figures of the verified reads, recounted when a read or a verification changes them
    paid: int = 0
    paid_units: int = 0
    credit: int = 0
    live_left: int = 0
    has_live: bool = False
    proof: str | None = field(default=None, repr=False)
    """The proof last accepted for every escrow named: a request with it skips re-hashing."""

    def good(self) -> list[Escrow]:
        return [r.escrow for r in self.reads.values() if r.escrow is not None and r.verified]

    def live(self) -> list[Escrow]:
        return [e for e in self.good() if e.is_open]

    def paid_micro(self) -> int:
        return self.paid


class _Bucket:
    """A token bucket of reads: ``per_minute`` sustained, bursts up to a tenth of it."""

    def __init__(self, per_minute: int, now: float) -> None:
        self.rate = per_minute / 60.0  # ok: reads per second, not money
        self.capacity = max(per_minute / 10.0, 4.0)
        self.tokens = self.capacity
        self.at = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


def _seconds(value: object, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 3600:
        raise InvalidInput(field_name, "must be a number of seconds in [0, 3600]")
    return float(value)  # ok: seconds, not money


class GateCore:
    """Every decision of a payment gate; drivers (:class:`PaymentGate`, :class:`AsyncPaymentGate`)
    only read escrows. Thread-safe: each account has its own lock, held by drivers across that
    account's reads (one read in flight per stream); the bookkeeping takes it briefly."""

    def __init__(
        self,
        provider_id: str,
        rate: object,
        *,
        batch: int = DEFAULT_BATCH,
        credit: int | None = None,
        require_proof: bool = True,
        max_age: float = DEFAULT_MAX_AGE,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        reads_per_minute: int = DEFAULT_READS_PER_MINUTE,
        chain_holdback_micro: int = 0,
        now: float = 0.0,
    ) -> None:
        if not isinstance(provider_id, str) or not _ID.match(provider_id):
            raise InvalidInput("provider_id", "must be the provider's agent id")
        self.provider_id = provider_id
        self.rate: Rate = parse_rate(rate, "rate")
        self.batch = parse_count(batch, "batch", allow_zero=False)
        self.credit = (
            2 * self.batch if credit is None else parse_count(credit, "credit", allow_zero=True)
        )
        if not isinstance(require_proof, bool):
            raise InvalidInput("require_proof", "must be True or False")
        self.require_proof = require_proof
        self.max_age = _seconds(max_age, "max_age")
        self.min_interval = _seconds(min_interval, "min_interval")
        per_minute = parse_count(reads_per_minute, "reads_per_minute", allow_zero=False)
        self._bucket = _Bucket(per_minute, now)
        self._holdback_micro = chain_holdback_micro
        frac = Fraction(self.rate.decimal) * MICRO  # micro-USDC per unit, exact
        self._num, self._den = frac.numerator, frac.denominator
        self._accounts: dict[str, _Account] = {}
        self._owner: dict[str, str] = {}  # escrow id -> account key (an escrow pays one stream)
        self._lock = threading.Lock()

    # -- money ---------------------------------------------------------------------------

    def cost_micro(self, units: int) -> int:
        """What ``units`` cost, settled: ``half_up(rate × units)``."""
        return self.rate.micro_half_up(units)

    def units_paid(self, paid_micro: int) -> int:
        """The most units whose ``floor(rate × units)`` is covered by ``paid_micro``."""
        return ((paid_micro + 1) * self._den - 1) // self._num

    def _units_for(self, micro: int) -> int:
        return -(-micro * self._den // self._num)

    # -- accounts ------------------------------------------------------------------------

    def account(self, claim: Claim) -> _Account:
        with self._lock:
            acct = self._accounts.get(claim.escrow_id)
            if acct is None:
                acct = self._accounts[claim.escrow_id] = _Account(claim.escrow_id)
                acct.credit = self.credit
            return acct

    def _credit_for(self, acct: _Account) -> int:
        return acct.credit

    def _recount(self, acct: _Account) -> None:
        """Recompute an account's figures from its verified reads (after any change to them)."""
        good = acct.good()
        acct.paid = sum(e.released_micro for e in good)
        acct.paid_units = self.units_paid(acct.paid)
        live = [e for e in good if e.is_open]
        acct.has_live = bool(live)
        acct.live_left = sum(e.remaining_micro for e in live)
        acct.credit = self.credit
        if acct.key.startswith(_CHAIN):
            biggest = max((e.amount_micro for e in good), default=0)
            acct.credit += self._units_for(biggest + self._holdback_micro)

    def _unpaid_after(self, acct: _Account, units: int) -> int:
        return acct.served + acct.in_flight + units - acct.paid_units

    # -- step 1: what to read ------------------------------------------------------------

    def reads_needed(self, acct: _Account, claim: Claim, units: int, now: float) -> list[str]:
        """Escrow ids to read before :meth:`decide` (caller holds ``acct.lock``)."""
        fresh = [i for i in claim.escrow_ids() if i not in acct.reads]
        stale: list[str] = []
        near_credit = self._unpaid_after(acct, units) * 2 > self._credit_for(acct)
        for eid, read in acct.reads.items():
            if read.escrow is None or not read.escrow.is_open or eid in fresh:
                continue  # a closed escrow stays closed; a failed read is retried below
            age = now - read.at
            if age >= self.max_age or (near_credit and age >= self.min_interval):
                stale.append(eid)
        failed = [
            eid
            for eid, read in acct.reads.items()
            if read.problem == "unverifiable" and now - read.at >= self.min_interval
        ]
        wanted = fresh + [e for e in failed if e not in fresh] + stale
        if not wanted:
            return []
        if self._bucket.take(len(wanted), now):
            return wanted
        if fresh and self._bucket.take(len(fresh), now):
            return fresh
        return []  # over the read budget: decide on what is cached (fresh ids: unverifiable)

    def wait_before_refusing(self, acct: _Account, units: int, now: float) -> float:
        """Seconds to wait, then read again, before refusing ``unpaid`` (0: decide now).

        Why wait rather than refuse: a consumer calling faster than ``min_interval`` can run
        into its credit while its release is already on the way; a refusal would fail an honest
        call. Waiting at most ``min_interval`` (holding only that stream's lock) slows just the
        stream that runs ahead of its payments, and reads stay bounded.
        """
        if self._unpaid_after(acct, units) <= self._credit_for(acct):
            return 0.0
        live = [
            now - r.at
            for r in acct.reads.values()
            if r.verified and r.escrow is not None and r.escrow.is_open
        ]
        if not live:
            return 0.0
        return max(0.0, self.min_interval - min(live))

    # -- step 1b: what a read said -------------------------------------------------------

    def apply_read(
        self, acct: _Account, escrow_id: str, answer: Escrow | BaseException, now: float
    ) -> None:
        """Record one read's answer (an escrow or the error the client raised)."""
        self._apply_read(acct, escrow_id, answer, now)
        self._recount(acct)

    def _apply_read(
        self, acct: _Account, escrow_id: str, answer: Escrow | BaseException, now: float
    ) -> None:
        if isinstance(answer, Escrow):
            old = acct.reads.get(escrow_id)
            same = (
                old is not None
                and old.verified
                and old.escrow is not None
                and (old.escrow.to_agent_id, old.escrow.memo) == (answer.to_agent_id, answer.memo)
            )
            acct.reads[escrow_id] = _Read(answer, now, verified=same)
        elif isinstance(answer, NotFound | PermissionDenied):
            acct.reads[escrow_id] = _Read(
                None,
                now,
                "unknown_escrow",
                f"escrow {escrow_id} does not exist or does not pay this provider",
            )
        else:
            old = acct.reads.get(escrow_id)
            if old is not None and old.escrow is not None:
                return  # keep the last good read; age decides when to try again
            acct.reads[escrow_id] = _Read(
                None,
                now,
                "unverifiable",
                f"escrow {escrow_id} could not be read ({type(answer).__name__}); try again",
            )

    # -- step 2: the decision ------------------------------------------------------------

    def decide(self, acct: _Account, claim: Claim, units: int) -> Admission:
        """Admit ``units`` for ``claim`` or raise :class:`PaymentRefused` (holds ``acct.lock``)."""
        try:
            self._check(acct, claim, units)
        except PaymentRefused as refusal:
            acct.refusals[refusal.reason] = acct.refusals.get(refusal.reason, 0) + 1
            raise
        acct.in_flight += units
        return Admission(acct.key, units)

    def _check(self, acct: _Account, claim: Claim, units: int) -> None:
        key = claim.escrow_id
        escrows = self.verify(acct, claim)

        owed = self._owed_micro(acct, acct.in_flight + units)
        if not acct.has_live:
            status = escrows[0].status if escrows else "unknown"
            raise PaymentRefused(
                "escrow_closed",
                f"{key} is no longer locked (status {status})",
                owed_micro=self._owed_micro(acct, 0),
                escrow_id=key,
            )
        if any(e.status == "disputed" for e in escrows):
            raise PaymentRefused("escrow_closed", f"{key} is disputed", escrow_id=key)
        left = acct.live_left
        need = owed if not claim.is_chain else self.cost_micro(units)
        if left < need:
            raise PaymentRefused(
                "insufficient_escrow",
                f"{key} has {format_usdc(left)} USDC left; {format_usdc(need)} is needed",
                owed_micro=self._owed_micro(acct, 0),
                escrow_id=key,
            )
        credit = self._credit_for(acct)
        if self._unpaid_after(acct, units) > credit:
            unpaid = acct.served - acct.paid_units
            raise PaymentRefused(
                "unpaid",
                f"{unpaid} units served and not paid (credit {credit}); release what is owed",
                owed_micro=self._owed_micro(acct, 0),
                escrow_id=key,
            )

    def verify(self, acct: _Account, claim: Claim) -> list[Escrow]:
        """Check every escrow the claim names (read, pays this provider, the caller's proof,
        not another stream's); mark them counted. Raises :class:`PaymentRefused`."""
        key = claim.escrow_id
        ids = claim.escrow_ids()
        if (
            acct.proof is not None
            and claim.proof is not None
            and hmac.compare_digest(acct.proof, claim.proof)
            and all((r := acct.reads.get(eid)) is not None and r.verified for eid in ids)
        ):
            return [acct.reads[eid].escrow for eid in ids]  # type: ignore[misc]
        escrows: list[Escrow] = []
        for eid in ids:
            read = acct.reads.get(eid)
            if read is None:
                raise PaymentRefused(
                    "unverifiable", f"escrow {eid} has not been read yet; try again", escrow_id=key
                )
            if read.escrow is None:
                assert read.problem is not None
                raise PaymentRefused(read.problem, read.message, escrow_id=key)
            escrow = read.escrow
            if escrow.escrow_id != eid:
                raise PaymentRefused("unknown_escrow", f"escrow {eid} not found", escrow_id=key)
            if escrow.to_agent_id != self.provider_id:
                raise PaymentRefused(
                    "wrong_provider", f"escrow {eid} does not pay this provider", escrow_id=key
                )
            if self.require_proof and not proof_matches(escrow.memo, claim.proof):
                raise PaymentRefused(
                    "not_payer",
                    f"escrow {eid}: the proof (X-PF-Proof) is missing or is not the one its memo "
                    "commits to; pay with your own PaymentStream",
                    escrow_id=key,
                )
            escrows.append(escrow)
        with self._lock:
            for eid in claim.escrow_ids():
                owner = self._owner.setdefault(eid, key)
                if owner != key:
                    raise PaymentRefused(
                        "escrow_in_use", f"escrow {eid} already pays for {owner}", escrow_id=key
                    )
        for eid in ids:
            acct.reads[eid].verified = True
        acct.proof = claim.proof if self.require_proof else None
        self._recount(acct)
        return escrows

    def _owed_micro(self, acct: _Account, extra: int) -> int:
        return max(self.cost_micro(acct.served + extra) - acct.paid_micro(), 0)

    # -- step 3: after the work ----------------------------------------------------------

    def finish(self, admission: Admission, units: int | None = None) -> None:
        """Count what was served for ``admission`` (``units``, default what was admitted)."""
        served = admission.units if units is None else parse_count(units, "units")
        acct = self._accounts[admission.key]
        with acct.lock:
            acct.in_flight -= admission.units
            acct.served += served
            unpaid = acct.served - acct.paid_units
            acct.max_unpaid = max(acct.max_unpaid, unpaid)

    def cancel(self, admission: Admission) -> None:
        """The work failed: count nothing."""
        acct = self._accounts[admission.key]
        with acct.lock:
            acct.in_flight -= admission.units

    def refused_before(self, reason: str) -> bool:
        """Whether ``reason`` is decided from the claim alone (no credit involved)."""
        return reason in _BEFORE_WORK

    # -- views ---------------------------------------------------------------------------

    def view(self, key: str) -> AccountView:
        acct = self._accounts[key]
        with acct.lock:
            return self._view(acct)

    def views(self) -> list[AccountView]:
        with self._lock:
            accounts = list(self._accounts.values())
        out = []
        for acct in accounts:
            with acct.lock:
                out.append(self._view(acct))
        return out

    def _view(self, acct: _Account) -> AccountView:
        paid = acct.paid_micro()
        good = [r.escrow for r in acct.reads.values() if r.escrow is not None]
        if not good:
            status = "unverified"
        elif any(e.is_open for e in good):
            status = "locked"
        else:
            status = "closed"
        return AccountView(
            escrow_id=acct.key,
            status=status,
            served=acct.served,
            in_flight=acct.in_flight,
            paid_units=self.units_paid(paid),
            paid_micro=paid,
            owed_micro=max(self.cost_micro(acct.served) - paid, 0),
            max_unpaid=acct.max_unpaid,
            refusals=dict(acct.refusals),
            escrows=tuple(acct.reads),
        )

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._accounts)
