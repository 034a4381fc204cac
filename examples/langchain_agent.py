"""A LangChain agent that pays as it works: per model call, and per call of a provider's tool.

The agent is built with ``langchain.agents.create_agent`` and pays two agents:

* **the model's host**, one unit (0.002 USDC) per model call, through ``MeteredMiddleware``:
  it opens a payment stream for the run, checks the budget *before* each call (a run the
  budget cannot pay ends cleanly with a message instead of an exception), closes the stream
  when the run ends and puts the run's bill and receipt in the agent's state
  (``result["pf_metered"]["MeteredMiddleware"]``);
* **the provider of** ``market_price`` (sold at 0.01 USDC a call), from a payment stream the
  agent opens, checks and closes itself with the Purple Flea toolkit (narrowed so it may pay
  but not claim the faucet, and capped by the operator); ``pay_per_call`` makes each
  successful ``market_price`` call count one unit on it, and refuses a call before it runs if
  nothing pays for it.

By default the model is a scripted fake that makes the mistakes real models make (an
over-the-cap budget, a rate written in words, buying before paying) and corrects itself from
the tools' answers. Everything runs on the embedded sandbox: no key, no network. The program
prints the conversation, both receipts and what the sandbox ledger shows (the same money).

    python examples/langchain_agent.py            # scripted model, sandbox
    PF_LLM=openai:gpt-4o-mini OPENAI_API_KEY=...  python examples/langchain_agent.py
                                                  # a real model (needs the provider's
                                                  # langchain package), still on the sandbox
    PF_API_KEY=... PF_PROVIDER_ID=... PF_MODEL_HOST_ID=... python examples/langchain_agent.py
                                                  # the live escrow API
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.tools import tool

from pf_metered.langchain import Caps, MeteredMiddleware, PurpleFleaToolkit, pay_per_call
from pf_metered.langchain.testing import ScriptedChatModel, tool_call
from pf_metered.meter.receipt import Receipt
from pf_metered.money import decimal_to_micro, format_usdc
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream

PRICE_PER_CALL = "0.01"
"""What the provider charges per ``market_price`` call."""
PRICE_PER_MODEL_CALL = "0.002"
"""What the model's host charges per model call."""
SYMBOLS = ["BTC", "ETH", "SOL", "AVAX", "DOT", "ATOM", "NEAR", "ARB", "OP", "SUI", "APT", "TIA"]


@tool
def market_price(symbol: str) -> str:
    """The latest price of a crypto asset in USD, e.g. symbol="BTC". Paid per call."""
    return json.dumps({"symbol": symbol, "usd": str(1000 + 7 * len(symbol) + ord(symbol[0]))})


# -- the model -----------------------------------------------------------------------------


def _figures(message: ToolMessage) -> dict[str, Any]:
    """A pay tool's figures: its artifact (the content is the sentence the model reads)."""
    return message.artifact if isinstance(message.artifact, dict) else {}


def _last_stream_id(messages: Sequence[BaseMessage]) -> str:
    for message in reversed(messages):
        if not isinstance(message, ToolMessage) or message.status == "error":
            continue
        if message.name == "stream_open":
            return str(_figures(message)["stream_id"])
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

    def on_stream(name: str) -> Any:
        def step(messages: Sequence[BaseMessage]) -> AIMessage:
            return AIMessage("", tool_calls=[tool_call(name, stream_id=_last_stream_id(messages))])

        return step

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
            # 3. buying before paying: refused before the tool runs, saying what to do
            prices(SYMBOLS[:1]),
            open_stream,
            prices(SYMBOLS[0:4]),
            prices(SYMBOLS[4:8]),
            prices(SYMBOLS[8:12]),
            on_stream("stream_status"),
            on_stream("stream_close"),
            "I bought 12 prices for 0.12 USDC and closed the stream; the rest was refunded.",
        ]
    )


def configured_model() -> BaseChatModel | None:
    """A real chat model named by ``PF_LLM`` (``provider:model``), if one is configured."""
    spec = os.environ.get("PF_LLM")
    if not spec:
        return None
    from langchain.chat_models import init_chat_model

    try:
        return init_chat_model(spec)
    except ImportError as exc:  # pragma: no cover - depends on optional installs
        raise SystemExit(f"PF_LLM={spec} needs the provider's integration: {exc}") from exc


PROMPT = (
    "Get the latest USD price of each of these assets from the market_price tool, which the "
    f"provider agent {{provider}} sells for {PRICE_PER_CALL} USDC a call: {', '.join(SYMBOLS)}. "
    "Pay through a payment stream (stream_open) with a budget of at most 1.00 USDC, check the "
    "stream when done, then close it."
)


# -- the run -------------------------------------------------------------------------------


@dataclass
class World:
    """Who pays whom: the payer's client, the two payees, and the sandbox if there is one."""

    client: Any
    provider: str
    host: str
    sandbox: Sandbox | None = None
    payer: str | None = None


def connect() -> World:
    """The live service if ``PF_API_KEY`` is set, else a fresh sandbox with three agents."""
    if os.environ.get("PF_API_KEY"):
        from pf_metered import EscrowClient

        provider = os.environ.get("PF_PROVIDER_ID")
        host = os.environ.get("PF_MODEL_HOST_ID")
        if not provider or not host:
            raise SystemExit(
                "set PF_PROVIDER_ID (the agent selling market_price) and PF_MODEL_HOST_ID "
                "(the agent hosting the model)"
            )
        return World(EscrowClient(), provider, host)
    sandbox = Sandbox()
    payer = sandbox.add_agent(balance="20.00")
    return World(
        sandbox.client(payer.api_key),
        provider=sandbox.add_agent().agent_id,
        host=sandbox.add_agent().agent_id,
        sandbox=sandbox,
        payer=payer.agent_id,
    )


@dataclass
class Outcome:
    """What one run did and paid."""

    messages: list[BaseMessage]
    tools: Receipt | None
    """The agent's own stream to the provider (``None`` if it never opened one)."""
    model_bill: dict[str, Any]
    """The run's bill for model calls, as ``MeteredMiddleware`` left it in the agent's state."""
    ledger: list[tuple[str, str]]
    """The sandbox ledger's figures, as rows (empty on the live service)."""


def run() -> Outcome:
    """Run the agent once; every stream is closed (and its unused budget refunded) whatever
    happens."""
    world = connect()
    before = world.sandbox.balance(world.payer) if world.sandbox and world.payer else None
    toolkit = PurpleFleaToolkit(
        client=world.client,
        caps=Caps(max_budget="2.00", max_rate="0.05", max_total="5.00", max_open_streams=2),
        allowed=["escrow", "stream"],  # may pay; may not claim the faucet
    )
    paid_prices = pay_per_call(market_price, toolkit=toolkit, provider=world.provider)
    model = configured_model() or scripted_model(world.provider)

    def model_calls_stream(run_key: str) -> PaymentStream:
        """The stream ``MeteredMiddleware`` opens for one run (and closes when it ends)."""
        return PaymentStream(
            world.client, world.host, PRICE_PER_MODEL_CALL, budget="1.00", batch=5,
            memo=f"model calls, run {run_key}",
        )  # fmt: skip

    meter = MeteredMiddleware(open_stream=model_calls_stream, per="call")
    agent = create_agent(model, [*toolkit.get_tools(), paid_prices], middleware=[meter])
    try:
        result = agent.invoke(
            {"messages": [("human", PROMPT.format(provider=world.provider))]},
            {"recursion_limit": 60},
        )
    finally:
        toolkit.tool_context.close_all()  # refund whatever the agent left open
        meter.close_all()  # a run that raised never reached after_agent: close its stream
    entries = toolkit.tool_context.entries()
    ledger: list[tuple[str, str]] = []
    if world.sandbox is not None and world.payer is not None and before is not None:
        world.sandbox.audit()
        ledger = [
            ("payer spent", _usdc(before - world.sandbox.balance(world.payer))),
            ("provider got", _usdc(world.sandbox.balance(world.provider))),
            ("model host got", _usdc(world.sandbox.balance(world.host))),
            ("fees", _usdc(world.sandbox.fees())),
        ]
        world.sandbox.close()
    world.client.close()
    return Outcome(
        messages=list(result["messages"]),
        tools=entries[-1].receipt if entries else None,
        model_bill=dict(result["pf_metered"][meter.name]),
        ledger=ledger,
    )


def _usdc(amount: Decimal) -> str:
    return f"{format_usdc(decimal_to_micro(amount))} USDC"


def table(title: str, rows: list[tuple[str, str]]) -> str:
    """Rows drawn like a receipt's table."""
    width = max(len(k) for k, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    rule = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    lines = [rule, f"| {title:<{width + vwidth + 3}} |", rule]
    lines += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
    return "\n".join([*lines, rule])


def bill_rows(bill: dict[str, Any]) -> list[tuple[str, str]]:
    """A run's bill as rows: what it counted, and the receipt of the stream closed for it."""
    rows = [("model calls", str(bill["model_calls"])), ("units", str(bill["units"]))]
    receipt = bill.get("receipt")
    if receipt is None:  # the stream was not closed by the run (a stream the program gave)
        return [*rows, ("cost", f"{bill['cost']} USDC")]
    return [
        *rows,
        ("rate", f"{receipt['rate']} USDC / unit"),
        ("releases", str(receipt["releases"])),
        ("budget", f"{receipt['budget']} USDC"),
        ("paid", f"{receipt['paid']} USDC"),
        ("fee (1%)", f"{receipt['fee']} USDC"),
        ("provider net", f"{receipt['provider_net']} USDC"),
        ("refunded", f"{receipt['refunded']} USDC"),
    ]


def show(outcome: Outcome) -> None:
    for message in outcome.messages:
        if isinstance(message, ToolMessage):
            flag = "error" if message.status == "error" else "ok"
            print(f"  tool {message.name:<14} [{flag}] {str(message.content)[:100]}")
        elif isinstance(message, AIMessage) and message.content:
            print(f"  agent: {message.content}")
    print(f"\nThe agent's stream to the provider (market_price at {PRICE_PER_CALL} USDC a call):")
    print(outcome.tools if outcome.tools is not None else "  (never opened)")
    bill = outcome.model_bill
    print(
        f"\nMeteredMiddleware's stream to the model's host ({PRICE_PER_MODEL_CALL} USDC a "
        "model call), opened and closed for the run; its bill from the agent's state:"
    )
    print(table("Run bill (state['pf_metered'])", bill_rows(bill)))
    if outcome.ledger:
        print()
        print(table("Sandbox ledger", outcome.ledger))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.parse_args()
    outcome = run()
    show(outcome)
    if outcome.tools is not None and outcome.tools.paid > Decimal("1.00"):
        raise SystemExit(f"paid past the agent's budget: {outcome.tools.paid}")


if __name__ == "__main__":
    main()
