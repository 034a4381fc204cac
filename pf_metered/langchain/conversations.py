"""Per-conversation tool state for LangChain: each thread (or user) has its own streams.

Why: one agent built with ``create_agent`` and a checkpointer serves many conversations, told
apart by the ``thread_id`` in each run's ``configurable`` (or by a user id in the agent's
runtime context). With one shared :class:`~pf_metered.tools.ToolContext`, thread B could list
and close thread A's stream. Here every tool call finds its conversation's context from its own
``RunnableConfig`` (LangChain hands a tool's ``_run`` the config when it asks for a parameter
typed ``RunnableConfig``), so ``s1`` of thread A is simply unknown to thread B.

* :func:`by_thread` (default), :func:`by_configurable` and :func:`by_context` say which key a
  run belongs to; any ``Callable[[RunnableConfig], str | None]`` will do. A call with no key
  belongs to the ``"default"`` conversation.
* :class:`Conversations` is a :class:`~pf_metered.tools.ToolContexts` plus that key function.
* :func:`conversation_tool_class` turns a tool class into its per-conversation twin (the same
  name, description, schema, answers and standard-test behaviour; only the context differs).

Caps: ``max_budget``, ``max_rate``, ``max_total``, ``max_open_streams`` bind each conversation,
``max_locked`` and ``max_spend`` all of them together (see :mod:`pf_metered.tools.contexts`).

What this module must never do: import LangGraph or ``langchain`` at import (the agent runtime
is read lazily, by :func:`by_context` only), or let a call reach a context other than its own
conversation's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.runnables import RunnableConfig
from pydantic import Field

from pf_metered.errors import InvalidInput
from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.tools import DEFAULT_KEY, ToolContext, ToolContexts

__all__ = [
    "ConversationKey",
    "ConversationTool",
    "Conversations",
    "by_configurable",
    "by_context",
    "by_thread",
    "conversation_tool_class",
]

ConversationKey = Callable[[RunnableConfig], "str | None"]
"""Which conversation a run belongs to, from its config (``None``: the default one)."""

_NO_CONFIG: RunnableConfig = {}  # never mutated: a call made outside any run


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def by_configurable(name: str) -> ConversationKey:
    """The key is ``config["configurable"][name]`` (``by_configurable("user_id")``)."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("name", "must name a configurable field")

    def key(config: RunnableConfig) -> str | None:
        return _text((config.get("configurable") or {}).get(name))

    key.__name__ = key.__qualname__ = f"by_configurable({name!r})"
    return key


by_thread: ConversationKey = by_configurable("thread_id")
"""The key is the run's ``thread_id`` (what a checkpointer keeps a conversation under)."""


def by_context(name: str) -> ConversationKey:
    """The key is field ``name`` of the agent's runtime context (``create_agent(...,
    context_schema=Ctx)`` then ``agent.invoke(..., context=Ctx(user_id="u1"))``): an attribute
    or a mapping key. Outside an agent run (no runtime) the key is ``None``."""
    if not isinstance(name, str) or not name:
        raise InvalidInput("name", "must name a field of the runtime context")

    def key(config: RunnableConfig) -> str | None:
        try:
            from langgraph.runtime import get_runtime

            runtime: Any = get_runtime()
        except (ImportError, RuntimeError, KeyError):  # not inside a graph run
            return None
        context = getattr(runtime, "context", None)
        if context is None:
            return None
        if isinstance(context, Mapping):
            return _text(context.get(name))
        return _text(getattr(context, name, None))

    key.__name__ = key.__qualname__ = f"by_context({name!r})"
    return key


class Conversations:
    """One :class:`ToolContext` per conversation, found from a run's config by ``key``."""

    def __init__(self, contexts: ToolContexts, key: ConversationKey = by_thread) -> None:
        if not isinstance(contexts, ToolContexts):
            raise InvalidInput("contexts", "must be a ToolContexts")
        if not callable(key):
            raise InvalidInput("key", "must be a function of the run's RunnableConfig")
        self.contexts = contexts
        self.key = key

    def __repr__(self) -> str:
        name = getattr(self.key, "__name__", "key")
        return f"Conversations(key={name}, {self.contexts!r})"

    def key_of(self, config: RunnableConfig | None) -> str:
        """The conversation ``config`` belongs to (``"default"`` when it names none)."""
        return _text(self.key(config or {})) or DEFAULT_KEY

    def context_for(self, config: RunnableConfig | None) -> ToolContext:
        """The context of the conversation ``config`` belongs to, made on first use."""
        return self.contexts.get(self.key_of(config))

    def find(self, config: RunnableConfig | None) -> ToolContext | None:
        """That context if the conversation has one (never makes one)."""
        return self.contexts.find(self.key_of(config))

    @property
    def default(self) -> ToolContext:
        """The context of calls that name no conversation."""
        return self.contexts.get(DEFAULT_KEY)


class ConversationTool(PurpleFleaTool):
    """Base of the per-conversation twin of a tool: runs against the calling conversation's
    context. Build twins with :func:`conversation_tool_class`; ``context`` (the default
    conversation's) only serves the description."""

    conversations: Conversations = Field(exclude=True, repr=False)

    def _bound(self, config: RunnableConfig) -> PurpleFleaTool:
        """This tool, acting on the context of the conversation ``config`` belongs to (a
        shallow copy per call: tool objects are shared by parallel calls)."""
        bound: PurpleFleaTool = self.model_copy(
            update={"context": self.conversations.context_for(config)}
        )
        return bound

    # LangChain passes the run's config to a ``_run``/``_arun`` parameter typed RunnableConfig
    def _run(
        self,
        run_manager: CallbackManagerForToolRun | None = None,
        *,
        config: RunnableConfig = _NO_CONFIG,
        **kwargs: Any,
    ) -> Any:
        return PurpleFleaTool._run(self._bound(config), run_manager, **kwargs)

    async def _arun(
        self,
        run_manager: AsyncCallbackManagerForToolRun | None = None,
        *,
        config: RunnableConfig = _NO_CONFIG,
        **kwargs: Any,
    ) -> Any:
        return await PurpleFleaTool._arun(self._bound(config), run_manager, **kwargs)


_TWINS: dict[type[PurpleFleaTool], type[ConversationTool]] = {}
_TWINS_LOCK = threading.Lock()


def conversation_tool_class(cls: type[PurpleFleaTool]) -> type[ConversationTool]:
    """The per-conversation twin of tool class ``cls`` (made once, then reused).

    The twin subclasses ``cls`` first (its name, description and schema win) and
    :class:`ConversationTool` second (its ``_run``/``_arun``, which pick the context)."""
    with _TWINS_LOCK:
        twin = _TWINS.get(cls)
        if twin is None:
            name = cls.__name__.removesuffix("Tool") + "ConversationTool"
            namespace = {"__module__": __name__, "__doc__": cls.__doc__}
            twin = type(name, (cls, ConversationTool), namespace)
            _TWINS[cls] = twin
    return twin
