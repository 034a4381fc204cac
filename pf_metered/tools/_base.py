"""The shape of one tool definition, and the single entry point that runs it.

Why an entry point apart from the frameworks: every check that protects the operator's money
(the tool is allowed, the arguments validate, the caps hold) happens in :meth:`ToolDefinition.call`
and :meth:`ToolDefinition.acall`, so LangChain, MCP and any future adapter get them by calling
one method; an adapter cannot forget one.

What this module must never do: let a library exception other than a :class:`ToolError`
escape ``call``/``acall`` for a failure the agent could act on, or format money through float.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from pf_metered.errors import ConfigError, PFMeteredError
from pf_metered.tools.caps import ALL_TOOL_NAMES
from pf_metered.tools.context import ToolContext
from pf_metered.tools.errors import ToolError, explain, format_validation_error, offering

__all__ = ["Answer", "Family", "ToolDefinition", "render", "usable_tools"]

A = TypeVar("A", bound=BaseModel)
Answer = dict[str, Any]
"""What a handler returns: JSON-ready figures (money as decimal strings)."""
Family = Literal["escrow", "faucet", "stream"]


def render(answer: Answer) -> str:
    """The text the model reads: compact one-line JSON with the figures as strings."""
    return json.dumps(answer, separators=(", ", ": "), ensure_ascii=False)


def usable_tools(ctx: ToolContext, offered: Iterable[str] | None = None) -> frozenset[str]:
    """The tools a message may tell the model to call: those the adapter offers (``None``:
    all), that the operator's caps allow, and that this escrow service can run.

    Why the service: on the deployed dialect the faucet needs an agent id the tools do not know,
    and a service with no refund or listing call makes ``escrow_refund`` / ``escrow_list``
    answer "not supported"; suggesting them would send the model into a dead end.
    """
    names = {n for n in (ALL_TOOL_NAMES if offered is None else offered) if ctx.caps.allows(n)}
    client = ctx.client if ctx.client is not None else ctx.async_client
    if client is not None and ctx.dialect is not None:  # known once a request has been sent
        capabilities = client.capabilities
        if capabilities.dialect == "deployed":
            names.discard("faucet_claim")
        if not capabilities.supports_refund:
            names.discard("escrow_refund")
        if not capabilities.supports_listing:
            names.discard("escrow_list")
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class ToolDefinition(Generic[A]):
    """One tool: its name, what the model is told, its arguments, and its sync/async handlers.

    ``run``/``arun`` receive validated arguments and may raise library errors; ``call`` and
    ``acall`` add the operator's allow-list, validation of raw arguments, and the translation
    of failures into :class:`ToolError`.
    """

    name: str
    family: Family
    description: str
    args_schema: type[A]
    run: Callable[[ToolContext, A], Answer]
    arun: Callable[[ToolContext, A], Awaitable[Answer]]
    uses_caps: bool = False
    read_only: bool = False
    by_dialect: Mapping[str, str] | None = None
    """Descriptions for a tool that does different things on different API dialects (keyed by
    dialect name); ``description`` then covers them all, for a caller with no context."""

    def describe(self, ctx: ToolContext | None = None) -> str:
        """The description for the model: what the tool does on the context's dialect, with the
        operator's caps when they bind this tool."""
        text = self.description
        if ctx is not None and self.by_dialect:
            text = self.by_dialect.get(ctx.dialect or "", text)
        if ctx is None or not self.uses_caps:
            return text
        caps = ctx.caps.describe()
        return text if caps == "no caps" else f"{text} Limits: {caps}."

    def input_schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments (what MCP advertises as ``inputSchema``)."""
        return self.args_schema.model_json_schema()

    def parse(self, raw: Mapping[str, Any] | BaseModel | None) -> A:
        """Validate raw arguments; a ``ToolError`` naming every bad field if they are wrong."""
        if isinstance(raw, self.args_schema):
            return raw
        data = raw.model_dump() if isinstance(raw, BaseModel) else dict(raw or {})
        try:
            return self.args_schema.model_validate(data)
        except ValidationError as exc:
            raise ToolError(
                format_validation_error(self.name, exc), kind="invalid_argument"
            ) from None
        except PFMeteredError as exc:  # a validator that raised one of ours
            raise explain(exc, tool_name=self.name) from None

    def _allowed(self, ctx: ToolContext) -> None:
        if not ctx.caps.allows(self.name):
            raise ToolError(
                f"The operator does not allow {self.name}.",
                next_step="Do not call it again; if it is needed, ask the user to have the "
                "operator allow it.",
                kind="not_allowed",
            )

    def call_answer(
        self,
        ctx: ToolContext,
        raw: Mapping[str, Any] | BaseModel | None,
        *,
        offered: Iterable[str] | None = None,
    ) -> Answer:
        """Run the tool synchronously and return its figures.

        ``offered``: the tools the model has beside this one (``None``: every tool), so an
        error's next step names only tools it can call. A ``ConfigError`` (the developer's
        mistake, such as a sync call on an async-only context) is raised as it is, never
        turned into a message for the model.
        """
        self._allowed(ctx)
        args = self.parse(raw)
        with offering(usable_tools(ctx, offered)):
            try:
                return self.run(ctx, args)
            except (ToolError, ConfigError):
                raise
            except PFMeteredError as exc:
                raise explain(exc, tool_name=self.name) from None

    async def acall_answer(
        self,
        ctx: ToolContext,
        raw: Mapping[str, Any] | BaseModel | None,
        *,
        offered: Iterable[str] | None = None,
    ) -> Answer:
        """Run the tool asynchronously and return its figures (see :meth:`call_answer`)."""
        self._allowed(ctx)
        args = self.parse(raw)
        with offering(usable_tools(ctx, offered)):
            try:
                return await self.arun(ctx, args)
            except (ToolError, ConfigError):
                raise
            except PFMeteredError as exc:
                raise explain(exc, tool_name=self.name) from None

    def call(self, ctx: ToolContext, raw: Mapping[str, Any] | BaseModel | None = None) -> str:
        """Run the tool synchronously; the answer as text for the model."""
        return render(self.call_answer(ctx, raw))

    async def acall(
        self, ctx: ToolContext, raw: Mapping[str, Any] | BaseModel | None = None
    ) -> str:
        """Run the tool asynchronously; the answer as text for the model."""
        return render(await self.acall_answer(ctx, raw))
