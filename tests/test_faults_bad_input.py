"""Fault suite 6: bad input over the public entry points is refused before any I/O, with
``InvalidInput`` naming a field, never a crash (no TypeError, no half-opened stream)."""

from __future__ import annotations

import contextlib
import math
from decimal import Decimal

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.open import open_store
from pf_metered.sandbox import Sandbox
from pf_metered.stream import AsyncPaymentStream, PaymentStream

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["NaN", "inf", "-1", "1e400", "0.0000001", "1,5", " 2 "]),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.just(Decimal("-0")),
    st.lists(st.integers(), max_size=2),
    st.just(object()),
)


class Counting(httpx.BaseTransport):
    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner
        self.n = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.n += 1
        return self.inner.handle_request(request)


SB = Sandbox()
PAYER = SB.add_agent(balance="1000000")
PROVIDER = SB.add_agent()
WIRE = Counting(SB.transport())
CLIENT = SB.client(PAYER.api_key, transport=WIRE)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(
    to=st.one_of(JUNK, st.just("agent_x")),
    rate=st.one_of(JUNK, st.just("0.001")),
    batch=st.one_of(JUNK, st.just(10)),
    every=st.one_of(JUNK, st.just("1.5")),
    budget=st.one_of(JUNK, st.just("5")),
    max_units=st.one_of(JUNK, st.just(100)),
    hours=st.one_of(JUNK, st.just(24)),
    memo=st.one_of(JUNK, st.just("m")),
)
def test_constructor_refuses_before_io(
    to, rate, batch, every, budget, max_units, hours, memo
) -> None:
    before = WIRE.n
    for cls in (PaymentStream, AsyncPaymentStream):
        try:
            stream = cls(
                CLIENT,
                to,
                rate,
                batch=batch,
                every=every,
                budget=budget,
                max_units=max_units,
                auto_release_hours=hours,
                memo=memo,
            )
        except InvalidInput as exc:
            assert exc.field
        else:
            assert not stream.is_open
        assert WIRE.n == before


@FUZZ
@given(units=JUNK)
def test_record_refuses_junk_units(units) -> None:
    stream = PaymentStream(CLIENT, PROVIDER.agent_id, "0.001", budget="1", background=False)
    with __import__("contextlib").suppress(StreamClosed):
        stream.record(1)  # not open yet: refused without I/O
    before = WIRE.n
    with contextlib.suppress(InvalidInput, StreamClosed, BudgetExhausted):
        stream.record(units)
    assert WIRE.n == before


@FUZZ
@given(units=st.one_of(JUNK, st.integers(0, 10**16)))
def test_record_on_open_stream(units) -> None:
    stream = PAIRED
    before = WIRE.n
    total = stream.status().units
    try:
        stream.record(units)
    except (InvalidInput, BudgetExhausted):
        assert stream.status().units == total  # nothing counted
    assert WIRE.n == before


PAIRED = PaymentStream(CLIENT, PROVIDER.agent_id, "0.001", budget="1000", background=False)
PAIRED.open()


@FUZZ
@given(spec=JUNK)
def test_open_store_refuses_junk(spec) -> None:
    if isinstance(spec, str) and spec.strip() and "://" not in spec:
        return  # a str is a path: creating files at random names is not the point here
    try:
        open_store(spec)
    except InvalidInput as exc:
        assert exc.field == "store"


@FUZZ
@given(sid=JUNK)
def test_resume_refuses_junk_ids(sid, tmp_path_factory) -> None:
    before = WIRE.n
    path = tmp_path_factory.mktemp("r") / "j.db"
    try:
        PaymentStream.resume(path, sid, CLIENT)
    except InvalidInput as exc:
        assert exc.field == "stream_id"
    assert WIRE.n == before


def test_floats_are_never_money() -> None:
    for bad in (0.1, math.nan, math.inf):
        try:
            PaymentStream(CLIENT, PROVIDER.agent_id, bad, budget="1")
        except InvalidInput as exc:
            assert exc.field == "rate"
        else:
            raise AssertionError("a float rate was accepted")
