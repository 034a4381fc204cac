"""Exact money: USDC amounts as integer micro-USDC, rates as exact fractions.

Why integers: USDC has six decimals, so every amount that can ever move is a whole number of
micro-USDC. Holding amounts as ``int`` makes sums exact and cheap, and makes "at most six
places" a property of the type rather than a check someone may forget. Rates are finer than
amounts (a price per token may be 0.0000001 USDC), so a :class:`Rate` is an exact fraction and
the cost of *n* units is computed in integers, rounded only where the design says so:

* a batch pays ``floor(rate × units so far) − paid so far`` (no rounding error accumulates);
* the close pays up to ``rate × units`` rounded half-up to the micro-USDC, once.

This module must never accept a ``float``: ``Decimal(0.9)`` keeps the float's error, and one
float near money is a bug. It does no I/O and imports nothing from the rest of the package
except the error types.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final

from pf_metered.errors import InvalidInput

__all__ = [
    "FEE_PERCENT",
    "MAX_AMOUNT_MICRO",
    "MAX_RATE_PLACES",
    "MICRO",
    "PLAIN_DECIMAL",
    "AmountLike",
    "Rate",
    "decimal_to_micro",
    "fee_micro",
    "format_usdc",
    "micro_to_decimal",
    "net_micro",
    "parse_amount",
    "parse_count",
    "parse_rate",
]

MICRO: Final = 1_000_000
"""micro-USDC in one USDC."""

AMOUNT_PLACES: Final = 6
"""Decimal places an amount may carry on the wire (USDC has six)."""

MAX_RATE_PLACES: Final = 18
"""Decimal places a rate may carry: finer than amounts, so sub-micro prices add up exactly."""

MAX_AMOUNT_MICRO: Final = 10**12 * MICRO
"""One trillion USDC: anything larger is a typo or an attack, not a budget."""

MAX_UNITS: Final = 10**15
"""Units counted in one call or one stream; beyond this a counter is surely corrupt."""

FEE_PERCENT: Final = 1
"""Purple Flea's flat fee on what is released, in percent."""

AmountLike = str | int | Decimal
"""What callers may pass as money. ``float`` is refused on purpose."""


def _to_decimal(value: object, field: str) -> Decimal:
    """Turn a caller's value into a finite Decimal, refusing floats, bools and junk."""
    if isinstance(value, bool):
        raise InvalidInput(field, "must be a number, not a bool")
    if isinstance(value, float):
        raise InvalidInput(
            field, f"must be a str, int or Decimal, not float ({value!r}); floats lose cents"
        )
    if isinstance(value, Decimal):
        dec = value
    elif isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, str):
        dec = _plain_decimal(value, field)
    else:
        raise InvalidInput(field, f"must be a str, int or Decimal, not {type(value).__name__}")
    if not dec.is_finite():
        raise InvalidInput(field, f"must be finite, got {dec}")
    return dec


PLAIN_DECIMAL: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
"""The only money text there is: ASCII digits, optionally a point and more ASCII digits.

Why so narrow: ``Decimal()`` also reads ``"1_0"``, ``"١٠"`` (Arabic-Indic), ``"１０"``
(full-width), ``"+10"``, ``" 10 "`` and ``"1e3"`` — each a different text for a human, a log
line or another service than the number we would pay. Use with ``fullmatch``."""

_SPECIALS: Final = frozenset({"nan", "snan", "inf", "infinity"})


def _plain_decimal(value: str, field: str) -> Decimal:
    """A money string as a Decimal, accepted only when :data:`PLAIN_DECIMAL` matches all of it
    (``-`` first is refused as negative, NaN/Infinity as not finite, to say what is wrong)."""
    shown = value[:40]
    if len(value) <= 64 and PLAIN_DECIMAL.fullmatch(value):
        return Decimal(value)  # exact: the constructor never rounds
    if not value or len(value) > 64:
        raise InvalidInput(field, f"is not a decimal number: {shown!r}")
    if value[0] == "-" and PLAIN_DECIMAL.fullmatch(value[1:]):
        raise InvalidInput(field, f"must not be negative, got {shown}")
    if value.lstrip("+-").lower() in _SPECIALS:
        raise InvalidInput(field, f"must be finite, got {shown!r}")
    if "e" in value or "E" in value:
        # "1e3" is a thousand USDC to Decimal and a typo to a human: money is written out.
        raise InvalidInput(field, f"must be written as a plain decimal, not {shown!r}")
    raise InvalidInput(
        field,
        f'is not a decimal number written in plain ASCII digits (like "1.50"): {shown!r}',
    )


def parse_amount(value: object, field: str = "amount", *, allow_zero: bool = False) -> int:
    """Parse a USDC amount into integer micro-USDC.

    Refuses more than six decimal places rather than rounding: a caller who writes
    ``"0.0000015"`` as an amount has a bug, and silently paying 0.000002 would hide it.
    """
    dec = _to_decimal(value, field)
    if dec < 0:
        raise InvalidInput(field, f"must not be negative, got {dec}")
    if dec == 0 and not allow_zero:
        raise InvalidInput(field, "must be greater than zero")
    micro = _exact_micro(dec)
    if micro is None:
        raise InvalidInput(
            field, f"has more than {AMOUNT_PLACES} decimal places (USDC's precision): {dec}"
        )
    if micro > MAX_AMOUNT_MICRO:
        raise InvalidInput(field, f"is absurdly large: {dec}")
    return micro


def _coefficient(dec: Decimal) -> tuple[int, int]:
    """``(coefficient, exponent)`` of a finite Decimal with trailing zeros stripped, so that
    ``abs(dec) == coefficient * 10**exponent`` exactly. Integer work only: no Decimal
    context (a caller's ``getcontext().prec`` must never round money)."""
    _sign, digits, exponent = dec.as_tuple()
    if not isinstance(exponent, int):  # pragma: no cover - callers pass finite values
        raise ValueError("not a finite decimal")
    text = "".join(map(str, digits)).lstrip("0")
    if not text:
        return 0, 0
    stripped = text.rstrip("0")
    return int(stripped), exponent + (len(text) - len(stripped))


def _exact_micro(dec: Decimal) -> int | None:
    """``abs(dec)`` in micro-USDC exactly, or ``None`` when it has more than six places."""
    coefficient, exponent = _coefficient(dec)
    if coefficient == 0:
        return 0
    shift = exponent + AMOUNT_PLACES
    if shift < 0:
        return None  # trailing zeros are stripped: a digit sits beyond the sixth place
    if shift > 30:  # far beyond MAX_AMOUNT_MICRO; do not build a huge int for "1E+999999"
        return MAX_AMOUNT_MICRO + 1
    return int(coefficient * 10**shift)


def decimal_to_micro(value: Decimal) -> int:
    """An amount already known to be exact (at most six places, e.g. a model's field) in
    micro-USDC, computed without any Decimal context. Raises ``ValueError`` otherwise."""
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    micro = _exact_micro(value)
    if micro is None:
        raise ValueError(f"more than {AMOUNT_PLACES} decimal places: {value}")
    return -micro if value < 0 else micro


def parse_count(value: object, field: str = "units", *, allow_zero: bool = True) -> int:
    """Parse a unit count: a non-negative whole number, never a float or a bool."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"must be a whole number (int), not {type(value).__name__}")
    if value < 0:
        raise InvalidInput(field, f"must not be negative, got {value}")
    if value == 0 and not allow_zero:
        raise InvalidInput(field, "must be at least 1")
    if value > MAX_UNITS:
        raise InvalidInput(field, f"is absurdly large: {value}")
    return value


def micro_to_decimal(micro: int) -> Decimal:
    """The exact Decimal value of an amount in micro-USDC."""
    sign = 1 if micro < 0 else 0
    digits = tuple(int(c) for c in str(abs(micro)))
    return Decimal((sign, digits, -AMOUNT_PLACES))  # built exactly, no context rounding


def format_usdc(micro: int) -> str:
    """Format micro-USDC as the wire's decimal string: at least 2 places, at most 6.

    ``format_usdc(10_000_000) == "10.00"``, ``format_usdc(1_500) == "0.0015"``.
    """
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO)
    digits = f"{frac:06d}".rstrip("0")
    if len(digits) < 2:
        digits = digits.ljust(2, "0")
    return f"{sign}{whole}.{digits}"


def fee_micro(released_micro: int) -> int:
    """The 1% fee on a released total, rounded half-up to the micro-USDC.

    Charged on the cumulative total (not per release), so a thousand small releases cost the
    same fee as one large one.
    """
    if released_micro < 0:
        raise InvalidInput("released", "must not be negative")
    return (released_micro * FEE_PERCENT * 2 + 100) // 200


def net_micro(released_micro: int) -> int:
    """What the provider receives of a released total after the fee."""
    return released_micro - fee_micro(released_micro)


class Rate:
    """A price per unit as an exact fraction ``numerator / denominator`` of a USDC.

    Costs are integer arithmetic on the hot path: no Decimal context, no rounding until asked.
    """

    __slots__ = ("_den", "_num", "_text")

    def __init__(self, numerator: int, denominator: int, text: str) -> None:
        self._num = numerator
        self._den = denominator
        self._text = text

    @property
    def decimal(self) -> Decimal:
        """The rate as an exact Decimal (for display and the wire)."""
        return Decimal(self._text)

    def scaled_down(self, places: int) -> Rate:
        """This rate divided by ``10**places``, exactly (a rate per second as a rate per
        millisecond). Integer work only: no Decimal context may round it."""
        if places < 0:
            raise ValueError("places must not be negative")
        coefficient, exponent = _coefficient(Decimal(self._text))
        text = _plain(coefficient, exponent - places)
        return Rate(self._num, self._den * 10**places, text)

    def micro_floor(self, units: int) -> int:
        """micro-USDC owed for ``units``, rounded down: what batches may pay so far."""
        return (units * self._num * MICRO) // self._den

    def micro_half_up(self, units: int) -> int:
        """micro-USDC owed for ``units``, rounded half-up: what the close settles to."""
        return (units * self._num * MICRO * 2 + self._den) // (2 * self._den)

    def units_affordable(self, budget_micro: int) -> int:
        """The most units whose half-up cost fits in ``budget_micro``."""
        if self._num == 0:
            return MAX_UNITS
        # micro_half_up(u) <= budget  <=>  2*u*num*M + den <= 2*den*budget + (2*den - 1)
        # Solve with floor division, then step back if rounding pushed it over.
        units = (2 * self._den * budget_micro + self._den - 1) // (2 * self._num * MICRO)
        while units > 0 and self.micro_half_up(units) > budget_micro:
            units -= 1
        return min(units, MAX_UNITS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Rate):
            return NotImplemented
        return self._num * other._den == other._num * self._den

    def __hash__(self) -> int:
        return hash(self.decimal)

    def __str__(self) -> str:
        return self._text

    def __repr__(self) -> str:
        return f"Rate('{self._text}')"


def parse_rate(value: object, field: str = "rate", *, allow_zero: bool = False) -> Rate:
    """Parse a price per unit. Up to 18 decimal places; refuses floats, negatives, junk."""
    if isinstance(value, Rate):
        return value
    dec = _to_decimal(value, field)
    if dec < 0:
        raise InvalidInput(field, f"must not be negative, got {dec}")
    if dec == 0 and not allow_zero:
        raise InvalidInput(field, "must be greater than zero")
    coefficient, exponent = _coefficient(dec)  # exact: no context may round a rate
    if exponent < -MAX_RATE_PLACES:
        raise InvalidInput(field, f"has more than {MAX_RATE_PLACES} decimal places: {dec}")
    if coefficient and len(str(coefficient)) + exponent > 13:  # >= 10**13 > the cap
        raise InvalidInput(field, f"is absurdly large: {dec}")
    if exponent >= 0:
        num, den = coefficient * 10**exponent, 1
    else:
        num, den = coefficient, 10**-exponent
    if num * MICRO > MAX_AMOUNT_MICRO * den:
        raise InvalidInput(field, f"is absurdly large: {dec}")
    return Rate(num, den, _plain(coefficient, exponent))


def _plain(coefficient: int, exponent: int) -> str:
    """``coefficient × 10**exponent`` written out as a plain decimal (no exponent), exactly."""
    return format(Decimal((0, tuple(int(c) for c in str(coefficient)), exponent)), "f")
