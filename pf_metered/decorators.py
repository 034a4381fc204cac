"""``@metered``: pay per call, per yielded item, per token or per second of a function.

One object is a decorator *and* a context manager (prometheus_client's ``Timer`` shape)::

    @metered(rate="0.001", batch=100, to="ag_B", budget="10", client=client)
    def infer(prompt: str) -> str: ...

    with metered(stream=s):        # one unit for the block, if it does not raise
        ...

What it meters: one successful call is one unit by default; a call that raises costs nothing
(``charge_errors=True`` to bill it anyway); ``units=`` a number or a callable of the result
(tokens from an LLM answer); generators and async generators pay per yielded item (streaming
output); ``per="second"`` bills the call's wall time in exact quanta (see
:data:`pf_metered.meter.core.PER_QUANTA`). The budget is checked *before* the wrapped function
runs: a unit is reserved, and ``BudgetExhausted`` refuses the call without running it. Units
known only afterwards (wall time, tokens in the result) are paid as far as the budget goes; the
rest is counted in ``overflow_units`` and logged, never raised over a finished call's result.

Why two wrapping paths: a plain Python function is wrapped by a plain closure (a function is
already a correct descriptor: it binds as a method, and ``inspect.iscoroutinefunction`` & co.
hold because the closure is of the same kind). For one unit a call that closure is the
stream's lane itself (:func:`pf_metered.meter.lane.lane_call`: two atomic ``list.pop``
around the call, no lock, no Python call in between), so it adds less than half of what a
``prometheus_client.Counter.inc()`` adds (``benchmarks/overhead.py``). Everything else
(``classmethod``/``staticmethod`` objects, callable instances, builtins, partials) gets
``wrapt.FunctionWrapper``, whose descriptor handling is correct on every kind of callable.

What this module must never do: run the wrapped function when the budget cannot pay for it,
do I/O per call (only the first call of a lazily-opened own stream locks its escrow), or
count a unit for a call that raised (unless asked to).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator
from decimal import Decimal
from types import TracebackType
from typing import Any, Final, TypeVar, cast, overload

import wrapt

from pf_metered import _lifecycle
from pf_metered.errors import InvalidInput
from pf_metered.meter.core import PER_QUANTA
from pf_metered.meter.lane import LaneParts, lane_call, lane_call_async
from pf_metered.meter.policy import BatchPolicy
from pf_metered.meter.store import Store
from pf_metered.money import AmountLike, parse_count
from pf_metered.stream._async import AsyncPaymentStream
from pf_metered.stream._base import StreamBase
from pf_metered.stream._sync import PaymentStream
from pf_metered.stream.clock import check_ns_source

_log = logging.getLogger(__name__)

__all__ = ["Metered", "metered"]

F = TypeVar("F", bound=Callable[..., Any])

UnitsSpec = int | Callable[[Any], int]

_TIME_PERS: Final = ("second", "minute", "hour")


class _TimeCarry:
    """Sums the wall time of metered calls and hands out whole quanta (exact over calls)."""

    __slots__ = ("_billed", "_lock", "_ns", "_quantum")

    def __init__(self, quantum_ns: int) -> None:
        self._quantum = quantum_ns
        self._lock = threading.Lock()
        self._ns = 0
        self._billed = 0

    def units_for(self, elapsed_ns: int) -> int:
        with self._lock:
            self._ns += max(0, elapsed_ns)
            due = self._ns // self._quantum - self._billed
            self._billed += due
            return due


class Metered:
    """What ``metered(...)`` returns: a decorator, a context manager, and a stream handle."""

    def __init__(
        self,
        *,
        stream: StreamBase | None = None,
        rate: AmountLike | None = None,
        batch: int | BatchPolicy | None = None,
        every: float | int | str | Decimal | BatchPolicy | None = None,
        to: str | None = None,
        budget: AmountLike | None = None,
        max_units: int | None = None,
        client: Any = None,
        units: UnitsSpec = 1,
        per: str = "call",
        charge_errors: bool = False,
        auto_release_hours: int | None = None,
        memo: str | None = None,
        store: Store | None = None,
        timer: Callable[[], int] = time.perf_counter_ns,
    ) -> None:
        if per not in ("call", "item", *_TIME_PERS):
            raise InvalidInput("per", f"must be 'call', 'second', 'minute' or 'hour', got {per!r}")
        if not callable(units):
            units = parse_count(units, "units", allow_zero=False)
        self.units: UnitsSpec = units
        if per in _TIME_PERS:
            check_ns_source(timer, "timer")
        self.per = per
        self.charge_errors = bool(charge_errors)
        self._timer = timer
        self._own = stream is None
        self._lock = threading.Lock()
        self.overflow_units = 0
        """Units of finished calls the budget could not pay (see ``_bill_up_to``)."""
        self._cm: contextvars.ContextVar[tuple[tuple[int, int], ...]] = contextvars.ContextVar(
            f"pf_metered_cm_{id(self)}", default=()
        )
        if stream is not None:
            if any(v is not None for v in (rate, to, budget, max_units, client, batch, every)):
                raise InvalidInput(
                    "stream", "give either stream= or rate=/to=/budget=/client=..., not both"
                )
            if per in _TIME_PERS and stream.per != per:
                raise InvalidInput(
                    "per", f"the stream bills per {stream.per!r}; make it with per={per!r}"
                )
            self._stream: StreamBase | None = stream
            self._spec: dict[str, Any] = {}
        else:
            if rate is None:
                raise InvalidInput("rate", "is required unless stream= is given")
            if not to:
                raise InvalidInput("to", "is required unless stream= is given")
            self._stream = None
            self._spec = {
                "to_agent_id": to,
                "rate": rate,
                "batch": batch,
                "every": every,
                "budget": budget,
                "max_units": max_units,
                "auto_release_hours": auto_release_hours,
                "memo": memo,
                "store": store,
                "per": per if per in _TIME_PERS else "unit",
            }
            self._client = client
            # Validate every argument now (no I/O): bad input fails at decoration time.
            from pf_metered.meter.core import plan_stream

            plan_stream(
                to,
                rate,
                batch=batch,
                every_=every,
                budget=budget,
                max_units=max_units,
                auto_release_hours=auto_release_hours,
                memo=memo,
                per=self._spec["per"],
            )
        quantum = PER_QUANTA[per][1] if per in _TIME_PERS else 0
        self._carry = _TimeCarry(quantum) if quantum else None

    # ------------------------------------------------------------- the stream
    @property
    def stream(self) -> StreamBase:
        """The stream this decorator pays through (made on first use for an own stream)."""
        s = self._stream
        if s is None:
            s = self._make_stream(async_=False)
        return s

    def _make_stream(self, *, async_: bool) -> StreamBase:
        with self._lock:
            if self._stream is not None:
                return self._stream
            client = self._client
            if client is None:
                from pf_metered.client import AsyncEscrowClient, EscrowClient

                client = AsyncEscrowClient() if async_ else EscrowClient()
                self._client = client
            is_async_client = inspect.iscoroutinefunction(getattr(client, "release_partial", None))
            cls = AsyncPaymentStream if is_async_client else PaymentStream
            stream: StreamBase = cls(client, **self._spec)
            self._stream = stream
            _register_for_exit(stream)
            return stream

    def _ensure_open_sync(self) -> StreamBase:
        s = self._stream or self._make_stream(async_=False)
        if not s.is_open and not s.closed:
            if isinstance(s, AsyncPaymentStream):
                raise InvalidInput(
                    "client", "an async client's stream can only meter async functions"
                )
            assert isinstance(s, PaymentStream)
            s.open()
        return s

    async def _ensure_open_async(self) -> StreamBase:
        s = self._stream or self._make_stream(async_=True)
        if not s.is_open and not s.closed:
            if isinstance(s, AsyncPaymentStream):
                await s.open()
            else:
                assert isinstance(s, PaymentStream)
                await asyncio.get_running_loop().run_in_executor(None, s.open)
        return s

    def close(self) -> Any:
        """Close the own stream (returns its receipt, or a coroutine for an async stream)."""
        return cast(Any, self.stream).close()

    # -------------------------------------------------------------- counting
    # Everything goes through the stream's public counting API (reserve → commit/cancel).
    def _units_of(self, result: Any) -> int:
        spec = self.units
        if callable(spec):
            n = spec(result)
            try:
                return parse_count(n, "units")
            except InvalidInput as exc:
                name = getattr(spec, "__qualname__", type(spec).__name__)
                raise InvalidInput(
                    "units",
                    f"returned by the units= callable {name} for this call {exc.problem}; the "
                    "call ran, nothing was counted for it and its reservation was given back",
                ) from None
        return spec

    def _settle(self, s: StreamBase, token: int, result: Any, elapsed_ns: int) -> None:
        """After a successful call: turn the reservation into the call's real units."""
        if self._carry is not None:
            n = self._carry.units_for(elapsed_ns)
        else:
            try:
                n = self._units_of(result)
            except BaseException:
                s.cancel(token)  # a bad units= answer must not leak the reservation
                raise
        unpaid = s.commit(token, n)
        if unpaid:
            with self._lock:
                self.overflow_units += unpaid

    def _reserve_count(self) -> int:
        spec = self.units
        return spec if isinstance(spec, int) and self._carry is None else 1

    # ------------------------------------------------------------ decorating
    def __call__(self, func: F) -> F:
        target: Callable[..., Any] = func
        if isinstance(func, classmethod | staticmethod):
            target = func.__func__
        if inspect.isasyncgenfunction(target):
            body: Callable[..., Any] = self._asyncgen_body(target)
        elif inspect.isgeneratorfunction(target):
            body = self._gen_body(target)
        elif inspect.iscoroutinefunction(target):
            body = self._async_body(target)
        else:
            body = self._sync_body(target)
        wrapper: Any
        if inspect.isfunction(func):
            wrapper = functools.wraps(func)(body)
        else:
            # wrapt binds classmethod/staticmethod/callable objects correctly; its wrapper
            # calls the bound ``wrapped`` through the same metered body.
            wrapper = _WraptMetered(func, _bound_adapter(self, target))
        wrapper.stream = _StreamHandle(self)
        wrapper.metered = self
        return cast(F, wrapper)

    def _count_unpaid(self, unpaid: int) -> None:
        with self._lock:
            self.overflow_units += unpaid

    def _sync_body(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        reserve_n = self._reserve_count()
        charge = self.charge_errors
        if not (self._carry is None and isinstance(self.units, int)):
            return self._generic_sync(fn, reserve_n, charge)
        ensure = self._ensure_open_sync
        count_unpaid = self._count_unpaid

        def bind() -> LaneParts:  # on the first call: the stream opens, its lane is bound
            return ensure().lane_parts(reserve_n, on_unpaid=count_unpaid)

        return lane_call(fn, bind, charge=charge)

    def _generic_sync(
        self, fn: Callable[..., Any], reserve_n: int, charge: bool
    ) -> Callable[..., Any]:
        ensure = self._ensure_open_sync
        settle = self._settle
        perf = self._timer

        def metered_call_general(*args: Any, **kwargs: Any) -> Any:
            s = ensure()
            token = s.reserve(reserve_n)
            t0 = perf()
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                if charge:
                    settle(s, token, None, perf() - t0)
                else:
                    s.cancel(token)
                raise
            settle(s, token, result, perf() - t0)
            return result

        return metered_call_general

    def _async_body(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        ensure = self._ensure_open_async
        reserve_n = self._reserve_count()
        charge = self.charge_errors
        settle = self._settle
        perf = self._timer
        count_unpaid = self._count_unpaid
        opened: StreamBase | None = None
        if self._carry is None and isinstance(self.units, int):

            async def bind() -> LaneParts:
                return (await ensure()).lane_parts(reserve_n, on_unpaid=count_unpaid)

            return lane_call_async(fn, bind, charge=charge)

        async def metered_async(*args: Any, **kwargs: Any) -> Any:
            nonlocal opened
            s = opened
            if s is None:
                s = opened = await ensure()
            token = s.reserve(reserve_n)
            t0 = perf()
            try:
                result = await fn(*args, **kwargs)
            except BaseException:
                if charge:
                    settle(s, token, None, perf() - t0)
                else:
                    s.cancel(token)
                raise
            settle(s, token, result, perf() - t0)
            return result

        return metered_async

    def _gen_body(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        ensure = self._ensure_open_sync
        reserve_n = self._reserve_count()
        settle = self._settle
        perf = self._timer

        def metered_gen(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            s = ensure()
            gen = fn(*args, **kwargs)
            op: Callable[[Any], Any] = gen.send
            arg: Any = None
            while True:
                token = s.reserve(reserve_n)
                t0 = perf()
                try:
                    item = op(arg)
                except StopIteration as stop:
                    s.cancel(token)
                    return stop.value
                except BaseException:
                    s.cancel(token)
                    raise
                settle(s, token, item, perf() - t0)
                try:
                    arg = yield item
                    op = gen.send
                except GeneratorExit:
                    gen.close()
                    raise
                except BaseException as exc:
                    arg, op = exc, gen.throw

        return metered_gen

    def _asyncgen_body(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        ensure = self._ensure_open_async
        reserve_n = self._reserve_count()
        settle = self._settle
        perf = self._timer

        async def metered_agen(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            s = await ensure()
            agen = fn(*args, **kwargs)
            op: Callable[[Any], Any] = agen.asend
            arg: Any = None
            while True:
                token = s.reserve(reserve_n)
                t0 = perf()
                try:
                    item = await op(arg)
                except StopAsyncIteration:
                    s.cancel(token)
                    return
                except BaseException:
                    s.cancel(token)
                    raise
                settle(s, token, item, perf() - t0)
                try:
                    arg = yield item
                    op = agen.asend
                except GeneratorExit:
                    await agen.aclose()
                    raise
                except BaseException as exc:
                    arg, op = exc, agen.athrow

        return metered_agen

    # ------------------------------------------------------- context manager
    def _enter(self, s: StreamBase) -> None:
        n = self._reserve_count()
        token = s.reserve(n)
        self._cm.set((*self._cm.get(), (token, self._timer())))

    def _exit(self, s: StreamBase, failed: bool) -> None:
        stack = self._cm.get()
        token, t0 = stack[-1]
        self._cm.set(stack[:-1])
        if failed and not self.charge_errors:
            s.cancel(token)
        else:
            self._settle(s, token, None, self._timer() - t0)

    def __enter__(self) -> Metered:
        self._enter(self._ensure_open_sync())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(self.stream, exc_type is not None)

    async def __aenter__(self) -> Metered:
        self._enter(await self._ensure_open_async())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit(self.stream, exc_type is not None)

    def __repr__(self) -> str:
        return f"<Metered per={self.per} units={self.units!r} stream={self._stream!r}>"


class _WraptMetered(wrapt.FunctionWrapper):  # type: ignore[misc,type-arg,unused-ignore]
    """wrapt's descriptor-correct wrapper, for callables that are not plain functions."""


def _bound_adapter(m: Metered, target: Callable[..., Any]) -> Callable[..., Any]:
    """A wrapt wrapper calling the bound ``wrapped`` through the matching metered body."""
    if inspect.isasyncgenfunction(target):
        make = m._asyncgen_body
    elif inspect.isgeneratorfunction(target):
        make = m._gen_body
    elif inspect.iscoroutinefunction(target):
        make = m._async_body
    else:
        make = m._sync_body

    def call_through(wrapped: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    body = make(call_through)
    if inspect.iscoroutinefunction(target):

        async def wrapper_async(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return await body(wrapped, *args, **kwargs)

        return wrapper_async

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return body(wrapped, *args, **kwargs)

    return wrapper


class _StreamHandle:
    """``f.stream``: the decorator's stream, made (not opened) on first attribute access."""

    __slots__ = ("_m",)

    def __init__(self, m: Metered) -> None:
        self._m = m

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m.stream, name)

    def __repr__(self) -> str:
        return repr(self._m.stream)


def _register_for_exit(stream: StreamBase) -> None:
    """Own streams are closed at exit (last partial batch paid, rest refunded): phase CLOSE
    of :mod:`pf_metered._lifecycle`."""
    _lifecycle.track(stream, close_at_exit=True)


# Typing: ``@metered`` (bare) and ``metered(f, ...)`` give back the function with its own type
# (so a caller's ``mypy --strict`` keeps checking its arguments and result); ``metered(...)``
# gives the ``Metered`` object, a decorator (``Metered.__call__`` keeps the type too) and a
# context manager.
@overload
def metered(
    func: F,
    /,
    *,
    stream: StreamBase | None = ...,
    rate: AmountLike | None = ...,
    batch: int | BatchPolicy | None = ...,
    every: float | int | str | Decimal | BatchPolicy | None = ...,
    to: str | None = ...,
    budget: AmountLike | None = ...,
    max_units: int | None = ...,
    client: Any = ...,
    units: UnitsSpec = ...,
    per: str = ...,
    charge_errors: bool = ...,
    auto_release_hours: int | None = ...,
    memo: str | None = ...,
    store: Store | None = ...,
    timer: Callable[[], int] = ...,
) -> F: ...


@overload
def metered(
    func: None = None,
    /,
    *,
    stream: StreamBase | None = ...,
    rate: AmountLike | None = ...,
    batch: int | BatchPolicy | None = ...,
    every: float | int | str | Decimal | BatchPolicy | None = ...,
    to: str | None = ...,
    budget: AmountLike | None = ...,
    max_units: int | None = ...,
    client: Any = ...,
    units: UnitsSpec = ...,
    per: str = ...,
    charge_errors: bool = ...,
    auto_release_hours: int | None = ...,
    memo: str | None = ...,
    store: Store | None = ...,
    timer: Callable[[], int] = ...,
) -> Metered: ...


def metered(
    func: F | None = None,
    /,
    *,
    stream: StreamBase | None = None,
    rate: AmountLike | None = None,
    batch: int | BatchPolicy | None = None,
    every: float | int | str | Decimal | BatchPolicy | None = None,
    to: str | None = None,
    budget: AmountLike | None = None,
    max_units: int | None = None,
    client: Any = None,
    units: UnitsSpec = 1,
    per: str = "call",
    charge_errors: bool = False,
    auto_release_hours: int | None = None,
    memo: str | None = None,
    store: Store | None = None,
    timer: Callable[[], int] = time.perf_counter_ns,
) -> F | Metered:
    """Meter a callable (``@metered(...)``) or a block (``with metered(...):``).

    ``stream=`` pays through an existing stream; otherwise ``rate``, ``to`` and ``budget``
    (or ``max_units``) describe an own stream, opened on the first call and closed by
    ``f.stream.close()`` or at interpreter exit.
    """
    m = Metered(
        stream=stream,
        rate=rate,
        batch=batch,
        every=every,
        to=to,
        budget=budget,
        max_units=max_units,
        client=client,
        units=units,
        per=per,
        charge_errors=charge_errors,
        auto_release_hours=auto_release_hours,
        memo=memo,
        store=store,
        timer=timer,
    )
    if func is not None:
        return m(func)
    return m
