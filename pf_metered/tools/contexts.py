"""``ToolContexts``: one :class:`~pf_metered.tools.ToolContext` per conversation.

Why: an agent serving many conversations (LangChain threads, users, MCP sessions) must not let
one of them see, feed or close another's streams and escrows, and the operator wants limits per
conversation as well as across them. Each key (a thread id, a user id) gets its own context —
its own stream registry, its own short ids (``s1`` in two conversations are two streams), its
own book — made on first use from one set of clients and one :class:`Caps`.

How the caps divide: ``max_budget``, ``max_rate``, ``max_total``, ``max_open_streams`` and the
allow-lists bind each conversation on its own; ``max_locked`` and ``max_spend`` are counted over
the one :class:`~pf_metered.tools.ToolState` every context's book lives in, so they are the
global caps: they bind all conversations together (checked and held under the state's lock, in
integer micro-USDC, so parallel conversations cannot pass them between them). So
``Caps(max_total="5", max_locked="50")`` is "5 USDC per conversation, 50 across all".

What this module must never do: hand one key's context to another key, make a context for a
key only to look at it (:meth:`ToolContexts.find` does not create), or lose a context that
still holds open streams (contexts are forgotten only by :meth:`ToolContexts.forget`, which
refuses while streams are open).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pf_metered.errors import ConfigError, InvalidInput
from pf_metered.tools.caps import Caps
from pf_metered.tools.context import ToolContext, require_a_client
from pf_metered.tools.state import Figures, ToolState

if TYPE_CHECKING:
    from pf_metered.client import AsyncEscrowClient, EscrowClient
    from pf_metered.meter.receipt import Receipt
    from pf_metered.meter.store import Store

__all__ = ["DEFAULT_KEY", "ToolContexts"]

DEFAULT_KEY = "default"
"""The conversation of calls that carry no key (no ``thread_id``, no user id)."""


class ToolContexts:
    """A :class:`ToolContext` per conversation key, made on first use (thread-safe).

    ``client``/``async_client``, ``caps``, ``store`` and ``auto_release_hours`` are given to
    every context. ``state`` is the one :class:`ToolState` all their books live in (default: a
    throwaway in-memory one); each key's book is owned by ``f"{owner_prefix}:{key}"``. The caps'
    ``max_locked`` and ``max_spend`` bind all conversations together, the others each one.
    """

    def __init__(
        self,
        client: EscrowClient | None = None,
        async_client: AsyncEscrowClient | None = None,
        *,
        caps: Caps | None = None,
        store: Store | None = None,
        auto_release_hours: int | None = None,
        state: ToolState | None = None,
        owner_prefix: str = "conversation",
    ) -> None:
        require_a_client("ToolContexts", client, async_client)
        if not owner_prefix:
            raise InvalidInput("owner_prefix", "must not be empty")
        self.client = client
        self.async_client = async_client
        self.caps = caps if caps is not None else Caps()
        self.store = store
        self.auto_release_hours = auto_release_hours
        self.state = state if state is not None else ToolState()
        self.owner_prefix = owner_prefix
        self._lock = threading.Lock()
        self._contexts: dict[str, ToolContext] = {}

    def __repr__(self) -> str:
        return f"ToolContexts(conversations={len(self._contexts)}, caps={self.caps.describe()!r})"

    @staticmethod
    def _key(key: str | None) -> str:
        if key is None:
            return DEFAULT_KEY
        if not isinstance(key, str):
            raise InvalidInput("key", f"must be text, got {type(key).__name__}")
        return key.strip() or DEFAULT_KEY

    def get(self, key: str | None) -> ToolContext:
        """The context of conversation ``key`` (``None`` or blank: :data:`DEFAULT_KEY`),
        made on first use."""
        name = self._key(key)
        with self._lock:
            ctx = self._contexts.get(name)
            if ctx is None:
                ctx = ToolContext(
                    self.client,
                    self.async_client,
                    caps=self.caps,
                    store=self.store,
                    auto_release_hours=self.auto_release_hours,
                    book=self.state.book(f"{self.owner_prefix}:{name}"),
                )
                self._contexts[name] = ctx
        return ctx

    def find(self, key: str | None) -> ToolContext | None:
        """The context of ``key`` if that conversation has one (never makes one)."""
        with self._lock:
            return self._contexts.get(self._key(key))

    def keys(self) -> list[str]:
        """Every conversation that has a context, in the order they were made."""
        with self._lock:
            return list(self._contexts)

    def forget(self, key: str | None) -> bool:
        """Drop the context of ``key`` once nothing of it is open; ``False`` if it had none.

        Its book rows stay in the state (the lifetime ``max_spend`` is their sum)."""
        name = self._key(key)
        with self._lock:
            ctx = self._contexts.get(name)
            if ctx is None:
                return False
            if any(e.receipt is None for e in ctx.entries()) or ctx.pending_creates():
                raise ConfigError(
                    f"conversation {name!r} still has open streams or unsettled creates; "
                    "close them first (close(key) or aclose(key))"
                )
            del self._contexts[name]
        return True

    def close(self, key: str | None) -> list[Receipt]:
        """Close what conversation ``key`` left open (see :meth:`ToolContext.close_all`)."""
        ctx = self.find(key)
        return [] if ctx is None else ctx.close_all()

    async def aclose(self, key: str | None) -> list[Receipt]:
        """:meth:`close` for async code."""
        ctx = self.find(key)
        return [] if ctx is None else await ctx.aclose_all()

    def close_all(self) -> dict[str, list[Receipt]]:
        """Close every conversation's open streams; the receipts by conversation."""
        return {key: self.close(key) for key in self.keys()}

    async def aclose_all(self) -> dict[str, list[Receipt]]:
        """:meth:`close_all` for async code."""
        return {key: await self.aclose(key) for key in self.keys()}

    def figures(self) -> Figures:
        """Locked, paid, refunded and committed money of all conversations together."""
        return self.state.figures()
