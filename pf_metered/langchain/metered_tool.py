"""``pay_per_call``: make any LangChain tool pay its provider from the stream the agent opened.

Why a wrapper and not a new tool: the paid tool keeps its name, description and ``args_schema``
exactly (the model sees no difference), while every successful call counts ``units`` on the
newest open stream to ``provider`` in the shared :class:`~pf_metered.tools.ToolContext`. If the
agent has not opened one, or its budget cannot pay for the call, the call is refused *before*
the tool runs with a message saying what to do (``stream_open``, ``stream_close``); a call that
raises costs nothing.

For a stream the program opened itself, ``pay_per_call(tool, stream=s)`` does the same;
``@metered(stream=s)`` under ``@tool`` also keeps the schema, but a refused call then raises
``BudgetExhausted`` out of the tool instead of answering the model.

What this module must never do: run the wrapped tool when the call cannot be paid, or count a
call that failed.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict, Field

from pf_metered.errors import InvalidInput, PFMeteredError
from pf_metered.langchain import _units
from pf_metered.langchain._units import Meterable
from pf_metered.money import parse_count
from pf_metered.tools import StreamEntry, ToolContext, explain

__all__ = ["PaidTool", "pay_per_call"]


class PaidTool(BaseTool):
    """A tool whose every successful call pays ``units`` on the agent's stream to ``provider``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool = Field(exclude=True)
    context: ToolContext | None = Field(default=None, exclude=True, repr=False)
    provider: str | None = None
    fixed_stream: Any = Field(default=None, exclude=True, repr=False)
    units: int = 1
    handle_tool_error: bool = True

    def _stream(self) -> tuple[Any, str]:
        if self.fixed_stream is not None:
            return self.fixed_stream, "the tool's stream"
        assert self.context is not None and self.provider is not None
        entry: StreamEntry | None = self.context.stream_for(self.provider)
        if entry is None:
            raise ToolException(
                f"{self.name} is paid per call: open a payment stream to provider "
                f"{self.provider!r} with stream_open first, then call {self.name} again."
            )
        return entry.stream, f"stream {entry.handle}"

    def _reserve(self) -> Any:
        stream, label = self._stream()
        try:
            _units.reserve(stream, self.units)
        except PFMeteredError as exc:
            err = explain(exc, tool_name=self.name)
            raise ToolException(
                f"{err.message} ({self.name} costs {self.units} unit(s) of {label}; it was "
                "not run.)"
            ) from exc
        return stream

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any) -> Any:
        stream = self._reserve()
        try:
            result = self.inner.invoke(
                kwargs, {"callbacks": run_manager.get_child()} if run_manager else None
            )
        except BaseException:
            _units.cancel(stream, self.units)
            raise
        _units.commit(stream, self.units)
        return result

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> Any:
        stream = self._reserve()
        try:
            result = await self.inner.ainvoke(
                kwargs, {"callbacks": run_manager.get_child()} if run_manager else None
            )
        except BaseException:
            _units.cancel(stream, self.units)
            raise
        _units.commit(stream, self.units)
        return result


def pay_per_call(
    tool: BaseTool,
    *,
    context: ToolContext | None = None,
    provider: str | None = None,
    stream: Meterable | None = None,
    units: int = 1,
) -> PaidTool:
    """``tool``, paying ``units`` per successful call; refused before it runs if unpaid.

    Either ``context`` and ``provider``: the agent pays from the newest stream *it* opened to
    ``provider`` with ``stream_open`` (pass the toolkit's ``toolkit.tool_context``). Or
    ``stream``: a stream the program opened. The returned tool has the same name, description
    and arguments as ``tool``; an unpaid call answers with a message the model can act on.
    """
    units = parse_count(units, "units", allow_zero=False)
    if (stream is None) == (context is None or provider is None):
        raise InvalidInput(
            "stream", "give either stream=, or context= and provider= (not both, not neither)"
        )
    return PaidTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        inner=tool,
        context=context,
        provider=provider,
        fixed_stream=stream,
        units=units,
    )
