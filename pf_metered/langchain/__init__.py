"""LangChain integration: Purple Flea payment tools for agents, and a callback that meters models.

* :class:`PurpleFleaToolkit` — ``escrow_create``, ``escrow_release``, ``escrow_status``,
  ``escrow_list``, ``faucet_claim``, ``stream_open``, ``stream_status``, ``stream_record``,
  ``stream_close``, ``stream_list``, narrowable and bounded by operator :class:`Caps`.
* :class:`MeteredCallbackHandler` — attach to any chat model, chain or agent with
  ``callbacks=[...]`` to pay per LLM call or per token from a payment stream.
* :func:`pay_per_call` — make any LangChain tool pay its provider one unit per successful call
  from the stream the agent opened to that provider.

Importing this module needs ``langchain-core`` only (never LangGraph), and ``import pf_metered``
never imports it.
"""

from __future__ import annotations

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
