"""LangChain integration: Purple Flea payment tools for agents, and a callback that meters models.

* :class:`PurpleFleaToolkit` — ``escrow_create``, ``escrow_release``, ``escrow_status``,
  ``escrow_list``, ``faucet_claim``, ``stream_open``, ``stream_status``, ``stream_record``,
  ``stream_close``, ``stream_list``, narrowable and bounded by operator :class:`Caps`.
* :class:`MeteredCallbackHandler` — attach to any chat model, chain or agent with
  ``callbacks=[...]`` to pay per LLM call or per token from a payment stream.
* :class:`MeteredMiddleware` — an ``AgentMiddleware`` for ``langchain.agents.create_agent``
  that pays per model call or per token (and per tool call) and ends the run cleanly, with a
  message, when the budget cannot pay (needs the ``langchain`` extra; loaded on first use).
* :func:`pay_per_call` — make any LangChain tool pay its provider one unit per successful call
  from the stream the agent opened to that provider.

Importing this module needs ``langchain-core`` only (never LangGraph), and ``import pf_metered``
never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.langchain.callbacks import MeteredCallbackHandler
from pf_metered.langchain.escrow import (
    EscrowCreateTool,
    EscrowListTool,
    EscrowRefundTool,
    EscrowReleaseTool,
    EscrowStatusTool,
)
from pf_metered.langchain.faucet import FaucetClaimTool
from pf_metered.langchain.metered_tool import pay_per_call
from pf_metered.langchain.streams import (
    StreamCloseTool,
    StreamListTool,
    StreamOpenTool,
    StreamRecordTool,
    StreamStatusTool,
)
from pf_metered.langchain.toolkit import TOOL_CLASSES, PurpleFleaToolkit
from pf_metered.tools import Caps, ToolContext

if TYPE_CHECKING:
    from pf_metered.langchain.middleware import MeteredMiddleware

__all__ = [
    "TOOL_CLASSES",
    "Caps",
    "EscrowCreateTool",
    "EscrowListTool",
    "EscrowRefundTool",
    "EscrowReleaseTool",
    "EscrowStatusTool",
    "FaucetClaimTool",
    "MeteredCallbackHandler",
    "MeteredMiddleware",
    "PurpleFleaTool",
    "PurpleFleaToolkit",
    "StreamCloseTool",
    "StreamListTool",
    "StreamOpenTool",
    "StreamRecordTool",
    "StreamStatusTool",
    "ToolContext",
    "pay_per_call",
]


def __getattr__(name: str) -> Any:
    """``MeteredMiddleware`` is imported on first use: it needs ``langchain`` (an extra), and
    importing this package must keep needing ``langchain-core`` only."""
    if name == "MeteredMiddleware":
        from pf_metered.langchain.middleware import MeteredMiddleware

        return MeteredMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
