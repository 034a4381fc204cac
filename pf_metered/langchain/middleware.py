"""``MeteredMiddleware``: an agent built with ``langchain.agents.create_agent`` pays as it works.

Each model call (and, if asked, each call of a chosen tool) is counted on a payment stream the
program opened (``PaymentStream`` or ``AsyncPaymentStream``) through the stream's public
counting API only: ``can_pay`` before, ``reserve`` as the call starts, ``commit`` when it
succeeded, ``cancel`` when it failed.

Why a middleware and not only the callback handler: a callback can refuse a call only by
raising out of ``agent.invoke``, which loses the run and every message in it. A middleware can
check the budget *before* the model node runs and, like LangChain's own
``ModelCallLimitMiddleware``, end the run cleanly (``jump_to: "end"``) with an ``AIMessage``
that says why. ``exit_behavior="error"`` raises ``BudgetExhausted`` instead, for programs that
prefer to stop hard.

* ``per="call"``: one unit per model call, reserved before the call and committed after.
* ``per="token"``: the answer's ``usage_metadata["total_tokens"]``. ``reserve_tokens`` units
  are held while the model runs (the call is refused up front if the budget cannot pay even
  them); after the answer the reservation is replaced by the tokens really used, paid as far
  as the budget goes (finished work is never failed: what the budget cannot pay is logged and
  the next call is refused). An answer without ``usage_metadata`` pays the reservation and a
  warning says so.
* ``tools``: ``None`` (no tool is metered), ``"all"`` (one unit per call of any tool), or
  ``{name: units}`` where ``units`` is a whole number of units, or a price (``"0.05"``) that
  must be an exact multiple of the stream's rate. After each model answer the tool calls it
  asks for are checked together; if the budget cannot pay them all, the run ends before any
  runs (or raises). A tool call whose answer is an error costs nothing.

What this module must never do: perform I/O (counting only wakes the stream's own sender),
read a stream's private attributes, count a failed call, or pay past the budget. Importing it
needs the ``langchain`` extra (``pip install 'pf-metered[langchain]'``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal, localcontext
from typing import TYPE_CHECKING, Any, Literal

from pf_metered.errors import BudgetExhausted, InvalidInput, MissingExtra, StreamClosed
from pf_metered.money import parse_count, parse_rate
from pf_metered.stream import AsyncPaymentStream, PaymentStream

try:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ModelRequest,
        ModelResponse,
        hook_config,
    )
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("langchain", "MeteredMiddleware", missing=exc.name) from exc
from langchain_core.messages import AIMessage, ToolMessage

if TYPE_CHECKING:
    from langgraph.prebuilt.tool_node import ToolCallRequest
    from langgraph.runtime import Runtime
    from langgraph.types import Command

__all__ = ["MeteredMiddleware"]

_log = logging.getLogger("pf_metered.langchain")

Per = Literal["call", "token"]
ExitBehavior = Literal["end", "error"]
ToolPrices = None | Literal["all"] | Mapping[str, int | str | Decimal]


class MeteredMiddleware(AgentMiddleware[AgentState[Any], Any, Any]):
    """Pay a payment stream for an agent's model calls (and chosen tool calls) as they run.

    ``stream`` must be open while the agent runs (the program opens and closes it; its
    receipt is the bill). Stack it with the stock limit middlewares: it only adds checks.
    """

    def __init__(
        self,
        stream: PaymentStream | AsyncPaymentStream,
        *,
        per: Per = "call",
        tools: ToolPrices = None,
        exit_behavior: ExitBehavior = "end",
        reserve_tokens: int = 1,
        meter_model: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(stream, PaymentStream | AsyncPaymentStream):
            raise InvalidInput("stream", "must be a PaymentStream or an AsyncPaymentStream")
        if per not in ("call", "token"):
            raise InvalidInput("per", f"must be 'call' or 'token', got {per!r}")
        if exit_behavior not in ("end", "error"):
            raise InvalidInput("exit_behavior", f"must be 'end' or 'error', got {exit_behavior!r}")
        if not isinstance(meter_model, bool):
            raise InvalidInput("meter_model", "must be True or False")
        self.stream = stream
        self.per: Per = per
        self.exit_behavior: ExitBehavior = exit_behavior
        self.reserve_tokens = parse_count(reserve_tokens, "reserve_tokens", allow_zero=False)
        self.meter_model = meter_model
        self._all_tools = tools == "all"
        self._tool_units: dict[str, int] = (
            {} if tools in (None, "all") else _tool_units(tools, stream.rate)
        )
        self.model_calls = 0
        """Model calls paid (committed) so far."""
        self.tool_calls = 0
        """Metered tool calls paid so far."""
        self.unpaid_units = 0
        """Units of finished work the budget could not pay (logged when they happen)."""

    @property
    def name(self) -> str:
        return "MeteredMiddleware"

    # ---------------------------------------------------------------- what a call needs
    def _model_units(self) -> int:
        return 1 if self.per == "call" else self.reserve_tokens

    def tool_units(self, tool_name: str) -> int:
        """Units one call of ``tool_name`` costs (0: not metered)."""
        if self._all_tools:
            return 1
        return self._tool_units.get(tool_name, 0)

    def _why_not(self, units: int, what: str) -> str:
        stream = self.stream
        if not stream.is_open:
            return (
                f"Payment stream {stream.stream_id[:12]} is not open, so {what} cannot be paid; "
                "the run ended before it. Open the stream before running the agent."
            )
        return (
            f"Budget exhausted: payment stream {stream.stream_id[:12]} can pay "
            f"{stream.units_left} more unit(s) at {stream.rate} USDC each, and {what} needs "
            f"{units}; the run ended before it. Close the stream for its receipt, or open one "
            "with a larger budget to go on."
        )

    def _refuse(self, units: int, what: str) -> str:
        """The refusal text; raises instead when ``exit_behavior="error"``."""
        message = self._why_not(units, what)
        if self.exit_behavior == "error":
            if not self.stream.is_open:
                raise StreamClosed(message)
            raise BudgetExhausted(message, remaining_units=self.stream.units_left)
        return message

    # ------------------------------------------------------------------- model calls
    @hook_config(can_jump_to=["end"])
    def before_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Refuse the next model call before it runs when the budget cannot pay for it."""
        if not self.meter_model:
            return None
        units = self._model_units()
        if self.stream.can_pay(units):
            return None
        return {
            "jump_to": "end",
            "messages": [AIMessage(self._refuse(units, "the next model call"))],
        }

    @hook_config(can_jump_to=["end"])
    async def abefore_model(
        self, state: AgentState[Any], runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async twin of :meth:`before_model` (counting does no I/O, so nothing is awaited)."""
        return self.before_model(state, runtime)

    def _reserve_model(self) -> int | str:
        """A reservation token, or the refusal text (another caller took the budget)."""
        units = self._model_units()
        try:
            return self.stream.reserve(units)
        except (BudgetExhausted, StreamClosed):
            return self._refuse(units, "the next model call")

    def _commit_model(self, token: int, response: ModelResponse[Any]) -> None:
        if self.per == "call":
            unpaid = self.stream.commit(token)
        else:
            used = _tokens_used(response)
            if used is None:
                _log.warning(
                    "MeteredMiddleware: the model's answer reports no usage_metadata; paying "
                    "the %d reserved token(s) instead",
                    token,
                )
                unpaid = self.stream.commit(token)
            else:
                unpaid = self.stream.commit(token, used)
        self.model_calls += 1
        self.unpaid_units += unpaid

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        """Hold the call's units while the model runs; count them if it answered."""
        if not self.meter_model:
            return handler(request)
        token = self._reserve_model()
        if isinstance(token, str):
            return AIMessage(token)  # no tool calls: the agent loop ends here
        try:
            response = handler(request)
        except BaseException:
            self.stream.cancel(token)
            raise
        self._commit_model(token, response)
        return response

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        """Async twin of :meth:`wrap_model_call`."""
        if not self.meter_model:
            return await handler(request)
        token = self._reserve_model()
        if isinstance(token, str):
            return AIMessage(token)
        try:
            response = await handler(request)
        except BaseException:
            self.stream.cancel(token)
            raise
        self._commit_model(token, response)
        return response

    # -------------------------------------------------------------------- tool calls
    @hook_config(can_jump_to=["end"])
    def after_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Before any tool of this answer runs: can the budget pay every metered call in it?

        If not, no tool of the batch runs: each call gets an error ``ToolMessage`` (so the
        history stays valid) and the run ends with an ``AIMessage`` saying why.
        """
        messages = state.get("messages", [])
        last = messages[-1] if messages else None
        if not isinstance(last, AIMessage) or not last.tool_calls:
            return None
        units = sum(self.tool_units(call["name"]) for call in last.tool_calls)
        if units == 0 or self.stream.can_pay(units):
            return None
        names = ", ".join(call["name"] for call in last.tool_calls if self.tool_units(call["name"]))
        why = self._refuse(units, f"the tool call(s) asked for ({names})")
        stopped: list[ToolMessage | AIMessage] = [
            ToolMessage(
                content="Not run: the payment budget cannot pay for this batch of tool calls.",
                tool_call_id=call["id"] or "",
                name=call["name"],
                status="error",
            )
            for call in last.tool_calls
        ]
        stopped.append(AIMessage(why))
        return {"jump_to": "end", "messages": stopped}

    @hook_config(can_jump_to=["end"])
    async def aafter_model(
        self, state: AgentState[Any], runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async twin of :meth:`after_model`."""
        return self.after_model(state, runtime)

    def _reserve_tool(self, request: ToolCallRequest) -> tuple[int, int] | ToolMessage:
        """``(units, token)`` to commit after the tool ran (``(0, 0)``: not metered)."""
        call = request.tool_call
        units = self.tool_units(call["name"])
        if units == 0:
            return (0, 0)
        try:
            return (units, self.stream.reserve(units))
        except (BudgetExhausted, StreamClosed):
            why = self._refuse(units, f"the tool call {call['name']}")
            return ToolMessage(
                content=why, tool_call_id=call["id"] or "", name=call["name"], status="error"
            )

    def _settle_tool(self, token: int, result: ToolMessage | Command[Any]) -> None:
        if isinstance(result, ToolMessage) and result.status == "error":
            self.stream.cancel(token)  # the tool failed: it costs nothing
            return
        self.unpaid_units += self.stream.commit(token)
        self.tool_calls += 1

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """Hold a metered tool call's units while it runs; count them if it succeeded."""
        held = self._reserve_tool(request)
        if isinstance(held, ToolMessage):
            return held
        units, token = held
        if units == 0:
            return handler(request)
        try:
            result = handler(request)
        except BaseException:
            self.stream.cancel(token)
            raise
        self._settle_tool(token, result)
        return result

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async twin of :meth:`wrap_tool_call`."""
        held = self._reserve_tool(request)
        if isinstance(held, ToolMessage):
            return held
        units, token = held
        if units == 0:
            return await handler(request)
        try:
            result = await handler(request)
        except BaseException:
            self.stream.cancel(token)
            raise
        self._settle_tool(token, result)
        return result


def _tokens_used(response: ModelResponse[Any]) -> int | None:
    """Total tokens the answer's messages report (``None``: no message reports usage)."""
    total: int | None = None
    for message in response.result:
        usage = getattr(message, "usage_metadata", None) if isinstance(message, AIMessage) else None
        if usage is not None:
            total = (total or 0) + int(usage.get("total_tokens", 0))
    return total


def _tool_units(tools: object, stream_rate: Decimal) -> dict[str, int]:
    """``{name: units per call}`` from ``{name: units}`` or ``{name: price}`` (exact only)."""
    if not isinstance(tools, Mapping) or not tools:
        raise InvalidInput(
            "tools", "must be None, 'all' or a non-empty {tool name: units or price}"
        )
    units: dict[str, int] = {}
    for name, value in tools.items():
        field = f"tools[{name!r}]"
        if not isinstance(name, str) or not name:
            raise InvalidInput("tools", f"keys must be tool names, got {name!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            units[name] = parse_count(value, field, allow_zero=False)
            continue
        price = parse_rate(value, field).decimal
        with localcontext() as ctx:
            ctx.prec = 60
            ratio = price / stream_rate
        if ratio != ratio.to_integral_value() or ratio * stream_rate != price:
            raise InvalidInput(
                field,
                f"price {price} is not a whole number of units at the stream's rate "
                f"{stream_rate}; give units (an int) or a multiple of the rate",
            )
        units[name] = parse_count(int(ratio), field, allow_zero=False)
    return units
