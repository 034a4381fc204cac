"""The store contract as tests: every meter store must pass all of them.

Adding a store is one class (``make_store`` is the only thing to write)::

    class TestRedisStoreContract(StoreContract):
        def make_store(self, tmp_path): return RedisStore(url, prefix=tmp_path.name)

The module is not collected on its own (its name does not start with ``test_``); the classes
in ``test_sqlite_store.py`` (memory and SQLite) and the Redis tests subclass it. A
``make_store`` may be called more than once in one test: the calls must return handles on the
*same* underlying state (a second process, a second connection), which is how the
cross-handle tests see what another holder wrote.
"""

from __future__ import annotations

import itertools
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.store import (
    Intent,
    Store,
    StreamConfig,
    intent_amount_micro,
    intent_key,
)
from pf_metered.money import parse_rate


def config(max_units: int = 1000, rate: str = "0.0015", **kw: Any) -> StreamConfig:
    sid = kw.pop("stream_id", None) or uuid.uuid4().hex
    rate_obj = parse_rate(rate)
    return StreamConfig(
        stream_id=sid,
        to_agent_id="ag_provider",
        rate=rate,
        budget_micro=kw.pop("budget_micro", rate_obj.micro_half_up(max_units)),
        max_units=max_units,
        memo=kw.pop("memo", "contract"),
        **kw,
    )


def opened(store: Store, max_units: int = 1000, rate: str = "0.0015", **kw: Any) -> StreamConfig:
    cfg = config(max_units, rate, **kw)
    store.create(cfg)
    store.set_escrow(cfg.stream_id, "esc_" + cfg.stream_id[:8])
    return cfg


def settle_all(store: Store, cfg: StreamConfig, intent: Intent) -> int:
    amount = intent_amount_micro(cfg.parsed_rate, intent)
    store.settle(cfg.stream_id, intent.seq, amount)
    return amount


class StoreContract:
    """Subclass and define ``make_store(tmp_path)``; see the module docstring."""

    def make_store(self, tmp_path: Path) -> Store:  # pragma: no cover - overridden
        raise NotImplementedError

    concurrent_processes = False
    """Set True when ``make_store`` handles may live in other processes (file/redis)."""

    @pytest.fixture
    def store(self, tmp_path: Path) -> Any:
        s = self.make_store(tmp_path)
        yield s
        close = getattr(s, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------ lifecycle
    def test_create_load_roundtrip(self, store: Store) -> None:
        cfg = config(500, "0.001", batch_units=100, every_seconds="2.5", auto_release_hours=24)
        assert store.load(cfg.stream_id) is None
        store.create(cfg)
        state = store.load(cfg.stream_id)
        assert state is not None
        assert state.config == cfg
        assert (state.status, state.escrow_id, state.units, state.claimed_units) == (
            "new",
            None,
            0,
            0,
        )
        assert (state.paid_micro, state.releases, state.pending, state.next_seq) == (0, 0, (), 1)

    def test_create_twice_refused(self, store: Store) -> None:
        cfg = config()
        store.create(cfg)
        with pytest.raises(InvalidInput) as err:
            store.create(cfg)
        assert err.value.field == "stream_id"

    def test_unknown_stream(self, store: Store) -> None:
        with pytest.raises(InvalidInput):
            store.add_units("nope-" + uuid.uuid4().hex, 1)
        with pytest.raises(InvalidInput):
            store.set_escrow("nope-" + uuid.uuid4().hex, "esc_1")

    def test_set_escrow_opens_once(self, store: Store) -> None:
        cfg = config()
        store.create(cfg)
        with pytest.raises(StreamClosed):
            store.add_units(cfg.stream_id, 1)
        store.set_escrow(cfg.stream_id, "esc_a")
        store.set_escrow(cfg.stream_id, "esc_a")  # idempotent
        with pytest.raises(InvalidInput):
            store.set_escrow(cfg.stream_id, "esc_b")
        state = store.load(cfg.stream_id)
        assert state is not None
        assert (state.status, state.escrow_id) == ("open", "esc_a")

    # ------------------------------------------------------------ budget
    def test_budget_exact_and_refusal_counts_nothing(self, store: Store) -> None:
        cfg = opened(store, max_units=10)
        assert store.add_units(cfg.stream_id, 7) == 7
        with pytest.raises(BudgetExhausted) as err:
            store.add_units(cfg.stream_id, 4)
        assert err.value.remaining_units == 3
        assert store.add_units(cfg.stream_id, 3) == 10
        with pytest.raises(BudgetExhausted):
            store.add_units(cfg.stream_id, 1)
        state = store.load(cfg.stream_id)
        assert state is not None and state.units == 10

    def test_zero_units_is_harmless(self, store: Store) -> None:
        cfg = opened(store, max_units=10)
        store.add_units(cfg.stream_id, 0)
        state = store.load(cfg.stream_id)
        assert state is not None and state.units == 0

    # ------------------------------------------------------------ claims
    def test_claim_respects_min_units_and_one_pending(self, store: Store) -> None:
        cfg = opened(store)
        store.add_units(cfg.stream_id, 5)
        assert store.claim(cfg.stream_id, min_units=10) is None
        store.add_units(cfg.stream_id, 5)
        first = store.claim(cfg.stream_id, min_units=10)
        assert first == Intent(cfg.stream_id, 1, 0, 10, False)
        assert first.idempotency_key == intent_key(cfg.stream_id, 1)
        store.add_units(cfg.stream_id, 20)
        assert store.claim(cfg.stream_id, min_units=1) is None  # one in flight at most
        assert store.claim(cfg.stream_id, min_units=0, final=True) is None
        state = store.load(cfg.stream_id)
        assert state is not None
        assert state.pending == (first,) and state.claimed_units == 10 and state.units == 30
        settle_all(store, cfg, first)
        second = store.claim(cfg.stream_id, min_units=1)
        assert second == Intent(cfg.stream_id, 2, 10, 30, False)

    def test_claim_nothing_new_is_none(self, store: Store) -> None:
        cfg = opened(store)
        assert store.claim(cfg.stream_id, min_units=0) is None

    def test_claim_before_open_is_none(self, store: Store) -> None:
        cfg = config()
        store.create(cfg)
        assert store.claim(cfg.stream_id, min_units=1) is None

    def test_final_claim_closes_counting(self, store: Store) -> None:
        cfg = opened(store, rate="0.0000015")
        store.add_units(cfg.stream_id, 3)
        final = store.claim(cfg.stream_id, min_units=0, final=True)
        assert final == Intent(cfg.stream_id, 1, 0, 3, True)
        with pytest.raises(StreamClosed):
            store.add_units(cfg.stream_id, 1)
        assert store.claim(cfg.stream_id, min_units=1) is None
        state = store.load(cfg.stream_id)
        assert state is not None and state.status == "closing"
        # half-up: 3 × 1.5 µ = 4.5 µ → 5 µ in total
        assert settle_all(store, cfg, final) == 5

    def test_final_claim_with_no_new_units_still_settles_rounding(self, store: Store) -> None:
        cfg = opened(store, rate="0.0000015")
        store.add_units(cfg.stream_id, 1)
        batch = store.claim(cfg.stream_id, min_units=1)
        assert batch is not None
        assert settle_all(store, cfg, batch) == 1  # floor(1.5)
        final = store.claim(cfg.stream_id, min_units=0, final=True)
        assert final == Intent(cfg.stream_id, 2, 1, 1, True)
        assert settle_all(store, cfg, final) == 1  # half_up(1.5)=2, minus the 1 paid

    def test_one_final_intent_per_stream(self, store: Store) -> None:
        """A second closer that raced past its own "is it closing?" check must get nothing:
        a second final intent made it a closer too, and it refunded a second time (seen on
        Redis under CI load)."""
        cfg = opened(store)
        store.add_units(cfg.stream_id, 5)
        final = store.claim(cfg.stream_id, min_units=0, final=True)
        assert final is not None and final.final
        assert store.claim(cfg.stream_id, min_units=0, final=True) is None  # while pending
        settle_all(store, cfg, final)
        assert store.claim(cfg.stream_id, min_units=0, final=True) is None  # and after

    # ------------------------------------------------------------ settle / close
    def test_settle_is_idempotent(self, store: Store) -> None:
        cfg = opened(store)
        store.add_units(cfg.stream_id, 100)
        intent = store.claim(cfg.stream_id, min_units=1)
        assert intent is not None
        store.settle(cfg.stream_id, intent.seq, 150)
        store.settle(cfg.stream_id, intent.seq, 150)
        store.settle(cfg.stream_id, intent.seq + 7, 999)  # unknown seq: no-op
        state = store.load(cfg.stream_id)
        assert state is not None
        assert (state.paid_micro, state.releases, state.pending) == (150, 1, ())
        assert state.settled == ((intent, 150),)

    def test_zero_amount_settle_is_not_a_release(self, store: Store) -> None:
        cfg = opened(store, rate="0.0000001")
        store.add_units(cfg.stream_id, 3)
        intent = store.claim(cfg.stream_id, min_units=1)
        assert intent is not None
        assert settle_all(store, cfg, intent) == 0
        state = store.load(cfg.stream_id)
        assert state is not None and (state.paid_micro, state.releases) == (0, 0)

    def test_mark_closed_is_idempotent(self, store: Store) -> None:
        cfg = opened(store)
        store.add_units(cfg.stream_id, 10)
        final = store.claim(cfg.stream_id, min_units=0, final=True)
        assert final is not None
        settle_all(store, cfg, final)
        store.mark_closed(cfg.stream_id, 1234)
        store.mark_closed(cfg.stream_id, 99999)
        state = store.load(cfg.stream_id)
        assert state is not None
        assert (state.status, state.refunded_micro) == ("closed", 1234)
        assert store.claim(cfg.stream_id, min_units=0, final=True) is None
        with pytest.raises(StreamClosed):
            store.add_units(cfg.stream_id, 1)

    def test_amounts_telescope_to_half_up(self, store: Store) -> None:
        cfg = opened(store, max_units=10_000, rate="0.0000037")
        rate = cfg.parsed_rate
        paid = 0
        for step in (1, 3, 7, 100, 2, 999, 5):
            store.add_units(cfg.stream_id, step)
            intent = store.claim(cfg.stream_id, min_units=1)
            assert intent is not None
            paid += settle_all(store, cfg, intent)
        store.add_units(cfg.stream_id, 1)
        final = store.claim(cfg.stream_id, min_units=0, final=True)
        assert final is not None
        paid += settle_all(store, cfg, final)
        state = store.load(cfg.stream_id)
        assert state is not None
        assert paid == state.paid_micro == rate.micro_half_up(state.units)
        assert paid <= cfg.budget_micro
        ranges = [(i.units_from, i.units_to) for i, _ in state.settled]
        assert ranges[0][0] == 0 and ranges[-1][1] == state.units
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))

    # ------------------------------------------------------------ counter extension
    def test_counter_reservations_hold_budget(self, store: Store) -> None:
        make = getattr(store, "counter", None)
        if make is None:
            pytest.skip("store has no counter extension")
        cfg = opened(store, max_units=10)
        counter = make(cfg.stream_id)
        counter.reserve(6)
        with pytest.raises(BudgetExhausted):
            counter.reserve(5)
        with pytest.raises(BudgetExhausted):
            counter.add(5)
        assert counter.add(4) == 4
        counter.cancel(1)
        assert counter.commit(5) == 9
        with pytest.raises(BudgetExhausted):
            counter.add(2)
        assert counter.add(1) == 10
        state = store.load(cfg.stream_id)
        assert state is not None and state.units == 10

    # ------------------------------------------------------------ concurrency
    def test_threads_never_overspend(self, store: Store) -> None:
        cfg = opened(store, max_units=2_000)
        counted = [0] * 32
        refused = [0] * 32
        start = threading.Barrier(32)

        def work(i: int) -> None:
            start.wait()
            while True:
                try:
                    store.add_units(cfg.stream_id, 1 + i % 3)
                except BudgetExhausted:
                    refused[i] += 1
                    if refused[i] > 3:
                        return
                else:
                    counted[i] += 1 + i % 3

        threads = [threading.Thread(target=work, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        state = store.load(cfg.stream_id)
        assert state is not None
        assert state.units == sum(counted)
        assert cfg.max_units - 2 <= state.units <= cfg.max_units

    def test_claimers_and_recorders_race(self, store: Store) -> None:
        """Many threads record while several claim and settle: ranges tile, one in flight."""
        cfg = opened(store, max_units=1_000_000, rate="0.0000031")
        stop = threading.Event()
        in_flight = [0]
        max_in_flight = [0]
        guard = threading.Lock()
        errors: list[BaseException] = []
        per_recorder = 300

        def record() -> None:
            for _ in range(per_recorder):
                store.add_units(cfg.stream_id, 1)

        def claimer() -> None:
            try:
                while not stop.is_set():
                    intent = store.claim(cfg.stream_id, min_units=7)
                    if intent is None:
                        continue
                    with guard:
                        in_flight[0] += 1
                        max_in_flight[0] = max(max_in_flight[0], in_flight[0])
                    with guard:
                        in_flight[0] -= 1
                    settle_all(store, cfg, intent)
                    settle_all(store, cfg, intent)  # a duplicate answer changes nothing
            except BaseException as exc:
                errors.append(exc)

        recorders = [threading.Thread(target=record) for _ in range(16)]
        claimers = [threading.Thread(target=claimer) for _ in range(4)]
        for t in claimers + recorders:
            t.start()
        for t in recorders:
            t.join()
        stop.set()
        for t in claimers:
            t.join()
        assert not errors
        final = store.claim(cfg.stream_id, min_units=0, final=True)
        assert final is not None
        settle_all(store, cfg, final)
        state = store.load(cfg.stream_id)
        assert state is not None
        assert state.units == 16 * per_recorder
        ranges = sorted((i.units_from, i.units_to) for i, _ in state.settled)
        assert ranges[0][0] == 0 and ranges[-1][1] == state.units
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
        assert [i.seq for i, _ in state.settled] == list(range(1, len(state.settled) + 1))
        assert state.paid_micro == cfg.parsed_rate.micro_half_up(state.units)
        assert max_in_flight[0] <= 1
