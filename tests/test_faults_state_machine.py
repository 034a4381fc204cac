"""Fault suite 3: a Hypothesis state machine over record / tick / flush / faults / crash+resume /
close, against the sandbox, with a SQLite journal. Invariants after every step:

* the journal never pays more than rate × units (floor before close) nor more than the budget;
* the escrow's released figure equals what the journal paid, or that plus the one pending
  intent's amount (its answer lost): never anything else;
* every unit the model counted is in the journal (no unit lost, none invented).
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from pathlib import Path

from faultkit import FaultyTransport, SeededSchedule
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pf_metered.errors import BudgetExhausted, PFMeteredError
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import intent_amount_micro
from pf_metered.sandbox import Sandbox
from pf_metered.stream import PaymentStream

RATE = "0.0031731"


class StreamMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.sandbox = Sandbox()
        self.payer = self.sandbox.add_agent(balance="10")
        self.provider = self.sandbox.add_agent()
        self.schedule = SeededSchedule(0, 0.5)
        self.schedule.enabled = False
        self.transport = FaultyTransport(self.sandbox.transport(), self.schedule)
        self.client = self.sandbox.client(
            self.payer.api_key, transport=self.transport, _sleep=lambda s: None, max_retries=1
        )
        self.path = str(Path(self.dir) / "j.db")
        self.store = SQLiteStore(self.path)
        self.stream = PaymentStream(
            self.client,
            self.provider.agent_id,
            RATE,
            batch=7,
            budget="1",
            store=self.store,
            background=False,
            stream_id=uuid.uuid4().hex,
        )
        self.stream.open()
        self.units = 0
        self.closed = False

    def teardown(self) -> None:
        self.sandbox.close()

    @rule(seed=st.integers(0, 2**16))
    def fault_on(self, seed: int) -> None:
        self.schedule.rng.seed(seed)
        self.schedule.enabled = True

    @rule()
    def fault_off(self) -> None:
        self.schedule.enabled = False

    @precondition(lambda self: not self.closed)
    @rule(n=st.integers(0, 40))
    def record(self, n: int) -> None:
        try:
            self.stream.record(n)
            self.units += n
        except BudgetExhausted:
            pass

    @precondition(lambda self: not self.closed)
    @rule()
    def tick(self) -> None:
        with contextlib.suppress(PFMeteredError):
            self.stream.pump()

    @precondition(lambda self: not self.closed)
    @rule()
    def flush(self) -> None:
        with contextlib.suppress(PFMeteredError):
            self.stream.flush()

    @rule()
    def crash_and_resume(self) -> None:
        # The old process is gone: its objects are dropped, its file handle too.
        sid = self.stream.stream_id
        self.store = SQLiteStore(self.path)
        for _ in range(50):
            try:
                self.stream = PaymentStream.resume(self.store, sid, self.client, background=False)
                return
            except PFMeteredError:
                continue
        raise AssertionError("resume never succeeded")

    @rule()
    def close(self) -> None:
        with contextlib.suppress(PFMeteredError):
            self.stream.close()
            self.closed = True

    @invariant()
    def books_agree(self) -> None:
        state = self.store.load(self.stream.stream_id)
        assert state is not None
        rate = state.config.parsed_rate
        assert state.units == self.units
        assert state.paid_micro <= rate.micro_half_up(state.units) <= state.config.budget_micro
        if state.status == "open":
            assert state.paid_micro <= rate.micro_floor(state.units)
        escrow = self.sandbox.escrow(state.escrow_id)
        pending = sum(intent_amount_micro(rate, i) for i in state.pending)
        assert escrow.released_micro in (state.paid_micro, state.paid_micro + pending)
        if state.status == "closed":
            assert escrow.released_micro == rate.micro_half_up(state.units)
            assert escrow.released_micro + escrow.refunded_micro == escrow.amount_micro


StreamMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStreamMachine = StreamMachine.TestCase
