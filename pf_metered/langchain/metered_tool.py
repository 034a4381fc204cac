"""``pay_per_call``: make any LangChain tool pay its provider from the stream the agent opened.

Why a wrapper and not a new tool: the paid tool keeps its name, description and ``args_schema``
exactly (the model sees no difference), while every successful call counts ``units`` on the
newest open stream to ``provider`` in the shared :class:`~pf_metered.tools.ToolContext`. If the
agent has not opened one, or its budget cannot pay for the call, the call is refused *before*
the tool runs with a message saying what to do (``stream_open``, ``stream_close``); a call that
raises costs nothing.

For a stream the program opened itself, ``@metered(stream=s)`` under ``@tool`` does the same
with no wrapper.

What this module must never do: run the wrapped tool when the call cannot be paid, or count a
call that failed.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict, Field

from pf_metered.errors import PFMeteredError
from pf_metered.langchain import _units
from pf_metered.money import parse_count
from pf_metered.tools import StreamEntry, ToolContext, explain

__all__ = ["PaidTool", "pay_per_call"]


class PaidTool(BaseTool):
    """A tool whose every successful call pays ``units`` on the agent's stream to ``provider``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool = Field(exclude=True)
    context: ToolContext = Field(exclude=True, repr=False)
    provider: str
    units: int = 1
    handle_tool_error: bool = True

    def _stream(self) -> StreamEntry:
        entry = self.context.stream_for(self.provider)
        if entry is None:
            raise ToolException(
                f"{self.name} is paid per call: open a payment stream to provider "
                f"{self.provider!r} with stream_open first, then call {self.name} again."
            )
        return entry

    def _reserve(self) -> StreamEntry:
        entry = self._stream()
        try:
            _units.reserve(entry.stream, self.units)
        except PFMeteredError as exc:
            err = explain(exc, tool_name=self.name)
            raise ToolException(
                f"{err.message} ({self.name} costs {self.units} unit(s) of stream "
                f"{entry.handle}; it was not run.)"
            ) from exc
        return entry

    def _run(
        self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> Any:
        entry = self._reserve()
        try:
            result = self.inner.invoke(
                kwargs, callbacks=run_manager.get_child() if run_manager else None
            )
        except BaseException:
            _units.cancel(entry.stream, self.units)
            raise
        _units.commit(entry.stream, self.units)
        return result

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> Any:
        entry = self._reserve()
        try:
            result = await self.inner.ainvoke(
                kwargs, callbacks=run_manager.get_child() if run_manager else None
            )
        except BaseException:
            _units.cancel(entry.stream, self.units)
            raise
        _units.commit(entry.stream, self.units)
        return result


def pay_per_call(
    tool: BaseTool, *, context: ToolContext, provider: str, units: int = 1
) -> PaidTool:
    """``tool``, paying ``provider`` ``units`` per successful call from the agent's stream.

    The returned tool has the same name, description and arguments as ``tool``. Pass the same
    ``context`` as the toolkit's (``toolkit.tool_context``) so the agent's ``stream_open``
    funds it.
    """
    units = parse_count(units, "units", allow_zero=False)
    return PaidTool(
        name=tool.name,
        description=tool.description,
        args_schema=tool.args_schema,
        return_direct=tool.return_direct,
        response_format=tool.response_format,
        inner=tool,
        context=context,
        provider=provider,
        units=units,
    )
