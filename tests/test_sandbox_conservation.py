"""Thousands of random operations against the sandbox, checked against a tiny reference model.

After every step: the ledger's audit passes (money conserved, every escrow adds up) and every
balance, the fee account, and each escrow's figures equal what the model predicts. Driven over
the HTTP API with plain httpx through the in-process transport.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import httpx
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from pf_metered.money import fee_micro, format_usdc
from pf_metered.sandbox import FEE_ACCOUNT_ID, ManualClock, Sandbox, SandboxAgent

BASE = "http://localhost/api/v1"
HOUR_US = 3600 * 1_000_000


@dataclass
class ModelEscrow:
    payer: str
    payee: str
    amount: int
    released: int = 0
    refunded: int = 0
    fee: int = 0
    status: str = "locked"
    due_us: int | None = None

    @property
    def remaining(self) -> int:
        return self.amount - self.released - self.refunded


class SandboxMachine(RuleBasedStateMachine):
    agents = Bundle("agents")
    escrows = Bundle("escrows")

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.sb = Sandbox(clock=self.clock)
        self.keys: dict[str, SandboxAgent] = {}
        self.clients: dict[str, httpx.Client] = {}
        self.balances: dict[str, int] = {}
        self.fees = 0
        self.minted = 0
        self.claimed: set[str] = set()
        self.model: dict[str, ModelEscrow] = {}
        self.counter = itertools.count()
        self.last_post: tuple[str, str, dict, str, httpx.Response] | None = None
        self.posted_at = 0

    def teardown(self) -> None:
        for c in self.clients.values():
            c.close()
        self.sb.close()

    # -- model helpers -------------------------------------------------------------------

    def apply_due(self) -> None:
        now = self.clock.now_us()
        for esc in self.model.values():
            if esc.status == "locked" and esc.due_us is not None and esc.due_us <= now:
                self.pay_out(esc, esc.remaining)

    def pay_out(self, esc: ModelEscrow, amount: int) -> int:
        released = esc.released + amount
        fee = fee_micro(released) - esc.fee
        esc.released, esc.fee = released, esc.fee + fee
        self.balances[esc.payee] += amount - fee
        self.fees += fee
        if esc.remaining == 0:
            esc.status = "released"
        return fee

    def post(self, agent: str, path: str, body: dict) -> httpx.Response:
        key = f"k{next(self.counter)}"
        r = self.clients[agent].post(path, json=body, headers={"Idempotency-Key": key})
        self.last_post = (agent, path, body, key, r)
        self.posted_at = self.clock.now_us()
        return r

    # -- rules ---------------------------------------------------------------------------

    @initialize(
        target=agents, balances=st.lists(st.integers(0, 20_000_000), min_size=2, max_size=3)
    )
    def start(self, balances: list[int]):
        return multiple(*[self._add(b) for b in balances])

    def _add(self, balance: int) -> str:
        agent = self.sb.add_agent(format_usdc(balance))
        self.keys[agent.agent_id] = agent
        self.clients[agent.agent_id] = httpx.Client(
            transport=self.sb.transport(),
            base_url=BASE,
            headers={"Authorization": f"Bearer {agent.api_key}"},
            trust_env=False,
        )
        self.balances[agent.agent_id] = balance
        self.minted += balance
        return agent.agent_id

    @precondition(lambda self: len(self.keys) < 6)
    @rule(target=agents, balance=st.integers(0, 20_000_000))
    def add_agent(self, balance: int) -> str:
        return self._add(balance)

    @rule(agent=agents)
    def faucet(self, agent: str) -> None:
        self.apply_due()
        r = self.post(agent, "/faucet/claim", {})
        if agent in self.claimed:
            assert r.status_code == 409 and r.json()["error"] == "already_claimed"
        else:
            assert r.status_code == 200, r.text
            self.claimed.add(agent)
            self.balances[agent] += 1_000_000
            self.minted += 1_000_000

    @rule(
        target=escrows,
        payer=agents,
        payee=agents,
        amount=st.integers(900_000, 8_000_000),
        hours=st.none() | st.integers(1, 48),
    )
    def create(self, payer: str, payee: str, amount: int, hours: int | None):
        self.apply_due()
        body = {
            "to_agent_id": payee,
            "amount": format_usdc(amount),
            "memo": "",
            "auto_release_hours": hours,
        }
        r = self.post(payer, "/escrow", body)
        if payer == payee:
            assert r.status_code == 400
        elif amount < 1_000_000:
            assert (r.status_code, r.json()["error"]) == (400, "invalid_amount")
        elif amount > self.balances[payer]:
            assert (r.status_code, r.json()["error"]) == (402, "insufficient_balance")
        else:
            assert r.status_code == 201, r.text
            eid = r.json()["escrow_id"]
            due = None if hours is None else self.clock.now_us() + hours * HOUR_US
            self.model[eid] = ModelEscrow(payer, payee, amount, due_us=due)
            self.balances[payer] -= amount
            return eid
        return multiple()

    @rule(escrow=escrows, data=st.data(), by_payee=st.booleans())
    def release(self, escrow: str, data: st.DataObject, by_payee: bool) -> None:
        self.apply_due()
        esc = self.model[escrow]
        hi = max(esc.remaining, 1) + 2
        amount = data.draw(st.integers(1, hi) | st.integers(1, 20_000), label="amount")
        caller = esc.payee if by_payee else esc.payer
        r = self.post(caller, f"/escrow/{escrow}/release-partial", {"amount": format_usdc(amount)})
        if by_payee:
            assert r.status_code == 403
        elif esc.status != "locked":
            assert (r.status_code, r.json()["error"]) == (409, "invalid_status")
        elif amount > esc.remaining:
            assert (r.status_code, r.json()["error"]) == (400, "invalid_amount")
        else:
            assert r.status_code == 200, r.text
            fee = self.pay_out(esc, amount)
            assert r.json()["releases"][-1]["fee"] == format_usdc(fee)

    @rule(escrow=consumes(escrows))
    def refund(self, escrow: str) -> None:
        self.apply_due()
        esc = self.model[escrow]
        r = self.post(esc.payer, f"/escrow/{escrow}/refund", {})
        if esc.status != "locked":
            assert (r.status_code, r.json()["error"]) == (409, "invalid_status")
        else:
            assert r.status_code == 200, r.text
            esc.refunded += esc.remaining
            self.balances[esc.payer] += esc.refunded
            esc.status = "refunded"

    @precondition(lambda self: self.last_post is not None)
    @rule(change=st.booleans())
    def retry_last_post(self, change: bool) -> None:
        """A retry with the same key replays (moving nothing); another body is 422."""
        assert self.last_post is not None
        agent, path, body, key, first = self.last_post
        if change:
            body = {**body, "memo": "changed"}
        r = self.clients[agent].post(path, json=body, headers={"Idempotency-Key": key})
        if change:
            assert (r.status_code, r.json()["error"]) == (422, "idempotency_key_reused")
        else:
            assert r.headers["idempotent-replayed"] == "true"
            assert (r.status_code, r.content) == (first.status_code, first.content)

    @rule(hours=st.sampled_from([0.5, 1, 6, 24, 49]))
    def advance(self, hours: float) -> None:
        self.clock.advance(hours * 3600)
        if self.last_post is not None and self.clock.now_us() - self.posted_at >= 24 * HOUR_US:
            self.last_post = None  # its key expired: a retry would run afresh

    @rule()
    def tick(self) -> None:
        self.sb.tick()
        self.apply_due()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        self.sb.tick()
        self.apply_due()
        report = self.sb.audit()
        assert report.minted_micro == self.minted
        assert report.fees_micro == self.fees
        for agent, balance in self.balances.items():
            assert self.sb.balance(agent) * 1_000_000 == balance, agent
            assert balance >= 0
        assert self.sb.balance(FEE_ACCOUNT_ID) * 1_000_000 == self.fees
        escrowed = sum(e.remaining for e in self.model.values() if e.status == "locked")
        assert report.escrowed_micro == escrowed
        assert sum(self.balances.values()) + self.fees + escrowed == self.minted


SandboxMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSandboxConservation = SandboxMachine.TestCase


def test_escrow_figures_match_the_model_after_a_fixed_scenario() -> None:
    """A deterministic smoke run of the machine's rules (fast feedback when it breaks)."""
    m = SandboxMachine()
    try:
        a, b = m.start([5_000_000, 0]).values
        eid = m.create(a, b, 3_000_000, 1)
        m.release(eid, _Fixed([1_000_000]), False)
        m.retry_last_post(False)
        m.retry_last_post(True)
        m.advance(1)
        m.books_balance()
        assert m.model[eid].status == "released"
        assert m.sb.escrow(eid).released_micro == 3_000_000
    finally:
        m.teardown()


class _Fixed:
    """A stand-in for ``st.data()`` that draws prepared values."""

    def __init__(self, values: list[int]) -> None:
        self.values = list(values)

    def draw(self, _strategy: object, label: str = "") -> int:
        return self.values.pop(0)
