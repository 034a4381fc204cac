"""MeteredCallbackHandler on a real ``ChatOpenAI`` talking to an OpenAI-compatible server on a
free loopback port (tests/openai_server.py): what is billed, per call style, against what the
provider reports and generates; the stream_usage warning; cache hits; abandoned streams."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import aclosing
from decimal import Decimal

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI
from openai_server import OpenAIServer, prompt_tokens

from pf_metered.errors import ConfigError
from pf_metered.langchain import MeteredCallbackHandler
from pf_metered.stream import AsyncPaymentStream, PaymentStream

STYLES = ["invoke", "stream", "batch", "ainvoke", "astream", "chain", "chain_stream"]
PROMPT = "what does tea cost"


@pytest.fixture
def server() -> Iterator[OpenAIServer]:
    with OpenAIServer() as srv:
        yield srv


@pytest.fixture
def silent_server() -> Iterator[OpenAIServer]:
    with OpenAIServer(usage=False) as srv:
        yield srv


def _model(server: OpenAIServer, **kw) -> ChatOpenAI:
    return ChatOpenAI(
        model="loopback-1", base_url=server.base_url, api_key="sk-test", max_retries=0, **kw
    )


async def _call(model: ChatOpenAI, style: str) -> list[str]:
    """Two prompts' answers through ``model`` in one call style (batch: both at once)."""
    prompts = [PROMPT, PROMPT + " today"]
    chain = ChatPromptTemplate.from_messages([("human", "{q}")]) | model | StrOutputParser()
    if style == "invoke":
        return [str(model.invoke(p).content) for p in prompts]
    if style == "stream":
        return ["".join(str(c.content) for c in model.stream(p)) for p in prompts]
    if style == "batch":
        return [str(m.content) for m in model.batch(prompts)]
    answers = []
    for p in prompts:
        if style == "ainvoke":
            answers.append(str((await model.ainvoke(p)).content))
        elif style == "astream":
            answers.append("".join([str(c.content) async for c in model.astream(p)]))
    if answers:
        return answers
    if style == "chain":
        return [chain.invoke({"q": p}) for p in prompts]
    assert style == "chain_stream"
    return ["".join(chain.stream({"q": p})) for p in prompts]


@pytest.mark.parametrize("style", STYLES)
async def test_billed_tokens_equal_the_providers_in_every_call_style(pf_world, server, style):
    """With usage reported (``stream_usage=True`` for streams), each call is billed exactly the
    tokens the provider reported, once, whatever the call style."""
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.0001", budget="1", batch=5
    ) as s:
        handler = MeteredCallbackHandler(s, unit="token")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no stream_usage warning: it is on
            model = handler.attach(_model(server, stream_usage=True))
            answers = await _call(model, style)
        assert answers == list(server.answers[:2]) or sorted(answers) == sorted(server.answers[:2])
        assert len(server.served) == 2 and all(r.reported for r in server.served)
        provider = sum(r.total_tokens for r in server.served)
        assert handler.input_tokens == sum(r.prompt_tokens for r in server.served)
        assert handler.output_tokens == sum(r.completion_tokens for r in server.served)
        assert handler.calls == 2 and handler.estimated_tokens == 0
    assert s.receipt.units == provider
    assert s.receipt.paid == Decimal("0.0001") * provider
    assert pf_world.balance() == Decimal(100) - s.receipt.paid
    pf_world.sandbox.audit()
    await pf_world.aclient.aclose()


@pytest.mark.parametrize("style", STYLES)
async def test_per_call_bills_one_unit_per_request_served(pf_world, server, style):
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.01", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s)
        await _call(_model(server, callbacks=[handler]), style)
        assert handler.calls == len(server.served) == 2 and handler.pending_calls == 0
    assert s.receipt.units == 2 and s.receipt.paid == Decimal("0.02")
    await pf_world.aclient.aclose()


# -- streaming without usage: warned at attach time, billed by the fallback -----------------


def test_attach_warns_once_with_the_fix_and_streams_are_estimated(pf_world, server):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.001", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = _model(server)  # a custom base_url: langchain-openai leaves stream_usage off
        with pytest.warns(UserWarning, match=r"stream without token usage.*stream_usage=True"):
            assert handler.attach(model) is model
        assert model.callbacks == [handler]
        assert server.served == []  # warned before any request
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once: neither a call nor a second attach warns
            handler.attach(model)
            text = "".join(str(c.content) for c in model.stream(PROMPT))
        assert text == server.answers[0]
        assert model.callbacks == [handler]
        served = server.served[0]
        assert served.stream and not served.include_usage and not served.reported
        # billed the documented estimate: ceil(chars / 4) of the prompt and of the answer
        expected = -(-len(PROMPT) // 4) + -(-len(text) // 4)
        assert handler.estimated_tokens == expected == 5 + 8
    assert s.receipt.units == expected
    # the provider generated (and charges) 7 + 7 tokens; the estimate is what could be known


def test_first_call_warns_when_attached_by_callbacks(pf_world, server):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.001", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = _model(server, callbacks=[handler])
        with pytest.warns(UserWarning, match="stream_usage=True"):
            model.invoke(PROMPT)  # reports usage (non-streaming): billed exactly
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.invoke(PROMPT)
        assert handler.estimated_tokens == 0
    assert s.receipt.units == sum(r.total_tokens for r in server.served)


def test_no_warning_where_usage_streams(pf_world, server):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.001", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            handler.attach(_model(server, stream_usage=True))
            handler.attach(_model(server, model_kwargs={"stream_options": {"include_usage": True}}))
            handler.attach(ChatOpenAI(model="gpt-4o-mini", api_key="sk-test"))  # OpenAI's URL
            MeteredCallbackHandler(s).attach(_model(server))  # per call: usage not needed
            # per call, stream_usage given to the call itself
            model = _model(server, callbacks=[MeteredCallbackHandler(s, unit="token")])
            list(model.stream(PROMPT, stream_usage=True))
        assert server.served[-1].reported


def test_raise_refuses_a_model_that_will_stream_without_usage_before_any_request(pf_world, server):
    with PaymentStream(pf_world.client, pf_world.provider.agent_id, "0.001", budget="1") as s:
        handler = MeteredCallbackHandler(s, unit="token", on_missing_usage="raise")
        with pytest.raises(ConfigError, match="stream_usage=True"):
            handler.attach(_model(server))
        implicit = _model(server, callbacks=[handler])
        with pytest.raises(ConfigError, match="stream_usage=True"):
            list(implicit.stream(PROMPT))
        assert server.served == []  # no request was made
        fixed = handler.attach(_model(server, stream_usage=True))
        assert "".join(str(c.content) for c in fixed.stream(PROMPT)) == server.answers[0]
    assert s.receipt.units == server.served[0].total_tokens


async def test_a_server_that_never_reports_usage(pf_world, silent_server):
    """Every call style keeps its answer and is billed the estimate (logged once)."""
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.001", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = _model(silent_server, stream_usage=True, callbacks=[handler])
        answers = await _call(model, "invoke") + await _call(model, "astream")
        assert answers == list(silent_server.answers)
        assert handler.missing_usage == 4 and handler.estimated_tokens == s.status().units
        assert handler.estimated_tokens > 0
    await pf_world.aclient.aclose()


# -- cache hits and abandoned streams -------------------------------------------------------


async def test_a_cache_hit_makes_no_request_and_bills_nothing(pf_world, server):
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.001", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s, unit="token")
        model = _model(server, stream_usage=True, cache=InMemoryCache(), callbacks=[handler])
        first = model.invoke(PROMPT).content
        assert model.invoke(PROMPT).content == first
        assert (await model.ainvoke(PROMPT)).content == first
        assert len(server.served) == 1 and handler.cache_hits == 2
    assert s.receipt.units == server.served[0].total_tokens
    await pf_world.aclient.aclose()


@pytest.mark.parametrize("mode", ["stream", "astream"])
async def test_a_stream_abandoned_after_one_chunk(pf_world, server, mode):
    """The usage chunk comes last and is never read: billed the estimate of the prompt and of
    the chunks seen (the role chunk: no text), never nothing and never a lost run."""
    async with AsyncPaymentStream(
        pf_world.aclient, pf_world.provider.agent_id, "0.001", budget="1"
    ) as s:
        handler = MeteredCallbackHandler(s, unit="token")
        per_call = MeteredCallbackHandler(s)
        model = _model(server, stream_usage=True, callbacks=[handler, per_call])
        if mode == "stream":
            for _chunk in model.stream(PROMPT):
                break
        else:
            async with aclosing(model.astream(PROMPT)) as chunks:
                async for _chunk in chunks:
                    break
        assert handler.abandoned == per_call.abandoned == 1
        assert handler.estimated_tokens == -(-len(PROMPT) // 4) == 5
        assert per_call.calls == 1 and handler.pending_calls == per_call.pending_calls == 0
        assert server.served[0].completion_tokens == 7  # what the provider generated
    assert s.receipt.units == 5 + 1
    await pf_world.aclient.aclose()


def test_prompt_tokens_of_the_server_are_its_own():
    """The server's count is not the estimate's (so a test cannot pass by coincidence)."""
    assert prompt_tokens([{"role": "user", "content": PROMPT}]) == 7
    assert -(-len(PROMPT) // 4) == 5
