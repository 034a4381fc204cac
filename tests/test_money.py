"""Exact money: parsing refuses what would lose a cent; costs telescope exactly."""

from __future__ import annotations

from decimal import ROUND_FLOOR, ROUND_HALF_UP, Decimal, localcontext

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pf_metered.errors import InvalidInput
from pf_metered.money import (
    MAX_UNITS,
    MICRO,
    fee_micro,
    format_usdc,
    micro_to_decimal,
    net_micro,
    parse_amount,
    parse_count,
    parse_rate,
)


@pytest.mark.parametrize(
    ("value", "micro"),
    [
        ("10.00", 10_000_000),
        ("0.000001", 1),
        ("1", 1_000_000),
        (7, 7_000_000),
        (Decimal("2.5"), 2_500_000),
        ("1.5000000", 1_500_000),  # trailing zeros beyond six places are exact, not extra precision
    ],
)
def test_parse_amount_accepts_exact_values(value: object, micro: int) -> None:
    assert parse_amount(value) == micro


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0.1, "not float"),
        (True, "bool"),
        ("NaN", "finite"),
        ("Infinity", "finite"),
        ("-1", "negative"),
        ("0.0000001", "more than 6 decimal places"),
        ("abc", "not a decimal number"),
        ("", "not a decimal number"),
        ("1" * 80, "not a decimal number"),
        ("1" + "0" * 30, "absurdly large"),
        (None, "not NoneType"),
        ([1], "not list"),
        ("0", "greater than zero"),
        ("1e3", "plain decimal"),
        ("1E+2", "plain decimal"),
    ],
)
def test_parse_amount_refuses_with_the_field_named(value: object, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_amount(value, "budget")
    assert info.value.field == "budget"
    assert str(info.value).startswith("budget ")
    assert fragment in str(info.value)


def test_zero_amount_allowed_only_when_asked() -> None:
    assert parse_amount("0", allow_zero=True) == 0


@pytest.mark.parametrize(
    ("micro", "text"),
    [
        (10_000_000, "10.00"),
        (1_500, "0.0015"),
        (1, "0.000001"),
        (0, "0.00"),
        (123_456_789, "123.456789"),
    ],
)
def test_format_usdc(micro: int, text: str) -> None:
    assert format_usdc(micro) == text
    assert parse_amount(text, allow_zero=True) == micro


@given(st.integers(min_value=0, max_value=10**18))
def test_format_round_trips(micro: int) -> None:
    assert parse_amount(format_usdc(micro), allow_zero=True) == micro
    assert micro_to_decimal(micro) * MICRO == micro


def test_fee_is_one_percent_half_up() -> None:
    assert fee_micro(1_000 * MICRO) == 10 * MICRO  # the product page's $1,000 → $10 fee
    assert net_micro(1_000 * MICRO) == 990 * MICRO
    assert fee_micro(50) == 1  # 0.5 micro rounds half-up
    assert fee_micro(49) == 0
    assert fee_micro(150) == 2  # 1.5 → 2 (half-up, not banker's 2)
    assert fee_micro(250) == 3  # 2.5 → 3 (banker's rounding would give 2)


@given(st.integers(min_value=0, max_value=10**15))
def test_fee_matches_decimal_half_up(micro: int) -> None:
    expected = (Decimal(micro) / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    assert fee_micro(micro) == int(expected)


def test_rate_costs_are_exact_for_sub_micro_prices() -> None:
    rate = parse_rate("0.0000001")  # a tenth of a micro-USDC per token
    assert rate.micro_floor(9) == 0
    assert rate.micro_floor(10) == 1
    assert rate.micro_half_up(5) == 1
    assert rate.micro_half_up(4) == 0
    assert rate.micro_floor(10**9) == 100 * MICRO


@given(
    st.decimals(min_value=Decimal("0.000000000000000001"), max_value=Decimal(1000), places=18),
    st.integers(min_value=0, max_value=10**9),
)
def test_rate_matches_decimal_arithmetic(rate_value: Decimal, units: int) -> None:
    rate = parse_rate(rate_value)
    with localcontext() as ctx:
        ctx.prec = 80
        exact = rate_value * units * MICRO
        assert rate.micro_floor(units) == int(exact.to_integral_value(rounding=ROUND_FLOOR))
        assert rate.micro_half_up(units) == int(exact.to_integral_value(rounding=ROUND_HALF_UP))


@given(
    st.decimals(min_value=Decimal("0.0000001"), max_value=Decimal(10), places=9),
    st.integers(min_value=1, max_value=10**12),
)
def test_units_affordable_is_the_largest_that_fits(rate_value: Decimal, budget: int) -> None:
    rate = parse_rate(rate_value)
    units = rate.units_affordable(budget)
    assert rate.micro_half_up(units) <= budget
    if units < MAX_UNITS:
        assert rate.micro_half_up(units + 1) > budget


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (0.001, "not float"),
        ("-0.1", "negative"),
        ("0", "greater than zero"),
        ("0.0000000000000000001", "more than 18 decimal places"),
        ("nan", "finite"),
        ("1" + "0" * 13, "absurdly large"),
    ],
)
def test_parse_rate_refuses(value: object, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_rate(value, "rate")
    assert info.value.field == "rate"
    assert fragment in str(info.value)


def test_rate_text_and_equality() -> None:
    assert str(parse_rate("0.00100")) == "0.001"
    assert parse_rate("0.001") == parse_rate(Decimal("0.0010"))
    assert str(parse_rate(Decimal("5E+1"))) == "50"
    assert repr(parse_rate("0.5")) == "Rate('0.5')"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [(1.0, "not float"), (-1, "negative"), (True, "not bool"), (MAX_UNITS + 1, "absurdly")],
)
def test_parse_count_refuses(value: object, fragment: str) -> None:
    with pytest.raises(InvalidInput, match=fragment):
        parse_count(value)


# -- no Decimal context ever rounds money -------------------------------------------------

LONG_TAIL = "0.1" + "0" * 30 + "1"  # 33 significant digits: more than a default context holds


@pytest.mark.parametrize(
    "value", [LONG_TAIL, Decimal(LONG_TAIL), "12.3456780000000000000000000000000009"]
)
def test_amounts_beyond_six_places_are_refused_however_many_digits(value: object) -> None:
    # Decimal.normalize() rounds to the context's 28 digits: these once became 0.1 / 12.345678
    with pytest.raises(InvalidInput, match="decimal places"):
        parse_amount(value)


def test_rates_are_never_rounded_by_the_context() -> None:
    rate = parse_rate("123456789012.123456789012345678")  # 30 significant digits
    assert str(rate) == "123456789012.123456789012345678"
    assert rate.micro_floor(1) == 123456789012123456
    with pytest.raises(InvalidInput, match="decimal places"):
        parse_rate("0.1" + "0" * 30 + "1")


@pytest.mark.parametrize("rounding", [ROUND_FLOOR, ROUND_HALF_UP])
def test_a_callers_small_context_changes_nothing(rounding: str) -> None:
    from pf_metered.models import Escrow

    with localcontext() as ctx:
        ctx.prec = 4
        ctx.rounding = rounding
        assert parse_amount("12.345678") == 12_345_678
        assert parse_amount(Decimal("999999.999999")) == 999_999_999_999
        assert micro_to_decimal(12_345_678) == Decimal("12.345678")
        assert str(micro_to_decimal(-1)) == "-0.000001"
        rate = parse_rate("0.00012345678")
        assert rate.micro_half_up(10**6) == 123_456_780
        assert rate.micro_half_up(1) == 123
        escrow = Escrow(
            escrow_id="e1",
            status="locked",
            amount="12.345678",
            released="1.000001",
            remaining="11.345677",
        )
        assert escrow.amount_micro == 12_345_678
        assert escrow.model_dump()["amount"] == "12.345678"
        with pytest.raises(ValueError, match="amount"):  # rounding must not make it add up
            Escrow(
                escrow_id="e1",
                status="locked",
                amount="12.345678",
                released="1.000001",
                remaining="11.345678",
            )


def test_huge_exponents_are_refused_quickly() -> None:
    with pytest.raises(InvalidInput, match="absurdly large"):
        parse_amount(Decimal("1E+999999"))
    with pytest.raises(InvalidInput, match="decimal places"):
        parse_amount(Decimal("1E-999999"))
    with pytest.raises(InvalidInput, match="absurdly large"):
        parse_rate(Decimal("1E+999999"))
    with pytest.raises(InvalidInput, match="decimal places"):
        parse_rate(Decimal("1E-999999"))
    assert parse_amount(Decimal("1E+3")) == 1_000 * MICRO
    assert parse_amount(Decimal("1.000000000000000000000000000000000")) == MICRO


# -- only plain ASCII decimals are money (issue 13 item 10) -------------------------------

NOT_PLAIN = ["1_0", "١٠", "１０", "+10", " 10 ", "10 ", "\t10", "10\n", "1e3", "1.", ".5", "0x10"]


@pytest.mark.parametrize("text", NOT_PLAIN)
def test_money_text_must_be_plain_ascii_digits(text: str) -> None:
    for parse, field in ((parse_amount, "budget"), (parse_rate, "rate")):
        with pytest.raises(InvalidInput) as info:
            parse(text, field)
        assert info.value.field == field
        assert str(info.value).startswith(field + " ")


@pytest.mark.parametrize("text", ["10", "0.5", "10.000000", "007.25"])
def test_plain_decimals_still_parse(text: str) -> None:
    assert parse_amount(text) == int(Decimal(text) * 1_000_000)
