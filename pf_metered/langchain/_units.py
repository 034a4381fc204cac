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

from typing import Protocol

__all__ = ["Meterable", "cancel", "commit", "record_up_to", "reserve"]


class Meterable(Protocol):
    """What this module needs of a stream: ``StreamBase``'s public counting API."""

    def reserve(self, units: int = 1) -> int: ...

    def commit(self, token: int, units: int | None = None) -> int: ...

    def cancel(self, token: int) -> None: ...

    def record_up_to(self, units: int) -> int: ...


def reserve(stream: Meterable, units: int) -> int:
    """Hold ``units`` of the budget; ``BudgetExhausted`` or ``StreamClosed`` if it cannot."""
    return stream.reserve(units)


def commit(stream: Meterable, token: int) -> int:
    """Count what ``token`` holds (the stream wakes its sender if a batch is due); return the
    units not paid (the stream closed while the call ran)."""
    return stream.commit(token)


def cancel(stream: Meterable, token: int) -> None:
    """Give back what :func:`reserve` held (the call it was for failed)."""
    stream.cancel(token)


def record_up_to(stream: Meterable, units: int) -> int:
    """Count ``units``, or as many as the budget still pays; return how many were *not* counted.

    Why not all-or-nothing here: token counts are known only after the model has answered.
    The work is done; paying for what the budget covers (and reporting the rest) is fairer to
    the provider than paying nothing, and never exceeds the budget.
    """
    return stream.record_up_to(units) if units > 0 else 0
