"""What a stream reports: its status while it runs and its receipt once it is closed.

Values only, computed from the store's integers (micro-USDC) and shown as exact Decimals.
Nothing here counts, prices or does I/O.

A receipt is honest about where every micro-USDC of the payer's went, on either dialect:
``paid`` (released to the provider for counted units; ``fee`` and ``provider_net`` split it),
``auto_released`` (released to the provider by the service's timeout, beyond what was owed),
``refunded`` (came back to the payer's balance), ``kept_by_service`` (the commission the
deployed service keeps on an escrow it hands back at timeout) and ``still_locked`` (escrows
still holding the payer's money: which, until when, and what comes back then). Money still
locked is never counted as refunded: the payer's balance changed by :attr:`Receipt.debited_micro`
= paid + auto_released + kept_by_service + still locked.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Context, Decimal

from pf_metered.money import FEE_PERCENT, fee_micro, format_usdc, micro_to_decimal

__all__ = ["LockedEscrow", "Receipt", "ReleaseRecord", "StatusReport"]

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
class LockedEscrow:
    """Money of a closed stream that is still locked in one escrow, and what becomes of it.

    ``until``: when the service hands it back (ISO 8601 as the service wrote it; ``None`` when
    it will not by itself, as for a disputed escrow); ``returns_micro``: what the payer gets
    back then, after the service's commission (``None``: unknown). ``why`` says in a few words
    how it came to be left (an unused tranche, a dispute).
    """

    escrow_id: str
    amount_micro: int
    until: str | None
    returns_micro: int | None
    why: str = "unused tranche"

    @property
    def amount(self) -> Decimal:
        return micro_to_decimal(self.amount_micro)

    @property
    def returns(self) -> Decimal | None:
        return None if self.returns_micro is None else micro_to_decimal(self.returns_micro)

    def describe(self) -> str:
        """One line for the receipt's table."""
        text = f"{format_usdc(self.amount_micro)} USDC"
        if self.until is not None:
            text += f" until {self.until}"
        if self.returns_micro is not None:
            text += f", then {format_usdc(self.returns_micro)} back"
        return f"{text} ({self.why})"


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
    auto_released_micro: int = 0
    """Released to the provider by the service itself (its timeout), beyond ``paid``."""
    kept_by_service_micro: int = 0
    """The commission the service kept on escrows it handed back to the payer at timeout."""
    still_locked: tuple[LockedEscrow, ...] = ()
    unpaid_micro: int = 0
    """Owed for counted units but not paid (under the service's minimum escrow)."""
    notes: tuple[str, ...] = ()
    """What happened that the figures alone do not say (shown under the table)."""
    fee_override_micro: int | None = None
    """The fee as the service charged it, when it was charged per escrow (tranches)."""

    @property
    def released_micro(self) -> int:
        """Everything the provider's escrows released: paid plus auto-released."""
        return self.paid_micro + self.auto_released_micro

    @property
    def fee_micro(self) -> int:
        if self.fee_override_micro is not None:
            return self.fee_override_micro
        return fee_micro(self.released_micro)

    @property
    def provider_net_micro(self) -> int:
        return self.released_micro - self.fee_micro

    @property
    def still_locked_micro(self) -> int:
        return sum(h.amount_micro for h in self.still_locked)

    @property
    def debited_micro(self) -> int:
        """How much the payer's balance went down because of this stream, as of its close."""
        return (
            self.paid_micro
            + self.auto_released_micro
            + self.kept_by_service_micro
            + self.still_locked_micro
        )

    @property
    def still_locked_amount(self) -> Decimal:
        return micro_to_decimal(self.still_locked_micro)

    @property
    def auto_released(self) -> Decimal:
        return micro_to_decimal(self.auto_released_micro)

    @property
    def kept_by_service(self) -> Decimal:
        return micro_to_decimal(self.kept_by_service_micro)

    @property
    def debited(self) -> Decimal:
        return micro_to_decimal(self.debited_micro)

    @property
    def unpaid(self) -> Decimal:
        return micro_to_decimal(self.unpaid_micro)

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

    def figures(self) -> dict[str, int | str]:
        """The counts and money every receipt has, as plain data (money as USDC's exact wire
        text): the part of a receipt the tools' answers and the run bills share."""
        return {
            "units": self.units,
            "releases": self.releases,
            "budget": format_usdc(self.budget_micro),
            "paid": format_usdc(self.paid_micro),
            "fee": format_usdc(self.fee_micro),
            "provider_net": format_usdc(self.provider_net_micro),
            "refunded": format_usdc(self.refunded_micro),
        }

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
            *self._extra_rows(),
        ]

    def _extra_rows(self) -> list[tuple[str, str]]:
        """The rows only some receipts need: money not simply paid or refunded."""
        rows: list[tuple[str, str]] = []
        if self.auto_released_micro:
            rows.append(
                ("auto-released", f"{format_usdc(self.auto_released_micro)} USDC to provider")
            )
        if self.unpaid_micro:
            rows.append(("unpaid", f"{format_usdc(self.unpaid_micro)} USDC (under minimum)"))
        if self.kept_by_service_micro:
            rows.append(
                ("kept by service", f"{format_usdc(self.kept_by_service_micro)} USDC commission")
            )
        if self.still_locked:
            n = len(self.still_locked)
            rows.append(
                (
                    "still locked",
                    f"{format_usdc(self.still_locked_micro)} USDC in {n} escrow{'s' * (n > 1)}",
                )
            )
            for h in self.still_locked:
                rows += [
                    ("  escrow", h.escrow_id),
                    ("    amount", f"{format_usdc(h.amount_micro)} USDC ({h.why})"),
                    ("    until", h.until or "no timeout"),
                    (
                        "    returns",
                        "unknown"
                        if h.returns_micro is None
                        else f"{format_usdc(h.returns_micro)} USDC to payer",
                    ),
                ]
        if self.debited_micro != self.paid_micro:
            rows.append(("payer debited", f"{format_usdc(self.debited_micro)} USDC"))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max(len(k) for k, _ in rows)
        vwidth = max(len(v) for _, v in rows)
        inner = width + vwidth + 3
        rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
        lines = [rule, f"| {'Payment stream receipt':<{inner}} |", rule]
        lines += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
        lines.append(rule)
        for note in self.notes:
            for part in _wrap(note, inner - 2):
                lines.append(f"| {part:<{inner}} |")
        if self.notes:
            lines.append(rule)
        return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` in lines of at most ``width`` characters (words kept whole where they fit)."""
    import textwrap

    return textwrap.wrap(text, max(width, 20), break_long_words=True) or [""]
