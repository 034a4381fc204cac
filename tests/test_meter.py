"""The meter without I/O: policies, plans, the MemoryStore counter, and exact totals."""

from __future__ import annotations

import itertools
import threading
from decimal import ROUND_HALF_UP, Decimal

import pytest

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter import BatchPolicy, MemoryStore, Meter, every, plan_stream
from pf_metered.money import parse_rate


def exact(rate: str, units: int) -> int:
    return int((Decimal(rate) * units * 1_000_000).quantize(Decimal(1), ROUND_HALF_UP))


def make(rate: str = "0.001", *, batch: int | None = 100, budget: str = "10", clock=None):
    store = MemoryStore()
    config, policy = plan_stream("ag_B", rate, batch=batch, budget=budget)
    meter = Meter(store, config, policy, **({"clock": clock} if clock else {}))
    action = meter.begin_open()
    assert action is not None and action.amount_micro == config.budget_micro
    meter.opened("esc_1")
    return store, meter


def drain(meter: Meter, **kw) -> list:
    sent = []
    while (action := meter.next_release(**kw)) is not None:
        sent.append(action)
        meter.settled(action)
        if action.intent.final:
            break
    return sent


def test_policies_compose_whichever_first():
    p = every(units=100) | every(seconds=60) | every(units=50)
    assert p == BatchPolicy(50, Decimal(60))
    assert "every 50 units" in str(p)
    with pytest.raises(InvalidInput):
        every()
    with pytest.raises(InvalidInput, match="seconds"):
        every(seconds=-1)


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"rate": 0.1, "budget": "1"}, "rate"),
        ({"rate": "0.1"}, "budget"),
        ({"rate": "0.1", "budget": "1", "batch": 0}, "batch"),
        ({"rate": "0.1", "budget": "0.01"}, "budget"),
        ({"rate": "0.1", "budget": "1", "auto_release_hours": 0}, "auto_release_hours"),
        ({"rate": "0.1", "budget": "1", "per": "fortnight"}, "per"),
    ],
)
def test_bad_input_names_the_field(kw, field):
    with pytest.raises(InvalidInput) as info:
        plan_stream("ag_B", **kw)
    assert info.value.field == field


def test_budget_from_max_units_and_cap_from_budget():
    config, _ = plan_stream("ag_B", "0.333333333", max_units=3)
    assert config.budget_micro == 1_000_000 and config.max_units == 3
    config, _ = plan_stream("ag_B", "1.5", budget="10")
    assert config.max_units == 6


def test_per_second_rate_is_scaled_exactly():
    config, _ = plan_stream("ag_B", "0.50", per="hour", budget="4")
    assert parse_rate(config.rate) == parse_rate("0.0000005")
    assert config.max_units == 8_000_000  # 8 hours of micro-hours


@pytest.mark.parametrize("rate", ["0.0000001", "0.333333333", "1.5", "0.001", "0.000000123456789"])
@pytest.mark.parametrize("batch", [1, 7, 100])
def test_releases_sum_to_rate_times_units_half_up(rate, batch):
    store, meter = make(rate, batch=batch, budget="1000")
    sent = []
    total = 0
    for n in [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377]:
        if parse_rate(rate).micro_half_up(total + n) > 1000 * 1_000_000:
            break
        meter.add(n)
        total += n
        sent += drain(meter)
    sent += drain(meter, final=True)
    assert sum(a.amount_micro for a in sent) == exact(rate, total)
    settled = store.load(meter.stream_id).settled
    ranges = [(i.units_from, i.units_to) for i, _ in settled]
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(b[0] == a[1] for a, b in itertools.pairwise(ranges))
    assert all(a.amount_micro > 0 for a in sent)  # nothing-to-pay releases never go out


def test_batch_memo_names_units_and_zero_amount_batches_skip_http():
    _, meter = make("0.001", batch=100)
    meter.add(250)
    (a,) = drain(meter)
    assert a.memo == "batch:units 1-250" and a.amount_micro == 250_000
    _, meter = make("0.0000001", batch=5, budget="1")
    meter.add(5)
    assert drain(meter) == []  # 0.0000005 USDC rounds to nothing yet: carried, no request
    meter.add(5)
    (a,) = drain(meter, final=True)
    assert a.amount_micro == 1 and a.memo == "final:units 6-10"


def test_budget_enforced_before_counting():
    store, meter = make("1.5", budget="10")
    meter.add(6)
    with pytest.raises(BudgetExhausted) as info:
        meter.add(1)
    assert info.value.remaining_units == 0
    assert store.load(meter.stream_id).units == 6


def test_reservations_hold_budget_and_give_it_back():
    store, meter = make("1", batch=None, budget="3")
    meter.reserve(2)
    with pytest.raises(BudgetExhausted):
        meter.reserve(2)
    meter.cancel(1)
    assert meter.commit(1) == 1
    meter.reserve(2)
    meter.cancel(2)
    state = store.load(meter.stream_id)
    assert state.units == 1 and state.claimed_units == 0


def test_time_policy_uses_injected_clock():
    now = [0.0]
    _, meter = make("0.001", batch=None, clock=lambda: now[0])
    meter.policy = every(seconds=60)
    meter._period = 60.0
    meter.add(3)
    assert meter.next_release() is None
    assert meter.seconds_until_due() == 60.0
    now[0] = 61.0
    (a,) = drain(meter)
    assert a.intent.units_to == 3


def test_final_claim_closes_counting_and_is_never_repeated():
    store, meter = make()
    meter.add(10)
    drain(meter, final=True)
    with pytest.raises(StreamClosed):
        meter.add(1)
    assert drain(meter, final=True) == []
    assert store.load(meter.stream_id).paid_micro == 10_000


def test_threads_count_exactly_and_claims_never_overlap():
    _store, meter = make("0.001", batch=50, budget="1000")
    sent = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender():
        while not stop.is_set():
            with lock:
                sent.extend(drain(meter))

    def worker():
        for _ in range(2000):
            meter.add(1)

    t = threading.Thread(target=sender)
    t.start()
    threads = [threading.Thread(target=worker) for _ in range(32)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    t.join()
    sent += drain(meter, final=True)
    covered = sorted((a.intent.units_from, a.intent.units_to) for a in sent)
    assert covered[0][0] == 0 and covered[-1][1] == 64_000
    assert all(b[0] == a[1] for a, b in itertools.pairwise(covered))
    assert sum(a.amount_micro for a in sent) == 64_000_000


# -- the caller's decimal context never prices anything (issue 13 item 5) -----------------


@pytest.mark.parametrize(
    ("per", "units"), [("second", 60_000), ("minute", 10_000), ("hour", 1_000_000)]
)
def test_a_small_decimal_context_does_not_change_time_prices(per: str, units: int) -> None:
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = 6
        ctx.rounding = decimal.ROUND_DOWN
        config, _policy = plan_stream("ag_B", "0.123456789", budget="100", per=per)
        store = MemoryStore()
        meter = Meter(store, config, _policy, per=per)
        receipt_text = str(meter.build_receipt().rows())
    # 60 s, 1 min or 1 h at 0.123456789 per second/minute/hour = 7.40740734 / 0.123456789
    expected = {"second": 7_407_407, "minute": 123_457, "hour": 123_457}[per]
    assert config.parsed_rate.micro_half_up(units) == expected
    assert "0.123456789 USDC / " + per in receipt_text
