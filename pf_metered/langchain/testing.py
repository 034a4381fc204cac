"""``ScriptedChatModel``: a fake tool-calling chat model for tests, examples and dry runs.

Why our own fake: LangChain's fakes neither accept ``bind_tools`` (so no agent constructor
takes them) nor report ``usage_metadata`` when they stream, which is precisely what per-token
metering must get right. This model plays a script of answers; each step is an ``AIMessage``
(with ``tool_calls`` to drive an agent) or a function of the conversation so far (to use an id
a tool returned). It reports usage like a real provider: on the message for ``invoke``, and on
the *last* chunk only when streaming (the way OpenAI's ``stream_usage`` does), so a meter that
counted chunks, or read the first chunk, would be caught. Its async paths are native (no
worker thread), so an agent's ``ainvoke``/``astream`` stays on the event loop as it would
with a real async client.

``bind_tools`` works as a real model's does: it returns the model bound to the tools' names,
and every answer records which tools its call was offered (:attr:`ScriptedChatModel.offered`),
so a test can check what an agent constructor or a middleware really handed the model.

What this module must never do: touch the network, or be needed at import of anything else.
"""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field, PrivateAttr

__all__ = ["ScriptedChatModel", "Step", "count_words", "tool_call"]

Step = AIMessage | str | Callable[[Sequence[BaseMessage]], AIMessage | str]
"""One answer of the script: a message, plain text, or a function of the conversation."""


def count_words(messages: Sequence[BaseMessage]) -> int:
    """The fake's token count for messages: whitespace-separated words (at least 1 each)."""
    total = 0
    for message in messages:
        text = message.content if isinstance(message.content, str) else json.dumps(message.content)
        total += max(len(text.split()), 1)
    return total


_ids = iter(range(1, 10**12))
_ids_lock = threading.Lock()


def tool_call(name: str, /, **args: Any) -> dict[str, Any]:
    """A tool call for an ``AIMessage(tool_calls=[...])`` with a fresh id."""
    with _ids_lock:
        n = next(_ids)
    return {"name": name, "args": args, "id": f"call_{n}", "type": "tool_call"}


def _tool_name(tool: Any) -> str:
    """The name a provider would be told for one ``bind_tools`` entry."""
    if isinstance(tool, dict) and "function" not in tool and "name" in tool:
        return str(tool["name"])  # a provider-side tool, e.g. {"type": ..., "name": ...}
    spec = convert_to_openai_tool(tool)
    return str(spec.get("function", {}).get("name") or spec.get("name", ""))


class ScriptedChatModel(BaseChatModel):
    """Answers from a script, in order; accepts ``bind_tools``; reports token usage.

    ``usage`` (``True``): attach ``usage_metadata`` (input tokens = words of the prompt, output
    tokens = words of the answer plus 10 per tool call) unless a step's message has its own.
    ``False`` plays a model that reports no usage. After the script ends, it answers ``final``
    (text, no tool calls) so an agent stops. One instance is one conversation's script: agents
    built on it share its position, so build a fresh model per run.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    script: list[Any] = Field(default_factory=list)
    usage: bool = True
    final: str = "Done."
    _position: int = PrivateAttr(default=0)
    _offered: list[tuple[str, ...] | None] = PrivateAttr(default_factory=list)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "pf-metered-scripted"

    @property
    def calls(self) -> int:
        """How many answers the model has given."""
        return self._position

    @property
    def offered(self) -> list[tuple[str, ...] | None]:
        """Per answer given, the names of the tools its call was bound to (``None``: unbound)."""
        with self._lock:
            return list(self._offered)

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any
    ) -> Runnable[Any, AIMessage]:
        """Bind the tools' names (recorded per call); the script already knows what it calls.

        Like a real model, the result is a binding and this model is left unchanged; extra
        keyword arguments (``tool_choice``, ``parallel_tool_calls`` ...) are accepted and
        ignored.
        """
        return self.bind(tool_names=[_tool_name(t) for t in tools])

    def _next(self, messages: Sequence[BaseMessage], tool_names: Sequence[str] | None) -> AIMessage:
        with self._lock:
            index = self._position
            self._position += 1
            self._offered.append(None if tool_names is None else tuple(tool_names))
        step: Any = self.script[index] if index < len(self.script) else self.final
        if callable(step):
            step = step(messages)
        message = AIMessage(content=step) if isinstance(step, str) else step
        if self.usage and message.usage_metadata is None:
            tokens_in = count_words(messages)
            tokens_out = len(str(message.content).split()) + 10 * len(message.tool_calls)
            usage = cast(
                "UsageMetadata",
                {
                    "input_tokens": tokens_in,
                    "output_tokens": tokens_out,
                    "total_tokens": tokens_in + tokens_out,
                },
            )
            message = message.model_copy(update={"usage_metadata": usage})
        return message

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = self._next(messages, kwargs.get("tool_names"))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        """Native async: the script is played on the event loop, not in a worker thread."""
        message = self._next(messages, kwargs.get("tool_names"))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        for chunk in _chunks(self._next(messages, kwargs.get("tool_names"))):
            if run_manager:  # as provider integrations do, for every chunk (the last too)
                run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Native async streaming, chunk for chunk the same as :meth:`_stream`."""
        for chunk in _chunks(self._next(messages, kwargs.get("tool_names"))):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


def _chunks(message: AIMessage) -> Iterator[ChatGenerationChunk]:
    """An answer as a provider streams it: one chunk per word, then a last chunk carrying the
    tool calls and the usage (never earlier: a meter that read the first chunk would miss it).
    """
    words = str(message.content).split(" ") if message.content else []
    for i, word in enumerate(words):
        text = word if i == len(words) - 1 else word + " "
        yield ChatGenerationChunk(message=AIMessageChunk(content=text, id=message.id))
    last = AIMessageChunk(
        content="",
        id=message.id,
        tool_call_chunks=[
            tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
            for i, c in enumerate(message.tool_calls)
        ],
        usage_metadata=message.usage_metadata,
        chunk_position="last",
    )
    yield ChatGenerationChunk(message=last)
