"""The tranche planner: how a stream pays exactly on a service that only releases whole escrows.

Why tranches: the deployed escrow service has no partial release — an escrow is released whole
or not at all — and refuses amounts under its minimum (0.10 USDC). A stream on it is therefore a
chain of escrows ("tranches"), each locked ahead of need and released whole once the units it
pays for are used. This module decides the sizes; :mod:`._tranches` drives the chain.

Exactness, on a service that cannot release a part:

* every full tranche has the same size ``T`` (≥ the minimum, a multiple of 0.0001 USDC so the
  service's 1% commission is a whole micro-USDC and per-escrow fees add up to the 1% of the
  total that a receipt shows);
* a tranche of size ``s`` is released only when the stream owes at least ``s + H``, where the
  *hold-back* ``H`` is the service's minimum. After any release the stream still owes ≥ ``H``,
  so at close what is owed is either nothing or at least the minimum — always payable by one
  right-sized final escrow;
* at close the stream owes ``R = half_up(rate × units) − paid``. Live (locked, unreleased)
  tranches whose sizes fit in ``R`` are released whole (when what is left of ``R`` is zero or
  still at least the minimum), a final escrow of exactly the rest is locked and released, and
  live tranches that were not needed are let go (the service hands them back to the payer, less
  its 1% commission, when their ``timeout_hours`` pass).

So Σ released == ``half_up(rate × units)`` to the micro-USDC, never more, and never more than
the budget. The one case no exact payment exists: a stream whose whole cost is under the
minimum (say 3 calls at 0.001) — reported as ``unpaid``, never rounded up to the minimum.

What this module must never do: I/O, floats near money, or release (plan to release) a
tranche before the units it pays for were counted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Final

from pf_metered.errors import InvalidInput
from pf_metered.money import Rate, format_usdc

__all__ = [
    "DEPLOYED_MINIMUM_MICRO",
    "GRANULE_MICRO",
    "CloseSettlement",
    "TranchePlan",
    "next_lock_micro",
    "plan_tranches",
    "releasable",
    "settle_close",
    "split_budget",
    "units_for_micro",
]

DEPLOYED_MINIMUM_MICRO: Final = 100_000
"""The deployed service's smallest escrow: 0.10 USDC."""

GRANULE_MICRO: Final = 100
"""Tranche sizes are multiples of 0.0001 USDC, so 1% of each is a whole micro-USDC."""

DEFAULT_TRANCHES_PER_BUDGET: Final = 10
"""Without a batch size, a budget is paid in about this many tranches."""


def _round_up(value: int, granule: int) -> int:
    return -(-value // granule) * granule


def units_for_micro(rate: Rate, amount_micro: int) -> int:
    """The fewest units whose (floor) cost reaches ``amount_micro``: what one tranche pays for."""
    if amount_micro <= 0:
        return 0
    per_unit = Fraction(rate.decimal) * 1_000_000
    if per_unit == 0:
        return 0
    return math.ceil(Fraction(amount_micro) / per_unit)


@dataclass(frozen=True, slots=True)
class TranchePlan:
    """The sizes a tranche stream uses, and what the service's limits mean for it.

    ``notes`` are the adjustments and warnings a user should read when the stream opens
    (a batch below the minimum, a release cadence above the service's rate limit).
    """

    tranche_micro: int
    holdback_micro: int
    minimum_micro: int
    budget_micro: int
    units_per_tranche: int
    creates_per_minute: float | None
    notes: tuple[str, ...] = ()

    @property
    def sizes(self) -> tuple[int, ...]:
        """The budget split into tranche sizes (the most that could ever be locked, in order)."""
        return split_budget(self.budget_micro, self.tranche_micro, self.minimum_micro)

    @property
    def tranche(self) -> Decimal:
        return Decimal(format_usdc(self.tranche_micro))

    @property
    def max_units_per_minute(self) -> float | None:
        """Units a minute the create limit sustains with full-size tranches (catch-up tranches
        grow beyond ``T`` when a stream runs faster, so this is where releases start lagging,
        not a cap on recording)."""
        if self.creates_per_minute is None:
            return None
        return self.creates_per_minute * self.units_per_tranche


def split_budget(budget_micro: int, tranche_micro: int, minimum_micro: int) -> tuple[int, ...]:
    """``budget`` as full tranches of ``tranche_micro`` and a right-sized last one ≥ minimum.

    A rest under the minimum is folded into the last full tranche (so the last may be up to
    ``tranche + minimum``); a budget under the minimum cannot be locked at all.
    """
    if budget_micro < minimum_micro:
        raise InvalidInput(
            "budget",
            f"{format_usdc(budget_micro)} is under the service's minimum escrow of "
            f"{format_usdc(minimum_micro)}",
        )
    if tranche_micro < minimum_micro:
        raise InvalidInput("tranche", "must be at least the service's minimum")
    full, rest = divmod(budget_micro, tranche_micro)
    sizes = [tranche_micro] * full
    if rest:
        if rest >= minimum_micro or not sizes:
            sizes.append(rest)
        else:
            sizes[-1] += rest
    return tuple(sizes)


def plan_tranches(
    rate: Rate,
    *,
    budget_micro: int,
    batch_units: int | None = None,
    every_seconds: Decimal | float | None = None,
    minimum_micro: int = DEPLOYED_MINIMUM_MICRO,
    creates_per_minute: float | None = None,
    tranche_micro: int | None = None,
) -> TranchePlan:
    """Choose the tranche size for a stream and say what the service's limits imply.

    ``T`` is the cost of one batch (``rate × batch``, rounded up to :data:`GRANULE_MICRO`),
    raised to the minimum when a batch costs less, capped at the budget; without a batch size,
    a tenth of the budget. ``creates_per_minute`` is what the client's rate limiter sustains on
    the create path; a time-based cadence faster than that is reported.
    """
    if budget_micro < minimum_micro:
        raise InvalidInput(
            "budget",
            f"{format_usdc(budget_micro)} USDC is under the deployed service's minimum escrow "
            f"of {format_usdc(minimum_micro)} USDC",
        )
    notes: list[str] = []
    if tranche_micro is not None:
        if tranche_micro < minimum_micro:
            raise InvalidInput(
                "tranche", f"must be at least the service's minimum {format_usdc(minimum_micro)}"
            )
        size = tranche_micro
    elif batch_units:
        cost = math.ceil(Fraction(rate.decimal) * 1_000_000 * batch_units)
        size = _round_up(max(cost, 1), GRANULE_MICRO)
        if size < minimum_micro:
            units = units_for_micro(rate, minimum_micro)
            notes.append(
                f"a batch of {batch_units:,} units costs {format_usdc(cost)} USDC, under the "
                f"service's minimum escrow of {format_usdc(minimum_micro)}: each tranche pays "
                f"for about {units:,} units instead"
            )
            size = minimum_micro
    else:
        size = max(
            minimum_micro,
            _round_up(-(-budget_micro // DEFAULT_TRANCHES_PER_BUDGET), GRANULE_MICRO),
        )
    size = min(size, budget_micro)
    per_tranche = units_for_micro(rate, size)
    notes.append(
        f"tranches of {format_usdc(size)} USDC (about {per_tranche:,} units each); each is "
        f"released whole once its units are used and {format_usdc(minimum_micro)} more is "
        f"owed, so the final payment is always at least the service's minimum"
    )
    if creates_per_minute is not None:
        if every_seconds is not None:
            wanted = 60 / float(every_seconds)  # ok: releases a minute, not money
            if wanted > creates_per_minute:
                notes.append(
                    f"every={every_seconds}s asks for {wanted:.1f} releases a minute, but the "
                    f"service allows about {creates_per_minute:.1f} escrow creations a minute: "
                    f"releases will go out about every {60 / creates_per_minute:.1f}s, each "
                    f"covering more units"
                )
        notes.append(
            f"at {creates_per_minute:.1f} tranches a minute this stream pays up to about "
            f"{creates_per_minute * per_tranche:,.0f} units a minute in full-size tranches; "
            f"faster use is paid in larger catch-up tranches"
        )
    return TranchePlan(
        tranche_micro=size,
        holdback_micro=minimum_micro,
        minimum_micro=minimum_micro,
        budget_micro=budget_micro,
        units_per_tranche=per_tranche,
        creates_per_minute=creates_per_minute,
        notes=tuple(notes),
    )


def releasable(owed_micro: int, paid_micro: int, tranche_micro: int, plan: TranchePlan) -> bool:
    """May a locked tranche of ``tranche_micro`` be released now?

    Only when its units were used *and* the minimum is still owed after it (the hold-back),
    so the final payment at close can never fall under the minimum.
    """
    return owed_micro - paid_micro >= tranche_micro + plan.holdback_micro


def next_lock_micro(
    plan: TranchePlan,
    *,
    owed_micro: int,
    paid_micro: int,
    live_micro: int,
    locked_total_micro: int,
) -> int:
    """The size of the next tranche to lock, or 0 when none should be locked.

    ``live_micro`` is locked and not yet released; ``locked_total_micro`` is everything ever
    locked and not let go (paid + live). A stream behind its releases (owed far beyond what is
    locked, because the create limit held it back) locks one larger catch-up tranche rather
    than many small ones. Never locks beyond the budget or under the minimum.
    """
    room = plan.budget_micro - locked_total_micro
    if room < plan.minimum_micro:
        return 0
    behind = owed_micro - paid_micro - live_micro - plan.holdback_micro
    size = plan.tranche_micro
    if behind > size:
        size = behind - behind % GRANULE_MICRO
    if size < room:
        return size
    # the last room of the budget: keep it on the granule unless that falls under the minimum
    granular = room - room % GRANULE_MICRO
    return granular if granular >= plan.minimum_micro else room


@dataclass(frozen=True, slots=True)
class CloseSettlement:
    """What closing a tranche stream does, decided before any request.

    Release the live tranches at ``release`` (indices into the live list) whole, then lock and
    release one final escrow of ``final_micro`` (0: none), and let the others go. ``unpaid_micro``
    is owed but cannot be paid (the whole remainder is under the service's minimum).
    """

    release: tuple[int, ...]
    final_micro: int
    let_go: tuple[int, ...]
    unpaid_micro: int


def settle_close(
    owed_micro: int, live: Sequence[int], minimum_micro: int = DEPLOYED_MINIMUM_MICRO
) -> CloseSettlement:
    """Pay exactly ``owed_micro`` (what is still owed) from live tranches and one final escrow.

    Chooses the subset of live tranches that pays the most without overpaying and leaves a rest
    that is zero or payable (≥ minimum); ties go to fewer releases. Live lists are short (the
    current tranche and the one locked ahead), so the search is exhaustive.
    """
    if owed_micro < 0:
        raise InvalidInput("owed", "must not be negative")
    best: tuple[int, ...] = ()
    best_sum = 0
    indices = range(len(live))
    if len(live) > 12:  # pragma: no cover - a driver never keeps this many live
        raise InvalidInput("live", "too many live tranches to settle exhaustively")
    for k in range(len(live) + 1):
        for combo in itertools.combinations(indices, k):
            total = sum(live[i] for i in combo)
            rest = owed_micro - total
            if rest < 0 or (0 < rest < minimum_micro):
                continue
            if total > best_sum or (total == best_sum and len(combo) < len(best)):
                best, best_sum = combo, total
    rest = owed_micro - best_sum
    unpaid = 0
    final = rest
    if 0 < rest < minimum_micro:
        unpaid, final = rest, 0
    let_go = tuple(i for i in indices if i not in best)
    return CloseSettlement(release=best, final_micro=final, let_go=let_go, unpaid_micro=unpaid)
