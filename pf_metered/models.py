"""What the escrow service answers, as validated pydantic models, in dialect-neutral terms.

Why strict: a payments client that believes a malformed answer corrupts its own books. Every
model here refuses unknown statuses, amounts that are not exact decimal strings (a JSON number
has already been through a float somewhere), more than six places, negative or non-finite
values, and escrows whose figures do not add up. A dialect module turns its wire shape into
these models; nothing above the client ever sees raw JSON.

Amounts are ``Decimal`` on the models (what users read) with ``*_micro`` integer views (what
the meter computes with).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    model_validator,
)

from pf_metered.errors import InvalidInput
from pf_metered.money import decimal_to_micro, format_usdc, micro_to_decimal, parse_amount

__all__ = [
    "USDC",
    "Escrow",
    "EscrowEvent",
    "EscrowList",
    "EscrowStatus",
    "FaucetClaim",
    "Registration",
    "Release",
    "ReleasePage",
]

EscrowStatus = Literal["locked", "completed", "released", "refunded", "disputed"]
"""``locked``: funds held, releases possible. ``completed``: the provider marked the work done
(deployed dialect). ``released``: everything went to the provider. ``refunded``: closed, the
unreleased rest went back to the payer. ``disputed``: frozen until resolved."""

OPEN_STATUSES: frozenset[str] = frozenset({"locked", "completed"})


def _wire_amount(value: object) -> Decimal:
    """Accept an amount only as an exact decimal string (or a Decimal we built ourselves)."""
    if isinstance(value, str | Decimal) and not isinstance(value, bool):
        try:
            micro = parse_amount(value, "amount", allow_zero=True)
        except InvalidInput as exc:
            raise ValueError(exc.problem) from None
        return micro_to_decimal(micro)
    raise ValueError(f"amount must be a decimal string, not {type(value).__name__}")


USDC = Annotated[
    Decimal,
    BeforeValidator(_wire_amount),
    PlainSerializer(lambda d: format_usdc(decimal_to_micro(d)), return_type=str),
]
"""A USDC amount from the wire: a decimal string, at most six places, finite, non-negative."""

_ID = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=False)


class Release(_Model):
    """One partial release from an escrow to its provider."""

    amount: USDC
    memo: str = Field(default="", max_length=1000)
    release_id: _ID | None = None
    created_at: str | None = Field(default=None, max_length=64)

    @property
    def amount_micro(self) -> int:
        return decimal_to_micro(self.amount)


class Escrow(_Model):
    """An escrow as the service reports it: the budget, what left it, and what is left."""

    escrow_id: _ID
    status: EscrowStatus
    amount: USDC
    released: USDC
    remaining: USDC
    refunded: USDC = Decimal(0)
    to_agent_id: _ID | None = None
    from_agent_id: _ID | None = None
    memo: str = Field(default="", max_length=1000)
    auto_release_at: str | None = Field(default=None, max_length=64)
    releases: tuple[Release, ...] = ()
    """The release history, oldest first: all of it when :attr:`history_complete`, otherwise
    only the most recent ones (a v1 read carries the last 100; a release answer only the
    release just made; create, refund and list answers none)."""
    release_count: int | None = Field(default=None, ge=0, strict=True)
    """How many releases the escrow has had in all (``None``: the server did not say, and
    ``releases`` is then taken as the whole history)."""

    @model_validator(mode="after")
    def _figures_add_up(self) -> Escrow:
        # compared in integer micro-USDC: Decimal sums round under a caller's small context
        if self.released_micro + self.remaining_micro + self.refunded_micro != self.amount_micro:
            raise ValueError(
                f"released {self.released} + remaining {self.remaining} + refunded "
                f"{self.refunded} != amount {self.amount}"
            )
        if self.release_count is not None:
            if len(self.releases) > self.release_count:
                raise ValueError(
                    f"{len(self.releases)} releases listed but release_count is "
                    f"{self.release_count}"
                )
            if self.release_count == 0 and self.released:
                raise ValueError("release_count is 0 but money was released")
        if (
            self.releases
            and self.history_complete
            and sum(r.amount_micro for r in self.releases) != self.released_micro
        ):
            raise ValueError("release history does not sum to released")
        if not self.history_complete and (
            sum(r.amount_micro for r in self.releases) > self.released_micro
        ):
            raise ValueError("recent releases sum to more than released")
        return self

    @property
    def history_complete(self) -> bool:
        """Whether :attr:`releases` is the escrow's whole release history."""
        return self.release_count is None or self.release_count == len(self.releases)

    @property
    def total_releases(self) -> int:
        """How many releases the escrow has had (``release_count``, else the listed ones)."""
        return len(self.releases) if self.release_count is None else self.release_count

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def amount_micro(self) -> int:
        return decimal_to_micro(self.amount)

    @property
    def released_micro(self) -> int:
        return decimal_to_micro(self.released)

    @property
    def remaining_micro(self) -> int:
        return decimal_to_micro(self.remaining)

    @property
    def refunded_micro(self) -> int:
        return decimal_to_micro(self.refunded)

    @property
    def returned_micro(self) -> int:
        """What of the refund came back to the payer's balance (micro-USDC).

        Why beside ``refunded``: on a service that keeps a commission on what it hands back
        (the deployed dialect keeps 1% of an expired escrow) the two differ, and a count of
        money that left the payer must give back only what really returned."""
        return self.refunded_micro


class EscrowEvent(_Model):
    """One line of an escrow's history as the deployed service shows it to the escrow's two
    parties (``created``, ``completed``, ``released``, ``disputed``, ``refunded``)."""

    event: str = Field(max_length=64)
    actor_id: str | None = Field(default=None, max_length=128)
    note: str = Field(default="", max_length=2000)
    created_at: int | None = None
    """Unix seconds, as the service stores them."""


class ReleasePage(_Model):
    """One page of an escrow's release history (``GET /escrow/{id}/releases``), oldest first:
    ``releases`` are entries ``offset .. offset + len(releases) - 1`` of ``release_count``."""

    escrow_id: _ID
    release_count: int = Field(ge=0, strict=True)
    offset: int = Field(ge=0, strict=True)
    releases: tuple[Release, ...] = ()

    @model_validator(mode="after")
    def _fits(self) -> ReleasePage:
        if self.releases and self.offset + len(self.releases) > self.release_count:
            raise ValueError(
                f"page {self.offset}+{len(self.releases)} runs past release_count "
                f"{self.release_count}"
            )
        return self


class EscrowList(_Model):
    """The caller's escrows."""

    escrows: tuple[Escrow, ...] = ()


class FaucetClaim(_Model):
    """A faucet credit to a new agent ($1 once)."""

    credited: USDC
    claim_id: _ID
    agent_id: _ID | None = None

    @property
    def credited_micro(self) -> int:
        return decimal_to_micro(self.credited)


class Registration(_Model):
    """A new agent's identity and key (deployed dialect's casino registration)."""

    model_config = ConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)

    agent_id: _ID
    api_key: SecretStr
