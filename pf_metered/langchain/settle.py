"""``SettleConversationMiddleware``: when an agent run ends, settle what its conversation left.

Why: a model that forgets ``stream_close`` leaves its budget locked in escrow, and at the
escrow's auto-release the *provider* gets the unused rest — the opposite of what a user who
walked away wants. This ``AgentMiddleware`` runs in ``after_agent`` / ``aafter_agent`` of every
run of ``create_agent`` and, for the run's own conversation only (its ``thread_id``, or whatever
key the :class:`~pf_metered.langchain.conversations.Conversations` use):

* ``on_exit="close"`` (default): closes every stream still open (pays what was counted,
  refunds the rest; async-opened streams too) and settles creates whose answer was lost;
* ``on_exit="report"``: closes nothing (a stream may be meant to span several turns of the
  thread) and only says what is open.

Either way the run's state gets ``conversation_settlement``: the receipts of what it closed,
what is still open (streams, and escrows made with ``escrow_create``, which are never refunded
behind the agent's back), what could not be closed and why, and the conversation's money
(``locked``, ``paid``, ``refunded``). Another conversation's streams are never touched.

What this module must never do: close a stream of another conversation, make a context for a
conversation that has none (a run that opened nothing is reported as such), or let a failed
close end the run with an exception (it is reported, and the stream stays journaled). Importing
it needs the ``langchain`` extra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from typing_extensions import NotRequired

from pf_metered.errors import InvalidInput, MissingExtra
from pf_metered.money import format_usdc
from pf_metered.tools import DEFAULT_KEY, ToolContext, ToolError, get_definition
from pf_metered.tools.streams import status_figures

try:
    from langchain.agents.middleware import AgentMiddleware, AgentState
    from langchain.agents.middleware.types import OmitFromInput
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("langchain", "SettleConversationMiddleware", missing=exc.name) from exc

from pf_metered.langchain.conversations import Conversations

if TYPE_CHECKING:
    from langchain_core.runnables import RunnableConfig
    from langgraph.runtime import Runtime

__all__ = ["OnExit", "SettleConversationMiddleware", "SettlementState"]

OnExit = Literal["close", "report"]
STATE_KEY = "conversation_settlement"


class SettlementState(AgentState[Any]):
    """The agent state with what the last run's conversation settled or left open."""

    conversation_settlement: NotRequired[Annotated[dict[str, Any], OmitFromInput]]


def _config() -> RunnableConfig | None:
    try:
        from langgraph.config import get_config

        return get_config()
    except RuntimeError:  # not inside a graph run
        return None


class SettleConversationMiddleware(AgentMiddleware[SettlementState, Any, Any]):
    """Close (or report) the streams a finished run's conversation left open.

    ``conversations``: the :class:`Conversations` of a per-conversation toolkit
    (``toolkit.conversations``), or one :class:`ToolContext` (a toolkit shared by every run,
    ``toolkit.tool_context``). ``on_exit``: ``"close"`` or ``"report"``.
    """

    state_schema = SettlementState

    def __init__(
        self, conversations: Conversations | ToolContext, *, on_exit: OnExit = "close"
    ) -> None:
        super().__init__()
        if not isinstance(conversations, Conversations | ToolContext):
            raise InvalidInput(
                "conversations", "must be toolkit.conversations (Conversations) or a ToolContext"
            )
        if on_exit not in ("close", "report"):
            raise InvalidInput("on_exit", f"must be 'close' or 'report', got {on_exit!r}")
        self.conversations = conversations
        self.on_exit: OnExit = on_exit

    @property
    def name(self) -> str:
        return "SettleConversationMiddleware"

    def _context(self) -> tuple[str, ToolContext | None]:
        source = self.conversations
        if isinstance(source, ToolContext):
            return DEFAULT_KEY, source
        config = _config()
        return source.key_of(config), source.find(config)

    # ----------------------------------------------------------------------- the hooks
    def after_agent(self, state: SettlementState, runtime: Runtime[Any]) -> dict[str, Any]:
        """Close (or report) this run's conversation's open streams; the report in state."""
        key, ctx = self._context()
        receipts, problems = [], []
        if ctx is not None and self.on_exit == "close":
            close = get_definition("stream_close")
            for entry in ctx.entries():
                if entry.receipt is None:
                    try:
                        receipts.append(close.call_answer(ctx, {"stream_id": entry.handle}))
                    except ToolError as exc:
                        problems.append(f"stream {entry.handle}: {exc.message}")
            ctx.settle_pending()  # creates whose answer was lost: closed or refunded
        return {STATE_KEY: _report(key, ctx, self.on_exit, receipts, problems)}

    async def aafter_agent(self, state: SettlementState, runtime: Runtime[Any]) -> dict[str, Any]:
        """Async twin of :meth:`after_agent` (closes natively async)."""
        key, ctx = self._context()
        receipts, problems = [], []
        if ctx is not None and self.on_exit == "close":
            close = get_definition("stream_close")
            for entry in ctx.entries():
                if entry.receipt is None:
                    try:
                        receipts.append(await close.acall_answer(ctx, {"stream_id": entry.handle}))
                    except ToolError as exc:
                        problems.append(f"stream {entry.handle}: {exc.message}")
            await ctx.asettle_pending()
        return {STATE_KEY: _report(key, ctx, self.on_exit, receipts, problems)}


def _report(
    key: str,
    ctx: ToolContext | None,
    on_exit: OnExit,
    receipts: list[dict[str, Any]],
    problems: list[str],
) -> dict[str, Any]:
    """What the conversation settled and what it still holds, as JSON-ready figures."""
    report: dict[str, Any] = {
        "conversation": key,
        "on_exit": on_exit,
        "closed": receipts,
        "open_streams": [],
        "open_escrows": [],
        "problems": problems,
        "locked": "0.00",
        "paid": "0.00",
        "refunded": "0.00",
    }
    if ctx is None:
        return report
    report["open_streams"] = [
        status_figures(e, e.stream.status()) for e in ctx.entries() if e.receipt is None
    ]
    report["open_escrows"] = [
        {
            "escrow_id": e.escrow_id,
            "provider": e.provider,
            "remaining": format_usdc(e.remaining_micro),
            "auto_release_at": e.auto_release_at,
        }
        for e in ctx.book.escrows(open_only=True)
    ]
    report["problems"] += [p.describe() for p in ctx.pending_creates()]
    report.update(ctx.book.figures().as_answer())
    return report
