"""``MeteredMiddleware``: an agent built with ``langchain.agents.create_agent`` pays as it works.

Each model call (and, if asked, each call of a chosen tool) is counted on a payment stream
(``PaymentStream`` or ``AsyncPaymentStream``) through the stream's public counting API only:
``can_pay`` before, ``reserve`` as the call starts, ``commit`` when it succeeded, ``cancel``
when it failed.

Why a middleware and not only the callback handler: a callback can refuse a call only by
raising out of ``agent.invoke``, which loses the run and every message in it. A middleware can
check the budget *before* the model node runs and, like LangChain's own
``ModelCallLimitMiddleware``, end the run cleanly (``jump_to: "end"``) with an ``AIMessage``
that says why. ``exit_behavior="error"`` raises ``BudgetExhausted`` instead, for programs that
prefer to stop hard (a stream the middleware opened for the run is closed first).

**Which stream** (exactly one; see :mod:`pf_metered.langchain._meter_streams`): ``stream=`` (the
program's, for every run), ``context_field=`` (a field of the run's ``runtime.context``, so each
run brings its own), or ``open_stream=factory`` (the middleware opens and owns it: one per run,
closed by ``after_agent``, or with ``budget_per="thread"`` one per ``thread_id``, kept open
across that thread's runs until ``close_thread``/``close_all``).

**What it costs**:

* ``per="call"``: one unit per model call, reserved before the call and committed after.
* ``per="token"``: the answer's ``usage_metadata`` tokens: ``total_tokens`` × 1 unit, or with
  ``token_prices={"input": ..., "output": ...}`` input and output tokens each at their own
  price (whole units, or a price that is an exact multiple of the stream's rate). While the
  model runs ``reserve_tokens`` units are held (the call is refused up front if the budget
  cannot pay even them); after the answer they are replaced by what it really cost, paid as
  far as the budget goes (finished work is never failed: what the budget cannot pay is logged,
  counted in ``unpaid_units``, and the next call is refused). An answer without usage pays
  the reservation and a warning says so.
* ``tools``: ``None`` (no tool is metered), ``"all"`` (one unit per call of any tool), or
  ``{name: units or price, "*": ...}`` (``"*"`` prices every tool not named). After each model
  answer the metered calls it asks for are checked together; if the budget cannot pay them
  all, none runs and the run ends. Each call is checked again as it starts (a shared stream
  may have been spent meanwhile); a refused call answers with an error ``ToolMessage`` and the
  run ends before the next model call. A tool call whose answer is an error costs nothing.

**What the state shows**: ``after_agent`` puts the run's bill under ``state["pf_metered"]
[middleware name]`` (declared through ``state_schema``, checkpointable plain data): model and
tool calls paid, units, their exact cost, units left, why the run stopped, and the receipt of
the stream it closed.

What this module must never do: perform I/O on the hot path (counting only wakes the stream's
own sender; opening and closing happen in ``before_agent``/``after_agent``), read a stream's
private attributes, count a failed call, or pay past the budget. Importing it needs the
``langchain`` extra (``pip install 'pf-metered[langchain]'``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pf_metered.errors import BudgetExhausted, InvalidInput, MissingExtra, StreamClosed
from pf_metered.langchain._meter_pricing import (
    MeterConfigError,
    ModelPricing,
    Per,
    ToolPricing,
    UnitsOrPrice,
)
from pf_metered.langchain._meter_streams import (
    BudgetPer,
    RunBill,
    StreamFactory,
    StreamSource,
)
from pf_metered.meter.receipt import Receipt
from pf_metered.money import parse_rate
from pf_metered.stream import AsyncPaymentStream, PaymentStream

try:
    from langchain.agents.middleware import (
        AgentMiddleware,
        AgentState,
        ModelRequest,
        ModelResponse,
        hook_config,
    )
    from langchain.agents.middleware.types import OmitFromInput, PrivateStateAttr
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("langchain", "MeteredMiddleware", missing=exc.name) from exc
from langchain_core.messages import AIMessage, ToolMessage
from typing_extensions import NotRequired

if TYPE_CHECKING:
    from langgraph.prebuilt.tool_node import ToolCallRequest
    from langgraph.runtime import Runtime
    from langgraph.types import Command

__all__ = ["MeterConfigError", "MeteredMiddleware", "MeteredState"]

_log = logging.getLogger("pf_metered.langchain")

ExitBehavior = Literal["end", "error"]
ToolPrices = None | Literal["all"] | Mapping[str, UnitsOrPrice]
Stream = PaymentStream | AsyncPaymentStream

STATE_KEY = "pf_metered"
_RUN_KEY = "pf_metered_run"


def _merge(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Each middleware instance writes its own entry; the others' are kept."""
    return {**(left or {}), **(right or {})}


class MeteredState(AgentState[Any]):
    """The agent state ``MeteredMiddleware`` adds: each run's bill, by middleware name."""

    pf_metered: NotRequired[Annotated[dict[str, Any], _merge, OmitFromInput]]
    pf_metered_run: NotRequired[Annotated[dict[str, str], _merge, PrivateStateAttr]]


class MeteredMiddleware(AgentMiddleware[MeteredState, Any, Any]):
    """Pay a payment stream for an agent's model calls (and chosen tool calls) as they run.

    Stack it with the stock limit middlewares (``ModelCallLimitMiddleware``,
    ``ToolCallLimitMiddleware``), in either order: it only adds checks. Two instances (say one
    paying the model's provider, one a tool's) need different ``name=``.
    """

    state_schema = MeteredState

    def __init__(
        self,
        stream: Stream | None = None,
        *,
        context_field: str | None = None,
        open_stream: StreamFactory | None = None,
        budget_per: BudgetPer = "run",
        rate: str | Decimal | None = None,
        per: Per = "call",
        token_prices: Mapping[str, UnitsOrPrice] | None = None,
        tools: ToolPrices = None,
        exit_behavior: ExitBehavior = "end",
        reserve_tokens: int = 1,
        meter_model: bool = True,
        name: str = "MeteredMiddleware",
    ) -> None:
        super().__init__()
        if rate is not None:
            try:
                declared: Decimal | None = parse_rate(rate, "rate").decimal
            except InvalidInput as exc:
                raise MeterConfigError("rate", exc.problem) from None
        else:
            declared = None
        if stream is not None and isinstance(stream, PaymentStream | AsyncPaymentStream):
            if declared is not None and declared != stream.rate:
                raise MeterConfigError("rate", f"is {declared}, but the stream's is {stream.rate}")
            declared = stream.rate
        self._source = StreamSource(stream, context_field, open_stream, budget_per, declared)
        if exit_behavior not in ("end", "error"):
            raise MeterConfigError(
                "exit_behavior", f"must be 'end' or 'error', got {exit_behavior!r}"
            )
        if not isinstance(meter_model, bool):
            raise MeterConfigError("meter_model", "must be True or False")
        if not isinstance(name, str) or not name:
            raise MeterConfigError("name", "must be a non-empty string")
        self._pricing = ModelPricing.build(per, reserve_tokens, token_prices, declared)
        self._tools = ToolPricing.build(tools, declared)
        self.exit_behavior: ExitBehavior = exit_behavior
        self.meter_model = meter_model
        self._name = name
        self._totals = threading.Lock()
        self.model_calls = 0
        """Model calls paid (committed) so far, over every run."""
        self.tool_calls = 0
        """Metered tool calls paid so far, over every run."""
        self.unpaid_units = 0
        """Units of finished work the budget could not pay (logged when they happen)."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def stream(self) -> Stream | None:
        """The given stream (``stream=``); ``None`` when runs find or open their own."""
        return self._source.given

    @property
    def per(self) -> Per:
        return self._pricing.per

    @property
    def budget_per(self) -> BudgetPer:
        return self._source.budget_per

    def tool_units(self, tool_name: str) -> int:
        """Units one call of ``tool_name`` costs (0: not metered)."""
        return self._tools.units(tool_name)

    # ------------------------------------------------------------- streams it owns
    def open_streams(self) -> dict[str, Stream]:
        """Streams this middleware opened and has not closed, by thread id (or run key)."""
        return self._source.open_streams()

    def close_thread(self, thread_id: str) -> Receipt | None:
        """Close the stream of one thread (``budget_per="thread"``); its receipt, or ``None``
        if that thread has none open. The thread's next run opens a new one."""
        streams = self._source.take(thread_id)
        receipts = self._close_sync(streams)
        return receipts[0] if receipts else None

    async def aclose_thread(self, thread_id: str) -> Receipt | None:
        """Async twin of :meth:`close_thread`."""
        receipts = await self._close_async(self._source.take(thread_id))
        return receipts[0] if receipts else None

    def close_all(self) -> list[Receipt]:
        """Close every stream this middleware opened and still holds (threads' streams, and
        those of runs that ended by an exception before ``after_agent``); their receipts.

        An ``AsyncPaymentStream`` closes only on its event loop: those are left open, still
        listed by :meth:`open_streams`, and a ``MeterConfigError`` names :meth:`aclose_all`
        after every sync stream was closed.
        """
        streams = self._source.take(None)
        on_loop = [s for s in streams if isinstance(s, AsyncPaymentStream)]
        receipts = self._close_sync([s for s in streams if isinstance(s, PaymentStream)])
        if on_loop:
            self._source.put_back(list(on_loop))
            raise MeterConfigError(
                "close_all",
                f"left {len(on_loop)} AsyncPaymentStream(s) open: they close on their event "
                "loop; await aclose_all() there",
            )
        return receipts

    async def aclose_all(self) -> list[Receipt]:
        """Close every stream this middleware opened and still holds, sync or async."""
        return await self._close_async(self._source.take(None))

    @staticmethod
    def _close_sync(streams: list[Stream]) -> list[Receipt]:
        return [s.close() for s in streams if isinstance(s, PaymentStream)]

    @staticmethod
    async def _close_async(streams: list[Stream]) -> list[Receipt]:
        import asyncio

        receipts: list[Receipt] = []
        for s in streams:
            if isinstance(s, AsyncPaymentStream):
                receipts.append(await s.close())
            else:
                receipts.append(await asyncio.to_thread(s.close))
        return receipts

    # ----------------------------------------------------------------- run lifecycle
    def _started(self, bill: RunBill) -> dict[str, Any]:
        update: dict[str, Any] = {_RUN_KEY: {self._name: bill.key}}
        if bill.stopped is not None:  # no stream could be opened: end before the model
            update.update(jump_to="end", messages=[AIMessage(bill.stopped)])
        return update

    @hook_config(can_jump_to=["end"])
    def before_agent(self, state: MeteredState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Find (or open) this run's stream and start its bill."""
        end = self.exit_behavior == "end"
        return self._started(self._source.start(runtime, end_if_unfunded=end))

    @hook_config(can_jump_to=["end"])
    async def abefore_agent(
        self, state: MeteredState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async twin of :meth:`before_agent`."""
        end = self.exit_behavior == "end"
        return self._started(await self._source.astart(runtime, end_if_unfunded=end))

    def after_agent(self, state: MeteredState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Close what this run opened; put the run's bill (and receipt) in the state."""
        bill = self._bill(state)
        return {STATE_KEY: {self._name: self._source.finish(bill)}}

    async def aafter_agent(
        self, state: MeteredState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async twin of :meth:`after_agent`."""
        bill = self._bill(state)
        return {STATE_KEY: {self._name: await self._source.afinish(bill)}}

    def _bill(self, state: Mapping[str, Any]) -> RunBill:
        key = (state.get(_RUN_KEY) or {}).get(self._name)
        bill = self._source.bill(key)
        if bill is None:
            raise MeterConfigError(
                "state",
                f"{self._name}: this run has no bill (its before_agent did not run in this "
                "process, e.g. a run resumed elsewhere); start a new run",
            )
        return bill

    # ---------------------------------------------------------------------- refusals
    def _why_not(self, stream: Stream, units: int, what: str) -> str:
        if not stream.is_open:
            return (
                f"Payment stream {stream.stream_id[:12]} is not open, so {what} cannot be paid; "
                "the run ended before it. Open the stream before running the agent."
            )
        if self._source.budget_per == "thread":
            then = "This thread's budget is spent; a new conversation has its own."
        else:
            then = "Close the stream for its receipt, or open one with a larger budget to go on."
        return (
            f"Budget exhausted: payment stream {stream.stream_id[:12]} can pay "
            f"{stream.units_left} more unit(s) at {stream.rate} USDC each, and {what} needs "
            f"{units}; the run ended before it. {then}"
        )

    def _refusal(self, bill: RunBill, units: int, what: str) -> tuple[str, Exception | None]:
        """The refusal text, and (``exit_behavior="error"``) the exception to raise."""
        message = self._why_not(bill.stream, units, what)
        bill.stopped = bill.stopped or message
        if self.exit_behavior == "end":
            return message, None
        if not bill.stream.is_open:
            return message, StreamClosed(message)
        return message, BudgetExhausted(message, remaining_units=bill.stream.units_left)

    def _raise(self, bill: RunBill, exc: Exception) -> None:
        """The run ends by an exception: close what it opened first (sync)."""
        self._source.finish(bill)
        raise exc

    async def _araise(self, bill: RunBill, exc: Exception) -> None:
        await self._source.afinish(bill)
        raise exc

    def _paid(self, bill: RunBill, units: int, unpaid: int, *, tool: bool) -> None:
        bill.paid(units, unpaid, tool=tool)
        with self._totals:
            self.unpaid_units += unpaid
            if tool:
                self.tool_calls += 1
            else:
                self.model_calls += 1

    # ------------------------------------------------------------------- model calls
    def _check_model(self, state: MeteredState) -> tuple[dict[str, Any] | None, Exception | None]:
        bill = self._bill(state)
        if bill.stopped is not None:  # a tool call was refused: end before the model runs
            return {"jump_to": "end", "messages": [AIMessage(bill.stopped)]}, None
        if not self.meter_model:
            return None, None
        units = self._pricing.reserve
        if bill.stream.can_pay(units):
            return None, None
        why, exc = self._refusal(bill, units, "the next model call")
        return {"jump_to": "end", "messages": [AIMessage(why)]}, exc

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: MeteredState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Refuse the next model call before it runs when the budget cannot pay for it."""
        update, exc = self._check_model(state)
        if exc is not None:
            self._raise(self._bill(state), exc)
        return update

    @hook_config(can_jump_to=["end"])
    async def abefore_model(
        self, state: MeteredState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async twin of :meth:`before_model`."""
        update, exc = self._check_model(state)
        if exc is not None:
            await self._araise(self._bill(state), exc)
        return update

    def _reserve_model(self, bill: RunBill) -> tuple[int | str, Exception | None]:
        """A reservation token, or the refusal text (another caller took the budget)."""
        units = self._pricing.reserve
        try:
            return bill.stream.reserve(units), None
        except (BudgetExhausted, StreamClosed):
            return self._refusal(bill, units, "the next model call")

    def _commit_model(self, bill: RunBill, token: int, response: ModelResponse[Any]) -> None:
        used = self._pricing.units_for(response.result)
        if used is None:
            _log.warning(
                "MeteredMiddleware: the model's answer reports no usable usage_metadata; "
                "paying the %d reserved unit(s) instead",
                token,
            )
            used = token
        unpaid = bill.stream.commit(token, used)
        self._paid(bill, used, unpaid, tool=False)

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any] | AIMessage:
        """Hold the call's units while the model runs; count them if it answered."""
        if not self.meter_model:
            return handler(request)
        bill = self._bill(request.state)
        token, exc = self._reserve_model(bill)
        if exc is not None:
            self._raise(bill, exc)
        if isinstance(token, str):
            return AIMessage(token)  # no tool calls: the agent loop ends here
        try:
            response = handler(request)
        except BaseException:
            bill.stream.cancel(token)
            raise
        self._commit_model(bill, token, response)
        return response

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any] | AIMessage:
        """Async twin of :meth:`wrap_model_call`."""
        if not self.meter_model:
            return await handler(request)
        bill = self._bill(request.state)
        token, exc = self._reserve_model(bill)
        if exc is not None:
            await self._araise(bill, exc)
        if isinstance(token, str):
            return AIMessage(token)
        try:
            response = await handler(request)
        except BaseException:
            bill.stream.cancel(token)
            raise
        self._commit_model(bill, token, response)
        return response

    # -------------------------------------------------------------------- tool calls
    def _check_batch(self, state: MeteredState) -> tuple[dict[str, Any] | None, Exception | None]:
        """Can the budget pay every metered tool call of the last answer not yet answered?"""
        messages = state.get("messages", [])
        last_ai = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
        if last_ai is None or not last_ai.tool_calls:
            return None, None
        index = messages.index(last_ai)
        answered = {m.tool_call_id for m in messages[index + 1 :] if isinstance(m, ToolMessage)}
        pending = [c for c in last_ai.tool_calls if c["id"] not in answered]
        units = sum(self.tool_units(c["name"]) for c in pending)
        bill = self._bill(state)
        if units == 0 or bill.stream.can_pay(units):
            return None, None
        names = ", ".join(c["name"] for c in pending if self.tool_units(c["name"]))
        why, exc = self._refusal(bill, units, f"the tool call(s) asked for ({names})")
        stopped: list[ToolMessage | AIMessage] = [
            ToolMessage(
                content="Not run: the payment budget cannot pay for this batch of tool calls.",
                tool_call_id=c["id"] or "",
                name=c["name"],
                status="error",
            )
            for c in pending
        ]
        stopped.append(AIMessage(why))
        return {"jump_to": "end", "messages": stopped}, exc

    @hook_config(can_jump_to=["end"])
    def after_model(self, state: MeteredState, runtime: Runtime[Any]) -> dict[str, Any] | None:
        """Before any tool of this answer runs: can the budget pay every metered call in it?

        If not, no tool of the batch runs: each call gets an error ``ToolMessage`` (so the
        history stays valid) and the run ends with an ``AIMessage`` saying why.
        """
        update, exc = self._check_batch(state)
        if exc is not None:
            self._raise(self._bill(state), exc)
        return update

    @hook_config(can_jump_to=["end"])
    async def aafter_model(
        self, state: MeteredState, runtime: Runtime[Any]
    ) -> dict[str, Any] | None:
        """Async twin of :meth:`after_model`."""
        update, exc = self._check_batch(state)
        if exc is not None:
            await self._araise(self._bill(state), exc)
        return update

    def _reserve_tool(
        self, bill: RunBill, request: ToolCallRequest
    ) -> tuple[tuple[int, int] | ToolMessage, Exception | None]:
        """``(units, token)`` to commit after the tool ran (``(0, 0)``: not metered)."""
        call = request.tool_call
        units = self.tool_units(call["name"])
        if units == 0:
            return (0, 0), None
        try:
            return (units, bill.stream.reserve(units)), None
        except (BudgetExhausted, StreamClosed):
            why, exc = self._refusal(bill, units, f"the tool call {call['name']}")
            refused = ToolMessage(
                content=why, tool_call_id=call["id"] or "", name=call["name"], status="error"
            )
            return refused, exc

    def _settle_tool(
        self, bill: RunBill, units: int, token: int, result: ToolMessage | Command[Any]
    ) -> None:
        if isinstance(result, ToolMessage) and result.status == "error":
            bill.stream.cancel(token)  # the tool failed: it costs nothing
            return
        self._paid(bill, units, bill.stream.commit(token), tool=True)

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolMessage | Command[Any]],
    ) -> ToolMessage | Command[Any]:
        """Hold a metered tool call's units while it runs; count them if it succeeded."""
        bill = self._bill(request.state)
        held, exc = self._reserve_tool(bill, request)
        if exc is not None:
            self._raise(bill, exc)
        if isinstance(held, ToolMessage):
            return held
        units, token = held
        if units == 0:
            return handler(request)
        try:
            result = handler(request)
        except BaseException:
            bill.stream.cancel(token)
            raise
        self._settle_tool(bill, units, token, result)
        return result

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]],
    ) -> ToolMessage | Command[Any]:
        """Async twin of :meth:`wrap_tool_call`."""
        bill = self._bill(request.state)
        held, exc = self._reserve_tool(bill, request)
        if exc is not None:
            await self._araise(bill, exc)
        if isinstance(held, ToolMessage):
            return held
        units, token = held
        if units == 0:
            return await handler(request)
        try:
            result = await handler(request)
        except BaseException:
            bill.stream.cancel(token)
            raise
        self._settle_tool(bill, units, token, result)
        return result
