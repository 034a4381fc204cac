"""``ScriptedChatModel``, the public fake the agent tests, the examples and users' dry runs use.

What it must get right for an agent loop: ``bind_tools`` returns a binding (the model itself
is unchanged) and each answer records the tools it was offered; tool calls come back whole on
``invoke`` and as ``tool_call_chunks`` on the last streamed chunk; usage is reported once per
answer (on the message, or on the last chunk only); async calls play the script on the event
loop itself.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.tools import tool

from pf_metered.langchain.testing import ScriptedChatModel, count_words, tool_call


@tool
def weather(city: str) -> str:
    """Today's weather in a city."""
    return f"sunny in {city}"


def test_bind_tools_binds_names_and_each_answer_records_them():
    model = ScriptedChatModel(script=["one", "two"])
    bound = model.bind_tools([weather, {"type": "function", "function": {"name": "lookup"}}])
    assert bound is not model
    assert bound.invoke("hi").content == "one"
    assert model.invoke("hi").content == "two"
    assert model.invoke("hi").content == "Done."  # past the script: the final text
    assert model.offered == [("weather", "lookup"), None, None]
    assert model.calls == 3


def test_invoke_reports_tool_calls_and_usage_on_the_message():
    call = tool_call("weather", city="Oslo")
    model = ScriptedChatModel(script=[AIMessage("let me look", tool_calls=[call])])
    prompt = [HumanMessage("weather in Oslo please")]
    answer = model.bind_tools([weather]).invoke(prompt)
    assert answer.tool_calls == [call]
    assert answer.usage_metadata == {
        "input_tokens": count_words(prompt),
        "output_tokens": 3 + 10,
        "total_tokens": count_words(prompt) + 13,
    }
    silent = ScriptedChatModel(script=["x"], usage=False)
    assert silent.invoke("hi").usage_metadata is None


def test_stream_carries_tool_calls_and_usage_on_the_last_chunk_only():
    call = tool_call("weather", city="Rome")
    model = ScriptedChatModel(script=[AIMessage("checking the sky", tool_calls=[call])])
    chunks = list(model.bind_tools([weather]).stream("weather in Rome"))
    assert [c.content for c in chunks[:3]] == ["checking ", "the ", "sky"]
    assert all(c.usage_metadata is None and not c.tool_call_chunks for c in chunks[:-1])
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole = whole + chunk
    assert isinstance(whole, AIMessageChunk)
    assert whole.content == "checking the sky"
    assert whole.tool_calls == [call]
    assert whole.usage_metadata is not None and whole.usage_metadata["output_tokens"] == 13


async def test_async_plays_the_script_on_the_event_loop():
    seen: list[str] = []

    def step(messages: Sequence[BaseMessage]) -> str:
        seen.append(threading.current_thread().name)
        return f"{len(messages)} message(s)"

    model = ScriptedChatModel(script=[step, step])
    assert (await model.ainvoke("hi")).content == "1 message(s)"
    streamed = [c.content async for c in model.astream("hi")]
    assert "".join(str(c) for c in streamed) == "1 message(s)"
    assert seen == [threading.current_thread().name] * 2  # no worker thread
    assert model.calls == 2
