"""The one ``BaseTool`` subclass every Purple Flea LangChain tool is built on.

Why one base: a LangChain tool here is only an adapter. Its name, description, ``args_schema``
and both handlers come from a :class:`pf_metered.tools.ToolDefinition`, the same object the MCP
server serves, so the two can never drift. This class adds what LangChain expects: native
``_run``/``_arun``, ``ToolException`` with ``handle_tool_error=True`` (the model reads the
message and corrects itself), and validation errors that name the bad field instead of
LangChain's bare "Tool input validation error".

Answers are ``response_format="content_and_artifact"``: invoked with a tool call (as every
agent loop does), a tool returns a ``ToolMessage`` whose ``content`` is one short sentence for
the model (:func:`pf_metered.tools.summarize`: ids, state, amounts with their unit) and whose
``artifact`` is the answer's dict for the program: the same figures the MCP server sends as
``structuredContent``, money as decimal strings (``{"stream_id": "s1", "paid": "0.07", ...}``).
The artifact is never sent to a model; it stays in the agent's state (and checkpoints). A
failure is a ``ToolMessage`` with ``status="error"``, the message as content and the artifact
``{"error": kind, "message": text}`` (``kind`` as :class:`~pf_metered.tools.ToolError` has
it: ``insufficient_funds``, ``cap_exceeded``, ``invalid_argument``, ...; the MCP server's
error ``structuredContent`` is the same dict). Invoked with plain arguments (no tool call), a
tool returns the sentence only.

What this module must never do: let the API key reach ``repr``, ``model_dump`` or a message
(the context is excluded from both), or swallow a failure the agent did not cause (bugs still
raise).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, ClassVar

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, ToolException
from pydantic import Field, ValidationError

from pf_metered.tools import (
    Answer,
    ToolContext,
    ToolDefinition,
    ToolError,
    format_validation_error,
    summarize,
)

__all__ = ["ErrorArtifactTool", "PurpleFleaTool", "ValidationMessage", "context_from_env", "failed"]


def context_from_env() -> ToolContext:
    """A context over an ``EscrowClient`` configured from ``PF_API_KEY`` (and friends)."""
    from pf_metered.client import EscrowClient

    return ToolContext(EscrowClient())


_FAILURES: ContextVar[list[ToolError] | None] = ContextVar("pf_metered_tool_failures", default=None)
"""Where a running ``_run`` leaves its ``ToolError`` for :meth:`ErrorArtifactTool.run`
(LangChain runs ``_run`` in a copy of the caller's context, which shares this list)."""


def failed(exc: ToolError) -> ToolException:
    """The ``ToolException`` LangChain turns into an error message; ``exc`` kept for its kind."""
    failures = _FAILURES.get()
    if failures is not None:
        failures.append(exc)
    return ToolException(exc.message)


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


class ErrorArtifactTool(BaseTool):
    """A tool whose error ``ToolMessage`` carries ``{"error": kind, "message": text}``.

    Why a shared base: every tool of this package (the Purple Flea tools and ``pay_per_call``'s
    paid tools) must answer a failure in the same shape, so a program tells a spent budget
    from a typo the same way whichever tool refused. A ``_run`` raises :func:`failed` with its
    :class:`ToolError` to give the kind.
    """

    unrecorded_error_kind: ClassVar[str | None] = None
    """The kind of a handled error no ``_run`` recorded (``None``: leave its artifact alone)."""

    def _with_error_artifact(self, output: Any, failures: list[ToolError]) -> Any:
        """An error ``ToolMessage`` gets ``{"error": kind, "message": text}`` as its artifact:
        LangChain gives a handled ``ToolException`` no artifact, and a program (or a standard
        test) must be able to tell an insufficient balance from a typo without parsing text."""
        if isinstance(output, ToolMessage) and output.status == "error" and output.artifact is None:
            kind = failures[-1].kind if failures else self.unrecorded_error_kind
            if kind is not None:
                output.artifact = {"error": kind, "message": output.content}
        return output

    def run(self, tool_input: str | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """``BaseTool.run``, with a place for ``_run`` to leave the kind of its failure."""
        failures: list[ToolError] = []
        token = _FAILURES.set(failures)
        try:
            output = super().run(tool_input, *args, **kwargs)
        finally:
            _FAILURES.reset(token)
        return self._with_error_artifact(output, failures)

    async def arun(self, tool_input: str | dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        """``BaseTool.arun``, with a place for ``_arun`` to leave its failure (see :meth:`run`)."""
        failures: list[ToolError] = []
        token = _FAILURES.set(failures)
        try:
            output = await super().arun(tool_input, *args, **kwargs)
        finally:
            _FAILURES.reset(token)
        return self._with_error_artifact(output, failures)


class PurpleFleaTool(ErrorArtifactTool):
    """A LangChain tool over one shared tool definition and a :class:`ToolContext`.

    Subclasses set ``definition``; ``name``, ``description`` and ``args_schema`` follow from it.
    Built without ``context``, a tool talks to the service configured by ``PF_API_KEY``.
    """

    definition: ClassVar[ToolDefinition]  # type: ignore[type-arg]

    name: str = ""
    description: str = ""
    context: ToolContext = Field(default_factory=context_from_env, exclude=True, repr=False)
    """The clients, caps and open streams this tool acts on (never shown or serialised)."""

    offered: frozenset[str] | None = Field(default=None, exclude=True, repr=False)
    """The tools the model is given beside this one (the toolkit sets it), so an error's next
    step names only tools it can call; ``None`` (a tool built by hand): every tool the caps
    allow."""

    unrecorded_error_kind: ClassVar[str | None] = "invalid_argument"  # the schema refused

    handle_tool_error: bool = True
    response_format: str = "content_and_artifact"  # type: ignore[assignment]
    """``content``: the sentence the model reads; ``artifact``: the answer's figures (a dict)."""

    def model_post_init(self, context: Any, /) -> None:
        """Describe the operator's caps to the model and name bad fields on validation errors."""
        super().model_post_init(context)
        if self.description == type(self).model_fields["description"].default:
            self.description = self.definition.describe(self.context)
        if not self.handle_validation_error:
            self.handle_validation_error = ValidationMessage(self.name)

    def _run(
        self, run_manager: CallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> tuple[str, Answer]:
        """Run the shared definition: ``(sentence, figures)``; a ``ToolError`` becomes a
        ``ToolException``. ``run_manager`` is accepted (LangChain passes it) and not needed."""
        try:
            answer = self.definition.call_answer(self.context, kwargs, offered=self.offered)
        except ToolError as exc:
            raise failed(exc) from exc
        return summarize(self.name, answer), answer

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **kwargs: Any
    ) -> tuple[str, Answer]:
        """Run the shared definition natively async (no thread unless the context is sync)."""
        try:
            answer = await self.definition.acall_answer(self.context, kwargs, offered=self.offered)
        except ToolError as exc:
            raise failed(exc) from exc
        return summarize(self.name, answer), answer
