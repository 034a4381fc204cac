"""What a stream reports: its status while it runs and its receipt once it is closed.

Values only, computed from the store's integers (micro-USDC) and shown as exact Decimals.
Nothing here counts, prices or does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Context, Decimal

from pf_metered.money import FEE_PERCENT, fee_micro, format_usdc, micro_to_decimal

__all__ = ["Receipt", "ReleaseRecord", "StatusReport"]

_PER_SHIFT = {"second": 3, "minute": 4, "hour": 6}
_EXACT = Context(prec=60)
"""Room for every rate (18 places, 13 integer digits) after a shift: the caller's context,
whatever its precision, never rounds a price shown on a receipt."""
_QUANTUM_NOTE = {"second": " ms", "minute": " × 6 ms", "hour": " µh (3.6 ms each)"}


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    """One settled release: which units it paid for and how much."""

    seq: int
    units_from: int
    units_to: int
    amount_micro: int
    final: bool
    memo: str

    @property
    def amount(self) -> Decimal:
        return micro_to_decimal(self.amount_micro)


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A stream's figures right now (``stream.status()``)."""

    stream_id: str
    state: str
    escrow_id: str | None
    rate: Decimal
    units: int
    released_micro: int
    pending_units: int
    budget_micro: int
    history: tuple[ReleaseRecord, ...]

    @property
    def released(self) -> Decimal:
        return micro_to_decimal(self.released_micro)

    @property
    def remaining_micro(self) -> int:
        """Budget not yet released (units counted but unpaid are still in here)."""
        return self.budget_micro - self.released_micro

    @property
    def remaining(self) -> Decimal:
        return micro_to_decimal(self.remaining_micro)

    @property
    def releases(self) -> int:
        return sum(1 for r in self.history if r.amount_micro)


@dataclass(frozen=True, slots=True)
class Receipt:
    """The settled account of a closed stream. ``str(receipt)`` is a readable table."""

    stream_id: str
    escrow_id: str | None
    to_agent_id: str
    rate: Decimal
    units: int
    releases: int
    paid_micro: int
    refunded_micro: int
    budget_micro: int
    per: str = "unit"

    @property
    def fee_micro(self) -> int:
        return fee_micro(self.paid_micro)

    @property
    def provider_net_micro(self) -> int:
        return self.paid_micro - self.fee_micro

    @property
    def paid(self) -> Decimal:
        return micro_to_decimal(self.paid_micro)

    @property
    def fee(self) -> Decimal:
        return micro_to_decimal(self.fee_micro)

    @property
    def provider_net(self) -> Decimal:
        return micro_to_decimal(self.provider_net_micro)

    @property
    def refunded(self) -> Decimal:
        return micro_to_decimal(self.refunded_micro)

    @property
    def budget(self) -> Decimal:
        return micro_to_decimal(self.budget_micro)

    def _rate_text(self) -> str:
        shift = _PER_SHIFT.get(self.per, 0)
        shown = (
            format(_EXACT.normalize(_EXACT.scaleb(self.rate, shift)), "f")
            if shift
            else str(self.rate)
        )
        return f"{shown} USDC / {self.per}"

    def rows(self) -> list[tuple[str, str]]:
        """The receipt as (label, value) rows, in the order the table prints them."""
        return [
            ("stream", self.stream_id),
            ("escrow", self.escrow_id or "(never opened)"),
            ("provider", self.to_agent_id),
            ("rate", self._rate_text()),
            ("units", f"{self.units:,}{_QUANTUM_NOTE.get(self.per, '')}"),
            ("releases", f"{self.releases:,}"),
            ("budget", f"{format_usdc(self.budget_micro)} USDC"),
            ("paid", f"{format_usdc(self.paid_micro)} USDC"),
            (f"fee ({FEE_PERCENT}%)", f"{format_usdc(self.fee_micro)} USDC"),
            ("provider net", f"{format_usdc(self.provider_net_micro)} USDC"),
            ("refunded", f"{format_usdc(self.refunded_micro)} USDC"),
        ]

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        vwidth = max(len(v) for _, v in rows)
        rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
        lines = [rule, f"| {'Payment stream receipt':<{width + vwidth + 3}} |", rule]
        lines += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
        lines.append(rule)
        return "\n".join(lines)
