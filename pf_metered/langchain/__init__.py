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
* Per conversation: ``PurpleFleaToolkit(..., conversations=by_thread)`` (or
  :func:`by_context` / :func:`by_configurable`) gives each thread or user its own streams and
  caps (:class:`Conversations`); :class:`SettleConversationMiddleware` closes (or reports) what
  a finished run's conversation left open (``langchain`` extra; loaded on first use).

Importing this module needs ``langchain-core`` only (never LangGraph), and ``import pf_metered``
never imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.langchain.callbacks import MeteredCallbackHandler
from pf_metered.langchain.conversations import (
    Conversations,
    by_configurable,
    by_context,
    by_thread,
)
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
from pf_metered.tools import Caps, ToolContext, ToolContexts

if TYPE_CHECKING:
    from pf_metered.langchain.middleware import MeteredMiddleware
    from pf_metered.langchain.settle import SettleConversationMiddleware

__all__ = [
    "TOOL_CLASSES",
    "Caps",
    "Conversations",
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
    "SettleConversationMiddleware",
    "StreamCloseTool",
    "StreamListTool",
    "StreamOpenTool",
    "StreamRecordTool",
    "StreamStatusTool",
    "ToolContext",
    "ToolContexts",
    "by_configurable",
    "by_context",
    "by_thread",
    "pay_per_call",
]


def __getattr__(name: str) -> Any:
    """The middlewares are imported on first use: they need ``langchain`` (an extra), and
    importing this package must keep needing ``langchain-core`` only."""
    if name == "MeteredMiddleware":
        from pf_metered.langchain.middleware import MeteredMiddleware

        return MeteredMiddleware
    if name == "SettleConversationMiddleware":
        from pf_metered.langchain.settle import SettleConversationMiddleware

        return SettleConversationMiddleware
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
