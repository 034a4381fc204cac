"""Batch policies: when a stream's counted units are due for release.

A policy is a value (``every(units=100)``, ``every(seconds=60)``) and policies compose with
``|`` meaning "whichever comes first" (tenacity's ``stop_after_attempt(3) |
stop_after_delay(10)``). The meter reads two numbers from it; nothing here counts, sleeps or
does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from pf_metered.errors import InvalidInput
from pf_metered.money import parse_count

__all__ = ["BatchPolicy", "every"]

_MAX_SECONDS = Decimal(366 * 24 * 3600)
_T = TypeVar("_T", int, Decimal)


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Release every ``units`` counted units and/or every ``seconds`` seconds.

    ``None`` means "not on this criterion". With neither, units are released only at
    ``flush()`` and ``close()``.
    """

    units: int | None = None
    seconds: Decimal | None = None

    def __or__(self, other: BatchPolicy) -> BatchPolicy:
        if not isinstance(other, BatchPolicy):
            return NotImplemented
        return BatchPolicy(_min(self.units, other.units), _min(self.seconds, other.seconds))

    def __str__(self) -> str:
        parts = []
        if self.units is not None:
            parts.append(f"every {self.units} units")
        if self.seconds is not None:
            parts.append(f"every {self.seconds} s")
        return " or ".join(parts) or "at flush/close only"


def _min(a: _T | None, b: _T | None) -> _T | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a <= b else b


def parse_seconds(value: object, field: str = "every") -> Decimal:
    """Seconds as an exact positive Decimal; floats are fine here (time, not money)."""
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise InvalidInput(field, f"must be a number of seconds, not {type(value).__name__}")
    try:
        sec = Decimal(str(value)) if isinstance(value, float | str) else Decimal(value)
    except ArithmeticError:
        raise InvalidInput(field, f"is not a number of seconds: {value!r}") from None
    if not sec.is_finite() or sec <= 0:
        raise InvalidInput(field, f"must be a positive number of seconds, got {value!r}")
    if sec > _MAX_SECONDS:
        raise InvalidInput(field, f"is longer than a year: {value!r}")
    return sec


def every(
    *, units: int | None = None, seconds: float | int | str | Decimal | None = None
) -> BatchPolicy:
    """A batch policy: ``every(units=100)``, ``every(seconds=60)``, or both (first wins)."""
    if units is None and seconds is None:
        raise InvalidInput("every", "needs units= or seconds=")
    return BatchPolicy(
        parse_count(units, "units", allow_zero=False) if units is not None else None,
        parse_seconds(seconds, "seconds") if seconds is not None else None,
    )
