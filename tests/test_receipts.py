"""Receipts that say what happened to the money, checked against the sandbox ledger's balances:
after the service auto-released the escrow (v1) or timed a tranche out back to the payer
(deployed), ``close()`` finishes with a receipt instead of raising on every call."""

from __future__ import annotations

from decimal import Decimal

import pytest
from conftest import DeployedWorld

from pf_metered.money import fee_micro, micro_to_decimal
from pf_metered.sandbox import ManualClock, Sandbox
from pf_metered.stream import AsyncPaymentStream, PaymentStream

START = Decimal("100")


class V1World:
    """A v1 sandbox on a clock the test moves, a funded payer and a provider."""

    def __init__(self) -> None:
        self.clock = ManualClock()
        self.sandbox = Sandbox(clock=self.clock)
        self.payer = self.sandbox.add_agent(balance=str(START))
        self.provider = self.sandbox.add_agent()
        self.client = self.sandbox.client(self.payer.api_key)
        self.aclient = self.sandbox.async_client(self.payer.api_key)

    def balance(self, who: str = "payer") -> Decimal:
        agent = self.payer if who == "payer" else self.provider
        return self.sandbox.balance(agent.agent_id)

    def close(self) -> None:
        self.client.close()
        self.sandbox.close()


@pytest.fixture
def v1():
    w = V1World()
    yield w
    w.close()


def _check_auto_released(v1: V1World, r, units: int) -> None:
    assert r.units == units
    assert r.paid == Decimal("0.01") * units  # what the counted units cost
    assert r.auto_released == Decimal("10") - r.paid  # the rest went to the provider at timeout
    assert r.refunded == 0 and r.still_locked == ()
    assert START - v1.balance() == r.debited == Decimal("10")
    assert (
        v1.balance("provider")
        == r.provider_net
        == Decimal("10") - micro_to_decimal(fee_micro(10_000_000))
    )
    assert "auto-released" in str(r) and any("auto-released" in n for n in r.notes)
    v1.sandbox.audit()


def test_close_after_auto_release_returns_a_receipt_that_says_so(v1):
    s = PaymentStream(
        v1.client,
        v1.provider.agent_id,
        "0.01",
        batch=10,
        budget="10",
        auto_release_hours=1,
        background=False,
    ).open()
    s.record(25)
    s.pump()  # 20 units released, 5 counted and pending
    v1.clock.advance(2 * 3600)  # the escrow auto-releases its rest to the provider
    s.record(12)
    r = s.close()
    _check_auto_released(v1, r, 37)
    assert s.close() is r  # and again: the same receipt, no Conflict


async def test_async_close_after_auto_release_returns_a_receipt(v1):
    s = AsyncPaymentStream(
        v1.aclient,
        v1.provider.agent_id,
        "0.01",
        batch=10,
        budget="10",
        auto_release_hours=1,
        background=False,
    )
    await s.open()
    s.record(25)
    await s.pump()
    v1.clock.advance(2 * 3600)
    s.record(12)
    r = await s.close()
    _check_auto_released(v1, r, 37)


def test_deployed_tranche_timed_out_is_reported_back_less_commission():
    w = DeployedWorld(balance=str(START))
    try:
        start = w.balance()
        s = PaymentStream(
            w.client(),
            w.provider.agent_id,
            "0.001",
            batch=100,
            budget="5",
            auto_release_hours=1,
            background=False,
        ).open()
        s.record(150)
        s.pump()
        w.clock.advance(2 * 3600)  # the live tranches time out back to the payer, less 1%
        r = s.close()
        assert r.paid == Decimal("0.15")
        timed_out = [t for t in s.client.report().tranches if t.state == "expired"]
        assert timed_out
        gross = sum(t.amount_micro for t in timed_out)
        kept = sum(fee_micro(t.amount_micro) for t in timed_out)
        assert r.kept_by_service_micro == kept > 0
        assert r.refunded == micro_to_decimal(gross - kept)  # what really came back
        assert (
            start - w.balance() == r.debited == r.paid + r.kept_by_service + r.still_locked_amount
        )
        assert "kept by service" in str(r)
        assert any("timed out" in n for n in r.notes)
        w.sandbox.audit()
    finally:
        w.close()
