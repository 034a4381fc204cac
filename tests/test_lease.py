"""The lease engine on its own (issue 14.3): ``LeasedCounter`` over a tiny real backend.

``Ledger`` below is a whole shared record in a few lines: the stream's units, each process's
lease, a status, and the exactly-once memory of replies per (process, sequence) that Redis
keeps. It implements the two-method ``LeaseBackend`` the way the SQLite and Redis stores do
(count ``used`` out of the lease first, then :func:`grant`), and can fail on purpose: *before*
applying a push (a rolled back transaction) or *after* (a lost answer). Each process is its
own ``LeasedCounter`` over its own ``Process`` view of the ledger; "killing" one drops its
engine without a push, as SIGKILL would.

The properties checked (hypothesis drives random fleets through them):

* never overspent: ``units + Σ leases ≤ max_units`` in the ledger after every step;
* exactly once: after every live process pushed, the ledger counted every unit a live
  process was told it counted, no more, however many answers were lost or pushes failed;
* bounded loss: a killed process's counted-but-unpushed units are at most one ``chunk``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pf_metered.errors import BudgetExhausted, InvalidInput, StoreUnavailable, StreamClosed
from pf_metered.meter.lease import Grant, LeaseBackend, LeasedCounter, Push, grant

SID = "s1"


@dataclass
class Ledger:
    """The shared record of one stream (what a SQLite file or a Redis hash holds)."""

    max_units: int
    status: str = "open"
    units: int = 0
    leases: dict[str, int] = field(default_factory=dict)
    replies: dict[tuple[str, int], Grant] = field(default_factory=dict)
    counted_by: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    pushes: int = 0
    fail: list[str] = field(default_factory=list)
    """Planned faults, taken one per push: ``"before"`` (nothing applied) or ``"after"``
    (applied, answer lost)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self) -> None:
        assert self.units + sum(self.leases.values()) <= self.max_units
        assert all(v >= 0 for v in self.leases.values())

    def exchange(self, owner: str, push: Push, *, giving: bool) -> Grant:
        with self.lock:
            self.pushes += 1
            fault = self.fail.pop(0) if self.fail else None
            if fault == "before":
                raise StoreUnavailable("planned: the push never arrived")
            seen = self.replies.get((owner, push.seq))
            if seen is not None:  # a re-send: the first reply, nothing applied again
                answer = seen
            else:
                answer = self._apply(owner, push, giving=giving)
                self.replies[(owner, push.seq)] = answer
            self.check()
            if fault == "after":
                raise StoreUnavailable("planned: the answer was lost")
            return answer

    def _apply(self, owner: str, push: Push, *, giving: bool) -> Grant:
        lease = self.leases.get(owner, 0)
        others = sum(self.leases.values()) - lease
        from_lease = min(push.used, lease)
        lease -= from_lease
        counted = from_lease
        late = push.used - from_lease
        if (
            late
            and self.status == "open"
            and self.units + counted + lease + others + late <= (self.max_units)
        ):
            counted += late
        else:
            self.lost += late
        self.units += counted
        self.counted_by[owner] = self.counted_by.get(owner, 0) + counted
        if self.status != "open":
            lease = 0
        elif giving:
            lease = min(lease, push.want)
        else:
            avail = self.max_units - self.units - lease - others
            lease = grant(lease, push.want, push.need, avail, exact=push.exact)
        if lease:
            self.leases[owner] = lease
        else:
            self.leases.pop(owner, None)
        return Grant(self.status, self.units, lease, self.max_units - self.units - lease - others)

    def reclaim(self, owner: str) -> None:
        """A resume gives back a dead process's lease (budget only, never units)."""
        with self.lock:
            self.leases.pop(owner, None)


@dataclass
class Process:
    """One process's backend: the ledger, as seen by ``owner``."""

    ledger: Ledger
    owner: str

    def take(self, stream_id: str, push: Push) -> Grant:
        if stream_id != SID:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        return self.ledger.exchange(self.owner, push, giving=False)

    def give_back(self, stream_id: str, push: Push) -> Grant:
        if stream_id != SID:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        return self.ledger.exchange(self.owner, push, giving=True)


def engine(ledger: Ledger, owner: str = "p1", chunk: int = 8) -> LeasedCounter:
    return LeasedCounter(Process(ledger, owner), chunk=chunk)


def test_the_toy_backend_is_a_lease_backend() -> None:
    assert isinstance(Process(Ledger(10), "p"), LeaseBackend)
    with pytest.raises(TypeError):
        LeasedCounter(object(), chunk=1)  # type: ignore[arg-type]


def test_counts_exactly_with_one_push_per_chunk() -> None:
    ledger = Ledger(1000)
    e = engine(ledger, chunk=10)
    for i in range(1, 101):
        assert e.add(SID, 1) == i
        view = e.view(SID)
        assert view is not None and view.unpushed <= 10
    e.push(SID)
    assert ledger.units == 100
    assert ledger.pushes <= 100 // 10 + 2


def test_the_budget_is_never_overspent_by_two_processes() -> None:
    ledger = Ledger(25)
    a, b = engine(ledger, "a", chunk=10), engine(ledger, "b", chunk=10)
    counted = 0
    for e in (a, b) * 20:
        try:
            e.add(SID, 1)
            counted += 1
        except BudgetExhausted:
            pass
        ledger.check()
    a.push(SID, release=True)
    b.push(SID, release=True)
    assert counted == ledger.units == 25
    with pytest.raises(BudgetExhausted):
        a.add(SID, 1)


def test_a_lost_answer_is_resent_and_counted_once() -> None:
    ledger = Ledger(1000)
    e = engine(ledger, chunk=5)
    for _ in range(5):
        e.add(SID, 1)
    ledger.fail = ["after"]  # the next push is applied, its answer lost
    with pytest.raises(StoreUnavailable):
        e.push(SID)
    view = e.view(SID)
    assert view is not None and view.unpushed == 5  # in doubt: still ours to resend
    e.push(SID)  # the same push again: the ledger answers with the first reply
    assert ledger.units == 5
    e.add(SID, 3)
    e.push(SID)
    assert ledger.units == 8


def test_a_push_that_never_arrived_is_resent_and_counted_once() -> None:
    ledger = Ledger(1000)
    e = engine(ledger, chunk=5)
    e.add(SID, 4)
    ledger.fail = ["before"]
    with pytest.raises(StoreUnavailable):
        e.push(SID)
    assert ledger.units == 0
    e.push(SID)
    assert ledger.units == 4


def test_while_the_record_is_unreachable_at_most_a_chunk_is_unpushed() -> None:
    ledger = Ledger(1000)
    e = engine(ledger, chunk=4)
    e.reserve(SID, 8)  # a lease of 8 held + a chunk of 4
    e.cancel(SID, 8)  # the call failed: 12 free, more than a chunk
    e.add(SID, 1)
    ledger.fail = ["before"] * 100
    counted = 1
    for _ in range(20):
        try:
            e.add(SID, 1)
            counted += 1
        except StoreUnavailable:
            pass
        view = e.view(SID)
        assert view is not None and view.unpushed <= 4
    assert counted == 4  # then every add needs a push first, and the push fails
    ledger.fail = []
    e.push(SID)
    assert ledger.units == 4


def test_reserve_commit_cancel() -> None:
    ledger = Ledger(20)
    e = engine(ledger, chunk=8)
    e.reserve(SID, 5)
    e.reserve(SID, 5)
    e.cancel(SID, 5)
    assert e.commit(SID, 5) == 5
    e.push(SID, release=True)  # gives back the free lease, keeps nothing held
    assert ledger.units == 5 and ledger.leases == {}
    e.reserve(SID, 15)
    with pytest.raises(BudgetExhausted):
        e.reserve(SID, 1)
    e.push(SID, release=True)  # a running call's units stay leased
    assert ledger.leases == {"p1": 15}
    e.commit(SID, 15)
    e.push(SID)
    assert ledger.units == 20


def test_exact_leases_without_a_chunk() -> None:
    ledger = Ledger(20)
    e = engine(ledger, chunk=0)
    e.reserve(SID, 3)
    assert ledger.leases == {"p1": 3}  # exactly what is held, nothing spare
    e.commit(SID, 3)  # pushed at once
    assert ledger.units == 3 and ledger.leases == {}
    e.reserve(SID, 2)
    e.cancel(SID, 2)  # given back at once
    assert ledger.leases == {}


def test_a_closed_stream_refuses_locally_and_gives_everything_back() -> None:
    ledger = Ledger(100)
    e = engine(ledger)
    e.add(SID, 3)
    e.close_local(SID, "closing")
    with pytest.raises(StreamClosed):
        e.add(SID, 1)
    e.push(SID, release=True)
    assert ledger.units == 3 and ledger.leases == {}


def test_another_process_closing_is_seen_at_the_next_push() -> None:
    ledger = Ledger(100)
    e = engine(ledger, chunk=4)
    e.add(SID, 4)
    ledger.status = "closing"
    ledger.leases.clear()  # the final claim took every lease back
    with pytest.raises(StreamClosed):
        for _ in range(8):
            e.add(SID, 1)
    assert ledger.lost == 4  # counted after the close: reported, not counted
    assert ledger.units == 0


def test_a_new_stream_is_refused_until_it_opens() -> None:
    ledger = Ledger(100, status="new")
    e = engine(ledger)
    with pytest.raises(StreamClosed, match="new"):
        e.add(SID, 1)
    ledger.status = "open"
    assert e.add(SID, 1) == 1


def test_an_unknown_stream_leaves_nothing_behind() -> None:
    e = engine(Ledger(100))
    with pytest.raises(InvalidInput):
        e.add("nope", 1)
    assert not e.holds("nope")
    e.push_all(release=True)  # nothing to resend


def test_waiters_share_pushes() -> None:
    ledger = Ledger(10**6)
    e = engine(ledger, chunk=10_000)
    threads = [
        threading.Thread(target=lambda: [e.add(SID, 1, wait=True) for _ in range(50)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ledger.units == 400  # every add returned after a push covering it
    assert ledger.pushes <= 401


def test_lease_expiry_stops_consumption_first() -> None:
    now = [0.0]

    class Expiring(Process):
        def take(self, stream_id: str, push: Push) -> Grant:
            g = super().take(stream_id, push)
            return Grant(g.status, g.total, g.lease, g.available, ttl=2.0)

    ledger = Ledger(100)
    e = LeasedCounter(Expiring(ledger, "p1"), chunk=10, clock=lambda: now[0])
    e.add(SID, 1)
    pushes = ledger.pushes
    now[0] = 1.4  # before the local expiry (2.0 less a 0.5 margin): no I/O
    e.add(SID, 1)
    assert ledger.pushes == pushes
    now[0] = 1.6  # past it: a push renews the lease before consuming
    e.add(SID, 1)
    assert ledger.pushes == pushes + 1
    e.push(SID)
    assert ledger.units == 3


@given(
    lease=st.integers(0, 100),
    want=st.integers(0, 100),
    need=st.integers(0, 100),
    avail=st.integers(0, 200),
    exact=st.booleans(),
)
def test_grant_stays_in_the_pool_and_is_all_or_nothing(
    lease: int, want: int, need: int, avail: int, exact: bool
) -> None:
    after = grant(lease, want, need, avail, exact=exact)
    assert after - lease <= avail  # never more than the pool has
    if after > lease:
        assert after >= need and after <= max(want, need)  # a grant covers the need
    if not exact:
        assert after >= lease  # a take never shrinks a lease unless asked


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "hold", "commit", "cancel", "push", "tick", "lose", "kill"]),
        st.integers(0, 2),
        st.integers(1, 6),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, chunk=st.integers(1, 8), budget=st.integers(1, 60))
# a count larger than a chunk whose push loses its answer: counted, not raised to the caller
@example(ops=[("hold", 1, 2), ("cancel", 1, 1), ("lose", 0, 1), ("add", 1, 2)], chunk=1, budget=2)
def test_fleet_bounds(ops: list[tuple[str, int, int]], chunk: int, budget: int) -> None:
    """Random fleets of three processes: the three properties of the module docstring."""
    ledger = Ledger(budget)
    gen = [0, 0, 0]
    engines = [engine(ledger, f"p{i}/0", chunk) for i in range(3)]
    told = [0, 0, 0]  # units each live process was told it counted
    held: list[list[int]] = [[], [], []]
    for op, i, n in ops:
        e = engines[i]
        try:
            if op == "add":
                e.add(SID, n)
                told[i] += n
            elif op == "hold":
                e.reserve(SID, n)
                held[i].append(n)
            elif op == "commit" and held[i]:
                units = held[i].pop()
                try:
                    e.commit(SID, units)
                finally:
                    told[i] += units  # the call ran: counted even when its push failed
            elif op == "cancel" and held[i]:
                e.cancel(SID, held[i].pop())
            elif op == "push":
                e.push(SID)
            elif op == "tick":
                e.tick()
            elif op == "lose":
                ledger.fail.append("after" if n % 2 else "before")
        except (BudgetExhausted, StoreUnavailable):
            pass
        if op == "kill":
            owner = f"p{i}/{gen[i]}"
            lost = told[i] - ledger.counted_by.get(owner, 0)
            assert 0 <= lost <= chunk  # what the kill took: at most one chunk
            ledger.reclaim(owner)  # its lease: budget only, given back
            gen[i] += 1
            engines[i] = engine(ledger, f"p{i}/{gen[i]}", chunk)
            told[i], held[i] = 0, []
        ledger.check()
    ledger.fail = []
    for i, e in enumerate(engines):
        for units in held[i]:
            e.commit(SID, units)
            told[i] += units
        e.push(SID, release=True)
        assert ledger.counted_by.get(f"p{i}/{gen[i]}", 0) == told[i]  # exactly once
    assert ledger.leases == {}
    ledger.check()


def test_a_failed_push_after_counting_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The call ran: its units are counted; a push that fails then is logged, and the next
    push carries them once (raising would invite a retry that counts them twice)."""
    ledger = Ledger(20)
    e = engine(ledger, chunk=0)  # every commit pushes at once
    e.reserve(SID, 3)
    ledger.fail = ["after"]  # applied, answer lost
    assert e.commit(SID, 3) == 3
    assert "push for stream s1 failed" in caplog.text
    e.push(SID)
    assert ledger.units == 3 and ledger.counted_by == {"p1": 3}
    e.reserve(SID, 2)
    ledger.fail = ["before"]  # never arrived
    e.commit(SID, 2)
    e.push(SID)
    assert ledger.units == 5
    ledger.fail = ["before"]
    with pytest.raises(StoreUnavailable):  # no lease to count from: refused, nothing counted
        e.add(SID, 1)
    e.push(SID)
    assert ledger.units == 5
    w = engine(ledger, "p2", chunk=4)
    w.add(SID, 1)  # takes a lease
    ledger.fail = ["before"]
    with pytest.raises(StoreUnavailable):  # wait=True promised a push: its failure is raised
        w.add(SID, 1, wait=True)
    w.push(SID)
    assert ledger.counted_by["p2"] == 2  # and the unit counted before it still went, once
