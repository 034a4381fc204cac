"""``pay_per_call``: make any LangChain tool pay its provider from the stream the agent opened.

Why a wrapper and not a new tool: the paid tool keeps its name, description and ``args_schema``
exactly (the model sees no difference), while every successful call counts ``units`` on the
newest open stream to ``provider`` in the shared :class:`~pf_metered.tools.ToolContext`. If the
agent has not opened one, or its budget cannot pay for the call, the call is refused *before*
the tool runs with a message saying what to do; a call that raises costs nothing.

Give it the toolkit the agent has, ``pay_per_call(tool, toolkit=toolkit, provider=p)``: it
pays from that toolkit's context (per conversation, from the stream *its* conversation opened;
another thread's stream to the same provider is never touched), and a refusal names only the
toolkit's tools (``stream_open`` where it is offered, else "ask the user"). With
``context=`` instead, say which tools the model has with ``offered=``; without it a refusal
names no tool at all. Refusals answer like the toolkit's tools: an error ``ToolMessage`` whose
artifact is ``{"error": kind, "message": text}`` (``no_stream``, ``budget_exhausted``,
``stream_closed``, ...).

For a stream the program opened itself, ``pay_per_call(tool, stream=s)`` does the same;
``@metered(stream=s)`` under ``@tool`` also keeps the schema, but a refused call then raises
``BudgetExhausted`` out of the tool instead of answering the model.

What this module must never do: run the wrapped tool when the call cannot be paid, or count a
call that failed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.runnables import RunnableConfig
from langchain_core.runnables.config import patch_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field

from pf_metered.errors import InvalidInput, PFMeteredError
from pf_metered.langchain import _paid_messages, _units
from pf_metered.langchain._base import ErrorArtifactTool, failed
from pf_metered.langchain._units import Meterable
from pf_metered.langchain.conversations import Conversations
from pf_metered.langchain.toolkit import PurpleFleaToolkit
from pf_metered.money import parse_count
from pf_metered.tools import ALL_TOOL_NAMES, StreamEntry, ToolContext

__all__ = ["PaidTool", "pay_per_call"]

_NO_CONFIG: RunnableConfig = {}  # never mutated: a call made outside any run


class PaidTool(ErrorArtifactTool):
    """A tool whose every successful call pays ``units`` on the agent's stream to ``provider``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseTool = Field(exclude=True)
    context: ToolContext | Conversations | None = Field(default=None, exclude=True, repr=False)
    provider: str | None = None
    fixed_stream: Any = Field(default=None, exclude=True, repr=False)
    units: int = 1
    offered: frozenset[str] = Field(default=frozenset(), exclude=True, repr=False)
    """The Purple Flea tools the model has beside this one: all a refusal may tell it to call
    (empty: none is known, so a refusal asks the user)."""
    handle_tool_error: bool = True

    def _stream(self, config: RunnableConfig) -> tuple[Any, str | None]:
        """The stream to pay from and the agent's handle for it (``None``: the program's)."""
        if self.fixed_stream is not None:
            return self.fixed_stream, None
        assert self.context is not None and self.provider is not None
        ctx = self.context
        if isinstance(ctx, Conversations):
            found = ctx.find(config)  # a conversation that opened nothing has no stream
            entry: StreamEntry | None = None if found is None else found.stream_for(self.provider)
        else:
            entry = ctx.stream_for(self.provider)
        if entry is None:
            raise failed(
                _paid_messages.no_stream(self.name, provider=self.provider, offered=self.offered)
            )
        return entry.stream, entry.handle

    def _reserve(self, config: RunnableConfig) -> tuple[Any, int]:
        """Hold this call's units before it runs: the stream and the reservation's token."""
        stream, handle = self._stream(config)
        try:
            token = _units.reserve(stream, self.units)
        except PFMeteredError as exc:
            raise failed(
                _paid_messages.refused(
                    exc,
                    tool_name=self.name,
                    units=self.units,
                    provider=self.provider,
                    handle=handle,
                    offered=self.offered,
                )
            ) from exc
        return stream, token

    def _run(
        self,
        run_manager: CallbackManagerForToolRun | None = None,
        *,
        config: RunnableConfig = _NO_CONFIG,
        **kwargs: Any,
    ) -> Any:
        stream, token = self._reserve(config)
        try:
            result = self.inner.invoke(kwargs, _child(config, run_manager))
        except BaseException:
            _units.cancel(stream, token)
            raise
        _units.commit(stream, token)
        return result

    async def _arun(
        self,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        *,
        config: RunnableConfig = _NO_CONFIG,
        **kwargs: Any,
    ) -> Any:
        stream, token = self._reserve(config)
        try:
            result = await self.inner.ainvoke(kwargs, _child(config, run_manager))
        except BaseException:
            _units.cancel(stream, token)
            raise
        _units.commit(stream, token)
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
    toolkit: PurpleFleaToolkit | None = None,
    context: ToolContext | Conversations | None = None,
    provider: str | None = None,
    stream: Meterable | None = None,
    units: int = 1,
    offered: Iterable[str] | None = None,
) -> PaidTool:
    """``tool``, paying ``units`` per successful call; refused before it runs if unpaid.

    One of three sources, each with ``provider`` for the first two:

    * ``toolkit``: the agent pays from the newest stream *it* opened to ``provider`` with the
      toolkit's ``stream_open`` (per conversation, its conversation's), and a refusal names
      only the toolkit's tools (:attr:`PurpleFleaToolkit.tool_names`).
    * ``context``: the same over a :class:`ToolContext` or :class:`Conversations`; ``offered``
      says which Purple Flea tools the model has (without it, a refusal names none and asks
      the user).
    * ``stream``: a stream the program opened (a refusal asks the user: no tool of the
      model's can act on it).

    The returned tool has the same name, description and arguments as ``tool``; an unpaid call
    answers with a message the model can act on.
    """
    units = parse_count(units, "units", allow_zero=False)
    sources = (("toolkit", toolkit), ("context", context), ("stream", stream))
    given = [name for name, source in sources if source is not None]
    if len(given) != 1:
        raise InvalidInput(
            "stream", "give one of toolkit=, context= or stream= (not several, not none)"
        )
    if stream is None and provider is None:
        raise InvalidInput("provider", f"is needed with {given[0]}=: the agent id to pay")
    names: frozenset[str] = frozenset()
    if offered is not None:
        if context is None:
            raise InvalidInput(
                "offered", "goes with context= only (a toolkit says which tools it offers)"
            )
        names = frozenset([offered] if isinstance(offered, str) else offered)
        unknown = sorted(names - set(ALL_TOOL_NAMES))
        if unknown:
            raise InvalidInput("offered", f"names no Purple Flea tool: {unknown}")
    if toolkit is not None:
        context = toolkit.tool_context if toolkit.conversations is None else toolkit.conversations
        names = toolkit.tool_names
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
        offered=names,
    )
