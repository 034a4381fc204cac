"""The one ``BaseTool`` subclass every Purple Flea LangChain tool is built on.

Why one base: a LangChain tool here is only an adapter. Its name, description, ``args_schema``
and both handlers come from a :class:`pf_metered.tools.ToolDefinition`, the same object the MCP
server serves, so the two can never drift. This class adds what LangChain expects: native
``_run``/``_arun``, ``ToolException`` with ``handle_tool_error=True`` (the model reads the
message and corrects itself), and validation errors that name the bad field instead of
LangChain's bare "Tool input validation error".

What this module must never do: let the API key reach ``repr``, ``model_dump`` or a message
(the context is excluded from both), or swallow a failure the agent did not cause (bugs still
raise).
"""

from __future__ import annotations

from typing import Any, ClassVar

from langchain_core.tools import BaseTool, ToolException
from pydantic import Field, ValidationError

from pf_metered.tools import ToolContext, ToolDefinition, ToolError, format_validation_error

__all__ = ["PurpleFleaTool", "ValidationMessage", "context_from_env"]


def context_from_env() -> ToolContext:
    """A context over an ``EscrowClient`` configured from ``PF_API_KEY`` (and friends)."""
    from pf_metered.client import EscrowClient

    return ToolContext(EscrowClient())


class ValidationMessage:
    """``handle_validation_error`` for a tool: one line per bad field, naming it.

    A small named callable rather than a bound method, so a tool's ``repr`` stays finite.
    """

    __slots__ = ("tool_name",)

    def __init__(self, tool_name: str) -> None:
        self.tool_name = tool_name

    def __call__(self, exc: Any) -> str:
        if isinstance(exc, ValidationError):
            return format_validation_error(self.tool_name, exc)
        return f"Invalid arguments for {self.tool_name}: {exc}. Fix them and call the tool again."

    def __repr__(self) -> str:
        return f"ValidationMessage({self.tool_name!r})"


class PurpleFleaTool(BaseTool):
    """A LangChain tool over one shared tool definition and a :class:`ToolContext`.

    Subclasses set ``definition``; ``name``, ``description`` and ``args_schema`` follow from it.
    Built without ``context``, a tool talks to the service configured by ``PF_API_KEY``.
    """

    definition: ClassVar[ToolDefinition]  # type: ignore[type-arg]

    name: str = ""
    description: str = ""
    context: ToolContext = Field(default_factory=context_from_env, exclude=True, repr=False)
    """The clients, caps and open streams this tool acts on (never shown or serialised)."""

    handle_tool_error: bool = True
    response_format: str = "content"  # type: ignore[assignment]

    def model_post_init(self, context: Any, /) -> None:
        """Describe the operator's caps to the model and name bad fields on validation errors."""
        super().model_post_init(context)
        if self.description == type(self).model_fields["description"].default:
            self.description = self.definition.describe(self.context)
        if not self.handle_validation_error:
            self.handle_validation_error = ValidationMessage(self.name)

    def _run(self, **kwargs: Any) -> str:
        """Run the shared definition; a ``ToolError`` becomes a ``ToolException``."""
        try:
            return self.definition.call(self.context, kwargs)
        except ToolError as exc:
            raise ToolException(exc.message) from exc

    async def _arun(self, **kwargs: Any) -> str:
        """Run the shared definition natively async (no thread unless the context is sync)."""
        try:
            return await self.definition.acall(self.context, kwargs)
        except ToolError as exc:
            raise ToolException(exc.message) from exc
