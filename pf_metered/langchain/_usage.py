"""Reading what an LLM call used from LangChain's callback payloads, and what to do without it.

The callback handler decides *what to bill*; this module only *reads*: the usage a call
reported, whether the answer came from an LLM cache, a documented token estimate for a call
that reported nothing, and whether an OpenAI-style chat model is configured to stream without
usage. Everything here is a pure function of LangChain objects, so the sync and async paths,
and tests, share it.

What this module must never do: perform I/O, call a model, load a tokenizer (``tiktoken``
fetches its tables from the network on first use), or return a float.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, Generation, LLMResult

__all__ = [
    "CHARS_PER_TOKEN",
    "TokenUsage",
    "estimate_tokens",
    "generations_of",
    "is_cache_hit",
    "model_key",
    "model_name",
    "streams_without_usage",
    "text_of",
    "usage_of",
]

CHARS_PER_TOKEN = 4
"""The estimate's ratio: about four characters of English text per token (OpenAI's published
rule of thumb for its tokenizers). Rounded up per text, so a non-empty text is at least 1."""


class TokenUsage(tuple[int, int]):
    """``(input_tokens, output_tokens)`` of one LLM call."""

    __slots__ = ()

    @property
    def input(self) -> int:
        return self[0]

    @property
    def output(self) -> int:
        return self[1]


def generations_of(response: LLMResult) -> list[Generation]:
    """Every generation of a response (``n`` answers of one call, or a partial stream's)."""
    return [gen for generations in response.generations for gen in generations]


def usage_of(response: LLMResult) -> TokenUsage | None:
    """The tokens an LLM call used, from its (aggregated) generations; ``None`` if unreported.

    Reads each chat generation's ``message.usage_metadata`` (summed over ``n`` generations of
    one call), then falls back to ``llm_output["token_usage"]`` (older integrations) and
    ``llm_output["usage"]``. A ``usage_metadata`` without token counts (a cache hit of an
    answer that had none carries only ``total_cost``) is not usage.
    """
    found = False
    tokens_in = tokens_out = 0
    for gen in generations_of(response):
        if not isinstance(gen, ChatGeneration):
            continue
        usage: Mapping[str, Any] | None = getattr(gen.message, "usage_metadata", None)
        if usage and ("input_tokens" in usage or "output_tokens" in usage):
            found = True
            tokens_in += int(usage.get("input_tokens", 0) or 0)
            tokens_out += int(usage.get("output_tokens", 0) or 0)
    if found:
        return TokenUsage((tokens_in, tokens_out))
    output = response.llm_output or {}
    for key in ("token_usage", "usage"):
        legacy = output.get(key)
        if isinstance(legacy, dict) and legacy:
            tokens_in = int(legacy.get("prompt_tokens", legacy.get("input_tokens", 0)) or 0)
            tokens_out = int(legacy.get("completion_tokens", legacy.get("output_tokens", 0)) or 0)
            if tokens_in or tokens_out:
                return TokenUsage((tokens_in, tokens_out))
    return None


def is_cache_hit(response: LLMResult) -> bool:
    """Whether every answer of a chat call came from LangChain's LLM cache (no request made).

    How it shows: on a cache hit ``BaseChatModel`` still fires ``on_chat_model_start`` and
    ``on_llm_end``, with the cached generations, and (langchain-core >= 0.3.73, "zero out
    token costs for cache hits") stamps each cached ``AIMessage``'s ``usage_metadata`` with
    ``"total_cost": 0``; no provider integration sets that key. Text LLMs (``BaseLLM``) fire
    no callback at all for a cached prompt, so they never reach here. An older langchain-core
    leaves no mark: its cache hits look like calls.
    """
    gens = generations_of(response)
    if not gens:
        return False
    for gen in gens:
        message = getattr(gen, "message", None)
        usage: Mapping[str, Any] | None = getattr(message, "usage_metadata", None)
        if not isinstance(message, AIMessage) or not usage or usage.get("total_cost", 1) != 0:
            return False
    return True


def text_of(message: BaseMessage) -> str:
    """What a message says, as a tokenizer would see it: text (or the JSON of content
    blocks) plus the JSON of any tool calls' arguments."""
    content = message.content
    text = content if isinstance(content, str) else json.dumps(content, default=str)
    if isinstance(message, AIMessage) and message.tool_calls:
        calls = [{"name": c["name"], "args": c["args"]} for c in message.tool_calls]
        text += json.dumps(calls, default=str)
    return text


def _chars_over_four(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)  # ceil, in integers


def estimate_tokens(
    prompt: Iterable[BaseMessage],
    answers: Iterable[Generation],
    count: Callable[[str], int] | None = None,
) -> TokenUsage:
    """A documented guess of a call's tokens: ``count(text)`` per message (default
    ``ceil(characters / 4)``, :data:`CHARS_PER_TOKEN`), prompt messages as input, the
    answers' text and tool calls as output. Used only where the model reported nothing."""
    counter = count or _chars_over_four
    tokens_in = sum(counter(text_of(m)) for m in prompt)
    tokens_out = 0
    for gen in answers:
        message = getattr(gen, "message", None)
        text = text_of(message) if isinstance(message, BaseMessage) else gen.text
        tokens_out += counter(text)
    for value in (tokens_in, tokens_out):
        if value.__class__ is not int or value < 0:
            raise ValueError(f"a token counter must return a non-negative int, not {value!r}")
    return TokenUsage((tokens_in, tokens_out))


# -- which model, and will it stream without usage -----------------------------------------


def model_key(serialized: Mapping[str, Any] | None) -> str:
    """A stable identity for a model's configuration: its class path and constructor
    arguments as LangChain serialises them (secrets masked), or the ``repr`` LangChain sends
    for a model it cannot serialise. Only compared, never shown."""
    if not serialized:
        return "?"
    config = serialized.get("kwargs", serialized.get("repr"))
    return json.dumps([serialized.get("id"), config], sort_keys=True, default=str)


def model_name(serialized: Mapping[str, Any] | None) -> str:
    """The model's class name for messages (never its arguments: they may hold a URL)."""
    ident = (serialized or {}).get("id")
    return str(ident[-1]) if isinstance(ident, list) and ident else "the chat model"


def _include_usage(options: object) -> bool | None:
    if isinstance(options, Mapping):
        value = options.get("include_usage")
        if isinstance(value, bool):
            return value
    return None


def _first_bool(*values: object) -> bool | None:
    for value in values:
        if isinstance(value, bool):
            return value
    return None


def streams_without_usage(
    model: object = None,
    *,
    serialized: Mapping[str, Any] | None = None,
    invocation_params: Mapping[str, Any] | None = None,
) -> bool:
    """Whether an OpenAI-style chat model (one with a ``stream_usage`` setting:
    ``ChatOpenAI``, ``AzureChatOpenAI`` and the integrations built on them) will stream
    without a usage chunk, so a ``stream()`` through it reports no tokens.

    Why this can be known: ``langchain-openai`` asks for usage while streaming
    (``stream_options.include_usage``) only when ``stream_usage`` resolves true — the call's
    ``stream_usage`` argument, then ``stream_options`` in the call or in ``model_kwargs``, then
    the field, which it turns on by itself only for OpenAI's own URL. Either the model object
    is read (its public fields) or, inside a callback, what LangChain serialised of it.
    """
    params = invocation_params or {}
    if model is not None:
        fields = getattr(type(model), "model_fields", {})
        if "stream_usage" not in fields:
            return False
        model_kwargs = getattr(model, "model_kwargs", None) or {}
        on = _first_bool(
            _include_usage(model_kwargs.get("stream_options")), getattr(model, "stream_usage", None)
        )
        return not on
    if not serialized:
        return False
    ident = serialized.get("id")
    name = str(ident[-1]) if isinstance(ident, list) and ident else ""
    kwargs = serialized.get("kwargs")
    kwargs = kwargs if isinstance(kwargs, Mapping) else {}
    if not name.endswith("ChatOpenAI"):
        return False
    model_kwargs = kwargs.get("model_kwargs")
    if not isinstance(model_kwargs, Mapping):
        model_kwargs = {}
    on = _first_bool(
        params.get("stream_usage"),
        _include_usage(params.get("stream_options")),
        _include_usage(model_kwargs.get("stream_options")),
        kwargs.get("stream_usage"),  # set by langchain-openai itself for OpenAI's own URL
    )
    return not on
