"""The argument models of every tool: one pydantic class each, read by the model and by us.

Why here, apart from any framework: LangChain builds ``args_schema`` from these classes and the
MCP server builds ``inputSchema`` from ``model_json_schema()`` of the same classes, so a field's
name, type, bounds and description exist once. Descriptions are written for the language model
that reads them: what the value means, its unit, and an example.

Validation here is shape only (types, bounds, id syntax, no unknown fields). Counts are
strict ints (``strict=True``): ``"5"``, ``5.0`` and ``true`` are refused, never coerced — a
model that writes a count as text or a bool has misread the schema, and guessing is how a
count goes wrong. Money is checked
exactly by :mod:`pf_metered.money` in the handlers, and caps by :mod:`pf_metered.tools.caps`,
so a clever argument cannot slip past a limit by satisfying the schema.

What this module must never do: turn an amount into a float, or accept fields the tool does not
define (``extra="forbid"``: an invented argument is refused with its name, never ignored).
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "AmountText",
    "EscrowCreateArgs",
    "EscrowListArgs",
    "EscrowReleaseArgs",
    "EscrowStatusArgs",
    "FaucetClaimArgs",
    "NoArgs",
    "StreamCloseArgs",
    "StreamIdArgs",
    "StreamListArgs",
    "StreamOpenArgs",
    "StreamRecordArgs",
    "StreamStatusArgs",
]


def _decimal_text(value: Any) -> Any:
    """Let a model write ``0.001`` or ``"0.001"``: turn JSON numbers into their decimal text.

    Why ``repr`` of a float is acceptable here and nowhere else: a JSON number the model wrote
    is parsed to the nearest float, whose ``repr`` is the shortest text that reads back to it —
    the digits the model wrote, for any amount with fewer than 16 significant digits. The text is
    then parsed exactly (and refused past six places) by the handler; no float does arithmetic.
    """
    if isinstance(value, bool):
        return value  # refused by the str validator: True is not an amount
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return format(Decimal(repr(value)), "f")
        return value
    if isinstance(value, Decimal):
        return format(value, "f")
    return value


_DECIMAL = r"^\s*[0-9]+(\.[0-9]+)?\s*$"

AmountText = Annotated[
    str,
    BeforeValidator(_decimal_text),
    Field(pattern=_DECIMAL, max_length=40, json_schema_extra={"pattern": _DECIMAL}),
]
"""A non-negative decimal number written as text ("2.50"); numbers are accepted and converted."""

_AgentId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$"),
]
_EscrowId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:\-]+$",
        description="The escrow's id, as returned by escrow_create or escrow_list "
        '(e.g. "esc_3f2a").',
    ),
]
_StreamId = Annotated[
    str,
    Field(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description='The stream\'s id, as returned by stream_open or stream_list (e.g. "s1").',
    ),
]
_Memo = Annotated[
    str,
    Field(
        default="",
        max_length=200,
        description="Optional short note stored with the payment, e.g. what it pays for.",
    ),
]


def _omittable_not_nullable(schema: dict[str, Any]) -> None:
    """An optional argument is described as its one type, to be left out, not as
    ``anyOf [T, null]``: generic clients (the MCP Inspector's CLI among them) convert a typed
    value only when the property has a top-level ``type``, and sent ``"10"`` for an optional
    integer otherwise, which the strict counts rightly refuse. ``null`` is still accepted."""
    for name, prop in list(schema.get("properties", {}).items()):
        branches = prop.get("anyOf")
        if (
            not isinstance(branches, list)
            or len(branches) != 2
            or prop.get("default", 0) is not None
        ):
            continue
        typed = [b for b in branches if b != {"type": "null"}]
        if len(typed) != 1:
            continue
        merged = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
        schema["properties"][name] = {**typed[0], **merged}


class _Args(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        str_strip_whitespace=True,
        frozen=True,
        json_schema_extra=_omittable_not_nullable,
    )


class NoArgs(_Args):
    """A tool that takes no arguments."""


class EscrowCreateArgs(_Args):
    """Lock an amount in a new escrow for another agent."""

    to_agent_id: _AgentId = Field(
        description="The agent id of the provider who will be paid from this escrow "
        '(e.g. "agent_b7").'
    )
    amount: AmountText = Field(
        description="USDC to lock, as a decimal string with at most 6 decimal places, "
        'at least "1.00" (e.g. "5.00").'
    )
    memo: _Memo = ""
    auto_release_hours: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=8760,
        description="Optional: hours after which whatever is still locked goes to the provider. "
        "Leave empty to use the operator's default (if any).",
    )


class EscrowReleaseArgs(_Args):
    """Pay an escrow (or, where the service allows it, part of one) to its provider."""

    escrow_id: _EscrowId
    amount: AmountText | None = Field(
        default=None,
        description="USDC to release to the provider now, a decimal string with at most 6 "
        'decimal places, no more than what remains locked (e.g. "0.25"). Leave it out to '
        "release all that remains. On a service that releases only whole escrows it must be "
        "the escrow's whole amount, or left out.",
    )
    memo: _Memo = ""


class EscrowStatusArgs(_Args):
    """Read one escrow."""

    escrow_id: _EscrowId


class EscrowListArgs(_Args):
    """List the caller's escrows."""

    status: str | None = Field(
        default=None,
        pattern=r"^(locked|completed|released|refunded|disputed)$",
        description="Optional filter: only escrows in this status "
        "(locked, completed, released, refunded or disputed).",
    )
    limit: int = Field(
        default=20,
        strict=True,
        ge=1,
        le=100,
        description="At most this many escrows, newest first (1-100, default 20).",
    )


class FaucetClaimArgs(NoArgs):
    """Claim the one-time $1 USDC faucet credit for a new agent."""


class StreamOpenArgs(_Args):
    """Open a metered payment stream to a provider."""

    provider: _AgentId = Field(
        description='The agent id of the provider to pay per unit of work (e.g. "agent_b7").'
    )
    rate: AmountText = Field(
        description="USDC paid per unit (per call, token, data point or second), a decimal "
        'string with up to 18 decimal places (e.g. "0.001").'
    )
    budget: AmountText | None = Field(
        default=None,
        description='USDC to lock for the whole stream (e.g. "2.00"). Give budget or '
        "max_units; unused budget is refunded when the stream closes.",
    )
    max_units: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        description="Alternatively, the most units the stream may pay for; the budget locked "
        "is then rate x max_units.",
    )
    batch: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=1_000_000,
        description="Pay the provider every this many units (e.g. 10). Leave empty to pay at "
        "close only.",
    )
    memo: _Memo = ""


class StreamIdArgs(_Args):
    """A tool that acts on one stream."""

    stream_id: _StreamId


class StreamStatusArgs(StreamIdArgs):
    """Read one stream's figures."""


class StreamCloseArgs(StreamIdArgs):
    """Close a stream: pay what is owed, refund the rest."""


class StreamRecordArgs(StreamIdArgs):
    """Count units the agent measured itself."""

    units: int = Field(
        default=1,
        strict=True,
        ge=1,
        le=1_000_000_000,
        description="How many units to count on the stream now (e.g. 25 data points received).",
    )


class StreamListArgs(_Args):
    """List this session's streams."""

    include_closed: bool = Field(
        default=True, description="Whether to include streams that are already closed."
    )
