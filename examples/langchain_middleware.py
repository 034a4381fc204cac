"""One ``create_agent`` agent, two conversations, each paying from its own budget via middleware.

``MeteredMiddleware`` opens one payment stream per conversation (``budget_per="thread"``: the
``thread_id`` of the run's config, with a checkpointer keeping each conversation's history)
and pays the provider from it: one unit (0.01 USDC) per model call, and ``market_price`` at
0.02 USDC (two units) per call. The budget is checked *before* every model call and every
batch of tool calls; when it cannot pay, the run ends cleanly with a message saying why,
instead of an exception that loses the conversation. One conversation spending its budget
leaves the other's untouched. Each run's bill is in the agent's state
(``state["pf_metered"]``); at the end ``close_all()`` closes both streams, and the sandbox
ledger shows exactly what was paid.

The model is a scripted tool-calling fake: asked for one price it looks it up and answers;
asked for every price it keeps looking (more than the budget pays for). Everything runs on the
embedded sandbox: no key, no network.

    python examples/langchain_middleware.py
    python examples/langchain_middleware.py --budget 2.00
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langgraph.checkpoint.memory import InMemorySaver

from pf_metered import PaymentStream, Sandbox
from pf_metered.langchain import MeteredMiddleware
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.money import format_usdc

SYMBOLS = ["BTC", "ETH", "SOL", "AVAX", "DOT", "ATOM", "NEAR", "ARB", "OP", "SUI", "APT", "TIA"]


@tool
def market_price(symbol: str) -> str:
    """The latest price of a crypto asset in USD, e.g. symbol="BTC". Paid per call."""
    return json.dumps({"symbol": symbol, "usd": str(1000 + 7 * len(symbol) + ord(symbol[0]))})


def answer(messages: Sequence[BaseMessage]) -> AIMessage:
    """The scripted model: look up what the last question asks for, then answer."""
    asked = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
    question = str(messages[asked].content)
    looked_up = [m for m in messages[asked:] if isinstance(m, ToolMessage)]
    if question == "every price":
        symbol = SYMBOLS[len(looked_up) % len(SYMBOLS)]
    elif not looked_up:
        symbol = question.rsplit(maxsplit=1)[-1]
    else:
        price = json.loads(str(looked_up[-1].content))["usd"]
        return AIMessage(f"{question.rsplit(maxsplit=1)[-1]} costs {price} USD.")
    return AIMessage("", tool_calls=[tool_call("market_price", symbol=symbol)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="1.00", help="USDC each conversation may spend")
    args = parser.parse_args()

    sandbox = Sandbox()
    payer = sandbox.add_agent(balance="100.00")
    provider = sandbox.add_agent()
    client = sandbox.client(payer.api_key)

    def open_conversation_stream(thread_id: str) -> PaymentStream:
        """Called by the middleware on a conversation's first run; it opens and owns it."""
        return PaymentStream(
            client, provider.agent_id, "0.01", budget=args.budget, batch=10, memo=thread_id
        )

    meter = MeteredMiddleware(
        open_stream=open_conversation_stream,
        budget_per="thread",
        rate="0.01",
        per="call",
        tools={"market_price": "0.02"},
    )
    model = ScriptedChatModel(script=[answer] * 1000)
    agent = create_agent(model, [market_price], middleware=[meter], checkpointer=InMemorySaver())

    turns = [("alice", "price of BTC"), ("bob", "every price"), ("alice", "price of ETH"),
             ("bob", "price of SOL")]  # fmt: skip
    runs: dict[str, int] = {}
    for thread, question in turns:
        config: Any = {"configurable": {"thread_id": thread}, "recursion_limit": 1000}
        state = agent.invoke({"messages": [("human", question)]}, config)
        bill = state["pf_metered"]["MeteredMiddleware"]
        runs[thread] = runs.get(thread, 0) + 1
        print(
            f"{thread} run {runs[thread]} : {bill['units']} units, {bill['cost']} USDC "
            f"({bill['model_calls']} model calls, {bill['tool_calls']} tool calls), "
            f"{bill['units_left']} left"
        )
        print(f"{thread} run {runs[thread]} said : {state['messages'][-1].content}")

    by_stream = {s.stream_id: thread for thread, s in meter.open_streams().items()}
    for receipt in meter.close_all():
        print(
            f"{by_stream[receipt.stream_id]} receipt : {receipt.units} units, "
            f"{format_usdc(receipt.paid_micro)} paid, {format_usdc(receipt.refunded_micro)} "
            "refunded"
        )
    print(f"provider balance : {sandbox.balance(provider.agent_id).normalize():f} USDC")
    print(f"payer balance : {sandbox.balance(payer.agent_id).normalize():f} USDC")
    sandbox.audit()
    client.close()
    sandbox.close()


if __name__ == "__main__":
    main()
