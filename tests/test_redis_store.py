"""RedisStore against the real Redis server: the contract, exact-once retries, leases, faults.

Every test uses its own key prefix (the ``redis_prefix`` fixture deletes it afterwards). The
dropped-connection tests put a loopback proxy we control between the store and Redis: it
forwards a command, lets Redis execute it, then drops the connection instead of delivering the
answer - the exact situation in which redis-py (or our retry) re-sends the command.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.redis_store import RedisStore
from pf_metered.meter.store import MemoryStore, StreamConfig, intent_amount_micro

pytestmark = pytest.mark.redis


def _cfg(sid: str = "s1", max_units: int = 10_000, rate: str = "0.001") -> StreamConfig:
    return StreamConfig(sid, "agent_b", rate, 10_000_000, max_units, batch_units=100)


@pytest.fixture
def make_store(redis_url: str, redis_prefix: str) -> Iterator:
    made: list[RedisStore] = []

    def factory(**kw) -> RedisStore:
        kw.setdefault("prefix", redis_prefix)
        url = kw.pop("url", redis_url)
        store = RedisStore(url, **kw)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


def _open(store: RedisStore, cfg: StreamConfig | None = None) -> StreamConfig:
    cfg = cfg or _cfg()
    store.create(cfg)
    store.set_escrow(cfg.stream_id, "esc_1")
    return cfg


# -- the contract, side by side with MemoryStore ------------------------------------------


def test_same_answers_as_memory_store(make_store):
    red, mem = make_store(claim_batches=0), MemoryStore()
    cfg = _cfg(max_units=250)
    for store in (red, mem):
        store.create(cfg)
        with pytest.raises(InvalidInput):
            store.create(cfg)
        assert store.claim("s1", min_units=1) is None  # not open yet
        store.set_escrow("s1", "esc_1")
        with pytest.raises(InvalidInput):
            store.set_escrow("s1", "esc_other")
    steps = [
        ("add", 120),
        ("claim", 100),
        ("claim", 1),
        ("settle", None),
        ("add", 130),
        ("budget", 1),
        ("claim", 100),
        ("settle", None),
        ("final", None),
        ("closed", 1),
        ("settle", None),
        ("mark", 0),
        ("mark", 5),
    ]
    for op, arg in steps:
        answers = []
        for store in (red, mem):
            state = store.load("s1")
            if op == "add":
                answers.append(store.add_units("s1", arg))
            elif op == "budget":
                with pytest.raises(BudgetExhausted) as exc:
                    store.add_units("s1", arg)
                answers.append(exc.value.remaining_units)
            elif op == "closed":
                with pytest.raises(StreamClosed):
                    store.add_units("s1", arg)
                answers.append(None)
            elif op == "claim":
                answers.append(store.claim("s1", min_units=arg))
            elif op == "final":
                answers.append(store.claim("s1", min_units=0, final=True))
            elif op == "settle":
                intent = state.pending[0]
                store.settle("s1", intent.seq, intent_amount_micro(cfg.parsed_rate, intent))
                store.settle("s1", intent.seq, 999)  # idempotent
                answers.append(intent)
            elif op == "mark":
                store.mark_closed("s1", arg)
                answers.append(None)
        assert answers[0] == answers[1], (op, answers)
    r, m = red.load("s1"), mem.load("s1")
    assert r == m
    assert r.status == "closed" and r.refunded_micro == 0 and r.paid_micro == 250_000
    assert red.load("nope") is None


def test_claims_pay_one_batch_each_and_amounts_telescope(make_store):
    store = make_store()  # claim_batches=1: each release pays exactly one batch
    cfg = _open(store, _cfg(rate="0.0000123"))
    store.add_units("s1", 1_234)
    paid, seen = 0, []
    while (intent := store.claim("s1", min_units=100)) is not None:
        assert intent.units_to - intent.units_from == 100
        amount = intent_amount_micro(cfg.parsed_rate, intent)
        store.settle("s1", intent.seq, amount)
        paid += amount
        seen.append(intent.seq)
    final = store.claim("s1", min_units=0, final=True)
    assert final is not None and final.final and (final.units_from, final.units_to) == (1200, 1234)
    paid += intent_amount_micro(cfg.parsed_rate, final)
    store.settle("s1", final.seq, intent_amount_micro(cfg.parsed_rate, final))
    assert seen == list(range(1, 13))
    assert paid == store.load("s1").paid_micro == cfg.parsed_rate.micro_half_up(1_234)


def test_big_numbers_never_pass_through_a_lua_float(make_store):
    store = make_store()
    big = 10**15 - 7  # MAX_UNITS territory: a %.14g would write 1e+15
    cfg = StreamConfig("s1", "agent_b", "1000", 10**18, big)
    _open(store, cfg)
    assert store.add_units("s1", big - 3) == big - 3
    with pytest.raises(BudgetExhausted) as exc:
        store.add_units("s1", 4)
    assert exc.value.remaining_units == 3
    intent = store.claim("s1", min_units=0, final=True)
    store.settle("s1", intent.seq, 999_999_999_999_999_937)  # 18 digits of micro-USDC
    state = store.load("s1")
    assert state.units == big - 3 and state.paid_micro == 999_999_999_999_999_937


def test_atomic_budget_under_threads(make_store):
    store = make_store()
    _open(store, _cfg(max_units=3_000))
    counted = [0] * 8

    def work(i: int) -> None:
        while True:
            try:
                store.add_units("s1", 1)
            except BudgetExhausted:
                return
            counted[i] += 1

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(counted) == store.load("s1").units == 3_000


def test_op_id_makes_a_callers_retry_exact_once(make_store):
    store = make_store()
    _open(store)
    assert store.add_units("s1", 5, op_id="call-1") == 5
    assert store.add_units("s1", 5, op_id="call-1") == 5  # the retry: first answer replayed
    assert store.add_units("s1", 5, op_id="call-2") == 10
    assert store.load("s1").units == 10


def test_script_cache_flushed_like_after_a_restart(make_store, owned_redis_url):
    """SCRIPT FLUSH is server-wide: done on a server this session owns, never a shared one."""
    store = make_store(url=owned_redis_url)
    _open(store)
    store.add_units("s1", 1)
    admin = redis.Redis.from_url(owned_redis_url)
    admin.script_flush()
    admin.close()
    assert store.add_units("s1", 1) == 2  # NOSCRIPT -> SCRIPT LOAD -> EVALSHA


# -- a dropped connection after the command reached Redis ---------------------------------


class DroppingProxy:
    """A loopback TCP proxy to Redis that can drop a connection after Redis has answered.

    ``drop_next(n)``: the next ``n`` answers to a script call (``EVALSHA``, or ``INCR`` for the
    control test) coming back from Redis are swallowed and the client's connection is closed,
    so the client cannot tell whether its command ran. Handshake answers are never dropped.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self._lsock.getsockname()[1]
        self._lock = threading.Lock()
        self._to_drop = 0
        self.dropped = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_next(self, n: int = 1) -> None:
        with self._lock:
            self._to_drop += n

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            last = [b""]
            threading.Thread(
                target=self._pipe, args=(client, upstream, False, last), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, True, last), daemon=True
            ).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool, last: list) -> None:
        try:
            while data := src.recv(65536):
                if not answers:
                    last[0] = data.upper()
                else:
                    with self._lock:
                        drop = self._to_drop > 0 and (b"EVALSHA" in last[0] or b"INCR" in last[0])
                        if drop:
                            self._to_drop -= 1
                            self.dropped += 1
                    if drop:
                        break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self._lsock.close()


@pytest.fixture
def proxy(redis_url: str) -> Iterator[DroppingProxy]:
    pool = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    p = DroppingProxy(pool.get("host", "127.0.0.1"), int(pool.get("port", 6379)))
    yield p
    p.close()


def test_the_trap_is_real_a_dropped_answer_hides_an_executed_command(
    proxy, redis_prefix, redis_url
):
    """Control: through the proxy, INCR runs on the server but the client sees an error."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    raw = redis.Redis(port=proxy.port, retry=Retry(NoBackoff(), 0))
    key = f"{redis_prefix}:trap"
    proxy.drop_next()
    with pytest.raises(redis.ConnectionError):
        raw.incr(key)
    assert int(redis.Redis.from_url(redis_url).get(key)) == 1
    raw.close()


@pytest.mark.parametrize("chunk", [0, 16])
def test_dropped_connection_after_a_script_never_counts_twice(make_store, proxy, chunk):
    store = make_store(url=f"redis://127.0.0.1:{proxy.port}/0", chunk=chunk)
    _open(store)
    for i in range(300):
        if i % 7 == 3:
            proxy.drop_next()  # this call's (or this push's) answer is lost after it ran
        store.add_units("s1", 1)
    store.flush("s1")
    assert proxy.dropped >= 40
    assert store.load("s1").units == 300


def test_dropped_connection_during_claim_hands_out_one_intent(make_store, proxy):
    store = make_store(url=f"redis://127.0.0.1:{proxy.port}/0")
    _open(store)
    store.add_units("s1", 250)
    proxy.drop_next()
    first = store.claim("s1", min_units=100)  # its answer was lost once; the resend replays
    assert first is not None and (first.seq, first.units_to) == (1, 100)
    state = store.load("s1")
    assert state.pending == (first,) and state.claimed_units == 100 and state.next_seq == 2


STORE_RETRIES = 5
"""The store's own retry budget for one operation (``RedisStore(retries=5)``, the default):
``retries + 1`` attempts, each of which redis-py may itself retry, before ``StoreUnavailable``."""

KILLS_PER_OPERATION = 1
"""The kill test kills at most one connection per store operation; below the retry budget, so
the test cannot fail by running out of retries, only by counting wrong."""

assert KILLS_PER_OPERATION < STORE_RETRIES + 1


class KillPlan:
    """Kills the connection that carries the next script call, after the call was sent.

    ``arm()`` (the test does so every N operations) makes the next EVALSHA sent on a
    connection of the store's own pool go like this: ``CLIENT ID`` on that connection, then the
    EVALSHA, then ``CLIENT KILL ID <conn_id>`` from a separate admin connection. Whether Redis
    ran the script before the kill (its answer then lost) or not is the server's race; either
    way the store must count the units once. Nothing but that one connection is killed.
    """

    def __init__(self, admin: redis.Redis) -> None:
        self._admin = admin
        self._lock = threading.Lock()
        self._armed = 0
        self.killed_ids: list[int] = []
        self.kill_replies: list[int] = []

    def arm(self) -> None:
        with self._lock:
            self._armed += 1

    def _take(self) -> bool:
        with self._lock:
            if self._armed == 0:
                return False
            self._armed -= 1
            return True

    def connection_class(self) -> type:
        plan = self

        class KillMidCommand(redis.connection.Connection):
            def send_command(self, *args, **kwargs):
                if not (args and str(args[0]).upper() == "EVALSHA" and plan._take()):
                    return super().send_command(*args, **kwargs)
                super().send_command("CLIENT", "ID")
                conn_id = int(self.read_response())
                super().send_command(*args, **kwargs)  # the script is on its way ...
                plan.killed_ids.append(conn_id)  # ... and its connection is killed
                plan.kill_replies.append(int(plan._admin.client_kill_filter(_id=conn_id)))
                return None

        return KillMidCommand

    @property
    def pending(self) -> int:
        with self._lock:
            return self._armed


@pytest.mark.parametrize("chunk", [0, 16])
def test_client_kill_by_id_mid_traffic_never_counts_twice(redis_url, redis_prefix, chunk):
    """CLIENT KILL ID <conn_id> of the store's own connection in every 25th operation."""
    admin = redis.Redis.from_url(redis_url)
    plan = KillPlan(admin)
    pool = redis.ConnectionPool.from_url(
        redis_url,
        connection_class=plan.connection_class(),
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
    )
    client = redis.Redis(connection_pool=pool)
    store = RedisStore(client=client, prefix=redis_prefix, chunk=chunk, retries=STORE_RETRIES)
    try:
        _open(store)
        ops, every = 1_500, 25
        for i in range(ops):
            if i % every == 0:
                plan.arm()
            store.add_units("s1", 1)
            if chunk == 0:
                assert plan.pending == 0  # direct mode: that very operation carried the kill
        store.flush("s1")  # leased mode: the last armed kill lands on a push by now
        assert plan.pending == 0
        assert store.load("s1").units == ops
    finally:
        store.close()
        client.close()
        admin.close()
    assert plan.kill_replies == [1] * (ops // every)  # each kill found its one connection
    assert len(set(plan.killed_ids)) == ops // every  # and the store reconnected every time


# -- leases: client-side batching -----------------------------------------------------------


def test_leased_counting_is_exact_and_cheap(make_store):
    store = make_store(chunk=100)
    _open(store, _cfg(max_units=20_000))
    for _ in range(10_000):
        store.add_units("s1", 1)
    store.flush("s1")
    assert store.load("s1").units == 10_000
    assert store.round_trips < 10_000 / 100 + 20


def test_reservations_count_against_the_budget_and_cancel_gives_back(make_store):
    store = make_store(chunk=10)
    _open(store, _cfg(max_units=25))
    counter = store.counter("s1")
    counter.reserve(20)
    other = make_store(chunk=10)
    with pytest.raises(BudgetExhausted):
        other.add_units("s1", 6)  # 20 held by the first worker
    counter.cancel(15)
    assert counter.commit(5) >= 5
    store.flush("s1")
    store.close()  # gives the unused lease back
    assert other.add_units("s1", 20) >= 20
    other.flush("s1")
    assert other.load("s1").units == 25


def test_one_worker_closes_the_stream_for_all(make_store):
    worker = make_store(chunk=50, lease_ttl=1.0, push_interval=0.05)
    closer = make_store()
    _open(closer)
    for _ in range(123):
        worker.add_units("s1", 1)  # all local: nothing pushed yet
    final = closer.claim("s1", min_units=0, final=True)  # drains the worker's lease first
    assert final is not None and final.units_to == 123
    with pytest.raises(StreamClosed):
        worker.add_units("s1", 1)
    fleet = closer.fleet_status("s1")
    assert fleet.leases == () and fleet.lost_units == 0 and fleet.revoked_units == 0
    assert fleet.state.status == "closing"


def test_a_dead_workers_lease_expires_and_is_reported(make_store):
    dead = make_store(chunk=40, lease_ttl=0.5, push_interval=0.1)
    alive = make_store()
    _open(alive, _cfg(max_units=100))
    dead.add_units("s1", 1)
    dead.flush("s1")
    dead._leases.stop()  # the pusher stops: as good as a crashed process from here on
    for _ in range(9):
        dead.add_units("s1", 1)  # consumed locally, never pushed
    with pytest.raises(BudgetExhausted):
        alive.add_units("s1", 60)  # 1 counted + 40 leased to the dead worker
    time.sleep(0.6)
    assert alive.add_units("s1", 99) == 100  # the lease expired: its headroom is back
    fleet = alive.fleet_status("s1")
    assert fleet.revoked_units == 40 and fleet.state.units == 100
    final = alive.claim("s1", min_units=0, final=True)
    assert final.units_to == 100
    dead.flush("s1")  # the "dead" worker's late push: refused, reported
    fleet = alive.fleet_status("s1")
    assert fleet.lost_units == 9 and fleet.state.units == 100


def test_take_over_keeps_the_intent_and_its_key(make_store):
    owner = make_store()
    rescuer = make_store()
    cfg = _open(owner)
    owner.add_units("s1", 100)
    intent = owner.claim("s1", min_units=100)
    assert rescuer.take_over("s1", lease_seconds=5) is None  # its owner is still within lease
    time.sleep(0.05)
    taken = rescuer.take_over("s1", lease_seconds=0.01)
    assert taken == intent and taken.idempotency_key == intent.idempotency_key
    assert rescuer.fleet_status("s1").owners[0][1] == rescuer.worker
    amount = intent_amount_micro(cfg.parsed_rate, taken)
    rescuer.settle("s1", taken.seq, amount)
    owner.settle("s1", intent.seq, amount)  # the slow owner settles too: a no-op
    state = owner.load("s1")
    assert state.paid_micro == amount and state.releases == 1 and state.pending == ()


def test_bad_input_is_refused_before_any_io(make_store):
    store = make_store()
    with pytest.raises(InvalidInput):
        store.load("bad id with spaces")
    with pytest.raises(InvalidInput):
        store.create(_cfg(sid="a{b}"))
    with pytest.raises(InvalidInput):
        RedisStore(prefix="bad prefix")
    with pytest.raises(InvalidInput):
        RedisStore(chunk=-1)
    _open(store)
    with pytest.raises(InvalidInput):
        store.add_units("s1", True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        store.settle("s1", 1, -5)
    assert store.load("s1").units == 0


# -- the Redis tests run in CI --------------------------------------------------------------

pytest_plugins = ["pytester"]


def _run_inner(pytester, monkeypatch, *, ci: bool):
    from pathlib import Path

    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_needs_redis="def test_it(redis_url):\n    assert redis_url\n")
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    return pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")


def test_unreachable_redis_fails_in_ci_and_skips_with_the_reason_printed_outside(
    pytester, monkeypatch
) -> None:
    """The ``redis_url`` fixture every Redis test uses: with ``CI`` set an unreachable server
    is a failure (these tests must run there); without, a skip whose reason is printed."""
    monkeypatch.setenv("PFM_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    outside = _run_inner(pytester, monkeypatch, ci=False)
    outside.assert_outcomes(skipped=1)
    outside.stdout.fnmatch_lines(
        ["*SKIPPED the Redis tests: Redis unreachable at redis://127.0.0.1:1/0*"]
    )
    in_ci = _run_inner(pytester, monkeypatch, ci=True)
    in_ci.assert_outcomes(errors=1)
    in_ci.stdout.fnmatch_lines(["*CI is set, so the Redis tests must run*"])
    assert in_ci.ret != 0


def test_no_redis_server_binary_fails_in_ci_and_skips_with_the_reason_printed_outside(
    pytester, monkeypatch, tmp_path
) -> None:
    """Without ``PFM_REDIS_URL`` the suite starts its own server; no binary: the same rule."""
    missing = str(tmp_path / "no-such-redis-server")
    monkeypatch.delenv("PFM_REDIS_URL", raising=False)
    monkeypatch.setenv("PFM_REDIS_SERVER", missing)
    outside = _run_inner(pytester, monkeypatch, ci=False)
    outside.assert_outcomes(skipped=1)
    outside.stdout.fnmatch_lines(
        [f"*SKIPPED the Redis tests: cannot start a private Redis: *(tried {missing})*"]
    )
    in_ci = _run_inner(pytester, monkeypatch, ci=True)
    in_ci.assert_outcomes(errors=1)
    in_ci.stdout.fnmatch_lines(["*CI is set, so the Redis tests must run*"])


def test_the_servers_the_suite_starts_are_private_and_keep_nothing(owned_redis_url) -> None:
    """The server the suite starts (the session's own unless ``PFM_REDIS_URL`` names one;
    then a private one for this test): not 6379, loopback only, no RDB snapshots, no AOF, and
    a working directory of its own."""
    import tempfile
    from pathlib import Path
    from urllib.parse import urlsplit

    admin = redis.Redis.from_url(owned_redis_url)
    try:
        port = int(admin.config_get("port")["port"])
        assert port == urlsplit(owned_redis_url).port != 6379
        assert admin.config_get("bind")["bind"] == "127.0.0.1"
        assert admin.config_get("save")["save"] == ""
        assert admin.config_get("appendonly")["appendonly"] == "no"
        workdir = Path(admin.config_get("dir")["dir"])
        assert workdir.name.startswith("pfm-redis-")
        assert workdir.parent == Path(tempfile.gettempdir()).resolve()
    finally:
        admin.close()
