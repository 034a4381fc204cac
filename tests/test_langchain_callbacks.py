"""MeteredCallbackHandler on a fake chat model that reports usage like a real one: per call and
per token, sync, async and streaming, with the sandbox ledger showing the exact payments."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import pytest
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate

from pf_metered.errors import BudgetExhausted, ConfigError, InvalidInput
from pf_metered.langchain import MeteredCallbackHandler
from pf_metered.langchain.testing import ScriptedChatModel, count_words
from pf_metered.stream import AsyncPaymentStream, PaymentStream

ANSWERS = ["one two three", "four five", "six seven eight nine", "ten"]


def _model(**kw) -> ScriptedChatModel:
    return ScriptedChatModel(script=list(ANSWERS), **kw)


def _expected_tokens(prompt: str) -> tuple[int, int]:
    from langchain_core.messages import HumanMessage

    tokens_in = count_words([HumanMessage(prompt)]) * len(ANSWERS)
    tokens_out = sum(len(a.split()) for a in ANSWERS)
    return tokens_in, tokens_out


def _paid(world, stream, rate: str, units: int) -> None:
    receipt = stream.receipt
    assert receipt is not None and receipt.units == units
    assert receipt.paid == Decimal(rate) * units


def test_validation_of_arguments(pf_world):
    s = PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1")
    with pytest.raises(InvalidInput, match="unit"):
        MeteredCallbackHandler(s, unit="byte")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="stream"):
        MeteredCallbackHandler(unit="call", input_stream=s)
    with pytest.raises(InvalidInput, match="stream"):
        MeteredCallbackHandler(unit="token")


# -- per call ------------------------------------------------------------------------------


def test_per_call_sync(pf_world):
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.01", budget="1", batch=2
    ) as stream:
        handler = MeteredCallbackHandler(stream)
        model = _model(callbacks=[handler])
        for _ in range(4):
            model.invoke("hi")
        assert handler.calls == 4 and handler.pending_calls == 0
    _paid(pf_world, stream, "0.01", 4)
    assert pf_world.balance() == Decimal("99.96")
    assert pf_world.balance("provider") == Decimal("0.0396")


def test_per_call_refuses_before_the_model_runs(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.5", max_units=2) as stream:
        handler = MeteredCallbackHandler(stream)
        model = _model()
        model.invoke("a", config={"callbacks": [handler]})
        model.invoke("b", config={"callbacks": [handler]})
        with pytest.raises(BudgetExhausted):
            model.invoke("c", config={"callbacks": [handler]})
        assert model.calls == 2  # the third call never reached the model
    assert stream.receipt is not None and stream.receipt.paid == Decimal("1.00")


def test_a_failed_call_costs_nothing(pf_world):
    def boom(_messages):
        raise RuntimeError("provider down")

    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as stream:
        handler = MeteredCallbackHandler(stream)
        model = ScriptedChatModel(script=["ok", boom, "ok again"], callbacks=[handler])
        model.invoke("x")
        with pytest.raises(RuntimeError):
            model.invoke("y")
        model.invoke("z")
        assert handler.calls == 2 and handler.pending_calls == 0
    _paid(pf_world, stream, "0.01", 2)


async def test_per_call_async_concurrent(pf_world):
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.001", budget="1", batch=10
    ) as stream:
        handler = MeteredCallbackHandler(stream)
        model = ScriptedChatModel(script=["x"] * 50, callbacks=[handler])
        await asyncio.gather(*(model.ainvoke(f"q{i}") for i in range(50)))
        assert handler.calls == 50
    _paid(pf_world, stream, "0.001", 50)
    await pf_world.aclient.aclose()


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_per_call_while_streaming(pf_world, mode):
    """One unit per streamed answer, however many chunks it arrives in; refused up front."""
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.5", max_units=3, batch=2
    ) as stream:
        handler = MeteredCallbackHandler(stream)
        model = _model(callbacks=[handler])
        for _ in range(3):
            if mode == "stream":
                chunks = list(model.stream("hi"))
            else:
                chunks = [c async for c in model.astream("hi")]
            assert len(chunks) > 1
        with pytest.raises(BudgetExhausted):
            if mode == "stream":
                list(model.stream("one too many"))
            else:
                [c async for c in model.astream("one too many")]
        assert model.calls == 3 and handler.calls == 3 and handler.pending_calls == 0
    _paid(pf_world, stream, "0.5", 3)
    assert pf_world.balance("provider") == Decimal("1.485")
    await pf_world.aclient.aclose()


def test_per_call_through_a_chain(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as stream:
        handler = MeteredCallbackHandler(stream)
        chain = ChatPromptTemplate.from_messages([("human", "say {x}")]) | _model()
        chain.invoke({"x": "a"}, config={"callbacks": [handler]})
        chain.batch([{"x": "b"}, {"x": "c"}], config={"callbacks": [handler]})
    _paid(pf_world, stream, "0.01", 3)


# -- per token -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_per_token_sync(pf_world, mode):
    tokens_in, tokens_out = _expected_tokens("what is the price")
    with PaymentStream(
        pf_world.client, pf_world.provider.agent_id, "0.0001", budget="1", batch=7
    ) as stream:
        handler = MeteredCallbackHandler(stream, unit="token")
        model = _model(callbacks=[handler])
        for _ in ANSWERS:
            if mode == "invoke":
                model.invoke("what is the price")
            else:
                chunks = list(model.stream("what is the price"))
                assert len(chunks) > 1
                # the trap: no chunk but the last carries usage
                assert all(c.usage_metadata is None for c in chunks[:-1])
        assert (handler.input_tokens, handler.output_tokens) == (tokens_in, tokens_out)
    _paid(pf_world, stream, "0.0001", tokens_in + tokens_out)


@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
async def test_per_token_async(pf_world, mode):
    tokens_in, tokens_out = _expected_tokens("what is the price")
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.0001", budget="1", batch=7
    ) as stream:
        handler = MeteredCallbackHandler(stream, unit="token")
        model = _model(callbacks=[handler])
        for _ in ANSWERS:
            if mode == "ainvoke":
                await model.ainvoke("what is the price")
            else:
                async for _chunk in model.astream("what is the price"):
                    pass
        assert handler.calls == len(ANSWERS)
    _paid(pf_world, stream, "0.0001", tokens_in + tokens_out)
    await pf_world.aclient.aclose()


@pytest.mark.parametrize("mode", ["invoke", "stream"])
def test_input_and_output_tokens_priced_separately(pf_world, mode):
    reader = pf_world.sandbox.add_agent()
    tokens_in, tokens_out = _expected_tokens("summarise this long document now")
    with (
        PaymentStream(pf_world.client, reader.agent_id, "0.00001", budget="1") as s_in,
        PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.00003", budget="1") as s_out,
    ):
        handler = MeteredCallbackHandler(unit="token", input_stream=s_in, output_stream=s_out)
        model = _model(callbacks=[handler])
        for _ in ANSWERS:
            if mode == "invoke":
                model.invoke("summarise this long document now")
            else:
                list(model.stream("summarise this long document now"))
    assert s_in.receipt.units == tokens_in and s_out.receipt.units == tokens_out
    assert s_in.receipt.paid == Decimal("0.00001") * tokens_in
    assert s_out.receipt.paid == Decimal("0.00003") * tokens_out
    paid = s_in.receipt.paid + s_out.receipt.paid
    assert pf_world.balance() == Decimal(100) - paid
    pf_world.sandbox.audit()


@pytest.mark.parametrize("mode", ["ainvoke", "astream"])
async def test_input_and_output_tokens_priced_separately_async(pf_world, mode):
    reader = pf_world.sandbox.add_agent()
    tokens_in, tokens_out = _expected_tokens("summarise this long document now")
    async with (
        AsyncPaymentStream(pf_world.aclient, reader.agent_id, "0.00001", budget="1") as s_in,
        AsyncPaymentStream(
            pf_world.aclient, pf_world.provider.agent_id, "0.00003", budget="1"
        ) as s_out,
    ):
        handler = MeteredCallbackHandler(unit="token", input_stream=s_in, output_stream=s_out)
        model = _model(callbacks=[handler])
        for _ in ANSWERS:
            if mode == "ainvoke":
                await model.ainvoke("summarise this long document now")
            else:
                async for _chunk in model.astream("summarise this long document now"):
                    pass
    assert (s_in.receipt.units, s_out.receipt.units) == (tokens_in, tokens_out)
    assert s_in.receipt.paid == Decimal("0.00001") * tokens_in
    assert s_out.receipt.paid == Decimal("0.00003") * tokens_out
    assert pf_world.balance() == Decimal(100) - s_in.receipt.paid - s_out.receipt.paid
    assert pf_world.sandbox.balance(reader.agent_id) == s_in.receipt.provider_net
    pf_world.sandbox.audit()
    await pf_world.aclient.aclose()


def test_tool_call_answers_report_usage_when_streamed(pf_world):
    from pf_metered.langchain.testing import tool_call

    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.001", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = ScriptedChatModel(
            script=[AIMessage("", tool_calls=[tool_call("f", a=1)])], callbacks=[handler]
        )
        list(model.stream("go"))
        assert handler.output_tokens == 10 and handler.input_tokens == 1
    assert s.receipt.units == 11


def test_tokens_over_budget_pay_what_fits_and_refuse_the_next_call(pf_world, caplog):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.2", max_units=6) as stream:
        handler = MeteredCallbackHandler(stream, unit="token")
        model = ScriptedChatModel(script=["a b c d e f g h"], callbacks=[handler])
        model.invoke("hi")  # 1 in + 8 out = 9 tokens, 6 fit
        assert handler.overflow == 3
        assert "could not be paid" in caplog.text
        with pytest.raises(BudgetExhausted):
            model.invoke("again")
        assert model.calls == 1
    assert stream.receipt.units == 6 and stream.receipt.paid == Decimal("1.20")


# -- missing usage: a declared fallback, never a lost answer --------------------------------

PROMPT = "what is the price of tea"  # 24 characters: 6 tokens by the estimate
ANSWER = "four coins please"  # 17 characters: 5 tokens by the estimate


def _silent(**kw) -> ScriptedChatModel:
    return ScriptedChatModel(script=[ANSWER] * 4, usage=False, **kw)


@pytest.mark.parametrize("mode", ["invoke", "stream", "ainvoke", "astream"])
async def test_missing_usage_is_estimated_by_default_and_the_answer_kept(pf_world, caplog, mode):
    """Default ``on_missing_usage="estimate"``: ceil(characters / 4) of the prompt and of the
    answer, logged once per model; the answer reaches the caller in every call style."""
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.001", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = _silent(callbacks=[handler])
        for _ in range(2):
            if mode == "invoke":
                text = model.invoke(PROMPT).content
            elif mode == "ainvoke":
                text = (await model.ainvoke(PROMPT)).content
            elif mode == "stream":
                text = "".join(str(c.content) for c in model.stream(PROMPT))
            else:
                text = "".join([str(c.content) async for c in model.astream(PROMPT)])
            assert text == ANSWER
        assert (handler.input_tokens, handler.output_tokens) == (12, 10)
        assert handler.missing_usage == 2 and handler.estimated_tokens == 22
        assert caplog.text.count("billed an estimate of 6+5 tokens") == 1
    assert s.receipt.units == 22 and s.receipt.paid == Decimal("0.022")
    await pf_world.aclient.aclose()


def test_missing_usage_estimate_with_a_tokenizer_of_ones_own(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        words = MeteredCallbackHandler(s, unit="token", count_tokens=lambda t: len(t.split()))
        assert _silent(callbacks=[words]).invoke(PROMPT).content == ANSWER
        assert (words.input_tokens, words.output_tokens) == (6, 3)
        broken = MeteredCallbackHandler(s, unit="token", count_tokens=lambda t: 0.5)  # type: ignore[arg-type,return-value]
        with pytest.raises(ValueError, match="non-negative int"):
            _silent(callbacks=[broken]).invoke(PROMPT)
    assert s.receipt.units == 9


def test_missing_usage_per_call_bills_the_declared_tokens(pf_world):
    reader = pf_world.sandbox.add_agent()
    with (
        PaymentStream(pf_world.client, reader.agent_id, "0.001", budget="1") as s_in,
        PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.002", budget="1") as s_out,
    ):
        handler = MeteredCallbackHandler(
            unit="token",
            input_stream=s_in,
            output_stream=s_out,
            on_missing_usage="per_call",
            per_call_tokens=(100, 40),
        )
        model = _silent(callbacks=[handler])
        model.invoke(PROMPT)
        list(model.stream(PROMPT))
        # a call that does report usage is billed its own figures, not the declared ones
        ScriptedChatModel(script=["a b"], callbacks=[handler]).invoke("q")
        assert handler.estimated_tokens == 280
    assert (s_in.receipt.units, s_out.receipt.units) == (201, 82)
    assert s_out.receipt.paid == Decimal("0.164")


def test_per_call_needs_its_declared_tokens(pf_world):
    s = PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1")
    with pytest.raises(InvalidInput, match="per_call_tokens"):
        MeteredCallbackHandler(s, unit="token", on_missing_usage="per_call")
    with pytest.raises(InvalidInput, match="per_call_tokens"):
        MeteredCallbackHandler(
            s, unit="token", on_missing_usage="per_call", per_call_tokens=(1, -1)
        )
    with pytest.raises(InvalidInput, match="per_call_tokens"):
        MeteredCallbackHandler(s, unit="token", per_call_tokens=(1, 1))
    with pytest.raises(InvalidInput, match="on_missing_usage"):
        MeteredCallbackHandler(s, unit="token", on_missing_usage="ignore")  # type: ignore[arg-type]


def test_missing_usage_warn_bills_nothing_and_says_so_each_call(pf_world, caplog):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token", on_missing_usage="warn")
        model = _silent(callbacks=[handler])
        assert model.invoke(PROMPT).content == ANSWER
        assert "".join(str(c.content) for c in model.stream(PROMPT)) == ANSWER
        assert handler.missing_usage == 2 and handler.calls == 0
        assert caplog.text.count("billed nothing (on_missing_usage=warn)") == 2
    assert s.receipt.units == 0 and s.receipt.paid == 0


def test_missing_usage_raise_keeps_the_answer_and_refuses_the_next_call(pf_world, caplog):
    """``"raise"`` never bills a guess. The call that reveals the missing usage already has
    its answer: it is returned (billed nothing, logged); the model's next call is refused
    before it runs. Another model on the same handler is not affected."""
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token", on_missing_usage="raise")
        model = _silent(callbacks=[handler])
        assert model.invoke(PROMPT).content == ANSWER
        assert "its next call will be refused" in caplog.text
        with pytest.raises(ConfigError, match="reported no token usage on an earlier call"):
            model.invoke(PROMPT)
        with pytest.raises(ConfigError, match="stream_usage=True"):
            list(model.stream(PROMPT))
        assert model.calls == 1  # neither refused call reached the model
        reporting = ScriptedChatModel(script=["x y"], final="z", callbacks=[handler])
        reporting.invoke("q")
        assert handler.calls == 1 and handler.missing_usage == 1
    assert s.receipt.units == 3


# -- cache hits: no request, no bill --------------------------------------------------------


@pytest.fixture
def global_cache():
    from langchain_core.caches import InMemoryCache
    from langchain_core.globals import get_llm_cache, set_llm_cache

    before = get_llm_cache()
    cache = InMemoryCache()
    set_llm_cache(cache)
    yield cache
    set_llm_cache(before)


@pytest.mark.parametrize("unit", ["call", "token"])
def test_a_cache_hit_is_not_billed(pf_world, unit):
    from langchain_core.caches import InMemoryCache

    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit=unit)
        model = _model(cache=InMemoryCache(), callbacks=[handler])
        first = model.invoke("hi")
        second = model.invoke("hi")  # answered from the cache: the model is not called
        assert second.content == first.content == ANSWERS[0]
        assert model.calls == 1 and handler.calls == 1 and handler.cache_hits == 1
        assert handler.pending_calls == 0
    assert s.receipt.units == (1 if unit == "call" else 1 + 3)  # "hi" + "one two three"


@pytest.mark.parametrize("unit", ["call", "token"])
async def test_a_cache_hit_through_set_llm_cache_async_and_batch(pf_world, global_cache, unit):
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.01", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s, unit=unit)
        model = _model(callbacks=[handler])
        await model.ainvoke("hi")
        await model.ainvoke("hi")
        model.batch(["hi", "hi"])
        assert model.calls == 1 and handler.cache_hits == 3
    assert s.receipt.units == (1 if unit == "call" else 4)
    await pf_world.aclient.aclose()


def test_cache_hits_billed_when_asked(pf_world, global_cache):
    """``bill_cache_hits=True``: a cached answer costs what it cost the first time (for a
    reseller whose price does not depend on its own cache)."""
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token", bill_cache_hits=True)
        model = _model(callbacks=[handler])
        model.invoke("hi")
        model.invoke("hi")
        assert model.calls == 1 and handler.calls == 2 and handler.cache_hits == 0
    assert s.receipt.units == 8


def test_stream_bypasses_the_cache_and_is_billed(pf_world, global_cache):
    """LangChain's ``stream()`` never reads the LLM cache: each stream is a real request."""
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s)
        model = _model(callbacks=[handler])
        model.invoke("hi")
        list(model.stream("hi"))
        assert model.calls == 2 and handler.cache_hits == 0
    assert s.receipt.units == 2


# -- abandoned streams: billed what came back -----------------------------------------------


@pytest.mark.parametrize("unit", ["call", "token"])
def test_a_stream_abandoned_after_one_chunk_is_billed_what_came(pf_world, unit):
    """The usage would come on the last chunk, which the caller never reads: the call is
    billed by ``on_missing_usage`` on what came back — per call, one unit; per token, the
    estimate of the prompt (6) and of the first chunk "four " (5 characters: 2)."""
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit=unit)
        model = ScriptedChatModel(script=[ANSWER], callbacks=[handler])
        for chunk in model.stream(PROMPT):
            assert chunk.content == "four "
            break
        assert handler.abandoned == 1 and handler.calls == 1 and handler.pending_calls == 0
        if unit == "token":
            assert (handler.input_tokens, handler.output_tokens) == (6, 2)
    assert s.receipt.units == (1 if unit == "call" else 8)


async def test_an_abandoned_astream_is_billed_when_closed(pf_world):
    """``async for ... break`` leaves the generator to the event loop's finaliser;
    ``contextlib.aclosing`` closes it at the ``break``, and the call is billed then."""
    from contextlib import aclosing

    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.01", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(
            s, unit="token", on_missing_usage="per_call", per_call_tokens=(50, 50)
        )
        model = ScriptedChatModel(script=[ANSWER], callbacks=[handler])
        async with aclosing(model.astream(PROMPT)) as chunks:
            async for _chunk in chunks:
                break
        assert handler.abandoned == 1 and handler.pending_calls == 0
    assert s.receipt.units == 100
    await pf_world.aclient.aclose()


async def test_an_async_break_alone_bills_nothing_until_the_generator_is_closed(pf_world):
    """What happens without ``aclosing``: ``break`` leaves the async generator open (its unit
    still reserved, nothing billed) until it is closed — here by hand, else by the event loop
    whenever it finalises it."""
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.01", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s)
        model = ScriptedChatModel(script=[ANSWER], callbacks=[handler])
        chunks = model.astream(PROMPT)
        async for _chunk in chunks:
            break
        assert handler.pending_calls == 1 and handler.abandoned == 0 and handler.calls == 0
        await chunks.aclose()
        assert handler.pending_calls == 0 and handler.abandoned == 1 and handler.calls == 1
    assert s.receipt.units == 1
    await pf_world.aclient.aclose()


class _EarlyUsageModel(ScriptedChatModel):
    """Reports the input tokens on its first chunk (as Anthropic's message_start does) and
    the output tokens on its last."""

    def _stream(self, messages, stop=None, run_manager=None, **kwargs):
        from langchain_core.messages import AIMessageChunk
        from langchain_core.outputs import ChatGenerationChunk

        for i, chunk in enumerate(super()._stream(messages, stop, run_manager, **kwargs)):
            if i == 0:
                early = {"input_tokens": 7, "output_tokens": 0, "total_tokens": 7}
                message = AIMessageChunk(content=chunk.message.content, usage_metadata=early)
                yield ChatGenerationChunk(message=message)
            else:
                yield chunk


def test_an_abandoned_stream_is_billed_the_usage_reported_so_far(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = _EarlyUsageModel(script=[ANSWER], usage=False, callbacks=[handler])
        next(iter(model.stream(PROMPT)))  # read one chunk, drop the generator
        assert handler.abandoned == 1 and handler.estimated_tokens == 0
        assert (handler.input_tokens, handler.output_tokens) == (7, 0)
    assert s.receipt.units == 7


def test_a_stream_that_fails_midway_costs_nothing(pf_world):
    class Failing(ScriptedChatModel):
        def _stream(self, messages, stop=None, run_manager=None, **kwargs):
            for i, chunk in enumerate(super()._stream(messages, stop, run_manager, **kwargs)):
                if i == 1:
                    raise RuntimeError("provider dropped the stream")
                yield chunk

    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        per_call = MeteredCallbackHandler(s)
        per_token = MeteredCallbackHandler(s, unit="token")
        model = Failing(script=[ANSWER, ANSWER], callbacks=[per_call, per_token])
        with pytest.raises(RuntimeError, match="dropped"):
            list(model.stream(PROMPT))
        assert per_call.calls == per_token.calls == 0 and per_call.pending_calls == 0
    assert s.receipt.units == 0


def test_handler_repr_shows_counts_not_secrets(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        _model(callbacks=[handler]).invoke("hello")
        assert "calls=1" in repr(handler)
        assert pf_world.payer.api_key not in repr(handler)
