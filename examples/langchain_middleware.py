"""An agent built with ``langchain.agents.create_agent`` that pays as it works, via middleware.

``MeteredMiddleware`` puts the agent on a payment stream to a provider agent: one unit per
model call, and ``market_price`` (sold at 0.02 USDC a call, two units at the stream's 0.01)
per tool call. The budget (1.00 USDC) is checked *before* every model call and every batch of
tool calls; when it cannot pay, the run ends cleanly with a message saying why, instead of an
exception that loses the conversation. The sandbox ledger then shows exactly what was paid.

The model is a scripted tool-calling fake that keeps asking for prices (more than the budget
pays for), so the run ends on the budget. Everything runs on the embedded sandbox: no key, no
network.

    python examples/langchain_middleware.py
    python examples/langchain_middleware.py --budget 2.00
"""

from __future__ import annotations

import argparse
import json

from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool

from pf_metered import PaymentStream, Sandbox
from pf_metered.langchain import MeteredMiddleware
from pf_metered.langchain.testing import ScriptedChatModel, tool_call

SYMBOLS = ["BTC", "ETH", "SOL", "AVAX", "DOT", "ATOM", "NEAR", "ARB", "OP", "SUI", "APT", "TIA"]
SCRIPT_SYMBOLS = SYMBOLS * 5  # more lookups than the budget pays for


@tool
def market_price(symbol: str) -> str:
    """The latest price of a crypto asset in USD, e.g. symbol="BTC". Paid per call."""
    return json.dumps({"symbol": symbol, "usd": str(1000 + 7 * len(symbol) + ord(symbol[0]))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="1.00", help="USDC the stream may spend")
    args = parser.parse_args()

    sandbox = Sandbox()
    payer = sandbox.add_agent(balance="100.00")
    provider = sandbox.add_agent()
    client = sandbox.client(payer.api_key)
    model = ScriptedChatModel(
        script=[
            AIMessage("", tool_calls=[tool_call("market_price", symbol=s)]) for s in SCRIPT_SYMBOLS
        ]
    )
    with PaymentStream(client, provider.agent_id, "0.01", budget=args.budget, batch=10) as stream:
        meter = MeteredMiddleware(stream, per="call", tools={"market_price": "0.02"})
        agent = create_agent(model, [market_price], middleware=[meter])
        result = agent.invoke(
            {"messages": [("human", "price every asset you can")]}, {"recursion_limit": 500}
        )
    receipt = stream.receipt
    assert receipt is not None
    prices = [m for m in result["messages"] if isinstance(m, ToolMessage) and m.status != "error"]
    print(f"model calls paid : {meter.model_calls}")
    print(f"tool calls paid  : {meter.tool_calls} (market_price, {len(prices)} answers)")
    print(f"last message     : {result['messages'][-1].content}")
    print(f"units            : {receipt.units}")
    print(f"paid             : {receipt.paid} USDC")
    print(f"refunded         : {receipt.refunded} USDC")
    print(f"provider balance : {sandbox.balance(provider.agent_id)} USDC")
    print(f"payer balance    : {sandbox.balance(payer.agent_id)} USDC")
    sandbox.audit()
    client.close()
    sandbox.close()


if __name__ == "__main__":
    main()
