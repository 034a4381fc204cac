"""The streams' exact-money invariants on both dialects (v1 partial releases, deployed tranche
chains), sync and async, plus the faults only the deployed dialect has."""

from __future__ import annotations

import logging
import re
import threading
from decimal import ROUND_HALF_UP, Decimal

import pytest
from conftest import DeployedWorld, LoseAnswers

from pf_metered.money import fee_micro, micro_to_decimal
from pf_metered.stream import AsyncPaymentStream, PaymentStream
from pf_metered.stream._tranches import TrancheChain

MIN = Decimal("0.10")
START = Decimal("1000")


def exact(rate: str, units: int) -> Decimal:
    return (Decimal(rate) * units).quantize(Decimal("0.000001"), ROUND_HALF_UP)


class World(DeployedWorld):
    """The same sandbox and virtual clock, speaking either dialect."""

    def __init__(self, dialect: str, **kw) -> None:
        super().__init__(balance=str(START), **kw)
        self.dialect = dialect

    def client(self, **kw):  # type: ignore[override]
        return super().client(dialect=self.dialect, **kw)

    def aclient(self, **kw):  # type: ignore[override]
        return super().aclient(dialect=self.dialect, **kw)

    def escrows(self) -> list[tuple[str, int, int, str]]:
        with self.sandbox._db.transaction() as conn:
            return [
                (str(r[0]), int(r[1]), int(r[2]), str(r[3]))
                for r in conn.execute(
                    "SELECT escrow_id, amount, released, status FROM escrows ORDER BY seq"
                ).fetchall()
            ]


@pytest.fixture(params=["v1", "deployed"])
def world(request):
    w = World(request.param)
    yield w
    w.close()


def no_float_tail(value: Decimal) -> bool:
    exp = value.as_tuple().exponent
    return isinstance(exp, int) and exp >= -6


def check(world: World, stream, rate: str, units: int) -> None:
    """The invariants every stream keeps, whatever the dialect."""
    r = stream.receipt
    world.sandbox.tick()
    assert r.units == units
    assert r.paid == exact(rate, units) <= r.budget
    assert r.fee + r.provider_net == r.paid
    if world.dialect == "v1":
        assert r.refunded == r.budget - r.paid and r.still_locked == ()
    for value in (r.paid, r.fee, r.provider_net, r.refunded, r.still_locked_amount):
        assert no_float_tail(value)
    assert not any(re.search(r"\d\.\d{7,}", v) for k, v in r.rows() if k != "rate")
    assert world.balance("provider") == r.provider_net
    escrows = world.escrows()
    released = sum(rel for _, _, rel, _ in escrows)
    assert micro_to_decimal(released) == r.paid
    if world.dialect == "deployed":
        report = stream.client.report()
        assert report.unpaid_micro == 0 and report.paid_micro == int(r.paid * 10**6)
        assert all(a == rel for _, a, rel, st in escrows if st == "released")  # whole
        assert all(a >= 100_000 for _, a, _, _ in escrows)  # the service's minimum
        assert r.releases == report.releases == sum(1 for e in escrows if e[3] == "released")
        locked_now = sum(a for _, a, rel, st in escrows if st == "locked")
        kept_now = sum(fee_micro(a) for _, a, _, st in escrows if st == "refunded")
        assert world.balance() == START - r.paid - micro_to_decimal(locked_now + kept_now)
        # the receipt says the same: what came back, what the service kept, what is locked
        # (a tranche whose create's answer was lost is locked but unknown to the receipt)
        unknown = sum(a for a, _ in report.ambiguous)
        assert r.still_locked_micro + unknown == locked_now
        assert r.kept_by_service_micro == kept_now
        assert r.refunded == micro_to_decimal(
            sum(a - fee_micro(a) for _, a, _, st in escrows if st == "refunded")
        )
        assert world.balance() == START - r.debited - micro_to_decimal(unknown)
        world.clock.advance(25 * 3600)  # unused tranches come back, less 1%
        world.sandbox.tick()
        kept = sum(fee_micro(a) for _, a, _, st in world.escrows() if st == "refunded")
        assert world.balance() == START - r.paid - micro_to_decimal(kept)
        assert kept == report.expiry_commission_micro
    else:
        assert world.balance() == START - r.paid
    world.sandbox.audit()


SCENARIOS = [
    ("0.001", 100, "5", [1, 2, 3, 50, 100, 44, 1000, 7]),
    ("0.333333333", 7, "100", [1, 2, 3, 6, 10, 30, 1, 1]),
    ("0.0000001", 1000, "10", [600_000, 1, 2_500_000, 33, 900_001]),
    ("1.5", None, "10", [1, 2, 3]),
    ("0.0433", 10, "20", [9, 10, 11, 100, 5, 200]),
]


@pytest.mark.parametrize(("rate", "batch", "budget", "chunks"), SCENARIOS)
def test_exact_totals_sync(world, rate, batch, budget, chunks):
    with PaymentStream(
        world.client(), world.provider.agent_id, rate, batch=batch, budget=budget
    ) as s:
        for k in chunks:
            s.record(k)
        s.flush()
    check(world, s, rate, sum(chunks))


@pytest.mark.parametrize(("rate", "batch", "budget", "chunks"), SCENARIOS)
async def test_exact_totals_async(world, rate, batch, budget, chunks):
    async with AsyncPaymentStream(
        world.aclient(), world.provider.agent_id, rate, batch=batch, budget=budget
    ) as s:
        for k in chunks:
            s.record(k)
        await s.flush()
    check(world, s, rate, sum(chunks))


def test_threads_exact_and_no_double_release(world):
    with PaymentStream(
        world.client(), world.provider.agent_id, "0.0001", batch=100, budget="100"
    ) as s:

        def work():
            for _ in range(1000):
                s.record()

        threads = [threading.Thread(target=work) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    check(world, s, "0.0001", 16_000)


def test_budget_used_to_the_last_unit(world):
    with PaymentStream(world.client(), world.provider.agent_id, "0.25", batch=3, budget="5") as s:
        s.record(20)
    check(world, s, "0.25", 20)
    assert s.receipt.refunded == 0


def test_context_manager_pays_on_exception(world):
    with (
        pytest.raises(RuntimeError),
        PaymentStream(world.client(), world.provider.agent_id, "0.01", budget="5") as s,
    ):
        s.record(37)
        raise RuntimeError("boom")
    check(world, s, "0.01", 37)


# -- deployed only ------------------------------------------------------------------------


@pytest.fixture
def dep():
    w = World("deployed")
    yield w
    w.close()


def test_chain_shape_lock_ahead_release_whole_final_right_sized(dep):
    s = PaymentStream(
        dep.client(), dep.provider.agent_id, "0.001", batch=100, budget="5", background=False
    ).open()
    chain = s.client
    assert isinstance(chain, TrancheChain)
    states = lambda: [t.state for t in chain.report().tranches]  # noqa: E731
    assert states() == ["live"]  # one tranche, ahead of need, at open
    s.record(60)
    s.pump()
    assert states() == ["live"]  # no batch yet: nothing to do
    s.record(40)
    s.pump()  # batch 1 (0.10 owed): one more locked ahead, nothing released (hold-back)
    assert states() == ["live", "live"]
    s.record(110)
    s.pump()  # 210 units: 0.21 owed ≥ 0.10 + hold-back 0.10 → tranche 1 released whole
    rep = chain.report()
    assert rep.paid_micro == 100_000 and rep.tranches[0].state == "released"
    assert all(t.amount_micro == 100_000 for t in rep.tranches)
    s.record(45)  # 255 units: 0.155 still owed at close
    r = s.close()
    rep = chain.report()
    assert r.paid == Decimal("0.255") == micro_to_decimal(rep.paid_micro)
    final = [t for t in rep.tranches if t.final]
    assert [t.amount_micro for t in final] == [155_000]  # right-sized, ≥ the minimum
    assert rep.let_go_micro == sum(t.amount_micro for t in rep.tranches if t.state == "let_go")
    check(dep, s, "0.001", 255)


def test_stream_under_the_minimum_is_reported_unpaid_not_rounded_up(dep, caplog):
    caplog.set_level(logging.WARNING, "pf_metered.stream.tranches")
    with PaymentStream(dep.client(), dep.provider.agent_id, "0.001", batch=100, budget="1") as s:
        s.record(3)
    assert s.receipt.paid == 0 and s.receipt.units == 3
    assert s.client.report().unpaid_micro == 3_000
    assert dep.balance("provider") == 0
    assert any("cannot be paid" in m for m in caplog.messages)
    dep.sandbox.audit()


def test_rate_limit_notes_reported_at_open(dep, caplog):
    caplog.set_level(logging.INFO, "pf_metered.stream.tranches")
    s = PaymentStream(
        dep.client(),
        dep.provider.agent_id,
        "0.0001",
        batch=10,
        every=2,
        budget="5",
        background=False,
    ).open()
    notes = s.client.plan.notes
    assert any("every=2s asks for 30.0 releases a minute" in n for n in notes)
    assert any("under the service's minimum" in n for n in notes)
    assert any("asks for" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    s.close()


def test_busy_stream_slows_down_instead_of_drawing_429s(dep):
    client = dep.client()
    with PaymentStream(
        client, dep.provider.agent_id, "0.001", batch=100, budget="50", background=False
    ) as s:
        for _ in range(300):
            s.record(100)
            s.pump()
    assert client._limiter.drawn_429 == 0
    assert dep.now() - 1_767_225_600 > 60  # creates were paced over virtual minutes
    check(dep, s, "0.001", 30_000)


def test_429_storm_from_a_neighbour_backs_off_and_stays_exact(dep):
    import httpx

    http = httpx.Client(transport=dep.sandbox.transport())
    client = dep.client(max_retries=6)
    with PaymentStream(
        client, dep.provider.agent_id, "0.001", batch=100, budget="50", background=False
    ) as s:
        for i in range(40):
            if i % 10 == 0:  # another process on the same address fills the window
                for _ in range(22):
                    http.post("http://localhost/deployed/escrow/create", json={})
            s.record(100)
            s.pump()
    http.close()
    assert client._limiter.drawn_429 >= 1
    check(dep, s, "0.001", 4_000)


def test_lost_create_and_release_answers_mid_stream(dep):
    t = LoseAnswers(
        dep.sandbox.transport(), {("POST", "/escrow/create"): 0, ("POST", "/escrow/release/"): 2}
    )
    s = PaymentStream(
        dep.client(transport=t),
        dep.provider.agent_id,
        "0.001",
        batch=100,
        budget="5",
        background=False,
    ).open()
    t.rules[("POST", "/escrow/create")] = 1  # the lock-ahead's answer is lost
    for _ in range(12):
        s.record(100)
        s.pump()
    s.close()
    rep = s.client.report()
    assert len(rep.ambiguous) == 1 and rep.ambiguous[0][1]  # amount and nonce kept
    assert len(t.lost) == 3
    unknown = [
        e
        for e in dep.escrows()
        if e[3] == "locked" and e[0] not in {tr.escrow_id for tr in rep.tranches}
    ]
    assert len(unknown) == 1  # the ambiguous tranche exists, unreleased: never paid twice
    check(dep, s, "0.001", 1_200)


async def test_async_lost_release_and_catch_up(dep):
    t = LoseAnswers(dep.sandbox.transport(), {("POST", "/escrow/release/"): 1})
    async with AsyncPaymentStream(
        dep.aclient(transport=t), dep.provider.agent_id, "0.002", batch=50, budget="10"
    ) as s:
        s.record(1234)
        await s.flush()
        s.record(766)
    assert t.lost
    check(dep, s, "0.002", 2000)


def test_expired_tranche_is_replaced(dep):
    s = PaymentStream(
        dep.client(),
        dep.provider.agent_id,
        "0.001",
        batch=100,
        budget="5",
        auto_release_hours=1,
        background=False,
    ).open()
    s.record(150)
    s.pump()
    dep.clock.advance(2 * 3600)  # live tranches expire back to the payer before release
    s.record(150)
    s.pump()
    r = s.close()
    states = [t.state for t in s.client.report().tranches]
    assert "expired" in states
    assert r.paid == Decimal("0.3")
    check(dep, s, "0.001", 300)


def test_time_policy_on_tranches(dep):
    now = [0.0]
    s = PaymentStream(
        dep.client(),
        dep.provider.agent_id,
        "0.01",
        every=60,
        budget="10",
        background=False,
        clock=lambda: now[0],
    ).open()
    for minute in range(5):
        s.record(25)  # 0.25 a minute
        now[0] += 61
        s.pump()
        assert s.client.report().paid_micro <= 250_000 * (minute + 1)
    assert s.client.report().paid_micro >= 500_000  # released while running, not only at close
    s.close()
    check(dep, s, "0.01", 125)


def test_a_chain_not_opened_here_says_so(dep):
    from pf_metered.errors import UnsupportedByDialect
    from pf_metered.meter.core import Meter, plan_stream
    from pf_metered.meter.store import MemoryStore

    config, policy = plan_stream(dep.provider.agent_id, "0.01", budget="1")
    chain = TrancheChain(dep.client(), Meter(MemoryStore(), config, policy))
    with pytest.raises(UnsupportedByDialect, match="not supported yet"):
        chain.release_partial("chain:esc_x", "0.10", "batch:units 1-10", "k")
    with pytest.raises(UnsupportedByDialect):
        chain.get_escrow("chain:esc_x")
    with pytest.raises(UnsupportedByDialect):
        chain.finish()


# -- honest receipts (issue 11 item 4): checked against the sandbox ledger's own balances ---


def _run_by_units(world: World, rate: str, batch: int, budget: str, units: int, *, chunk: int = 1):
    """A stream fed ``chunk`` units at a time, its sender pumped after each (deterministic)."""
    s = PaymentStream(
        world.client(), world.provider.agent_id, rate, batch=batch, budget=budget, background=False
    ).open()
    done = 0
    while done < units:
        k = min(chunk, units - done)
        s.record(k)
        s.pump()
        done += k
        rep = s.client.report()
        due = rep.owed_micro - rep.paid_micro
        covered, ahead = 0, 0
        for t in (t for t in rep.tranches if t.state == "live"):
            if covered >= due:
                ahead += 1  # no unit counted so far needs any of this tranche
            covered += t.amount_micro
        assert ahead <= 1, f"{ahead} tranches locked ahead of need at {done} units"
    return s


@pytest.mark.parametrize(
    ("rate", "batch", "budget", "units", "chunk"),
    [
        ("0.01", 25, "10", 337, 1),  # the sandbox case of issue 11
        ("0.01", 25, "10", 337, 7),
        ("0.001", 100, "5", 1234, 1),  # the other case
        ("0.001", 100, "5", 1234, 100),
    ],
)
def test_receipt_says_what_left_the_payer_and_what_is_still_locked(
    dep, rate, batch, budget, units, chunk
):
    start = dep.balance()
    s = _run_by_units(dep, rate, batch, budget, units, chunk=chunk)
    before_close = {e[0] for e in dep.escrows()}
    r = s.close()
    # close() locked only escrows it released (the final one): none was left locked by it
    made_at_close = [e for e in dep.escrows() if e[0] not in before_close]
    assert all(st == "released" for _, _, _, st in made_at_close)
    assert len(made_at_close) <= 1
    assert r.paid == exact(rate, units)
    assert r.refunded == 0  # on this dialect nothing locked came back (yet)
    # the bar: the payer's balance change is paid + still locked, to the micro-USDC
    assert start - dep.balance() == r.paid + r.still_locked_amount
    assert dep.balance("provider") == r.provider_net
    ledger = {e[0]: e for e in dep.escrows()}
    assert r.still_locked, "one tranche is locked ahead of need, so one is left at close"
    assert len(r.still_locked) <= 2
    for held in r.still_locked:
        _, amount, released, status = ledger[held.escrow_id]
        assert status == "locked" and released == 0 and amount == held.amount_micro
        assert held.returns_micro == amount - fee_micro(amount)
        assert held.until is not None
        assert dep.client().get_escrow(held.escrow_id).auto_release_at == held.until
    text = str(r)
    assert "still locked" in text and r.still_locked[0].escrow_id in text
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # still one aligned table
    # once their timeout passes the service returns them less its 1% commission
    dep.clock.advance(25 * 3600)
    dep.sandbox.tick()
    kept = sum(h.amount_micro - h.returns_micro for h in r.still_locked)
    assert start - dep.balance() == r.paid + micro_to_decimal(kept)
    dep.sandbox.audit()


def test_v1_receipt_has_nothing_locked_and_refunds_the_rest():
    w = World("v1")
    try:
        start = w.balance()
        with PaymentStream(w.client(), w.provider.agent_id, "0.01", batch=25, budget="10") as s:
            s.record(337)
        r = s.receipt
        assert r.still_locked == () and r.still_locked_amount == 0
        assert r.refunded == Decimal("6.63") and r.paid == Decimal("3.37")
        assert start - w.balance() == r.paid
        assert "still locked" not in str(r)
    finally:
        w.close()
