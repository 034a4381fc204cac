"""``PurpleFleaToolkit``: every Purple Flea tool for one agent, narrowed to what it may do.

Why a toolkit: the operator decides once what an agent may do (which tools, which caps) and
hands ``toolkit.get_tools()`` to the agent constructor. Narrowing is by tool name or by family
(``"escrow"``, ``"stream"``, ``"faucet"``), as stripe's agent toolkit narrows by permission: an
agent allowed to pay but not to claim the faucet is ``allowed=["escrow", "stream"]``. What the
toolkit leaves out the agent never sees; what ``caps.allowed_tools`` leaves out is also refused
at call time, so a tool object built by hand cannot bypass it.

Per conversation: ``conversations=by_thread`` (or any key function of the run's config, e.g.
``by_context("user_id")``) gives each conversation its own :class:`ToolContext` — its own
streams, escrows and per-conversation caps — so thread B cannot list or close thread A's stream
(:mod:`pf_metered.langchain.conversations`).

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
from pf_metered.langchain.conversations import (
    ConversationKey,
    Conversations,
    conversation_tool_class,
)
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
from pf_metered.tools import ALL_TOOL_NAMES, TOOLS, Caps, ToolContext, ToolContexts

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

    ``conversations``: a key function (``by_thread``, ``by_context("user_id")``) or a ready
    :class:`Conversations`; then each conversation gets its own context, made from the same
    clients, ``caps`` and the other keyword arguments (``state=`` a shared
    :class:`~pf_metered.tools.ToolState`, ``store=``, ``auto_release_hours=``), and
    :attr:`tool_context` is the context of calls that name no conversation.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Any = Field(default=None, exclude=True, repr=False)
    async_client: Any = Field(default=None, exclude=True, repr=False)
    caps: Caps | None = None
    allowed: frozenset[str] = Field(default_factory=lambda: frozenset(ALL_TOOL_NAMES))
    context: ToolContext | None = Field(default=None, exclude=True, repr=False)
    conversations: Conversations | None = Field(default=None, exclude=True, repr=False)

    def __init__(
        self,
        *,
        client: Any = None,
        async_client: Any = None,
        caps: Caps | None = None,
        allowed: Iterable[str] | None = None,
        context: ToolContext | None = None,
        conversations: Conversations | ConversationKey | None = None,
        **kwargs: Any,
    ) -> None:
        if conversations is not None:
            if context is not None:
                raise InvalidInput(
                    "context", "give context (one for all) or conversations (one each), not both"
                )
            if not isinstance(conversations, Conversations):
                if client is None and async_client is None:
                    from pf_metered.client import EscrowClient

                    client = EscrowClient()
                conversations = Conversations(
                    ToolContexts(client, async_client, caps=caps, **kwargs), key=conversations
                )
            elif caps is not None or kwargs:
                raise InvalidInput(
                    "conversations", "already carries its caps; pass caps to ToolContexts"
                )
            context = conversations.default
        elif context is None:
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
            conversations=conversations,
        )

    @property
    def tool_context(self) -> ToolContext:
        """The shared context (streams opened by the agent, money locked, caps); per
        conversation, the context of calls that name no conversation."""
        assert self.context is not None
        return self.context

    def context_for(self, key: str | None) -> ToolContext:
        """The context of conversation ``key`` (a thread id, a user id), made on first use;
        without ``conversations``, the one shared context whatever the key."""
        if self.conversations is None:
            return self.tool_context
        return self.conversations.contexts.get(key)

    def _classes(self) -> list[type[PurpleFleaTool]]:
        """The classes of the allowed tools (toolkit ``allowed`` and ``caps.allowed_tools``)."""
        caps = self.tool_context.caps
        return [
            cls
            for cls in TOOL_CLASSES
            if cls.definition.name in self.allowed and caps.allows(cls.definition.name)
        ]

    @property
    def tool_names(self) -> frozenset[str]:
        """The names of the tools :meth:`get_tools` gives the model: all an error message may
        tell it to call (``pay_per_call(tool, toolkit=...)`` reads them too)."""
        return frozenset(cls.definition.name for cls in self._classes())

    def get_tools(self) -> list[BaseTool]:
        """The allowed tools (toolkit ``allowed`` and ``caps.allowed_tools``), in a fixed order;
        per conversation, their twins that act on the calling conversation's context."""
        ctx = self.tool_context
        classes = self._classes()
        offered = frozenset(cls.definition.name for cls in classes)  # what messages may name
        if self.conversations is None:
            return [cls(context=ctx, offered=offered) for cls in classes]
        return [
            conversation_tool_class(cls)(
                context=ctx, conversations=self.conversations, offered=offered
            )
            for cls in classes
        ]

    def get_tool(self, name: str) -> BaseTool:
        """One allowed tool by name (``KeyError`` if it is not offered)."""
        for tool in self.get_tools():
            if tool.name == name:
                return tool
        raise KeyError(f"{name!r} is not among this toolkit's tools")
