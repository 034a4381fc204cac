"""Operator caps: the limits no tool call can exceed, whatever arguments a model invents.

Why a separate object: the operator who hands an agent a toolkit decides how much of their
money the agent may put at risk; the model only chooses arguments inside those limits. Caps are
parsed once, at construction, into exact integers (micro-USDC) and exact rates, so a check on the
hot path is an integer compare and a typo in a cap fails when the operator writes it, not when
the agent first hits it.

What this module must never do: accept a float as money, perform I/O, or let a tool bypass a
check because an argument was missing (a missing limit is "no limit" only where the operator
said so by leaving the cap at ``None``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pf_metered.errors import InvalidInput
from pf_metered.money import AmountLike, Rate, format_usdc, parse_amount, parse_count, parse_rate

__all__ = ["ALL_TOOL_NAMES", "Caps"]

ALL_TOOL_NAMES: tuple[str, ...] = (
    "escrow_create",
    "escrow_release",
    "escrow_status",
    "escrow_list",
    "faucet_claim",
    "stream_open",
    "stream_status",
    "stream_record",
    "stream_close",
    "stream_list",
    "escrow_refund",
)
"""Every tool this package defines, in the order toolkits list them."""


@dataclass(frozen=True, slots=True, init=False)
class Caps:
    """Limits an operator sets on what agents may do with the tools.

    * ``max_budget``: the most one stream may lock, and the most one ``escrow_create`` may lock.
    * ``max_rate``: the highest price per unit a stream may be opened at.
    * ``max_total``: the most money the tools of one context may take from the payer: what
      they paid plus what is still locked. Money that comes back counts back (an
      ``escrow_refund``, a stream's unused budget at close, an escrow or a closed stream's
      tranche the service handed back at its timeout, less the 1% it kept); paid money never.
    * ``max_locked``: the most money locked at once (open escrows' remaining amounts and open
      streams' unpaid budgets, over the whole state file); paid and refunded money counts back.
    * ``max_spend``: the most money that may ever be paid out over the server's life (what was
      released plus what is locked and could still be released), kept in the state file.
    * ``max_open_streams``: how many streams may be open at once.
    * ``allowed_tools``: the tools that may run at all (``None``: all of them).
    * ``allowed_providers``: the agent ids money may go to (``None``: any).
    * ``release_any_escrow``: whether ``escrow_release`` may release escrows this context did
      not create with ``escrow_create`` (default ``False``: only those; a stream's escrow is
      refused either way).

    ``None`` means "no limit" for that cap; ``Caps()`` limits nothing but what
    ``escrow_release`` may release.
    """

    max_budget_micro: int | None
    max_rate: Rate | None
    max_total_micro: int | None
    max_open_streams: int | None
    max_locked_micro: int | None
    max_spend_micro: int | None
    allowed_tools: frozenset[str] | None
    allowed_providers: frozenset[str] | None = field(default=None)
    release_any_escrow: bool = field(default=False)

    def __init__(
        self,
        *,
        max_budget: AmountLike | None = None,
        max_rate: AmountLike | None = None,
        max_total: AmountLike | None = None,
        max_open_streams: int | None = None,
        allowed_tools: Iterable[str] | None = None,
        allowed_providers: Iterable[str] | None = None,
        release_any_escrow: bool = False,
        max_locked: AmountLike | None = None,
        max_spend: AmountLike | None = None,
    ) -> None:
        set_ = object.__setattr__
        for name, value in (("max_locked", max_locked), ("max_spend", max_spend)):
            set_(self, f"{name}_micro", None if value is None else parse_amount(value, name))
        set_(
            self,
            "max_budget_micro",
            None if max_budget is None else parse_amount(max_budget, "max_budget"),
        )
        set_(self, "max_rate", None if max_rate is None else parse_rate(max_rate, "max_rate"))
        set_(
            self,
            "max_total_micro",
            None if max_total is None else parse_amount(max_total, "max_total"),
        )
        set_(
            self,
            "max_open_streams",
            None
            if max_open_streams is None
            else parse_count(max_open_streams, "max_open_streams", allow_zero=False),
        )
        tools = None if allowed_tools is None else _names(allowed_tools, "allowed_tools")
        if tools is not None:
            unknown = sorted(tools - set(ALL_TOOL_NAMES))
            if unknown:
                raise InvalidInput(
                    "allowed_tools", f"names unknown tools {unknown}; known: {list(ALL_TOOL_NAMES)}"
                )
        set_(self, "allowed_tools", tools)
        set_(
            self,
            "allowed_providers",
            None if allowed_providers is None else _names(allowed_providers, "allowed_providers"),
        )
        if not isinstance(release_any_escrow, bool):
            raise InvalidInput("release_any_escrow", "must be True or False")
        set_(self, "release_any_escrow", release_any_escrow)

    def allows(self, tool_name: str) -> bool:
        """Whether the operator lets ``tool_name`` run at all."""
        return self.allowed_tools is None or tool_name in self.allowed_tools

    def describe(self) -> str:
        """The caps in one line, for tool descriptions and error messages."""
        parts = []
        if self.max_budget_micro is not None:
            parts.append(f"max budget {format_usdc(self.max_budget_micro)} USDC per stream/escrow")
        if self.max_rate is not None:
            parts.append(f"max rate {self.max_rate} USDC per unit")
        if self.max_total_micro is not None:
            parts.append(f"max {format_usdc(self.max_total_micro)} USDC locked in total")
        if self.max_locked_micro is not None:
            parts.append(f"max_locked {format_usdc(self.max_locked_micro)} USDC locked at once")
        if self.max_spend_micro is not None:
            parts.append(f"max_spend {format_usdc(self.max_spend_micro)} USDC paid out in all")
        if self.max_open_streams is not None:
            parts.append(f"at most {self.max_open_streams} open streams")
        if self.allowed_providers is not None:
            parts.append(f"providers {sorted(self.allowed_providers)}")
        return "; ".join(parts) or "no caps"


def _names(values: Iterable[str], field_name: str) -> frozenset[str]:
    if isinstance(values, str):
        raise InvalidInput(field_name, "must be a collection of names, not one string")
    names = frozenset(values)
    for name in names:
        if not isinstance(name, str) or not name:
            raise InvalidInput(field_name, f"holds a non-name: {name!r}")
    return names
