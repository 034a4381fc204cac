"""@metered on every kind of callable, as a context manager, and with its own stream."""

from __future__ import annotations

import asyncio
import inspect
from decimal import Decimal

import pytest

from pf_metered.decorators import metered
from pf_metered.errors import BudgetExhausted, InvalidInput
from pf_metered.stream import AsyncPaymentStream, PaymentStream


@pytest.fixture
def stream(agents):
    s = PaymentStream(agents.client, agents.provider.agent_id, "0.01", batch=10, budget="1")
    s.open()
    yield s
    s.close()


@pytest.fixture
async def astream(agents):
    s = AsyncPaymentStream(agents.aclient, agents.provider.agent_id, "0.01", batch=10, budget="1")
    await s.open()
    yield s
    await s.close()


def test_plain_function_counts_success_only(stream):
    @metered(stream=stream)
    def f(x: int) -> int:
        """doc"""
        if x < 0:
            raise ValueError
        return x * 2

    assert f(2) == 4 and f(3) == 6
    with pytest.raises(ValueError):
        f(-1)
    assert stream.status().units == 2
    assert f.__name__ == "f" and f.__doc__ == "doc" and f.stream.stream_id == stream.stream_id
    assert list(inspect.signature(f).parameters) == ["x"]


def test_charge_errors_and_units_from_result(stream):
    @metered(stream=stream, charge_errors=True)
    def boom() -> None:
        raise RuntimeError

    @metered(stream=stream, units=lambda r: r["tokens"])
    def llm() -> dict:
        return {"tokens": 7}

    @metered(stream=stream, units=3)
    def three() -> None:
        return None

    with pytest.raises(RuntimeError):
        boom()
    llm()
    three()
    assert stream.status().units == 1 + 7 + 3


def test_methods_classmethods_staticmethods(stream):
    class K:
        def __init__(self) -> None:
            self.n = 5

        @metered(stream=stream)
        def m(self, x: int) -> int:
            return self.n + x

        @metered(stream=stream)
        @classmethod
        def cm(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

        @metered(stream=stream)
        @staticmethod
        def sm(x: int) -> int:
            return -x

        @classmethod
        @metered(stream=stream)
        def cm_inner(cls) -> type:
            return cls

    k = K()
    assert k.m(1) == 6 and K.m(k, 2) == 7
    assert K.cm(1) == "K1" and k.cm(2) == "K2"
    assert K.sm(3) == -3 and k.sm(4) == -4
    assert K.cm_inner() is K
    assert stream.status().units == 7


def test_budget_refuses_before_the_call_runs(agents):
    s = PaymentStream(agents.client, agents.provider.agent_id, "0.5", budget="1").open()
    ran = []

    @metered(stream=s)
    def work() -> None:
        ran.append(1)

    work()
    work()
    with pytest.raises(BudgetExhausted):
        work()
    assert len(ran) == 2
    assert s.close().paid == Decimal("1.0")


def test_generator_pays_per_item(stream):
    @metered(stream=stream)
    def tokens(n: int):
        for i in range(n):
            got = yield i
            if got == "stop":
                return

    assert inspect.isgeneratorfunction(tokens)
    assert list(tokens(5)) == [0, 1, 2, 3, 4]
    g = tokens(10)
    next(g)
    with pytest.raises(StopIteration):
        g.send("stop")
    assert stream.status().units == 6


def test_generator_budget_stops_mid_stream(agents):
    s = PaymentStream(agents.client, agents.provider.agent_id, "0.5", budget="1").open()

    @metered(stream=s)
    def items():
        yield from range(10)

    out = []
    with pytest.raises(BudgetExhausted):
        out.extend(items())
    assert out == [0, 1]
    assert s.close().units == 2


async def test_async_function_and_async_generator(astream):
    @metered(stream=astream)
    async def call(x: int) -> int:
        await asyncio.sleep(0)
        return x

    @metered(stream=astream)
    async def agen(n: int):
        for i in range(n):
            yield i

    assert inspect.iscoroutinefunction(call) and inspect.isasyncgenfunction(agen)
    assert await asyncio.gather(*(call(i) for i in range(20))) == list(range(20))
    assert [i async for i in agen(4)] == [0, 1, 2, 3]
    assert astream.status().units == 24


async def test_async_method_and_raising_call(astream):
    class A:
        @metered(stream=astream)
        async def m(self, fail: bool) -> str:
            if fail:
                raise KeyError
            return "ok"

    assert await A().m(False) == "ok"
    with pytest.raises(KeyError):
        await A().m(True)
    assert astream.status().units == 1


def test_per_second_with_fake_timer(agents):
    t = [0]
    s = PaymentStream(
        agents.client, agents.provider.agent_id, "0.001", per="second", budget="1"
    ).open()

    @metered(stream=s, per="second", timer=lambda: t[0])
    def compute(ms: int) -> None:
        t[0] += ms * 1_000_000 + 400_000  # ms and 0.4 ms more

    compute(1500)
    compute(10)
    assert s.status().units == 1510  # 1510.8 ms: the 0.8 ms carries to the next call
    compute(0)
    assert s.status().units == 1511
    assert s.close().paid == Decimal("0.001511")


def test_context_manager_sync(stream):
    m = metered(stream=stream)
    with m:
        pass
    with pytest.raises(ZeroDivisionError), m:
        1 / 0
    with m, m:
        pass
    assert stream.status().units == 3


async def test_context_manager_async(astream):
    m = metered(stream=astream, units=2)
    async with m:
        pass
    assert astream.status().units == 2


def test_own_stream_is_lazy_and_closes(agents):
    @metered(rate="0.001", batch=100, to=agents.provider.agent_id, budget="1", client=agents.client)
    def infer() -> str:
        return "ok"

    assert not f_open(infer)
    for _ in range(150):
        infer()
    receipt = infer.stream.close()
    assert receipt.units == 150 and receipt.paid == Decimal("0.15")


def f_open(f) -> bool:
    return f.metered._stream is not None and f.metered._stream.is_open


async def test_own_async_stream(agents):
    @metered(rate="0.001", to=agents.provider.agent_id, budget="1", client=agents.aclient)
    async def infer() -> str:
        return "ok"

    await asyncio.gather(*(infer() for _ in range(30)))
    receipt = await infer.stream.close()
    assert receipt.paid == Decimal("0.03")


def test_bad_arguments_fail_at_decoration():
    with pytest.raises(InvalidInput):
        metered(rate="0.1", to="ag_B")  # no budget
    with pytest.raises(InvalidInput):
        metered(rate=0.1, to="ag_B", budget="1")
    with pytest.raises(InvalidInput):
        metered(units=0, rate="0.1", to="ag_B", budget="1")


async def test_async_budget_refuses_before_the_call_runs(agents):
    s = AsyncPaymentStream(agents.aclient, agents.provider.agent_id, "0.5", budget="1.5")
    await s.open()
    ran = []

    @metered(stream=s)
    async def work() -> None:
        ran.append("call")

    @metered(stream=s)
    async def items():
        for i in range(10):
            ran.append(i)
            yield i

    await work()
    out = []
    with pytest.raises(BudgetExhausted):
        async for i in items():
            out.append(i)
    with pytest.raises(BudgetExhausted):
        await work()
    assert out == [0, 1] and ran == ["call", 0, 1]  # refused calls and items never ran
    assert (await s.close()).paid == Decimal("1.5")


def test_per_second_own_stream_bills_wall_time_exactly(agents):
    t = [0]

    @metered(
        rate="0.002",
        per="second",
        to=agents.provider.agent_id,
        budget="1",
        client=agents.client,
        timer=lambda: t[0],
    )
    def compute(ns: int) -> None:
        t[0] += ns

    compute(1_234_567_891)  # 1234.567891 ms: 1234 ms billed, 0.567891 ms carried
    compute(432_109)  # the carry reaches a whole millisecond: 1 more
    assert compute.stream.status().units == 1235
    receipt = compute.stream.close()
    assert receipt.per == "second" and receipt.paid == Decimal("0.00247")  # 1.235 s × 0.002


def test_units_known_after_the_call_are_paid_as_far_as_the_budget_goes(agents, caplog):
    """Tokens in a finished call's result can't be refused in advance: the caller keeps the
    result, what fits is paid, the rest is reported as overflow, and the next call is refused."""
    s = PaymentStream(agents.client, agents.provider.agent_id, "0.01", budget="1").open()
    ran = []
    m = metered(stream=s, units=lambda r: r)

    @m
    def answer(tokens: int) -> int:
        ran.append(tokens)
        return tokens

    assert answer(60) == 60
    with caplog.at_level("WARNING", logger="pf_metered.decorators"):
        assert answer(70) == 70  # only 40 of these 70 fit the budget of 100 units
    assert m.overflow_units == 30
    assert "30 of 70" in caplog.text
    with pytest.raises(BudgetExhausted):
        answer(1)
    assert ran == [60, 70]
    receipt = s.close()
    assert receipt.units == 100
    assert receipt.paid == Decimal("1.00")
    assert receipt.refunded == Decimal(0)


# -- validation at construction, nothing leaked (issue 13 item 11) -------------------------


@pytest.mark.parametrize("bad", [-1, "3", 1.5, None, True])
def test_a_units_callable_that_answers_badly_leaks_no_reservation(stream, bad):
    @metered(stream=stream, units=lambda result: bad)
    def call() -> str:
        return "done"

    left = stream.units_left
    for _ in range(5):
        with pytest.raises(InvalidInput) as info:
            call()
        assert info.value.field == "units"
        assert "units=" in str(info.value) and "callable" in str(info.value)
    assert stream.units_left == left  # the budget did not shrink
    assert stream.status().units == 0


@pytest.mark.parametrize("per", ["second", "minute", "hour"])
def test_a_float_timer_is_refused_at_construction(agents, per):
    import time

    s = PaymentStream(agents.client, agents.provider.agent_id, "0.001", per=per, budget="1")
    with pytest.raises(InvalidInput) as info:
        metered(stream=s, per=per, timer=time.perf_counter)
    assert info.value.field == "timer"
    assert "perf_counter_ns" in str(info.value)
    with pytest.raises(InvalidInput, match="timer"):
        metered(rate="0.001", to=agents.provider.agent_id, budget="1", per=per, timer=time.time)
