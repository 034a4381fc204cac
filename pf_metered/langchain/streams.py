"""LangChain tools for metered payment streams: ``stream_open``, ``stream_status``,
``stream_record``, ``stream_close``, ``stream_list``.

Why thin: each class only names its shared definition (:mod:`pf_metered.tools.streams`). The
streams an agent opens live in the tools' shared :class:`~pf_metered.tools.ToolContext`, so a
stream opened by ``stream_open`` is the one ``stream_close`` settles, whichever tool object runs.

What this module must never do: define a second description or schema for a tool.
"""

from __future__ import annotations

from pydantic import BaseModel

from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.tools.schemas import (
    StreamCloseArgs,
    StreamListArgs,
    StreamOpenArgs,
    StreamRecordArgs,
    StreamStatusArgs,
)
from pf_metered.tools.streams import (
    STREAM_CLOSE,
    STREAM_LIST,
    STREAM_OPEN,
    STREAM_RECORD,
    STREAM_STATUS,
)

__all__ = [
    "StreamCloseTool",
    "StreamListTool",
    "StreamOpenTool",
    "StreamRecordTool",
    "StreamStatusTool",
]


class StreamOpenTool(PurpleFleaTool):
    """Open a metered payment stream to a provider (within the operator's caps)."""

    definition = STREAM_OPEN
    name: str = STREAM_OPEN.name
    description: str = STREAM_OPEN.description
    args_schema: type[BaseModel] = StreamOpenArgs


class StreamStatusTool(PurpleFleaTool):
    """Read a stream's figures."""

    definition = STREAM_STATUS
    name: str = STREAM_STATUS.name
    description: str = STREAM_STATUS.description
    args_schema: type[BaseModel] = StreamStatusArgs


class StreamRecordTool(PurpleFleaTool):
    """Count units the agent measured itself."""

    definition = STREAM_RECORD
    name: str = STREAM_RECORD.name
    description: str = STREAM_RECORD.description
    args_schema: type[BaseModel] = StreamRecordArgs


class StreamCloseTool(PurpleFleaTool):
    """Close a stream and return its receipt."""

    definition = STREAM_CLOSE
    name: str = STREAM_CLOSE.name
    description: str = STREAM_CLOSE.description
    args_schema: type[BaseModel] = StreamCloseArgs


class StreamListTool(PurpleFleaTool):
    """List the session's streams."""

    definition = STREAM_LIST
    name: str = STREAM_LIST.name
    description: str = STREAM_LIST.description
    args_schema: type[BaseModel] = StreamListArgs
