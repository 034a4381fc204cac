"""A user's program, checked by ``mypy --strict`` in ./scripts/test and run by
tests/test_typed_user_program.py.

Why: a public API can make its users' code untyped without failing any of our own checks
(``@metered`` once returned ``Any``, and a strict user program reported "Untyped decorator
makes function untyped"). Here every result goes into a variable of the type a user would
write, and ``_call_sites_stay_checked`` holds calls that are wrong on purpose: each carries a
``# type: ignore[code]`` that mypy --strict (``warn_unused_ignores``) reports as unused the
moment the decorated function loses its signature.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal

from pf_metered import (
    AsyncPaymentStream,
    BudgetExhausted,
    Metered,
    PaymentStream,
    Receipt,
    Sandbox,
    StatusReport,
    metered,
)

RATE = "0.001"


def pay_per_call(sandbox: Sandbox, to: str, api_key: str) -> Receipt:
    """A sync stream, a decorated function, a units-from-the-result one and a metered block."""
    client = sandbox.client(api_key)
    with PaymentStream(client, to, RATE, batch=10, budget="1.00") as stream:

        @metered(stream=stream)
        def infer(prompt: str) -> str:
            return prompt.upper()

        @metered(stream=stream, units=len)
        def tokens(text: str) -> list[str]:
            return text.split()

        answers: list[str] = [infer(f"question {i}") for i in range(12)]
        words: list[str] = tokens("three more units")
        block: Metered
        with metered(stream=stream) as block:
            assert block.stream is stream
        counted: int = stream.record(2)
        status: StatusReport = stream.status()
        assert len(answers) == 12 and len(words) == 3
        assert counted == status.units == 12 + 3 + 1 + 2
    receipt = stream.receipt
    assert receipt is not None
    client.close()
    return receipt


async def pay_per_async_call(sandbox: Sandbox, to: str, api_key: str) -> Receipt:
    """An async stream and a decorated coroutine function."""
    client = sandbox.async_client(api_key)
    async with AsyncPaymentStream(client, to, RATE, batch=10, budget="1.00") as stream:

        @metered(stream=stream)
        async def ask(question: str) -> int:
            await asyncio.sleep(0)
            return len(question)

        lengths: list[int] = [await ask("four") for _ in range(5)]
        assert lengths == [4] * 5
    receipt = stream.receipt
    assert receipt is not None
    await client.aclose()
    return receipt


def own_stream(sandbox: Sandbox, to: str, api_key: str) -> Receipt:
    """A decorator that opens its own stream; typed code keeps the ``Metered`` object."""
    client = sandbox.client(api_key)
    meter: Metered = metered(rate=RATE, batch=5, to=to, budget="1.00", client=client)

    @meter
    def lookup(key: str, default: int = 0) -> int:
        return len(key) + default

    found: int = lookup("abc", default=1)
    try:
        refused: int | None = lookup("x")
    except BudgetExhausted:  # the error a caller handles when the budget is spent
        refused = None
    receipt: Receipt = meter.close()
    assert refused == 1
    client.close()
    assert found == 4
    return receipt


def _call_sites_stay_checked(stream: PaymentStream) -> None:
    """Never run. Each ignore below must be needed, else mypy --strict fails the run."""

    @metered(stream=stream)
    def infer(prompt: str) -> str:
        return prompt

    def plain(n: int) -> int:
        return n

    wrapped = metered(plain, stream=stream)
    infer(42)  # type: ignore[arg-type]
    not_a_str: int = infer("x")  # type: ignore[assignment]
    wrapped("no")  # type: ignore[arg-type]

    @metered(stream=stream)
    async def ask(question: str) -> int:
        return len(question)

    not_awaited: int = ask("q")  # type: ignore[assignment]
    del not_a_str, not_awaited


def main() -> list[Receipt]:
    with Sandbox() as sandbox:
        payer = sandbox.add_agent(balance="10.00")
        provider = sandbox.add_agent()
        receipts = [
            pay_per_call(sandbox, provider.agent_id, payer.api_key),
            asyncio.run(pay_per_async_call(sandbox, provider.agent_id, payer.api_key)),
            own_stream(sandbox, provider.agent_id, payer.api_key),
        ]
        paid: Decimal = sandbox.balance(provider.agent_id)
        assert paid > 0
    return receipts


if __name__ == "__main__":
    for r in main():
        print(r)
