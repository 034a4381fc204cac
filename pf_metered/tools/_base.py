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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ValidationError

from pf_metered.errors import PFMeteredError
from pf_metered.tools.context import ToolContext
from pf_metered.tools.errors import ToolError, explain, format_validation_error

__all__ = ["Answer", "Family", "ToolDefinition", "render"]

A = TypeVar("A", bound=BaseModel)
Answer = dict[str, Any]
"""What a handler returns: JSON-ready figures (money as decimal strings)."""
Family = Literal["escrow", "faucet", "stream"]


def render(answer: Answer) -> str:
    """The text the model reads: compact one-line JSON with the figures as strings."""
    return json.dumps(answer, separators=(", ", ": "), ensure_ascii=False)


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
                f"The operator does not allow {self.name}. Do not call it again.",
                kind="not_allowed",
            )

    def call_answer(self, ctx: ToolContext, raw: Mapping[str, Any] | BaseModel | None) -> Answer:
        """Run the tool synchronously and return its figures."""
        self._allowed(ctx)
        args = self.parse(raw)
        try:
            return self.run(ctx, args)
        except ToolError:
            raise
        except PFMeteredError as exc:
            raise explain(exc, tool_name=self.name) from None

    async def acall_answer(
        self, ctx: ToolContext, raw: Mapping[str, Any] | BaseModel | None
    ) -> Answer:
        """Run the tool asynchronously and return its figures."""
        self._allowed(ctx)
        args = self.parse(raw)
        try:
            return await self.arun(ctx, args)
        except ToolError:
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
