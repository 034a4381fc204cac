"""The tranche planner: sizes, the hold-back, and a close that pays exactly what is owed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pf_metered.errors import InvalidInput
from pf_metered.money import fee_micro, parse_rate
from pf_metered.stream._tranche_plan import (
    DEPLOYED_MINIMUM_MICRO as MIN,
)
from pf_metered.stream._tranche_plan import (
    GRANULE_MICRO,
    next_lock_micro,
    plan_tranches,
    releasable,
    settle_close,
    split_budget,
    units_for_micro,
)


def test_tranche_is_one_batch_when_that_reaches_the_minimum():
    plan = plan_tranches(parse_rate("0.001"), budget_micro=5_000_000, batch_units=1000)
    assert plan.tranche_micro == 1_000_000
    assert plan.units_per_tranche == 1000
    assert plan.holdback_micro == MIN
    assert plan.sizes == (1_000_000,) * 5


def test_small_batch_raised_to_the_minimum_with_a_note():
    plan = plan_tranches(parse_rate("0.0001"), budget_micro=5_000_000, batch_units=100)
    assert plan.tranche_micro == MIN
    assert plan.units_per_tranche == 1000
    assert any("under the service's minimum" in n and "1,000 units" in n for n in plan.notes)


def test_tranche_rounded_up_to_the_granule_so_commission_is_whole():
    plan = plan_tranches(parse_rate("0.333333333"), budget_micro=100_000_000, batch_units=7)
    assert plan.tranche_micro % GRANULE_MICRO == 0
    assert plan.tranche_micro >= 2_333_334
    assert fee_micro(plan.tranche_micro) * 100 == plan.tranche_micro


def test_no_batch_means_a_tenth_of_the_budget():
    plan = plan_tranches(parse_rate("0.01"), budget_micro=20_000_000)
    assert plan.tranche_micro == 2_000_000


def test_budget_under_the_minimum_refused():
    with pytest.raises(InvalidInput) as info:
        plan_tranches(parse_rate("0.01"), budget_micro=99_999)
    assert info.value.field == "budget"


def test_time_cadence_above_the_create_limit_reported():
    plan = plan_tranches(
        parse_rate("0.01"),
        budget_micro=10_000_000,
        batch_units=10,
        every_seconds=2,
        creates_per_minute=7.0,
    )
    assert any("every=2s asks for 30.0 releases a minute" in n for n in plan.notes)
    assert plan.max_units_per_minute == pytest.approx(70.0)
    calm = plan_tranches(
        parse_rate("0.01"),
        budget_micro=10_000_000,
        batch_units=10,
        every_seconds=60,
        creates_per_minute=7.0,
    )
    assert not any("asks for" in n for n in calm.notes)


@pytest.mark.parametrize(
    ("budget", "tranche", "sizes"),
    [
        (1_000_000, 100_000, (100_000,) * 10),
        (1_050_000, 100_000, (100_000,) * 9 + (150_000,)),
        (1_150_000, 100_000, (100_000,) * 10 + (150_000,)),
        (1_200_000, 100_000, (100_000,) * 12),
        (250_000, 1_000_000, (250_000,)),
    ],
)
def test_split_budget(budget, tranche, sizes):
    got = split_budget(budget, min(tranche, budget), MIN)
    assert sum(got) == budget
    assert all(s >= MIN for s in got)
    assert got == sizes


def test_release_needs_the_holdback():
    plan = plan_tranches(parse_rate("0.001"), budget_micro=5_000_000, batch_units=100)
    assert not releasable(199_999, 0, 100_000, plan)
    assert releasable(200_000, 0, 100_000, plan)


def test_next_lock_catches_up_and_stays_in_budget():
    plan = plan_tranches(parse_rate("0.001"), budget_micro=1_000_000, batch_units=100)
    assert (
        next_lock_micro(plan, owed_micro=0, paid_micro=0, live_micro=0, locked_total_micro=0)
        == 100_000
    )
    behind = next_lock_micro(
        plan, owed_micro=734_567, paid_micro=0, live_micro=100_000, locked_total_micro=100_000
    )
    assert behind == 534_500  # 734_567 - 100_000 - holdback, down to the granule
    assert (
        next_lock_micro(plan, owed_micro=0, paid_micro=0, live_micro=0, locked_total_micro=950_000)
        == 0
    )
    assert (
        next_lock_micro(plan, owed_micro=0, paid_micro=0, live_micro=0, locked_total_micro=880_000)
        == 100_000
    )


def test_settle_close_cases():
    s = settle_close(100_000, [100_000, 100_000])
    assert (s.release, s.final_micro, s.let_go, s.unpaid_micro) == ((0,), 0, (1,), 0)
    s = settle_close(250_000, [100_000, 100_000])
    assert s.release == (0,) and s.final_micro == 150_000 and s.let_go == (1,)
    s = settle_close(150_000, [100_000])
    assert s.release == () and s.final_micro == 150_000 and s.let_go == (0,)
    s = settle_close(3_000, [100_000])
    assert s.release == () and s.final_micro == 0 and s.unpaid_micro == 3_000
    s = settle_close(0, [100_000])
    assert s.release == () and s.final_micro == 0 and s.let_go == (0,)


@settings(max_examples=300, deadline=None)
@given(
    owed=st.integers(0, 5_000_000),
    live=st.lists(st.integers(MIN, 2_000_000), max_size=4),
)
def test_settle_close_pays_exactly_or_reports_unpaid(owed, live):
    s = settle_close(owed, live)
    paid = sum(live[i] for i in s.release) + s.final_micro
    assert paid + s.unpaid_micro == owed
    assert s.final_micro == 0 or s.final_micro >= MIN
    assert s.unpaid_micro == 0 or (owed < MIN and s.unpaid_micro == owed)
    assert sorted((*s.release, *s.let_go)) == list(range(len(live)))


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from(["0.0000001", "0.000333", "0.001", "0.05", "1.5"]),
    batches=st.lists(st.integers(1, 3000), min_size=1, max_size=40),
)
def test_release_rule_keeps_close_payable(rate, batches):
    """Simulate the chain's money: releasing only with the hold-back leaves a close that is
    either nothing or at least the minimum, once anything was released."""
    r = parse_rate(rate)
    plan = plan_tranches(r, budget_micro=10**12, batch_units=100)
    units = owed = paid = 0
    for b in batches:
        units += b
        owed = r.micro_floor(units)
        while releasable(owed, paid, plan.tranche_micro, plan):
            paid += plan.tranche_micro
    final_owed = r.micro_half_up(units)
    rest = final_owed - paid
    assert rest >= 0
    if paid:
        assert rest >= MIN
    s = settle_close(rest, [])
    assert s.unpaid_micro == 0 or paid == 0


def test_units_for_micro():
    assert units_for_micro(parse_rate("0.001"), 100_000) == 100
    assert units_for_micro(parse_rate("0.0003"), 100_000) == 334
    assert units_for_micro(parse_rate("0.001"), 0) == 0
