"""A provider agent's LangChain tools, served only while the calling stream pays.

``gate_tool(tool, gate=..., agate=...)`` returns a tool with the same name, description and
arguments; each call is admitted by the payment gate first. The caller names its stream the way
an HTTP caller does, with the same header names, in the run's metadata
(``tool.invoke(args, {"metadata": stream.provider_headers()})``) — the model never sees or
invents them. A refusal is a ``ToolException`` whose text is the 402 body
(``{error, message, owed, escrow_id}``), answered as the tool's result
(``handle_tool_error=True``); the wrapped tool does not run. A call that raises counts nothing.

What this module must never do: run the wrapped tool for a refused call, take the claim from
the model's arguments, or count a call that failed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict, Field

from pf_metered.errors import InvalidInput
from pf_metered.money import parse_count
from pf_metered.provider._core import Claim, PaymentRefused
from pf_metered.provider._gate import AsyncPaymentGate, PaymentGate

__all__ = ["GatedTool", "gate_tool"]


def _claim(run_manager: Any) -> Claim:
    meta = getattr(run_manager, "metadata", None)
    headers = (
        {str(k): v for k, v in meta.items() if isinstance(v, str)}
        if isinstance(meta, Mapping)
        else {}
    )
    return Claim.from_headers(headers)


def _refused(refusal: PaymentRefused) -> ToolException:
    return ToolException(json.dumps(refusal.to_json()))


class GatedTool(BaseTool):
    """A tool each of whose calls the payment gate admits first (see the module docstring)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool = Field(exclude=True)
    gate: PaymentGate | None = Field(default=None, exclude=True, repr=False)
    agate: AsyncPaymentGate | None = Field(default=None, exclude=True, repr=False)
    units: int = 1
    handle_tool_error: bool = True

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> Any:
        if self.gate is None:
            raise ToolException(f"{self.name} is served asynchronously only (no sync gate)")
        try:
            admission = self.gate.admit(_claim(run_manager), self.units)
        except PaymentRefused as refusal:
            raise _refused(refusal) from refusal
        try:
            result = self.inner.invoke(
                kwargs, {"callbacks": run_manager.get_child()} if run_manager else None
            )
        except BaseException:
            self.gate.cancel(admission)
            raise
        self.gate.finish(admission)
        return result

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> Any:
        if self.agate is None:
            return await super()._arun(run_manager=run_manager, **kwargs)  # _run in a thread
        try:
            admission = await self.agate.admit(_claim(run_manager), self.units)
        except PaymentRefused as refusal:
            raise _refused(refusal) from refusal
        try:
            result = await self.inner.ainvoke(
                kwargs, {"callbacks": run_manager.get_child()} if run_manager else None
            )
        except BaseException:
            self.agate.cancel(admission)
            raise
        self.agate.finish(admission)
        return result


def gate_tool(
    tool: BaseTool,
    *,
    gate: PaymentGate | None = None,
    agate: AsyncPaymentGate | None = None,
    units: int = 1,
) -> GatedTool:
    """``tool``, each call admitted by ``gate`` (``invoke``) and/or ``agate`` (``ainvoke``)."""
    units = parse_count(units, "units", allow_zero=False)
    if gate is None and agate is None:
        raise InvalidInput(
            "gate", "give gate= (a PaymentGate), agate= (an AsyncPaymentGate), or both"
        )
    if gate is not None and not isinstance(gate, PaymentGate):
        raise InvalidInput("gate", "must be a PaymentGate")
    if agate is not None and not isinstance(agate, AsyncPaymentGate):
        raise InvalidInput("agate", "must be an AsyncPaymentGate")
    return GatedTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        inner=tool,
        gate=gate,
        agate=agate,
        units=units,
    )
