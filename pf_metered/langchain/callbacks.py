"""``MeteredCallbackHandler``: pay for any chat model, LLM, chain or agent per call or per token.

Attach it with ``callbacks=[handler]`` (on the model, or on an agent/chain invocation, which
hands it to every model call inside), or ``handler.attach(model)``, and each LLM call is
counted on a payment stream through the stream's public counting API (``reserve`` /
``commit`` / ``cancel`` / ``record_up_to``):

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
``invoke``, ``ainvoke``, ``stream``, ``astream`` and ``batch`` alike.

Only work that happened is billed:

* **Cache hits** (``set_llm_cache(InMemoryCache())`` or the model's ``cache=``) make no request
  and cost nothing (``bill_cache_hits=False``, the default): LangChain still reports the call,
  with the cached message's ``usage_metadata`` stamped ``total_cost: 0``, and the handler gives
  its reservation back. ``cache_hits`` counts them.
* **No usage reported** (a server without usage, ``ChatOpenAI`` streaming without
  ``stream_usage``): the answer is never lost; the call is billed by ``on_missing_usage``:
  ``"estimate"`` (default) bills :func:`~pf_metered.langchain._usage.estimate_tokens` —
  ``ceil(characters / 4)`` per message, or ``count_tokens(text)`` if given — and logs once per
  model; ``"per_call"`` bills the declared ``per_call_tokens=(input, output)``; ``"warn"`` bills
  nothing and logs each call; ``"raise"`` never bills a guess: a model whose configuration
  says it will not report usage (``ChatOpenAI`` streaming without ``stream_usage``) is refused
  at ``attach()`` and before each call, ``invoke`` too, with ``ConfigError`` naming the fix;
  one that turns out not to report keeps the answer it gave (billed nothing, logged) and its
  *next* call is refused before it runs — raising after the answer came back would lose it.
  Why ``"estimate"`` is the default: the provider did the work and charges for it; billing
  nothing (``"warn"``) underpays silently, ``"per_call"`` needs a figure only the user knows,
  and ``"raise"`` refuses work; an estimate, logged with the fix, is the closest to the truth.
* **An abandoned stream** (the caller stops reading: ``break`` out of ``for chunk in
  model.stream(...)``, ``aclose()``, a cancelled task) is billed what came back so far: the
  usage the chunks seen carry where the provider reports it early, else ``on_missing_usage``
  on the chunks seen (an estimate of the prompt and of the text received). LangChain reports
  it as ``on_llm_error(GeneratorExit | CancelledError)`` with the chunks so far. What happens
  otherwise: a sync ``break`` closes the generator at once (CPython); an ``async for`` left by
  ``break`` is closed only when the event loop finalises it, so wrap it in
  ``contextlib.aclosing(model.astream(...))`` to be billed at the ``break``; a stream
  abandoned before its first chunk, and a call that fails, are billed nothing (no way to know
  the provider did any work). A provider usually generates, and charges, the whole answer
  after the client left; that difference is not seen by the handler.

When attached to a ``ChatOpenAI`` that will stream without usage (a custom ``base_url``
leaves ``stream_usage`` off), the handler warns once — at ``attach()``, else at the model's
first call — with the fix: ``ChatOpenAI(..., stream_usage=True)``.

What this handler must never do: perform I/O (recording only counts; the stream's own sender
pays), reach into a stream's private state, count a call that failed or a cache hit, pay more
than a budget (tokens over the budget are counted in ``overflow`` and logged, and the next
call is refused), or lose an answer that already came back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler, BaseCallbackManager
from langchain_core.load import dumpd
from langchain_core.messages import BaseMessage, HumanMessage
from langchain_core.outputs import LLMResult

from pf_metered.errors import ConfigError, InvalidInput
from pf_metered.langchain import _units
from pf_metered.langchain._units import Meterable
from pf_metered.langchain._usage import (
    TokenUsage,
    estimate_tokens,
    generations_of,
    is_cache_hit,
    model_key,
    model_name,
    streams_without_usage,
    usage_of,
)

__all__ = ["MeteredCallbackHandler", "TokenUsage", "usage_of"]

_log = logging.getLogger("pf_metered.langchain")

Unit = Literal["call", "token"]
MissingUsage = Literal["estimate", "per_call", "warn", "raise"]
_MISSING = ("estimate", "per_call", "warn", "raise")
_ABANDONED = (GeneratorExit, asyncio.CancelledError)
"""What LangChain reports when the *caller* stopped a call (not the provider failing)."""

M = TypeVar("M")

_FIX = (
    "Fix: ChatOpenAI(..., stream_usage=True) if the server supports "
    "stream_options.include_usage (OpenAI-compatible servers mostly do)"
)


@dataclass(slots=True)
class _Run:
    """One LLM call between its start and end callbacks."""

    key: str
    name: str
    prompt: list[BaseMessage] = field(default_factory=list)
    stream: Meterable | None = None
    token: int = 0


class MeteredCallbackHandler(BaseCallbackHandler):
    """Count LLM calls or tokens on payment streams (see the module docstring).

    ``MeteredCallbackHandler(stream)`` pays one unit per call;
    ``MeteredCallbackHandler(stream, unit="token")`` pays per token (input + output);
    ``MeteredCallbackHandler(unit="token", input_stream=s_in, output_stream=s_out)`` prices
    input and output tokens separately. ``bill_cache_hits``, ``on_missing_usage``,
    ``per_call_tokens`` and ``count_tokens`` say what a call that made no request, or
    reported no usage, costs. Works with sync and async models, streaming or not (it counts
    without I/O, so it runs inline in async code: one code path for both).
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
        on_missing_usage: MissingUsage = "estimate",
        per_call_tokens: tuple[int, int] | None = None,
        count_tokens: Callable[[str], int] | None = None,
        bill_cache_hits: bool = False,
    ) -> None:
        if unit not in ("call", "token"):
            raise InvalidInput("unit", f'must be "call" or "token", not {unit!r}')
        if on_missing_usage not in _MISSING:
            raise InvalidInput(
                "on_missing_usage", 'must be "estimate", "per_call", "warn" or "raise"'
            )
        if on_missing_usage == "per_call":
            if (
                not isinstance(per_call_tokens, tuple)
                or len(per_call_tokens) != 2
                or any(n.__class__ is not int or n < 0 for n in per_call_tokens)
            ):
                raise InvalidInput(
                    "per_call_tokens",
                    'on_missing_usage="per_call" needs per_call_tokens=(input, output), the '
                    "tokens billed for a call that reports none (non-negative ints)",
                )
        elif per_call_tokens is not None:
            raise InvalidInput("per_call_tokens", 'is used only with on_missing_usage="per_call"')
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
        self.per_call_tokens = TokenUsage(per_call_tokens or (0, 0))
        self.count_tokens = count_tokens
        self.bill_cache_hits = bill_cache_hits
        self._lock = threading.Lock()
        self._runs: dict[UUID, _Run] = {}
        self._config_warned: set[str] = set()  # models warned about stream_usage
        self._usage_warned: set[str] = set()  # models whose missing usage was logged
        self._unbillable: set[str] = set()
        self.calls = 0
        """LLM calls that finished (or were abandoned after an answer began) and were billed."""
        self.input_tokens = 0
        """Input tokens billed for finished calls (``unit="token"``), estimates included."""
        self.output_tokens = 0
        """Output tokens billed for finished calls (``unit="token"``), estimates included."""
        self.overflow = 0
        """Units the budget could not pay for (counted nowhere; the next call is refused)."""
        self.missing_usage = 0
        """Billed calls whose model reported no token usage (then ``on_missing_usage``)."""
        self.estimated_tokens = 0
        """Of the billed tokens, how many were estimated or declared, not reported."""
        self.cache_hits = 0
        """Calls answered from an LLM cache (no request made; not billed by default)."""
        self.abandoned = 0
        """Streams the caller stopped reading after an answer began (billed what came)."""

    def __repr__(self) -> str:
        return (
            f"<MeteredCallbackHandler unit={self.unit} calls={self.calls} "
            f"tokens={self.input_tokens}+{self.output_tokens} overflow={self.overflow} "
            f"cache_hits={self.cache_hits}>"
        )

    def _streams(self) -> list[Meterable]:
        return [s for s in (self.stream, self.input_stream, self.output_stream) if s is not None]

    # -- attaching: say now what cannot be billed later -----------------------------------

    def attach(self, model: M) -> M:
        """Add this handler to ``model.callbacks`` (in place) and check the model now.

        Returns the same model (so ``create_agent(handler.attach(ChatOpenAI(...)))`` keeps
        its type). With ``unit="token"`` and a ``ChatOpenAI`` that will stream without usage,
        warns (``UserWarning``) once with the fix, or raises ``ConfigError`` when
        ``on_missing_usage="raise"``, before any call is made.
        """
        if self.unit == "token" and streams_without_usage(model):
            serialized = dumpd(model)
            self._config_problem(model_key(serialized), model_name(serialized), stacklevel=3)
        callbacks = getattr(model, "callbacks", None)
        if isinstance(callbacks, BaseCallbackManager):
            callbacks.add_handler(self, inherit=True)
        elif self not in (callbacks or []):
            model.callbacks = [*(callbacks or []), self]  # type: ignore[attr-defined]
        return model

    def _config_problem(self, key: str, name: str, *, stacklevel: int = 2) -> None:
        message = (
            f"{name} will stream without token usage (stream_usage is off: langchain-openai "
            "turns it on only for OpenAI's own URL), so its stream() calls report no tokens "
            f'and are billed by on_missing_usage="{self.on_missing_usage}". {_FIX}.'
        )
        if self.on_missing_usage == "raise":
            raise ConfigError(
                message + ' Or meter its streams otherwise: on_missing_usage="estimate" or '
                '"per_call".'
            )
        with self._lock:
            if key in self._config_warned:
                return
            self._config_warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=stacklevel)

    # -- start: refuse a call the budget cannot pay, before the model runs ----------------

    def _start(
        self,
        run_id: UUID,
        serialized: dict[str, Any] | None,
        prompt: list[BaseMessage],
        invocation_params: dict[str, Any] | None,
    ) -> None:
        key = model_key(serialized)
        run = _Run(key, model_name(serialized))
        if self.unit == "call":
            assert self.stream is not None
            run.stream = self.stream
            run.token = _units.reserve(self.stream, 1)
            with self._lock:
                self._runs[run_id] = run
            return
        if key not in self._config_warned and streams_without_usage(
            serialized=serialized, invocation_params=invocation_params
        ):
            self._config_problem(key, run.name)
        if self.on_missing_usage == "raise" and key in self._unbillable:
            raise ConfigError(
                f"{run.name} reported no token usage on an earlier call, and "
                'on_missing_usage="raise" refuses calls it cannot bill. Enable usage '
                "reporting on the model (e.g. stream_usage=True), or choose "
                'on_missing_usage="estimate" or "per_call".'
            )
        for stream in self._streams():
            # Tokens are known only at the end; refuse now if not one more can be paid.
            _units.cancel(stream, _units.reserve(stream, 1))
        run.prompt = prompt
        with self._lock:
            self._runs[run_id] = run

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
        prompt = [m for batch in messages for m in batch]
        self._start(run_id, serialized, prompt, kwargs.get("invocation_params"))

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
        prompt: list[BaseMessage] = [HumanMessage(p) for p in prompts]
        self._start(run_id, serialized, prompt, kwargs.get("invocation_params"))

    # -- end: count what the call used ----------------------------------------------------

    def on_llm_end(
        self,
        response: LLMResult,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """Count the finished call: its reserved unit, or its tokens (reported, else
        ``on_missing_usage``); a cache hit gives its reservation back."""
        with self._lock:
            run = self._runs.pop(run_id, None)
        if not self.bill_cache_hits and is_cache_hit(response):
            if run is not None and run.stream is not None:
                _units.cancel(run.stream, run.token)
            with self._lock:
                self.cache_hits += 1
            return
        self._bill(run, response, run_id, abandoned=False)

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        tags: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """A failed call costs nothing: give its reserved unit back. A stream the caller
        abandoned after its answer began is billed what came back (module docstring)."""
        with self._lock:
            run = self._runs.pop(run_id, None)
        response = kwargs.get("response")
        seen = isinstance(response, LLMResult) and bool(generations_of(response))
        if isinstance(error, _ABANDONED) and seen:
            assert isinstance(response, LLMResult)
            with self._lock:
                self.abandoned += 1
            try:
                self._bill(run, response, run_id, abandoned=True)
            except Exception:  # the stream is being closed: raising here would mask that
                _log.exception("could not bill the abandoned LLM run %s", run_id)
            return
        if run is not None and run.stream is not None:
            _units.cancel(run.stream, run.token)

    # -- billing: shared by a finished call and an abandoned stream -----------------------

    def _bill(
        self, run: _Run | None, response: LLMResult, run_id: UUID, *, abandoned: bool
    ) -> None:
        if self.unit == "call":
            if run is not None and run.stream is not None:
                unpaid = _units.commit(run.stream, run.token)
                with self._lock:
                    self.calls += 1
                    self.overflow += unpaid
            return
        run = run or _Run("?", "the chat model")
        usage = usage_of(response)
        estimated = 0
        if usage is None:
            usage = self._fallback(run, response, run_id, abandoned=abandoned)
            if usage is None:
                return
            estimated = usage.input + usage.output
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
            self.estimated_tokens += estimated
            self.overflow += over
        if over:
            _log.warning(
                "budget exhausted: %d token(s) of LLM run %s could not be paid; further calls "
                "will be refused",
                over,
                run_id,
            )

    def _fallback(
        self, run: _Run, response: LLMResult, run_id: UUID, *, abandoned: bool
    ) -> TokenUsage | None:
        """What a call without reported usage is billed (``None``: nothing)."""
        with self._lock:
            self.missing_usage += 1
            first = run.key not in self._usage_warned
            self._usage_warned.add(run.key)
        what = "abandoned stream" if abandoned else "call"
        base = f"{run.name} reported no token usage for LLM run {run_id} ({what})"
        fix = (
            "enable usage reporting on the model (ChatOpenAI: stream_usage=True) or meter per "
            'call (unit="call")'
        )
        mode = self.on_missing_usage
        if mode == "estimate":
            usage = estimate_tokens(run.prompt, generations_of(response), self.count_tokens)
            if first:
                _log.warning(
                    "%s: billed an estimate of %d+%d tokens (%s); to bill real figures, %s",
                    base,
                    usage.input,
                    usage.output,
                    "count_tokens" if self.count_tokens else "ceil(characters / 4)",
                    fix,
                )
            return usage
        if mode == "per_call":
            if first:
                _log.warning(
                    "%s: billed the declared per_call_tokens %d+%d", base, *self.per_call_tokens
                )
            return self.per_call_tokens
        if mode == "warn":
            _log.warning("%s: billed nothing (on_missing_usage=warn); %s", base, fix)
            return None
        # "raise": never bill a guess. The answer already came back, so it is kept (raising
        # now would lose it); this model's next call is refused before it runs. A stream the
        # caller abandoned says nothing about the model, so it does not count against it.
        if not abandoned:
            with self._lock:
                self._unbillable.add(run.key)
        _log.error(
            "%s: billed nothing (on_missing_usage=raise)%s; %s",
            base,
            "" if abandoned else "; its next call will be refused",
            fix,
        )
        return None

    # -- helpers --------------------------------------------------------------------------

    @property
    def pending_calls(self) -> int:
        """Calls started and not yet finished (per call: their units are reserved)."""
        with self._lock:
            return len(self._runs)

    def streams(self) -> Sequence[Meterable]:
        """The streams this handler pays from."""
        return tuple(self._streams())
