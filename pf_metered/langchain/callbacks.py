"""``MeteredCallbackHandler``: pay for any chat model, LLM, chain or agent per call or per token.

Attach it with ``callbacks=[handler]`` (on the model, or on an agent/chain invocation, which
hands it to every model call inside) and each LLM call is counted on a payment stream:

* ``unit="call"``: one unit per LLM call. The unit is *reserved* when the call starts, so a
  call the budget cannot pay is refused before the model runs (``BudgetExhausted`` is raised
  from the model call), and a call that fails gives its reservation back.
* ``unit="token"``: tokens from the answer's ``usage_metadata``. ``stream`` counts input plus
  output tokens at one rate; ``input_stream`` / ``output_stream`` count each kind on its own
  stream (its own rate) when input and output are priced separately.

Why ``on_llm_end`` and never ``on_llm_new_token``: when a LangChain model streams, the chunks
carry no per-token usage (counting chunks, or reading ``llm_output["token_usage"]``, gives 0 or
a wrong figure). The callback manager hands ``on_llm_end`` the *aggregated* generation, whose
``usage_metadata`` is the sum of every chunk's; it is the one number that is right for
``invoke``, ``ainvoke``, ``stream`` and ``astream`` alike.

What this handler must never do: perform I/O (recording only counts; the stream's own sender
pays), count a call that failed, pay more than a budget (tokens over the budget are counted in
``overflow`` and logged, and the next call is refused), or guess a token count the model did
not report (``on_missing_usage``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, Literal
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from pf_metered.errors import ConfigError, InvalidInput
from pf_metered.langchain import _units
from pf_metered.langchain._units import Meterable

__all__ = ["MeteredCallbackHandler", "TokenUsage", "usage_of"]

_log = logging.getLogger("pf_metered.langchain")

Unit = Literal["call", "token"]
MissingUsage = Literal["raise", "warn", "ignore"]


class TokenUsage(tuple[int, int]):
    """``(input_tokens, output_tokens)`` of one LLM call."""

    __slots__ = ()

    @property
    def input(self) -> int:
        return self[0]

    @property
    def output(self) -> int:
        return self[1]


def usage_of(response: LLMResult) -> TokenUsage | None:
    """The tokens an LLM call used, from its (aggregated) generations; ``None`` if unreported.

    Reads each chat generation's ``message.usage_metadata`` (summed over ``n`` generations of
    one call), then falls back to ``llm_output["token_usage"]`` (older integrations) and
    ``llm_output["usage"]``.
    """
    found = False
    tokens_in = tokens_out = 0
    for generations in response.generations:
        for gen in generations:
            if not isinstance(gen, ChatGeneration):
                continue
            usage = getattr(gen.message, "usage_metadata", None)
            if usage:
                found = True
                tokens_in += int(usage.get("input_tokens", 0) or 0)
                tokens_out += int(usage.get("output_tokens", 0) or 0)
    if found:
        return TokenUsage((tokens_in, tokens_out))
    output = response.llm_output or {}
    for key in ("token_usage", "usage"):
        usage = output.get(key)
        if isinstance(usage, dict) and usage:
            tokens_in = int(usage.get("prompt_tokens", usage.get("input_tokens", 0)) or 0)
            tokens_out = int(usage.get("completion_tokens", usage.get("output_tokens", 0)) or 0)
            if tokens_in or tokens_out:
                return TokenUsage((tokens_in, tokens_out))
    return None


class MeteredCallbackHandler(BaseCallbackHandler):
    """Count LLM calls or tokens on payment streams (see the module docstring).

    ``MeteredCallbackHandler(stream)`` pays one unit per call;
    ``MeteredCallbackHandler(stream, unit="token")`` pays per token (input + output);
    ``MeteredCallbackHandler(unit="token", input_stream=s_in, output_stream=s_out)`` prices
    input and output tokens separately. Works with sync and async models, streaming or not
    (it counts without I/O, so it runs inline in async code).
    """

    raise_error: bool = True
    run_inline: bool = True

    def __init__(
        self,
        stream: Meterable | None = None,
        unit: Unit = "call",
        *,
        input_stream: Meterable | None = None,
        output_stream: Meterable | None = None,
        on_missing_usage: MissingUsage = "raise",
    ) -> None:
        if unit not in ("call", "token"):
            raise InvalidInput("unit", f'must be "call" or "token", not {unit!r}')
        if on_missing_usage not in ("raise", "warn", "ignore"):
            raise InvalidInput("on_missing_usage", 'must be "raise", "warn" or "ignore"')
        if unit == "call":
            if stream is None or input_stream is not None or output_stream is not None:
                raise InvalidInput(
                    "stream",
                    'unit="call" needs exactly one stream (input/output streams '
                    'price tokens: use unit="token")',
                )
        elif stream is None and input_stream is None and output_stream is None:
            raise InvalidInput("stream", "give stream, input_stream and/or output_stream")
        self.stream = stream
        self.unit: Unit = unit
        self.input_stream = input_stream
        self.output_stream = output_stream
        self.on_missing_usage: MissingUsage = on_missing_usage
        self._lock = threading.Lock()
        self._reserved: dict[UUID, Meterable] = {}
        self.calls = 0
        """LLM calls that finished and were counted."""
        self.input_tokens = 0
        """Input tokens reported by finished calls (``unit="token"``)."""
        self.output_tokens = 0
        """Output tokens reported by finished calls (``unit="token"``)."""
        self.overflow = 0
        """Units the budget could not pay for (counted nowhere; the next call is refused)."""
        self.missing_usage = 0
        """Finished calls whose model reported no token usage."""

    def __repr__(self) -> str:
        return (
            f"<MeteredCallbackHandler unit={self.unit} calls={self.calls} "
            f"tokens={self.input_tokens}+{self.output_tokens} overflow={self.overflow}>"
        )

    def _streams(self) -> list[Meterable]:
        return [s for s in (self.stream, self.input_stream, self.output_stream) if s is not None]

    # -- start: refuse a call the budget cannot pay, before the model runs ----------------

    def _start(self, run_id: UUID) -> None:
        if self.unit == "call":
            assert self.stream is not None
            _units.reserve(self.stream, 1)
            with self._lock:
                self._reserved[run_id] = self.stream
            return
        for stream in self._streams():
            # Tokens are known only at the end; refuse now if not one more can be paid.
            _units.reserve(stream, 1)
            _units.cancel(stream, 1)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Hold one call's unit (or check the token budget) before the chat model runs."""
        self._start(run_id)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Hold one call's unit (or check the token budget) before a text LLM runs."""
        self._start(run_id)

    # -- end: count what the call used ----------------------------------------------------

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Count the finished call: its reserved unit, or its tokens from usage metadata."""
        if self.unit == "call":
            with self._lock:
                stream = self._reserved.pop(run_id, None)
            if stream is not None:
                _units.commit(stream, 1)
                with self._lock:
                    self.calls += 1
            return
        usage = usage_of(response)
        if usage is None:
            with self._lock:
                self.missing_usage += 1
            self._missing(run_id)
            return
        over = 0
        if self.stream is not None:
            over += _units.record_up_to(self.stream, usage.input + usage.output)
        if self.input_stream is not None:
            over += _units.record_up_to(self.input_stream, usage.input)
        if self.output_stream is not None:
            over += _units.record_up_to(self.output_stream, usage.output)
        with self._lock:
            self.calls += 1
            self.input_tokens += usage.input
            self.output_tokens += usage.output
            self.overflow += over
        if over:
            _log.warning(
                "budget exhausted: %d token(s) of LLM run %s could not be paid; further calls "
                "will be refused",
                over,
                run_id,
            )

    def _missing(self, run_id: UUID) -> None:
        message = (
            f"LLM run {run_id} reported no token usage, so its tokens cannot be paid for. "
            "Enable usage reporting on the model (e.g. stream_usage=True when streaming), or "
            'meter per call (unit="call").'
        )
        if self.on_missing_usage == "raise":
            raise ConfigError(message)
        if self.on_missing_usage == "warn":
            _log.warning(message)

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A failed call costs nothing: give its reserved unit back."""
        with self._lock:
            stream = self._reserved.pop(run_id, None)
        if stream is not None:
            _units.cancel(stream, 1)

    # -- helpers --------------------------------------------------------------------------

    @property
    def pending_calls(self) -> int:
        """Calls started and not yet finished (their units are reserved)."""
        with self._lock:
            return len(self._reserved)

    def streams(self) -> Sequence[Meterable]:
        """The streams this handler pays from."""
        return tuple(self._streams())
