"""The lock-free lane of ``@metered`` (issue 14.1): budget first, raises free, exact at close.

The lane (``pf_metered.meter.lane``) admits a one-unit call by popping a token the in-memory
record lent and counts it by popping another when it returns; these tests hold it to the semantics the
locked path had: the budget is checked before the wrapped function runs, a call that raises
costs nothing, 64 threads racing ``close()`` are paid to the unit (late calls counted, not
paid), and a model of the record agrees with it under any interleaving hypothesis finds.
Nothing here measures time; the only timeout is the library's own ``close_wait``.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pf_metered import AsyncPaymentStream, PaymentStream, metered
from pf_metered.errors import BudgetExhausted, StreamClosed
from pf_metered.meter.store import CallGate, FastLane, MemoryStore, StreamConfig
from pf_metered.money import parse_rate

RATE = "0.001"


# ---------------------------------------------------------------- before the call, for free
@pytest.mark.parametrize("charge", [False, True])
def test_budget_is_checked_before_the_call_runs(agents: Any, charge: bool) -> None:
    stream = PaymentStream(agents.client, agents.provider.agent_id, "0.5", max_units=3).open()
    ran = []

    @metered(stream=stream, charge_errors=charge)
    def work(i: int) -> int:
        ran.append(i)
        return i

    assert [work(i) for i in range(3)] == [0, 1, 2]
    for i in range(3, 6):
        with pytest.raises(BudgetExhausted) as info:
            work(i)
        assert info.value.remaining_units == 0
        assert info.value.__suppress_context__  # not "during handling of IndexError"
    assert ran == [0, 1, 2]  # refused calls never ran
    receipt = stream.close()
    with pytest.raises(StreamClosed):
        work(9)
    assert ran == [0, 1, 2]
    assert receipt.units == 3 and receipt.paid_micro == 1_500_000


async def test_async_budget_is_checked_before_the_coroutine_runs(agents: Any) -> None:
    stream = await AsyncPaymentStream(
        agents.aclient, agents.provider.agent_id, "0.5", max_units=2
    ).open()
    started = []

    @metered(stream=stream)
    async def work(i: int) -> int:
        started.append(i)
        await asyncio.sleep(0)
        return i

    assert await asyncio.gather(work(0), work(1)) == [0, 1]
    with pytest.raises(BudgetExhausted):
        await work(2)
    assert started == [0, 1]
    receipt = await stream.close()
    with pytest.raises(StreamClosed):
        await work(3)
    assert started == [0, 1] and receipt.units == 2


def test_a_raising_call_costs_nothing(agents: Any) -> None:
    stream = PaymentStream(agents.client, agents.provider.agent_id, "0.5", max_units=4).open()

    @metered(stream=stream)
    def work(fail: bool) -> str:
        if fail:
            raise ValueError("the call failed")
        return "ok"

    for _ in range(10):  # more failures than the budget has units: none is held or paid
        with pytest.raises(ValueError, match="the call failed"):
            work(True)
    assert stream.units_left == 4
    assert [work(False) for _ in range(4)] == ["ok"] * 4
    with pytest.raises(BudgetExhausted):
        work(False)
    receipt = stream.close()
    assert receipt.units == 4 and receipt.paid_micro == 2_000_000
    assert receipt.refunded_micro == 0


async def test_a_raising_coroutine_costs_nothing_unless_charged(agents: Any) -> None:
    stream = await AsyncPaymentStream(
        agents.aclient, agents.provider.agent_id, "0.5", max_units=10
    ).open()

    @metered(stream=stream)
    async def free(x: int) -> int:
        raise KeyError(x)

    @metered(stream=stream, charge_errors=True)
    async def charged(x: int) -> int:
        raise KeyError(x)

    for i in range(3):
        with pytest.raises(KeyError):
            await free(i)
    assert stream.units_left == 10
    for i in range(2):
        with pytest.raises(KeyError):
            await charged(i)
    assert stream.units_left == 8
    assert (await stream.close()).units == 2


def test_no_frame_between_the_caller_and_the_function(agents: Any) -> None:
    """The decorated function is the lane's closure itself (no wrapper calling a wrapper)."""
    stream = PaymentStream(agents.client, agents.provider.agent_id, "0.5", max_units=10).open()

    @metered(stream=stream)
    def where() -> tuple[str, str]:
        return sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name

    for _ in range(2):  # the first call binds the lane, the second is the plain hot path
        assert where() == ("metered", "test_no_frame_between_the_caller_and_the_function")
    assert where.__name__ == "where" and where.__wrapped__ is not None
    assert stream.close().units == 2


def test_stream_lane_closures_count_like_the_methods(agents: Any, tmp_path: Any) -> None:
    """``StreamBase.lane()``: one-unit tokens ride the lock-free lane, others the methods;
    a token committed after close is returned unpaid; elsewhere it is the methods."""
    stream = PaymentStream(
        agents.client, agents.provider.agent_id, "0.5", max_units=5, close_wait=0.01
    ).open()
    reserve, commit, cancel = stream.lane()
    assert commit(reserve(1)) == 0
    cancel(reserve(1))  # a call that raised: nothing counted, nothing held
    assert stream.units_left == 4
    assert commit(reserve(2)) == 0  # two units: the locked methods
    held = reserve(1)
    assert stream.units_left == 1
    assert commit(reserve(1)) == 0
    with pytest.raises(BudgetExhausted):
        reserve(1)
    receipt = stream.close()  # ``held`` is still running: close waits 0.01 s, then seals
    assert commit(held) == 1 and stream.late_units == 1
    assert receipt.units == 4 and receipt.paid_micro == 2_000_000
    with pytest.raises(StreamClosed):
        reserve(1)

    other = PaymentStream(
        agents.client, agents.provider.agent_id, "0.5", max_units=5, store=str(tmp_path / "s.db")
    ).open()
    assert other.lane() == (other.reserve, other.commit, other.cancel)
    other.close()


# ------------------------------------------------------------------- 64 threads vs close
THREADS = 64
HOLDERS = 8  # threads whose first call is still running when close() gives up waiting


@pytest.fixture
def switch_often() -> Iterator[None]:
    """Thread switches every few bytecodes rather than every 5 ms: the lane's steps and the
    closer's interleave far more often (stress, not synchronisation)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


@pytest.mark.parametrize("max_units", [2_000, 400_000], ids=["budget-first", "close-first"])
def test_64_threads_race_close_exact_money_late_and_budget(
    agents: Any, max_units: int, switch_often: None
) -> None:
    stream = PaymentStream(
        agents.client,
        agents.provider.agent_id,
        RATE,
        batch=97,
        max_units=max_units,
        close_wait=0.05,  # the holders outlast it on purpose: their units are late
    ).open()
    ran = itertools.count()  # fn invocations (next() is atomic)
    hold = threading.Event()
    holding = threading.Semaphore(0)

    @metered(stream=stream)
    def work(k: int, held: bool) -> int:
        next(ran)
        if held:
            holding.release()
            hold.wait()
        return k

    racers_go = threading.Barrier(THREADS - HOLDERS + 1)
    warmed = threading.Semaphore(0)
    returned = [0] * THREADS
    refused: list[BaseException | None] = [None] * THREADS

    def holder(k: int) -> None:
        assert work(k, True) == k  # late: it finishes after the final claim
        returned[k] += 1

    def racer(k: int) -> None:
        racers_go.wait()
        signalled = False
        while True:
            try:
                assert work(k, False) == k
            except (BudgetExhausted, StreamClosed) as exc:
                refused[k] = exc
                break
            returned[k] += 1
            if returned[k] == 20 and not signalled:
                signalled = True
                warmed.release()
        if not signalled:
            warmed.release()

    holders = [threading.Thread(target=holder, args=(k,)) for k in range(HOLDERS)]
    racers = [threading.Thread(target=racer, args=(k,)) for k in range(HOLDERS, THREADS)]
    for t in holders:
        t.start()
    for _ in range(HOLDERS):
        holding.acquire()  # every holder's call is admitted and running
    for t in racers:
        t.start()
    racers_go.wait()
    for _ in racers:
        warmed.acquire()  # every racer made 20 calls or was refused
    receipt = stream.close()
    hold.set()
    for t in holders + racers:
        t.join(60)
        assert not t.is_alive()

    calls = sum(returned)
    assert next(ran) == calls  # every call that ran returned; no refused call ran
    assert calls <= max_units  # never over budget
    assert all(refused[HOLDERS:])  # every racer was refused in the end
    if max_units == 2_000:
        assert calls == max_units  # the budget ran out: exactly all of it was admitted
    assert stream.late_units == HOLDERS
    assert receipt.units == calls - HOLDERS  # counted: every call that finished in time
    assert work.metered.overflow_units == HOLDERS  # type: ignore[attr-defined]
    rate = parse_rate(RATE)
    assert receipt.paid_micro == rate.micro_half_up(receipt.units)
    assert sum(r.amount_micro for r in stream.status().history) == receipt.paid_micro
    assert receipt.paid_micro + receipt.refunded_micro == receipt.budget_micro
    escrow = agents.escrow(stream.escrow_id)
    assert escrow.released_micro == receipt.paid_micro
    assert escrow.refunded_micro == receipt.refunded_micro


# ---------------------------------------------------------- the record against a model
MAX = 12


class RecordMachine(RuleBasedStateMachine):
    """Interleaves lane calls (admit / commit / cancel), locked reservations, ``record``,
    batch claims, a failure, ``stop_calls`` and the final claim on one in-memory record,
    and checks every answer against a plain model of the budget and the counts."""

    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryStore()
        cfg = StreamConfig("st_lane", "ag_to", "0.001", budget_micro=MAX * 1000, max_units=MAX)
        self.store.create(cfg)
        self.store.set_escrow("st_lane", "es_lane")
        gate = self.store.counter("st_lane")
        assert isinstance(gate, CallGate) and isinstance(gate, FastLane)
        self.gate = gate
        self.dues: list[int] = []
        self.lates = 0
        self.parts = gate.lane_parts(self.dues.append, self._late)
        # the model
        self.units = 0  # counted (claimable) units
        self.claimed = 0
        self.reserved = 0  # locked reservations
        self.running = 0  # lane calls admitted, not finished
        self.late = 0  # late units of locked reservations
        self.lane_late = 0  # lane calls that finished after the final claim
        self.draining = False
        self.sealed = False
        self.failure: BaseException | None = None
        self.due_at = 1 << 62
        self.told = False  # the sender was told the total reached due_at

    def _late(self, n: int) -> None:
        self.lates += n

    def _used(self) -> int:
        """Budget held or spent (a late call gives its unit back, as a late commit of a
        locked reservation does)."""
        return self.units + self.reserved + self.running

    @rule()
    def lane_call_starts(self) -> None:
        expected: type[BaseException] | None = None
        if self.failure is not None:
            expected = type(self.failure)
        elif self.sealed or self.draining:
            expected = StreamClosed
        elif self._used() + 1 > MAX:
            expected = BudgetExhausted
        try:
            try:
                self.parts.take()
            except IndexError:
                self.parts.admit()
        except (BudgetExhausted, StreamClosed, RuntimeError) as exc:
            assert expected is not None and isinstance(exc, expected), exc
            return
        assert expected is None
        self.running += 1

    @precondition(lambda self: self.running > 0)
    @rule(raised=st.booleans())
    def lane_call_ends(self, raised: bool) -> None:
        self.running -= 1
        if raised:
            self.parts.cancel()
            return
        try:
            self.parts.done()
            unpaid = 0
        except IndexError:
            unpaid = self.parts.settle()
        if self.sealed:
            assert unpaid == 1
            self.lane_late += 1
            return
        assert unpaid == 0
        self.units += 1
        if self.units >= self.due_at:  # the sender was told: by this commit or before
            assert self.told or (self.dues and self.dues[-1] == self.units)
            self.told = True

    @rule(n=st.integers(0, 5))
    def record(self, n: int) -> None:
        if self.sealed:
            with pytest.raises(StreamClosed):
                self.gate.add(n)
        elif self._used() + n > MAX:
            with pytest.raises(BudgetExhausted):
                self.gate.add(n)
        else:
            assert self.gate.add(n) == self.units + n
            self.units += n
            self.told = self.told or self.units >= self.due_at  # record() wakes the sender

    @rule(n=st.integers(1, 4))
    def reserve(self, n: int) -> None:
        if self.sealed or self.draining:
            with pytest.raises(StreamClosed):
                self.gate.reserve(n)
        elif self._used() + n > MAX:
            with pytest.raises(BudgetExhausted):
                self.gate.reserve(n)
        else:
            self.gate.reserve(n)
            self.reserved += n

    @precondition(lambda self: self.reserved > 0)
    @rule(data=st.data(), commit=st.booleans())
    def reservation_ends(self, data: st.DataObject, commit: bool) -> None:
        n = data.draw(st.integers(1, self.reserved))
        self.reserved -= n
        if not commit:
            self.gate.cancel(n)
        elif self.sealed:
            with pytest.raises(StreamClosed):
                self.gate.commit(n)
            self.late += n
        else:
            assert self.gate.commit(n) == self.units + n
            self.units += n
            self.told = self.told or self.units >= self.due_at  # commit() wakes the sender

    @rule(ahead=st.integers(0, 4))
    def set_due(self, ahead: int) -> None:
        self.due_at = self.units + ahead
        self.gate.due_at = self.due_at
        self.told = False

    @rule()
    def batch_claim(self) -> None:
        intent = self.store.claim("st_lane", min_units=1)
        if self.sealed or self.units == self.claimed:
            assert intent is None
            return
        assert intent is not None and intent.units_to == self.units
        self.claimed = self.units
        self.store.settle("st_lane", intent.seq, 0)

    @rule(fail=st.booleans())
    def failure_changes(self, fail: bool) -> None:
        self.failure = RuntimeError("the sender failed") if fail else None
        self.gate.blocked = self.failure

    @rule()
    def stop_calls(self) -> None:
        self.gate.stop_calls()
        self.draining = True

    @precondition(lambda self: not self.sealed)
    @rule()
    def final_claim(self) -> None:
        pending = self.store.load("st_lane")
        assert pending is not None
        for intent in pending.pending:
            self.store.settle("st_lane", intent.seq, 0)
        intent = self.store.claim("st_lane", min_units=0, final=True)
        assert intent is not None and intent.final and intent.units_to == self.units
        self.sealed = True

    @invariant()
    def agrees(self) -> None:
        state = self.store.load("st_lane")
        assert state is not None and state.units == self.units
        assert self._used() <= MAX
        assert self.gate.units_left() == MAX - self._used()
        assert self.gate.wait_calls(0.0) == self.reserved + self.running
        assert self.gate.late_units == self.late + self.lane_late
        assert self.lates == self.lane_late  # each late lane call was told (on_late)


RecordMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_record_agrees_with_its_model = RecordMachine.TestCase
