"""What ``MeteredMiddleware`` charges: units per model answer and per tool call.

Prices are turned into whole *units* of the stream's rate once, at construction, and checked
there: a price that is not an exact multiple of the rate (or a float, or zero) is refused
with a :class:`MeterConfigError` naming the argument, never rounded. After that the hot path
is integer arithmetic only (tokens × units per token).

What this module must never do: touch a stream, read a float, or round money.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Literal

from pf_metered.errors import ConfigError, InvalidInput
from pf_metered.money import parse_count, parse_rate

__all__ = ["MeterConfigError", "ModelPricing", "ToolPricing", "tokens_of"]

Per = Literal["call", "token"]
UnitsOrPrice = int | str | Decimal


class MeterConfigError(ConfigError, InvalidInput):
    """``MeteredMiddleware`` was built with an argument it cannot work with; ``field`` names it.

    Both a ``ConfigError`` (a developer's mistake, caught at construction or when a run's
    configuration lacks what the middleware was told to find) and an ``InvalidInput`` (so code
    catching the library's bad-argument error keeps working).
    """


def _units(value: object, field: str, rate: Decimal | None) -> int:
    """Whole units of the stream's rate for ``value`` (units as an int, or an exact price)."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return parse_count(value, field, allow_zero=False)
        except InvalidInput as exc:
            raise MeterConfigError(field, exc.problem) from None
    if isinstance(value, bool) or not isinstance(value, str | Decimal):
        raise MeterConfigError(
            field,
            f"must be whole units (an int) or an exact price (a str or Decimal), not "
            f"{type(value).__name__}",
        )
    try:
        price = parse_rate(value, field).decimal
    except InvalidInput as exc:
        raise MeterConfigError(field, exc.problem) from None
    if rate is None:
        raise MeterConfigError(
            field,
            f"is a price ({price}), which needs the stream's rate to become units: pass rate= "
            "(the rate of the streams open_stream or the context will bring), or give units "
            "(an int)",
        )
    ratio = Fraction(price) / Fraction(rate)
    if ratio.denominator != 1:
        raise MeterConfigError(
            field,
            f"price {price} is not a whole number of units at the stream's rate {rate}; give "
            "units (an int) or a multiple of the rate",
        )
    return _units(int(ratio), field, rate)


@dataclass(frozen=True, slots=True)
class ModelPricing:
    """Units a model call costs: 1 per call, or tokens × units per token.

    ``token_units``: ``None`` prices every token alike (``total_tokens`` × 1 unit); else
    ``(input, output)`` units per input and per output token.
    """

    per: Per
    reserve: int
    token_units: tuple[int, int] | None = None

    @classmethod
    def build(
        cls,
        per: object,
        reserve_tokens: object,
        token_prices: Mapping[str, UnitsOrPrice] | None,
        rate: Decimal | None,
    ) -> ModelPricing:
        if per not in ("call", "token"):
            raise MeterConfigError("per", f"must be 'call' or 'token', got {per!r}")
        try:
            reserve = parse_count(reserve_tokens, "reserve_tokens", allow_zero=False)
        except InvalidInput as exc:
            raise MeterConfigError("reserve_tokens", exc.problem) from None
        if token_prices is None:
            return cls(per, 1 if per == "call" else reserve)
        if per != "token":
            raise MeterConfigError("token_prices", "prices tokens, so it needs per='token'")
        if not isinstance(token_prices, Mapping) or set(token_prices) != {"input", "output"}:
            raise MeterConfigError(
                "token_prices",
                "must be {'input': units or price, 'output': units or price} (both keys)",
            )
        units = (
            _units(token_prices["input"], "token_prices['input']", rate),
            _units(token_prices["output"], "token_prices['output']", rate),
        )
        return cls("token", reserve, units)

    def units_for(self, messages: list[Any]) -> int | None:
        """Units the answer's messages cost (``None``: no usage reported where one is needed)."""
        if self.per == "call":
            return 1
        tokens = tokens_of(messages)
        if tokens is None:
            return None
        total, tokens_in, tokens_out = tokens
        if self.token_units is None:
            return total
        if tokens_in is None or tokens_out is None:
            return None
        return tokens_in * self.token_units[0] + tokens_out * self.token_units[1]


def tokens_of(messages: list[Any]) -> tuple[int, int | None, int | None] | None:
    """``(total, input, output)`` tokens the messages' ``usage_metadata`` report, summed.

    ``None`` when no message reports usage; ``input``/``output`` are ``None`` when a report
    lacks them. Only ``AIMessage``-like objects carry ``usage_metadata``.
    """
    total = 0
    tokens_in: int | None = 0
    tokens_out: int | None = 0
    seen = False
    for message in messages:
        usage = getattr(message, "usage_metadata", None)
        if not usage:
            continue
        seen = True
        got_in, got_out = usage.get("input_tokens"), usage.get("output_tokens")
        got_total = usage.get("total_tokens")
        if got_total is None:
            got_total = (got_in or 0) + (got_out or 0)
        total += int(got_total)
        tokens_in = None if tokens_in is None or got_in is None else tokens_in + int(got_in)
        tokens_out = None if tokens_out is None or got_out is None else tokens_out + int(got_out)
    return (total, tokens_in, tokens_out) if seen else None


@dataclass(frozen=True, slots=True)
class ToolPricing:
    """Units one call of each tool costs (0: not metered)."""

    named: Mapping[str, int]
    default: int = 0

    @classmethod
    def build(cls, tools: object, rate: Decimal | None) -> ToolPricing:
        """From ``None``, ``"all"`` (1 unit a call) or ``{name: units or price}``.

        The key ``"*"`` in a mapping prices every tool not named.
        """
        if tools is None:
            return cls({})
        if tools == "all":
            return cls({}, 1)
        if not isinstance(tools, Mapping) or not tools:
            raise MeterConfigError(
                "tools", "must be None, 'all' or a non-empty {tool name: units or price}"
            )
        named: dict[str, int] = {}
        default = 0
        for name, value in tools.items():
            if not isinstance(name, str) or not name:
                raise MeterConfigError("tools", f"keys must be tool names, got {name!r}")
            units = _units(value, f"tools[{name!r}]", rate)
            if name == "*":
                default = units
            else:
                named[name] = units
        return cls(named, default)

    def units(self, tool_name: str) -> int:
        return self.named.get(tool_name, self.default)
