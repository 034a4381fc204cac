"""``PurpleFleaToolkit``: every Purple Flea tool for one agent, narrowed to what it may do.

Why a toolkit: the operator decides once what an agent may do (which tools, which caps) and
hands ``toolkit.get_tools()`` to the agent constructor. Narrowing is by tool name or by family
(``"escrow"``, ``"stream"``, ``"faucet"``), as stripe's agent toolkit narrows by permission: an
agent allowed to pay but not to claim the faucet is ``allowed=["escrow", "stream"]``. What the
toolkit leaves out the agent never sees; what ``caps.allowed_tools`` leaves out is also refused
at call time, so a tool object built by hand cannot bypass it.

What this module must never do: build a client the caller did not ask for when one was given,
or show the key (the context is excluded from ``repr`` and serialisation).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from langchain_core.tools import BaseTool, BaseToolkit
from pydantic import ConfigDict, Field

from pf_metered.errors import InvalidInput
from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.langchain.escrow import (
    EscrowCreateTool,
    EscrowListTool,
    EscrowRefundTool,
    EscrowReleaseTool,
    EscrowStatusTool,
)
from pf_metered.langchain.faucet import FaucetClaimTool
from pf_metered.langchain.streams import (
    StreamCloseTool,
    StreamListTool,
    StreamOpenTool,
    StreamRecordTool,
    StreamStatusTool,
)
from pf_metered.tools import ALL_TOOL_NAMES, TOOLS, Caps, ToolContext

__all__ = ["TOOL_CLASSES", "PurpleFleaToolkit"]

TOOL_CLASSES: tuple[type[PurpleFleaTool], ...] = (
    EscrowCreateTool,
    EscrowReleaseTool,
    EscrowStatusTool,
    EscrowListTool,
    FaucetClaimTool,
    StreamOpenTool,
    StreamStatusTool,
    StreamRecordTool,
    StreamCloseTool,
    StreamListTool,
    EscrowRefundTool,
)
"""The LangChain class of every shared tool definition, in the same order."""

_FAMILIES: dict[str, frozenset[str]] = {
    family: frozenset(t.name for t in TOOLS if t.family == family)
    for family in ("escrow", "stream", "faucet")
}


def resolve_allowed(allowed: Iterable[str] | None) -> frozenset[str]:
    """Tool names from a mix of tool and family names; ``InvalidInput`` for an unknown one."""
    if allowed is None:
        return frozenset(ALL_TOOL_NAMES)
    if isinstance(allowed, str):
        allowed = [allowed]
    names: set[str] = set()
    for item in allowed:
        if item in _FAMILIES:
            names |= _FAMILIES[item]
        elif item in ALL_TOOL_NAMES:
            names.add(item)
        else:
            raise InvalidInput(
                "allowed",
                f"names no tool or family: {item!r}; tools: {list(ALL_TOOL_NAMES)}, "
                f"families: {sorted(_FAMILIES)}",
            )
    return frozenset(names)


class PurpleFleaToolkit(BaseToolkit):
    """The Purple Flea escrow and payment-stream tools, sharing one :class:`ToolContext`.

    Give ``client`` (an ``EscrowClient``), ``async_client`` (an ``AsyncEscrowClient``), both,
    or a ready ``context``; with none, a client is configured from ``PF_API_KEY``. ``caps``
    bound every call; ``allowed`` narrows the tools by name or family.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Any = Field(default=None, exclude=True, repr=False)
    async_client: Any = Field(default=None, exclude=True, repr=False)
    caps: Caps | None = None
    allowed: frozenset[str] = Field(default_factory=lambda: frozenset(ALL_TOOL_NAMES))
    context: ToolContext | None = Field(default=None, exclude=True, repr=False)

    def __init__(
        self,
        *,
        client: Any = None,
        async_client: Any = None,
        caps: Caps | None = None,
        allowed: Iterable[str] | None = None,
        context: ToolContext | None = None,
        **kwargs: Any,
    ) -> None:
        if context is None:
            if client is None and async_client is None:
                from pf_metered.client import EscrowClient

                client = EscrowClient()
            context = ToolContext(client, async_client, caps=caps, **kwargs)
        elif caps is not None or kwargs:
            raise InvalidInput("context", "already carries its caps; pass caps to ToolContext")
        super().__init__(
            client=context.client,
            async_client=context.async_client,
            caps=context.caps,
            allowed=resolve_allowed(allowed),
            context=context,
        )

    @property
    def tool_context(self) -> ToolContext:
        """The shared context (streams opened by the agent, money locked, caps)."""
        assert self.context is not None
        return self.context

    def get_tools(self) -> list[BaseTool]:
        """The allowed tools (toolkit ``allowed`` and ``caps.allowed_tools``), in a fixed order."""
        ctx = self.tool_context
        return [
            cls(context=ctx)
            for cls in TOOL_CLASSES
            if cls.definition.name in self.allowed and ctx.caps.allows(cls.definition.name)
        ]

    def get_tool(self, name: str) -> BaseTool:
        """One allowed tool by name (``KeyError`` if it is not offered)."""
        for tool in self.get_tools():
            if tool.name == name:
                return tool
        raise KeyError(f"{name!r} is not among this toolkit's tools")
