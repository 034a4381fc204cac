"""Shared fixtures. Each section belongs to the module whose tests use it; add, don't rewrite."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import settings

# -- hypothesis: random draws on a developer's machine, the same examples in CI -------------
# Outside CI every run draws new examples (a new seed each time; a failure prints the seed and
# a reproduction blob, and .hypothesis/ replays it on the next run), so ./scripts/test keeps
# exploring. CI must be reproducible: a red run has to be a real bug that the next run shows
# again, not a new random draw, so there the examples are derived from each test (derandomize).
# Neither profile has a deadline: on a loaded 2-core machine a slow example is not a bug, and
# a timed assertion would make the suite flaky. A failure found either way is pinned as a
# plain regression test (or @example).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", print_blob=True, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# -- the user's data directory: no test writes into $HOME ---------------------------------


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``pf-metered mcp`` keeps its default state under ``$XDG_DATA_HOME``: every test (and
    every subprocess a test starts) gets a session directory of its own instead of the
    developer's ``~/.local/share``. A test that needs another sets its own."""
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


# -- client (tests/test_client*.py) ------------------------------------------------------

CANARY_KEY = "pf_live_CANARY0123456789abcdefSECRETtail"
"""A key that must never appear in any repr, str, exception or log record."""

CLIENT_CALLS = (
    "create_escrow",
    "release_partial",
    "get_escrow",
    "list_escrows",
    "list_releases",
    "refund",
    "claim_faucet",
    "release",
    "complete",
    "dispute",
)


def escrow_json(**over: Any) -> dict[str, Any]:
    """A sound v1 escrow answer, overridable field by field."""
    base: dict[str, Any] = {
        "escrow_id": "esc_1",
        "status": "locked",
        "amount": "10.00",
        "released": "0.00",
        "remaining": "10.00",
        "refunded": "0.00",
        "to_agent_id": "agent_b",
        "from_agent_id": "agent_a",
        "memo": "",
        "releases": [],
    }
    base.update(over)
    return base


def released_json(req: httpx.Request, **over: Any) -> dict[str, Any]:
    """A v1 answer to a release-partial: the escrow after it, its ``releases`` holding the
    release just made (its memo echoed, as docs/WIRE.md says the service answers)."""
    import json

    sent = json.loads(req.content)
    release = {"amount": sent["amount"], "fee": "0.01", "memo": sent.get("memo", "")}
    fields: dict[str, Any] = {"released": "1.00", "remaining": "9.00", "releases": [release]}
    fields.update(over)
    return escrow_json(**fields)


class Recorder:
    """An httpx.MockTransport handler that records every request it is given."""

    def __init__(self, handler: Callable[[httpx.Request], httpx.Response]) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.transport = httpx.MockTransport(self)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def idempotency_keys(self) -> list[str | None]:
        return [r.headers.get("idempotency-key") for r in self.requests]

    def bodies(self) -> list[Any]:
        return [json.loads(r.content) if r.content else None for r in self.requests]


class ClientFacade:
    """One blocking face over ``EscrowClient`` or ``AsyncEscrowClient``, so a test is written
    once and run against both drivers; ``sleeps`` records every backoff asked for."""

    def __init__(self, mode: str, **kw: Any) -> None:
        from pf_metered.client import AsyncEscrowClient, EscrowClient

        self.mode = mode
        self.sleeps: list[float] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client: Any
        if mode == "sync":
            self.client = EscrowClient(_sleep=self.sleeps.append, **kw)
        else:

            async def _sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            self._loop = asyncio.new_event_loop()
            self.client = AsyncEscrowClient(_sleep=_sleep, **kw)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if self._loop is not None and name in CLIENT_CALLS:
            loop = self._loop

            def call(*args: Any, **kwargs: Any) -> Any:
                return loop.run_until_complete(attr(*args, **kwargs))

            return call
        return attr

    def close(self) -> None:
        if self._loop is None:
            self.client.close()
        else:
            self._loop.run_until_complete(self.client.aclose())
            self._loop.close()


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[Callable[..., ClientFacade]]:
    """``make_client(transport=..., **kw)``: a :class:`ClientFacade`, sync and async in turn."""
    made: list[ClientFacade] = []

    def factory(**kw: Any) -> ClientFacade:
        kw.setdefault("api_key", CANARY_KEY)
        kw.setdefault("base_url", "http://localhost/api/v1")
        facade = ClientFacade(request.param, **kw)
        made.append(facade)
        return facade

    yield factory
    for facade in made:
        facade.close()


# -- redis (tests/test_redis_*.py, and the redis variants in test_stream*.py) ------------

REDIS_URL_ENV = "PFM_REDIS_URL"
"""Point the Redis tests at this server instead of starting one. The tests then only touch
keys under their own prefix and only their own connections; the few that change server-wide
state (SCRIPT FLUSH) start a private server for themselves."""


def _redis_unavailable(reason: str) -> None:
    """Unavailable Redis: FAIL when ``CI`` is set (these tests must run in CI), otherwise skip
    with the reason printed in the summary."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so the Redis tests must run)")
    _REDIS_SKIPPED.append(reason)
    pytest.skip(reason)


def _start_private_redis() -> Any:
    from redis_server import RedisServer, RedisServerUnavailable

    try:
        return RedisServer().start()
    except RedisServerUnavailable as exc:
        _redis_unavailable(f"cannot start a private Redis: {exc}")
        raise  # unreachable: _redis_unavailable always raises


class RedisTarget:
    """The server the Redis tests use: ``url``, and ``owned`` when this session started it."""

    def __init__(self, url: str, server: Any = None) -> None:
        self.url = url
        self.server = server

    @property
    def owned(self) -> bool:
        return self.server is not None


@pytest.fixture(scope="session")
def redis_target() -> Iterator[RedisTarget]:
    """A ``redis-server`` this test session starts on a free loopback port (no persistence,
    its own directory) and stops at the end; or the server ``PFM_REDIS_URL`` names.

    The suite never depends on, reads or disturbs the server at 127.0.0.1:6379.
    """
    url = os.environ.get(REDIS_URL_ENV)
    if not url:
        server = _start_private_redis()
        try:
            yield RedisTarget(server.url, server)
        finally:
            server.stop()
        return
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=2.0)
        client.ping()
        client.close()
    except Exception as exc:
        _redis_unavailable(f"Redis unreachable at {url}: {type(exc).__name__}: {exc}")
    yield RedisTarget(url)


@pytest.fixture(scope="session")
def redis_url(redis_target: RedisTarget) -> str:
    """The URL of the Redis server the tests use (see ``redis_target``)."""
    return redis_target.url


@pytest.fixture
def owned_redis_url(redis_target: RedisTarget) -> Iterator[str]:
    """A Redis server this session owns, for a test that changes server-wide state: the
    session's own one, or (with ``PFM_REDIS_URL`` set) a private one just for this test."""
    if redis_target.owned:
        yield redis_target.url
        return
    server = _start_private_redis()
    try:
        yield server.url
    finally:
        server.stop()


_REDIS_SKIPPED: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say why the Redis tests were skipped even without ``-rs``."""
    if _REDIS_SKIPPED:
        terminalreporter.write_line(f"SKIPPED the Redis tests: {_REDIS_SKIPPED[0]}", yellow=True)


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix unique to this test; every key under it is deleted afterwards."""
    import uuid

    import redis

    from pf_metered.meter.redis_store import purge_prefix

    prefix = f"pfmtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        purge_prefix(client, prefix)
    finally:
        client.close()


# -- meter, stream, decorators (tests/test_meter*.py, test_stream*.py, test_decorators*.py) --


class Agents:
    """A sandbox with a funded payer and an empty provider, and clients for the payer."""

    def __init__(self, balance: str = "1000") -> None:
        from pf_metered.sandbox import Sandbox

        self.sandbox = Sandbox()
        self.payer = self.sandbox.add_agent(balance=balance)
        self.provider = self.sandbox.add_agent()
        self.client = self.sandbox.client(self.payer.api_key)
        self._aclient: Any = None

    @property
    def aclient(self) -> Any:
        if self._aclient is None:
            self._aclient = self.sandbox.async_client(self.payer.api_key)
        return self._aclient

    def escrow(self, escrow_id: str) -> Any:
        return self.sandbox.escrow(escrow_id)


@pytest.fixture
def agents() -> Iterator[Agents]:
    a = Agents()
    yield a
    a.sandbox.close()


# -- tools and langchain (tests/test_tools*.py, tests/test_langchain*.py) ----------------


class PFWorld:
    """A sandbox with a funded payer, a provider and the payer's clients."""

    def __init__(self, balance: str = "100.00") -> None:
        from pf_metered.sandbox import Sandbox

        self.sandbox = Sandbox()
        self.payer = self.sandbox.add_agent(balance=balance)
        self.provider = self.sandbox.add_agent()
        self.client = self.sandbox.client(self.payer.api_key)
        self.aclient = self.sandbox.async_client(self.payer.api_key)

    def balance(self, who: str = "payer") -> Any:
        agent = self.payer if who == "payer" else self.provider
        return self.sandbox.balance(agent.agent_id)

    def close(self) -> None:
        self.client.close()
        self.sandbox.close()


@pytest.fixture
def pf_world() -> Iterator[PFWorld]:
    world = PFWorld()
    yield world
    world.close()


# -- deployed dialect (tests/test_deployed*.py, test_tranches*.py, test_ratelimit*.py) ---


class LoseAnswers(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Let chosen requests reach the sandbox, then lose their answers (a read timeout).

    ``rules`` maps ``(method, path fragment)`` to how many answers to lose; ``lost`` lists the
    requests whose answers were lost, ``seen`` every request.
    """

    def __init__(self, inner: Any, rules: dict[tuple[str, str], int] | None = None) -> None:
        self.inner = inner
        self.rules = dict(rules or {})
        self.lost: list[tuple[str, str]] = []
        self.seen: list[tuple[str, str]] = []

    def _should_lose(self, request: httpx.Request) -> bool:
        key = (request.method, request.url.path)
        self.seen.append(key)
        for (method, fragment), left in self.rules.items():
            if left > 0 and method == request.method and fragment in request.url.path:
                self.rules[(method, fragment)] = left - 1
                self.lost.append(key)
                return True
        return False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        lose = self._should_lose(request)
        response = self.inner.handle_request(request)
        if lose:
            raise httpx.ReadTimeout("answer lost (test)", request=request)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        lose = self._should_lose(request)
        response = await self.inner.handle_async_request(request)
        if lose:
            raise httpx.ReadTimeout("answer lost (test)", request=request)
        return response


class DeployedWorld:
    """A sandbox on a frozen clock serving the deployed dialect, a funded payer and a provider.

    Clients made here pace themselves by the *sandbox* clock and sleep by moving it, so rate
    windows and backoffs of minutes pass in microseconds of real time.
    """

    def __init__(self, balance: str = "1000", **sandbox_kw: Any) -> None:
        from pf_metered.sandbox import ManualClock, Sandbox

        self.clock = ManualClock()
        self.sandbox = Sandbox(clock=self.clock, dialect="deployed", **sandbox_kw)
        self.payer = self.sandbox.add_agent(balance=balance)
        self.provider = self.sandbox.add_agent()
        self.sleeps: list[float] = []
        self._clients: list[Any] = []

    def now(self) -> float:
        return self.clock.now_us() / 1_000_000

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(max(0.0, seconds))

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def limiter(self, limits: Any = None) -> Any:
        from pf_metered.client._ratelimit import PathRateLimiter

        return PathRateLimiter(limits, clock=self.now, rng=lambda: 0.5)

    def client(self, *, transport: Any = None, rate_limits: Any = None, **kw: Any) -> Any:
        c = self.sandbox.client(
            self.payer.api_key,
            transport=transport or self.sandbox.transport(),
            rate_limits=self.limiter() if rate_limits is None else rate_limits,
            _sleep=self.sleep,
            **kw,
        )
        self._clients.append(c)
        return c

    def aclient(self, *, transport: Any = None, rate_limits: Any = None, **kw: Any) -> Any:
        c = self.sandbox.async_client(
            self.payer.api_key,
            transport=transport or self.sandbox.transport(),
            rate_limits=self.limiter() if rate_limits is None else rate_limits,
            _sleep=self.asleep,
            **kw,
        )
        return c

    def balance(self, who: str = "payer") -> Any:
        agent = self.payer if who == "payer" else self.provider
        return self.sandbox.balance(agent.agent_id)

    def close(self) -> None:
        for c in self._clients:
            c.close()
        self.sandbox.close()


@pytest.fixture
def deployed() -> Iterator[DeployedWorld]:
    world = DeployedWorld()
    yield world
    world.close()
