"""A LangChain agent that pays another agent per call from a stream it opens and closes itself.

The agent (LangGraph's prebuilt ReAct loop, or LangChain's ``create_agent`` when installed) gets
the Purple Flea toolkit — narrowed so it may pay but not claim the faucet, and capped by the
operator — plus ``market_price``, a tool sold by a provider agent at 0.01 USDC a call. It opens
a payment stream to the provider, calls ``market_price`` twelve times, checks the stream and
closes it; the sandbox ledger then shows exactly 0.12 USDC paid and the rest refunded. Its own
LLM calls are metered per token by ``MeteredCallbackHandler`` on a second stream, to the model's
host.

By default the "LLM" is a scripted fake that makes the mistakes real models make (an
over-the-cap budget, a rate written in words) and corrects itself from the tools' error messages.
Everything runs on the embedded sandbox: no key, no network.

    python examples/langchain_agent.py            # scripted model, sandbox
    PF_LLM=openai:gpt-4o-mini OPENAI_API_KEY=...  python examples/langchain_agent.py
                                                  # a real model (needs `langchain` and the
                                                  # provider package), still on the sandbox
    PF_API_KEY=... PF_PROVIDER_ID=... PF_MODEL_HOST_ID=... python examples/langchain_agent.py
                                                  # the live escrow API
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool

from pf_metered.langchain import Caps, MeteredCallbackHandler, PurpleFleaToolkit, pay_per_call
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.stream import PaymentStream

PRICE_PER_CALL = "0.01"
PRICE_PER_TOKEN = "0.00001"
SYMBOLS = ["BTC", "ETH", "SOL", "AVAX", "DOT", "ATOM", "NEAR", "ARB", "OP", "SUI", "APT", "TIA"]


@tool
def market_price(symbol: str) -> str:
    """The latest price of a crypto asset in USD, e.g. symbol="BTC". Paid per call."""
    return json.dumps({"symbol": symbol, "usd": str(1000 + 7 * len(symbol) + ord(symbol[0]))})


# -- the model -----------------------------------------------------------------------------


def _last_stream_id(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        if isinstance(message, ToolMessage) and message.name == "stream_open":
            try:
                return str(json.loads(str(message.content))["stream_id"])
            except (ValueError, KeyError):
                continue
    raise RuntimeError("the script expected an opened stream")


def scripted_model(provider: str) -> ScriptedChatModel:
    """A fake LLM that drives the agent the way a careful model would, mistakes included."""

    def open_stream(_: Sequence[BaseMessage]) -> AIMessage:
        return AIMessage(
            "",
            tool_calls=[
                tool_call(
                    "stream_open", provider=provider, rate=PRICE_PER_CALL, budget="1.00", batch=5
                )
            ],
        )

    def prices(batch: list[str]) -> AIMessage:
        return AIMessage("", tool_calls=[tool_call("market_price", symbol=s) for s in batch])

    def status(messages: Sequence[BaseMessage]) -> AIMessage:
        return AIMessage(
            "", tool_calls=[tool_call("stream_status", stream_id=_last_stream_id(messages))]
        )

    def close(messages: Sequence[BaseMessage]) -> AIMessage:
        return AIMessage(
            "", tool_calls=[tool_call("stream_close", stream_id=_last_stream_id(messages))]
        )

    return ScriptedChatModel(
        script=[
            # 1. too greedy: the operator's cap refuses it, and says what the cap is
            AIMessage(
                "",
                tool_calls=[
                    tool_call("stream_open", provider=provider, rate=PRICE_PER_CALL, budget="500")
                ],
            ),
            # 2. a rate in words: the schema refuses it, naming the field
            AIMessage(
                "",
                tool_calls=[
                    tool_call("stream_open", provider=provider, rate="one cent", budget="1.00")
                ],
            ),
            # 3. paying before opening a stream: refused before the tool runs
            prices(SYMBOLS[:1]),
            open_stream,
            prices(SYMBOLS[0:4]),
            prices(SYMBOLS[4:8]),
            prices(SYMBOLS[8:12]),
            status,
            close,
            "I bought 12 prices for 0.12 USDC and closed the stream; the rest was refunded.",
        ]
    )


def configured_model() -> BaseChatModel | None:
    """A real chat model named by ``PF_LLM`` (``provider:model``), if one is configured."""
    spec = os.environ.get("PF_LLM")
    if not spec:
        return None
    try:
        from langchain.chat_models import init_chat_model  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:  # pragma: no cover - depends on optional installs
        raise SystemExit(
            "PF_LLM needs the `langchain` package and the provider's "
            "integration (e.g. langchain-openai)"
        ) from exc
    model: BaseChatModel = init_chat_model(spec)
    return model


def make_agent(model: BaseChatModel, tools: list[Any]) -> Any:
    """LangChain's ``create_agent`` when installed, else LangGraph's prebuilt ReAct agent."""
    try:
        from langchain.agents import create_agent  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        from langgraph.prebuilt import create_react_agent

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "moved to langchain.agents", which is not installed
            return create_react_agent(model, tools)
    return create_agent(model, tools)  # pragma: no cover - depends on optional installs


PROMPT = (
    "Get the latest USD price of each of these assets from the market_price tool, which the "
    f"provider agent {{provider}} sells for {PRICE_PER_CALL} USDC a call: {', '.join(SYMBOLS)}. "
    "Pay through a payment stream (stream_open) with a budget of at most 1.00 USDC, check the "
    "stream when done, then close it."
)


# -- the run -------------------------------------------------------------------------------


def connect() -> tuple[Any, str, str | None, Any]:
    """(payer's client, provider id, model host id or None, sandbox or None)."""
    if os.environ.get("PF_API_KEY"):
        from pf_metered import EscrowClient

        provider = os.environ.get("PF_PROVIDER_ID")
        if not provider:
            raise SystemExit("set PF_PROVIDER_ID to the agent selling market_price")
        return EscrowClient(), provider, os.environ.get("PF_MODEL_HOST_ID"), None
    from pf_metered.sandbox import Sandbox

    sandbox = Sandbox()
    payer = sandbox.add_agent(balance="20.00")
    return (
        sandbox.client(payer.api_key),
        sandbox.add_agent().agent_id,
        sandbox.add_agent().agent_id,
        sandbox,
    )


def run(*, verbose: bool = True) -> dict[str, Any]:
    """Run the agent once; return the figures the ledger shows."""
    client, provider, host, sandbox = connect()
    payer_before = sandbox.balance(_payer_id(sandbox, provider, host)) if sandbox else None
    toolkit = PurpleFleaToolkit(
        client=client,
        caps=Caps(max_budget="2.00", max_rate="0.05", max_total="5.00", max_open_streams=2),
        allowed=["escrow", "stream"],  # may pay; may not claim the faucet
    )
    paid_prices = pay_per_call(market_price, context=toolkit.tool_context, provider=provider)
    tools = [*toolkit.get_tools(), paid_prices]
    real = configured_model()
    model = real if real is not None else scripted_model(provider)

    callbacks: list[Any] = []
    llm_stream = None
    if host is not None:
        llm_stream = PaymentStream(
            client, host, PRICE_PER_TOKEN, budget="1.00", batch=500, memo="llm tokens"
        ).open()
        callbacks.append(MeteredCallbackHandler(llm_stream, unit="token"))

    agent = make_agent(model, tools)
    try:
        result = agent.invoke(
            {"messages": [("human", PROMPT.format(provider=provider))]},
            config={"callbacks": callbacks, "recursion_limit": 60},
        )
    finally:
        toolkit.tool_context.close_all()  # refund whatever the agent left open
        llm_receipt = llm_stream.close() if llm_stream is not None else None

    messages: list[BaseMessage] = result["messages"]
    if verbose:
        for message in messages:
            if isinstance(message, ToolMessage):
                flag = "error" if message.status == "error" else "ok"
                print(f"  tool {message.name:<14} [{flag}] {str(message.content)[:110]}")
            elif isinstance(message, AIMessage) and message.content:
                print(f"  agent: {message.content}")

    entries = toolkit.tool_context.entries()
    receipt = entries[-1].receipt if entries else None
    summary: dict[str, Any] = {
        "tool_errors": sum(
            1 for m in messages if isinstance(m, ToolMessage) and m.status == "error"
        ),
        "price_calls": sum(
            1
            for m in messages
            if isinstance(m, ToolMessage) and m.name == "market_price" and m.status != "error"
        ),
        "stream_units": receipt.units if receipt else None,
        "paid": receipt.paid if receipt else None,
        "refunded": receipt.refunded if receipt else None,
        "llm_tokens": llm_receipt.units if llm_receipt else None,
        "llm_paid": llm_receipt.paid if llm_receipt else None,
    }
    if sandbox is not None:
        sandbox.audit()
        summary["provider_balance"] = sandbox.balance(provider)
        summary["payer_spent"] = payer_before - sandbox.balance(_payer_id(sandbox, provider, host))
        summary["fees"] = sandbox.fees()
    if verbose:
        if receipt is not None:
            print(receipt)
        if llm_receipt is not None:
            print(f"LLM tokens metered: {llm_receipt.units} -> {llm_receipt.paid} USDC to the host")
        for key in ("provider_balance", "payer_spent", "fees"):
            if key in summary:
                print(f"{key.replace('_', ' ')}: {summary[key]} USDC")
    return summary


def _payer_id(sandbox: Any, provider: str, host: str | None) -> str:
    return str(next(a for a in sandbox.agent_ids() if a not in (provider, host)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quiet", action="store_true", help="print only the figures")
    args = ap.parse_args()
    summary = run(verbose=not args.quiet)
    if args.quiet:
        print(json.dumps({k: str(v) for k, v in summary.items()}))
    if summary["paid"] is not None and summary["paid"] != Decimal(PRICE_PER_CALL) * 12:
        raise SystemExit(f"unexpected amount paid: {summary['paid']}")


if __name__ == "__main__":
    main()
