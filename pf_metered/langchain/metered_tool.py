"""``pay_per_call``: make any LangChain tool pay its provider from the stream the agent opened.

Why a wrapper and not a new tool: the paid tool keeps its name, description and ``args_schema``
exactly (the model sees no difference), while every successful call counts ``units`` on the
newest open stream to ``provider`` in the shared :class:`~pf_metered.tools.ToolContext`. If the
agent has not opened one, or its budget cannot pay for the call, the call is refused *before*
the tool runs with a message saying what to do (``stream_open``, ``stream_close``); a call that
raises costs nothing.

With a per-conversation toolkit, pass ``context=toolkit.conversations``: each call then pays
from the stream *its* conversation opened (another thread's stream to the same provider is
never touched).

For a stream the program opened itself, ``pay_per_call(tool, stream=s)`` does the same;
``@metered(stream=s)`` under ``@tool`` also keeps the schema, but a refused call then raises
``BudgetExhausted`` out of the tool instead of answering the model.

What this module must never do: run the wrapped tool when the call cannot be paid, or count a
call that failed.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import patch_config
from langchain_core.tools import BaseTool, ToolException
from pydantic import ConfigDict, Field

from pf_metered.errors import InvalidInput, PFMeteredError
from pf_metered.langchain import _units
from pf_metered.langchain._units import Meterable
from pf_metered.langchain.conversations import Conversations
from pf_metered.money import parse_count
from pf_metered.tools import StreamEntry, ToolContext, explain

__all__ = ["PaidTool", "pay_per_call"]

_NO_CONFIG: RunnableConfig = {}  # never mutated: a call made outside any run


class PaidTool(BaseTool):
    """A tool whose every successful call pays ``units`` on the agent's stream to ``provider``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool = Field(exclude=True)
    context: ToolContext | Conversations | None = Field(default=None, exclude=True, repr=False)
    provider: str | None = None
    fixed_stream: Any = Field(default=None, exclude=True, repr=False)
    units: int = 1
    handle_tool_error: bool = True

    def _stream(self, config: RunnableConfig) -> tuple[Any, str]:
        if self.fixed_stream is not None:
            return self.fixed_stream, "the tool's stream"
        assert self.context is not None and self.provider is not None
        ctx = self.context
        if isinstance(ctx, Conversations):
            found = ctx.find(config)  # a conversation that opened nothing has no stream
            entry: StreamEntry | None = None if found is None else found.stream_for(self.provider)
        else:
            entry = ctx.stream_for(self.provider)
        if entry is None:
            raise ToolException(
                f"{self.name} is paid per call: open a payment stream to provider "
                f"{self.provider!r} with stream_open first, then call {self.name} again."
            )
        return entry.stream, f"stream {entry.handle}"

    def _reserve(self, config: RunnableConfig) -> Any:
        stream, label = self._stream(config)
        try:
            _units.reserve(stream, self.units)
        except PFMeteredError as exc:
            err = explain(exc, tool_name=self.name)
            raise ToolException(
                f"{err.message} ({self.name} costs {self.units} unit(s) of {label}; it was "
                "not run.)"
            ) from exc
        return stream

    def _run(
        self,
        run_manager: CallbackManagerForToolRun | None = None,
        *,
        config: RunnableConfig = _NO_CONFIG,
        **kwargs: Any,
    ) -> Any:
        stream = self._reserve(config)
        try:
            result = self.inner.invoke(kwargs, _child(config, run_manager))
        except BaseException:
            _units.cancel(stream, self.units)
            raise
        _units.commit(stream, self.units)
        return result

    async def _arun(
        self,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        *,
        config: RunnableConfig = _NO_CONFIG,
        **kwargs: Any,
    ) -> Any:
        stream = self._reserve(config)
        try:
            result = await self.inner.ainvoke(kwargs, _child(config, run_manager))
        except BaseException:
            _units.cancel(stream, self.units)
            raise
        _units.commit(stream, self.units)
        return result


def _child(
    config: RunnableConfig,
    run_manager: CallbackManagerForToolRun | AsyncCallbackManagerForToolRun | None,
) -> RunnableConfig:
    """The wrapped tool's config: this run's (its conversation, its runtime), with this tool's
    callbacks as parent."""
    if run_manager is None:
        return config
    return patch_config(config, callbacks=run_manager.get_child())


def pay_per_call(
    tool: BaseTool,
    *,
    context: ToolContext | Conversations | None = None,
    provider: str | None = None,
    stream: Meterable | None = None,
    units: int = 1,
) -> PaidTool:
    """``tool``, paying ``units`` per successful call; refused before it runs if unpaid.

    Either ``context`` and ``provider``: the agent pays from the newest stream *it* opened to
    ``provider`` with ``stream_open`` (pass the toolkit's ``toolkit.tool_context``, or
    ``toolkit.conversations`` for a per-conversation toolkit). Or
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
