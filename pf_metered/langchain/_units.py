"""Counting units on a payment stream from LangChain hooks: reserve before, commit after.

Why reserve/commit: a paid call must be refused *before* the provider's work starts when the
budget cannot pay for it, and a call that fails must cost nothing. The stream's meter offers
exactly that (``reserve`` holds budget, ``commit`` counts it, ``cancel`` gives it back); this
module is the one place the LangChain layer touches it, so the handler and ``pay_per_call``
share one accounting path with ``@metered``.

What this module must never do: perform I/O (counting wakes the stream's own sender; it never
sends), or count a unit the budget cannot pay.
"""

from __future__ import annotations

from typing import Any, Protocol

from pf_metered.errors import BudgetExhausted

__all__ = ["Meterable", "cancel", "commit", "record_up_to", "reserve"]


class Meterable(Protocol):
    """What this module needs of a stream (``PaymentStream`` or ``AsyncPaymentStream``)."""

    @property
    def meter(self) -> Any: ...

    def record(self, units: int = 1) -> int: ...


def reserve(stream: Meterable, units: int) -> None:
    """Hold ``units`` of the budget; ``BudgetExhausted`` or ``StreamClosed`` if it cannot."""
    stream.meter.reserve(units)


def commit(stream: Meterable, units: int) -> int:
    """Count ``units`` held by :func:`reserve` and wake the stream's sender if a batch is due."""
    total: int = stream.meter.commit(units)
    woken = getattr(stream, "_committed", None)
    if woken is not None:
        woken(total)
    return total


def cancel(stream: Meterable, units: int) -> None:
    """Give back ``units`` held by :func:`reserve` (the call they were for failed)."""
    stream.meter.cancel(units)


def record_up_to(stream: Meterable, units: int) -> int:
    """Count ``units``, or as many as the budget still pays; return how many were *not* counted.

    Why not all-or-nothing here: token counts are known only after the model has answered.
    The work is done; paying for what the budget covers (and reporting the rest) is fairer to
    the provider than paying nothing, and never exceeds the budget.
    """
    left = units
    while left > 0:
        try:
            stream.record(left)
            return 0
        except BudgetExhausted as exc:
            fits = exc.remaining_units or 0
            if fits <= 0 or fits >= left:
                return left
            try:
                stream.record(fits)
                left -= fits
            except BudgetExhausted:
                continue
    return 0
