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


def test_missing_usage_is_never_guessed(pf_world, caplog):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        strict = MeteredCallbackHandler(s, unit="token")
        with pytest.raises(ConfigError, match="no token usage"):
            ScriptedChatModel(script=["x y"], usage=False, callbacks=[strict]).invoke("q")
        lenient = MeteredCallbackHandler(s, unit="token", on_missing_usage="warn")
        list(ScriptedChatModel(script=["x y"], usage=False, callbacks=[lenient]).stream("q"))
        assert lenient.missing_usage == 1 and "no token usage" in caplog.text
    assert s.receipt.units == 0 and s.receipt.paid == 0


def test_handler_repr_shows_counts_not_secrets(pf_world):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.01", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        _model(callbacks=[handler]).invoke("hello")
        assert "calls=1" in repr(handler)
        assert pf_world.payer.api_key not in repr(handler)
