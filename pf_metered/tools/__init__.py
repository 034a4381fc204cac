"""Framework-neutral tool definitions: one source for the LangChain tools and the MCP server.

Each :class:`ToolDefinition` is a name, a description written for the model, a pydantic
arguments model and sync/async handlers over a :class:`ToolContext` (the clients, the
operator's :class:`Caps`, and the streams the agent opened). Adapters call
``definition.call_answer(ctx, raw_args)`` / ``await definition.acall_answer(ctx, raw_args)``
and get the answer's figures (:func:`render` makes them compact JSON, :func:`summarize` the
sentence a model reads), or a :class:`ToolError` whose message the model can correct from; the
allow-list, validation and caps are enforced inside, so no adapter can skip them.

What this package must never do: import a framework (LangChain, MCP), hold money as float, or
put the API key into anything a model reads.
"""

from __future__ import annotations

from pf_metered.tools._base import Answer, ToolDefinition, render
from pf_metered.tools.caps import ALL_TOOL_NAMES, Caps
from pf_metered.tools.context import StreamEntry, ToolContext
from pf_metered.tools.contexts import DEFAULT_KEY, ToolContexts
from pf_metered.tools.errors import ToolError, explain, format_validation_error
from pf_metered.tools.escrow import (
    ESCROW_CREATE,
    ESCROW_LIST,
    ESCROW_RELEASE,
    ESCROW_STATUS,
    FAUCET_CLAIM,
)
from pf_metered.tools.refund import ESCROW_REFUND
from pf_metered.tools.state import Book, ToolState
from pf_metered.tools.streams import (
    STREAM_CLOSE,
    STREAM_LIST,
    STREAM_OPEN,
    STREAM_RECORD,
    STREAM_STATUS,
)
from pf_metered.tools.summary import summarize

__all__ = [
    "ALL_TOOL_NAMES",
    "DEFAULT_KEY",
    "TOOLS",
    "Answer",
    "Book",
    "Caps",
    "StreamEntry",
    "ToolContext",
    "ToolContexts",
    "ToolDefinition",
    "ToolError",
    "ToolState",
    "explain",
    "format_validation_error",
    "get_definition",
    "render",
    "summarize",
]

TOOLS: tuple[ToolDefinition, ...] = (  # type: ignore[type-arg]
    ESCROW_CREATE,
    ESCROW_RELEASE,
    ESCROW_STATUS,
    ESCROW_LIST,
    FAUCET_CLAIM,
    STREAM_OPEN,
    STREAM_STATUS,
    STREAM_RECORD,
    STREAM_CLOSE,
    STREAM_LIST,
    ESCROW_REFUND,
)
"""Every tool definition, in the order of :data:`ALL_TOOL_NAMES`."""

assert tuple(t.name for t in TOOLS) == ALL_TOOL_NAMES

_BY_NAME = {t.name: t for t in TOOLS}


def get_definition(name: str) -> ToolDefinition:  # type: ignore[type-arg]
    """The definition of tool ``name``; ``KeyError`` naming the known tools if there is none."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no tool {name!r}; known: {list(ALL_TOOL_NAMES)}") from None
