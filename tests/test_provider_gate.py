"""PaymentGate / AsyncPaymentGate on the embedded sandbox: verification, exact money, credit,
refusal reasons with the amount owed, bounded reads, and the deployed dialect's tranche chains.

Every escrow here is a real one in the sandbox ledger; consumers are real PaymentStreams."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

import httpx
import pytest

from pf_metered import AsyncPaymentStream, PaymentStream, Sandbox
from pf_metered.errors import InvalidInput
from pf_metered.provider import (
    HEADER_ESCROW,
    HEADER_PROOF,
    AsyncPaymentGate,
    Claim,
    PaymentGate,
    PaymentRefused,
)
from pf_metered.sandbox import ManualClock
from pf_metered.stream._provider_auth import commitment_in, proof_commitment


def exact(rate: str, units: int) -> Decimal:
    return (Decimal(rate) * units).quantize(Decimal("0.000001"), ROUND_HALF_UP)


class Clock:
    """The gate's clock, moved by hand: no sleeps, no timing."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class World:
    def __init__(self, dialect: str = "v1") -> None:
        self.sandbox = Sandbox(clock=ManualClock(), dialect=dialect)
        self.payer = self.sandbox.add_agent(balance="100.00")
        self.other_payer = self.sandbox.add_agent(balance="100.00")
        self.provider = self.sandbox.add_agent()
        self.other_provider = self.sandbox.add_agent()
        self.gets = 0

        def count(request: object) -> None:
            if getattr(request, "method", "") == "GET":
                self.gets += 1

        self.sandbox.before_handle = count
        self.clock = Clock()
        self.sleeps: list[float] = []

    def gate(self, rate: str = "0.001", **kw: object) -> PaymentGate:
        client = self.sandbox.client(self.provider.api_key)
        return PaymentGate(
            client, self.provider.agent_id, rate, clock=self.clock, sleep=self.sleep, **kw
        )  # type: ignore[arg-type]

    def agate(self, rate: str = "0.001", **kw: object) -> AsyncPaymentGate:
        client = self.sandbox.async_client(self.provider.api_key)
        return AsyncPaymentGate(
            client, self.provider.agent_id, rate, clock=self.clock, sleep=self.sleep, **kw
        )

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.t += seconds

    def stream(
        self, rate: str = "0.001", *, payer: object = None, to: str | None = None, **kw: object
    ) -> PaymentStream:
        key = (payer or self.payer).api_key  # type: ignore[attr-defined]
        kw.setdefault("batch", 100)
        kw.setdefault("budget", "5.00")
        kw.setdefault("background", False)
        return PaymentStream(self.sandbox.client(key), to or self.provider.agent_id, rate, **kw)  # type: ignore[arg-type]

    def close(self) -> None:
        self.sandbox.close()


@pytest.fixture
def world():
    w = World()
    yield w
    w.close()


def serve(gate: PaymentGate, stream: PaymentStream, units: int = 1) -> None:
    """One request: the gate admits it, the work runs, the consumer counts it."""
    with gate.serving(stream.provider_headers(), units):
        pass
    stream.record(units)


# -- the consumer's headers -------------------------------------------------------------------


def test_headers_name_the_escrow_and_carry_a_proof_its_memo_commits_to(world):
    with world.stream() as s:
        h = s.provider_headers()
        assert h[HEADER_ESCROW] == s.escrow_id
        escrow = world.sandbox.escrow(s.escrow_id)
        assert commitment_in(escrow.memo) == proof_commitment(h[HEADER_PROOF])
        assert h[HEADER_PROOF] not in repr(s) + repr(s.auth()) + escrow.memo


def test_headers_before_open_say_open_first(world):
    from pf_metered.errors import StreamClosed

    with pytest.raises(StreamClosed, match="open"):
        world.stream().provider_headers()


def test_httpx_auth_adds_the_headers_to_each_request(world):
    seen: list[httpx.Headers] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers)
        return httpx.Response(200)

    with (
        world.stream() as s,
        httpx.Client(transport=httpx.MockTransport(handler), auth=s.auth()) as http,
    ):
        http.get("http://127.0.0.1/x")
    assert seen[0][HEADER_ESCROW] == s.escrow_id and len(seen[0][HEADER_PROOF]) == 32


# -- verification before any work -------------------------------------------------------------


def test_an_honest_stream_is_served_and_every_unit_reconciles_exactly(world):
    gate = world.gate(rate="0.0013", batch=50)
    with world.stream(rate="0.0013", batch=50) as s:
        for i in range(437):
            serve(gate, s)
            if i % 50 == 49:
                s.pump()
                world.clock.t += 1.0
    view = gate.account(s.escrow_id)
    assert view.served == 437 == s.receipt.units
    rec = gate.reconcile(s.escrow_id)
    assert rec.ok and rec.paid_micro == rec.cost_micro
    assert Decimal(rec.paid_micro).scaleb(-6) == exact("0.0013", 437) == s.receipt.paid
    assert view.max_unpaid <= gate.credit


@pytest.mark.parametrize(
    ("lie", "reason"),
    [
        ("no_header", "missing_escrow"),
        ("other_provider", "unknown_escrow"),  # v1: only its parties may read it,
        ("someone_elses", "not_payer"),
        ("no_proof", "not_payer"),
        ("closed", "escrow_closed"),
        ("unknown", "unknown_escrow"),
        ("junk", "invalid_claim"),
    ],
)
def test_a_lying_caller_is_refused_before_any_work(world, lie, reason):
    gate = world.gate()
    ran = []
    if lie == "no_header":
        headers: dict[str, str] = {}
    elif lie == "other_provider":
        s = world.stream(to=world.other_provider.agent_id).open()
        headers = s.provider_headers()
    elif lie == "someone_elses":
        victim = world.stream(payer=world.other_payer).open()
        mine = world.stream().open()
        headers = {**mine.provider_headers(), HEADER_ESCROW: victim.escrow_id}
    elif lie == "no_proof":
        s = world.stream().open()
        headers = {HEADER_ESCROW: s.escrow_id}
    elif lie == "closed":
        s = world.stream().open()
        headers = s.provider_headers()
        s.close()
    elif lie == "unknown":
        headers = {HEADER_ESCROW: "esc_doesnotexist", HEADER_PROOF: "0" * 32}
    else:
        headers = {HEADER_ESCROW: "esc bad id!"}
    with pytest.raises(PaymentRefused) as refused, gate.serving(headers):
        ran.append(1)
    assert ran == [] and refused.value.reason == reason
    assert refused.value.to_json()["error"] == reason
    assert Decimal(refused.value.to_json()["owed"]) == 0


def test_a_closed_stream_that_owes_is_refused_with_what_it_owes(world):
    gate = world.gate(rate="0.001", batch=100)
    s = world.stream(rate="0.001", batch=100).open()
    headers = s.provider_headers()
    for _ in range(30):
        with gate.serving(headers):
            pass
    s.record(10)  # the consumer counted only 10 of the 30 it was served
    s.close()
    world.clock.t += 10
    with pytest.raises(PaymentRefused) as refused, gate.serving(headers):
        pass
    assert refused.value.reason == "escrow_closed"
    assert refused.value.owed == Decimal("0.020000")  # 20 units at 0.001, exact


# -- credit: a consumer that stops paying -----------------------------------------------------


def test_a_consumer_that_stops_paying_is_refused_past_the_credit_with_the_amount_owed(world):
    gate = world.gate(rate="0.0007", batch=100)  # credit: two batches
    assert gate.credit == 200
    s = world.stream(rate="0.0007", batch=100).open()
    for _ in range(300):
        serve(gate, s)
        s.pump()  # pays each batch as it falls due
        world.clock.t += 0.01
    paid_at_stop = gate.reconcile(s.escrow_id).paid_micro
    assert paid_at_stop == 300 * 700  # floor(0.0007 × 300) micro-USDC
    served_after = 0
    with pytest.raises(PaymentRefused) as refused:
        while True:
            with gate.serving(s.provider_headers()):
                served_after += 1  # served, never recorded: the consumer stopped paying
            world.clock.t += 1.0
    assert refused.value.reason == "unpaid"
    assert served_after == 200  # exactly the credit, and then no more
    assert refused.value.owed == exact("0.0007", 200)
    assert gate.account(s.escrow_id).max_unpaid == 200
    # paying what it owes lets it through again
    s.record(200)
    s.pump()
    world.clock.t += 1.0
    with gate.serving(s.provider_headers()):
        pass
    s.close()


def test_units_reported_after_the_work_are_what_is_counted(world):
    gate = world.gate(rate="0.000002", batch=10_000)
    with world.stream(rate="0.000002", batch=10_000, budget="1.00") as s:
        for tokens in (517, 1203, 88):
            with gate.serving(s.provider_headers(), units=1) as served:
                served.units = tokens
            s.record(tokens)
    assert gate.account(s.escrow_id).served == 1808
    assert gate.reconcile(s.escrow_id).ok


def test_work_that_fails_counts_nothing(world):
    gate = world.gate()
    with world.stream() as s:
        with pytest.raises(RuntimeError), gate.serving(s.provider_headers()):
            raise RuntimeError("the model fell over")
        view = gate.account(s.escrow_id)
        assert view.served == 0 and view.in_flight == 0


def test_an_escrow_too_small_for_the_units_is_refused(world):
    gate = world.gate(rate="0.01", batch=1000, credit=1000)
    with world.stream(rate="0.01", budget="1.00", batch=1000) as s:
        with pytest.raises(PaymentRefused) as refused:
            gate.admit(s.provider_headers(), units=101)
        assert refused.value.reason == "insufficient_escrow"
        gate.finish(gate.admit(s.provider_headers(), units=100))
        s.record(100)


# -- reads: a cache and a bounded refresh rate ------------------------------------------------


def test_reads_are_cached_and_refreshed_only_when_stale_or_near_the_credit(world):
    gate = world.gate(batch=1000, max_age=5.0, min_interval=0.5)
    with world.stream(batch=1000) as s:
        headers = s.provider_headers()
        before = world.gets
        for _ in range(400):  # well inside the credit of 2000, clock frozen
            with gate.serving(headers):
                pass
        assert world.gets - before == 1  # verified once, then the cache
        world.clock.t += 5.0
        with gate.serving(headers):
            pass
        assert world.gets - before == 2  # stale: read again
        for _ in range(700):  # now past half the credit, clock frozen: still no re-read
            with gate.serving(headers):
                pass
        assert world.gets - before == 2
        world.clock.t += 0.5
        with gate.serving(headers):
            pass
        assert world.gets - before == 3  # near the credit: one read per min_interval
        s.record(1101)


def test_the_read_budget_caps_reads_across_streams(world):
    gate = world.gate(reads_per_minute=60)  # bursts of at most 6 (a tenth), then 1 a second
    streams = [world.stream(budget="1.00").open() for _ in range(8)]
    before = world.gets
    outcomes = []
    for s in streams:
        try:
            gate.finish(gate.admit(s.provider_headers()))
            outcomes.append("ok")
        except PaymentRefused as exc:
            outcomes.append(exc.reason)
    assert world.gets - before == 6
    assert outcomes == ["ok"] * 6 + ["unverifiable"] * 2
    world.clock.t += 2.0  # two more reads earned
    for s in streams[6:]:
        gate.finish(gate.admit(s.provider_headers()))
    assert world.gets - before == 8


def test_bad_gate_arguments_name_the_field(world):
    client = world.sandbox.client(world.provider.api_key)
    for kw, field in [
        ({"rate": 0.001}, "rate"),
        ({"credit": -1}, "credit"),
        ({"batch": 0}, "batch"),
        ({"max_age": "x"}, "max_age"),
    ]:
        args = {"rate": "0.001", **kw}
        with pytest.raises(InvalidInput) as exc:
            PaymentGate(client, world.provider.agent_id, **args)  # type: ignore[arg-type]
        assert exc.value.field == field
    with pytest.raises(InvalidInput):
        PaymentGate(object(), world.provider.agent_id, "0.001")


def test_claims_from_headers_are_case_insensitive_and_bounded():
    c = Claim.from_headers(
        {"x-pf-escrow": "chain:esc_1", "x-pf-tranche": "esc_2,esc_1", "x-pf-proof": "ab"}
    )
    assert c.escrow_ids() == ("esc_1", "esc_2") and c.is_chain and "ab" not in repr(c)
    with pytest.raises(PaymentRefused):
        Claim.from_headers({"X-PF-Escrow": "esc_1", "X-PF-Tranche": ",".join(["e"] * 9)})


# -- async twin -------------------------------------------------------------------------------


async def test_async_gate_serves_an_async_stream_and_refuses_past_the_credit(world):
    gate = world.agate(rate="0.0003", batch=10)
    client = world.sandbox.async_client(world.payer.api_key)
    s = AsyncPaymentStream(
        client, world.provider.agent_id, "0.0003", batch=10, budget="1.00", background=False
    )
    await s.open()
    for _ in range(35):
        async with gate.serving(s.provider_headers()):
            pass
        s.record()
        await s.pump()
        world.clock.t += 0.1
    with pytest.raises(PaymentRefused) as refused:
        for _ in range(100):
            async with gate.serving(s.provider_headers()):
                pass
            world.clock.t += 1.0
    assert refused.value.reason == "unpaid"
    view = gate.account(s.escrow_id)
    assert (view.paid_units, view.served) == (30, 50)  # the credit (20) past the 30 paid
    s.record(15)  # it pays up at close
    await s.close()
    rec = await gate.reconcile(s.escrow_id)
    assert rec.ok and rec.served == 50


# -- the deployed dialect: tranche chains -----------------------------------------------------


def test_a_tranche_chain_is_followed_tranche_by_tranche():
    from conftest import DeployedWorld

    dw = DeployedWorld(balance="100")
    w = World.__new__(World)
    w.sandbox, w.payer, w.provider, w.clock, w.gets = dw.sandbox, dw.payer, dw.provider, Clock(), 0
    w.sleeps = []
    w.stream = lambda rate, **kw: PaymentStream(
        dw.client(), dw.provider.agent_id, rate, background=False, **kw
    )  # type: ignore[method-assign]
    try:
        gate = w.gate(rate="0.001", batch=100)
        with w.stream(rate="0.001", batch=100, budget="2.00") as s:
            assert s.escrow_id.startswith("chain:")
            for i in range(1234):
                serve(gate, s)
                if i % 100 == 99:
                    s.pump()
                    w.clock.t += 1.0
            view = gate.account(s.escrow_id)
            assert len(view.escrows) >= 3  # it met several tranches
            assert view.max_unpaid <= gate.core._credit_for(gate.core._accounts[s.escrow_id])
        assert gate.reconcile(s.escrow_id).paid_micro < 1_234_000  # the final tranche: unseen
        rec = gate.reconcile(s.provider_headers())  # the consumer names it
        assert rec.served == 1234 == s.receipt.units
        assert rec.paid_micro == rec.cost_micro == 1_234_000
    finally:
        dw.close()


def test_a_stream_at_its_credit_waits_for_its_release_instead_of_being_refused(world):
    gate = world.gate(batch=10, min_interval=0.2)  # credit 20
    s = world.stream(batch=10).open()
    for _ in range(20):
        serve(gate, s)  # clock frozen: the gate does not re-read
    s.pump()  # the consumer pays 20 units; the gate's last read is younger than min_interval
    serve(gate, s)  # 21 unpaid by the cache: it waits min_interval, reads, and serves
    assert world.sleeps == [0.2]
    assert gate.account(s.escrow_id).paid_units == 20
    s.close()
