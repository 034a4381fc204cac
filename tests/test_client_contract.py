"""One contract suite against the real sandbox ledger, run four ways (in-process and over a
loopback socket, sync and async), and fault tests: the request reaches the sandbox, then its
answer is lost — the release (or create, or refund) is applied exactly once either way."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest
from conftest import ClientFacade

from pf_metered import errors

sandbox_mod = pytest.importorskip("pf_metered.sandbox")
Sandbox = sandbox_mod.Sandbox

IN_PROCESS = "http://localhost/api/v1"


class World:
    def __init__(self, sb: Any, connect: Callable[..., ClientFacade]) -> None:
        self.sb = sb
        self.payer = sb.add_agent(balance="100")
        self.provider = sb.add_agent(balance="0")
        self.connect = connect
        self.client = connect(self.payer.api_key)


@pytest.fixture(params=["inproc-sync", "inproc-async", "socket-sync", "socket-async"])
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    where, mode = request.param.split("-")
    made: list[ClientFacade] = []
    with Sandbox() as sb:
        if where == "inproc":
            kw: dict[str, Any] = {"base_url": IN_PROCESS, "transport": sb.transport()}
        else:
            kw = {"base_url": sb.serve().base_url}

        def connect(api_key: str, **more: Any) -> ClientFacade:
            facade = ClientFacade(mode, api_key=api_key, **{**kw, **more})
            made.append(facade)
            return facade

        yield World(sb, connect)
        for facade in made:
            facade.close()
        sb.audit()


# -- the contract -------------------------------------------------------------------------


def test_create_locks_the_budget(world: World) -> None:
    escrow = world.client.create_escrow(
        world.provider.agent_id, "10.00", memo="job 1", auto_release_hours=24
    )
    assert escrow.status == "locked"
    assert escrow.amount == Decimal("10")
    assert escrow.released == 0 and escrow.remaining == Decimal("10")
    assert escrow.to_agent_id == world.provider.agent_id
    assert escrow.from_agent_id == world.payer.agent_id
    assert escrow.memo.startswith("job 1")
    assert world.sb.balance(world.payer.agent_id) == Decimal("90")


def test_partial_releases_pay_the_provider_less_the_fee(world: World) -> None:
    escrow = world.client.create_escrow(world.provider.agent_id, "10.00")
    after = world.client.release_partial(escrow.escrow_id, "1.25", memo="batch 1")
    after = world.client.release_partial(escrow.escrow_id, "0.75", memo="batch 2")
    assert after.released == Decimal("2") and after.remaining == Decimal("8")
    # a release answer carries only the release just made, and the count
    assert [r.amount for r in after.releases] == [Decimal("0.75")]
    assert after.release_count == 2 and not after.history_complete
    got = world.client.get_escrow(escrow.escrow_id)
    assert [r.amount for r in got.releases] == [Decimal("1.25"), Decimal("0.75")]
    assert got.releases[0].memo.startswith("batch 1") and got.history_complete
    assert world.sb.balance(world.provider.agent_id) == Decimal("1.98")
    assert world.sb.fees() == Decimal("0.02")


def test_get_and_list_agree_with_the_ledger(world: World) -> None:
    escrow = world.client.create_escrow(world.provider.agent_id, "5.00")
    world.client.release_partial(escrow.escrow_id, "1.00")
    got = world.client.get_escrow(escrow.escrow_id)
    assert got == world.sb.escrow(escrow.escrow_id)
    assert [e.escrow_id for e in world.client.list_escrows()] == [escrow.escrow_id]
    provider = world.connect(world.provider.api_key)
    assert [e.escrow_id for e in provider.list_escrows()] == [escrow.escrow_id]
    assert provider.get_escrow(escrow.escrow_id).released == Decimal("1")


def test_release_history_is_paged_and_reads_carry_the_last_100(world: World) -> None:
    escrow = world.client.create_escrow(world.provider.agent_id, "10.00")
    eid = escrow.escrow_id
    assert (escrow.releases, escrow.release_count) == ((), 0)
    for i in range(130):
        world.client.release_partial(eid, "0.01", memo=f"b{i}")
    got = world.client.get_escrow(eid)
    assert got.release_count == 130 and len(got.releases) == 100 and not got.history_complete
    assert got.releases[0].memo.startswith("b30") and got.releases[-1].memo.startswith("b129")
    assert got.released == Decimal("1.30")
    page = world.client.list_releases(eid, offset=120, limit=50)
    assert (page.offset, page.release_count, len(page.releases)) == (120, 130, 10)
    listed = world.client.list_escrows()
    assert [(e.release_count, e.releases) for e in listed] == [(130, ())]
    if world.client.mode == "sync":
        every = list(world.client.iter_releases(eid, page_size=40))
    else:

        async def collect() -> list[Any]:
            return [r async for r in world.client.client.iter_releases(eid, page_size=40)]

        every = world.client._loop.run_until_complete(collect())
    assert [r.memo.split()[0] for r in every] == [f"b{i}" for i in range(130)]
    with pytest.raises(errors.InvalidInput):
        world.client.list_releases(eid, offset=-1)
    with pytest.raises(errors.InvalidInput):
        world.client.list_releases(eid, limit=1001)


def test_refund_returns_the_rest_and_closes(world: World) -> None:
    escrow = world.client.create_escrow(world.provider.agent_id, "10.00")
    world.client.release_partial(escrow.escrow_id, "3.00")
    refunded = world.client.refund(escrow.escrow_id)
    assert refunded.status == "refunded"
    assert refunded.refunded == Decimal("7") and refunded.remaining == 0
    assert world.sb.balance(world.payer.agent_id) == Decimal("97")
    with pytest.raises(errors.Conflict) as info:
        world.client.release_partial(escrow.escrow_id, "1.00")
    assert info.value.code == "invalid_status"


def test_faucet_once(world: World) -> None:
    fresh = world.sb.add_agent()
    client = world.connect(fresh.api_key)
    claim = client.claim_faucet()
    assert claim.credited == Decimal("1")
    assert world.sb.balance(fresh.agent_id) == Decimal("1")
    with pytest.raises(errors.Conflict) as info:
        client.claim_faucet()
    assert info.value.code == "already_claimed"


def test_errors_map_to_the_tree(world: World) -> None:
    escrow = world.client.create_escrow(world.provider.agent_id, "10.00")
    with pytest.raises(errors.NotFound):
        world.client.get_escrow("esc_does_not_exist")
    with pytest.raises(errors.InvalidRequest):
        world.client.release_partial(escrow.escrow_id, "10.01")
    with pytest.raises(errors.InsufficientFunds):
        world.client.create_escrow(world.provider.agent_id, "1000.00")
    with pytest.raises(errors.PermissionDenied):
        world.connect(world.provider.api_key).release_partial(escrow.escrow_id, "1.00")
    with pytest.raises(errors.AuthError) as info:
        world.connect("pf_test_not_a_real_key_000000").list_escrows()
    assert info.value.status == 401
    assert info.value.request_id
    with pytest.raises(errors.IdempotencyConflict):
        world.client.release_partial(escrow.escrow_id, "1.00", idempotency_key="same")
        world.client.release_partial(escrow.escrow_id, "2.00", idempotency_key="same")
    assert world.sb.escrow(escrow.escrow_id).released == Decimal("1")


def test_same_key_replays_instead_of_paying_twice(world: World) -> None:
    escrow = world.client.create_escrow(world.provider.agent_id, "10.00")
    first = world.client.release_partial(escrow.escrow_id, "1.00", idempotency_key="batch-1")
    again = world.client.release_partial(escrow.escrow_id, "1.00", idempotency_key="batch-1")
    assert first == again
    assert world.sb.escrow(escrow.escrow_id).released == Decimal("1")
    assert world.client.capabilities.honours_idempotency is True


# -- faults: the request lands, the answer is lost ----------------------------------------


class LosingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Passes each request to the sandbox; for the first ``times`` matching ones, throws the
    answer away and reports ``fault`` instead."""

    def __init__(self, inner: Any, fault: str, path_suffix: str, times: int = 1) -> None:
        self.inner = inner
        self.fault = fault
        self.path_suffix = path_suffix
        self.left = times
        self.lost = 0

    def _hit(self, request: httpx.Request) -> bool:
        hit = (
            request.method == "POST"
            and request.url.path.endswith(self.path_suffix)
            and self.left > 0
        )
        if hit:
            self.left -= 1
            self.lost += 1
        return hit

    def _loss(self, request: httpx.Request) -> httpx.Response:
        if self.fault == "timeout":
            raise httpx.ReadTimeout("answer lost", request=request)
        if self.fault == "reset":
            raise httpx.RemoteProtocolError("connection reset", request=request)
        return httpx.Response(500, json={"error": "internal_error", "message": "lost"})

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self._hit(request):
            response.read()
            response.close()
            return self._loss(request)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self._hit(request):
            await response.aread()
            await response.aclose()
            return self._loss(request)
        return response


FAULTS = ["timeout", "reset", "500"]
HONOUR = [True, False]


def _faulty(make_client, honour: bool, fault: str, suffix: str, times: int = 1):
    sb = Sandbox(honour_idempotency=honour)
    payer, provider = sb.add_agent(balance="100"), sb.add_agent()
    losing = LosingTransport(sb.transport(), fault, suffix, times)
    client = make_client(
        api_key=payer.api_key,
        base_url=IN_PROCESS,
        transport=losing,
        server_honours_idempotency=honour,
    )
    return sb, payer, provider, losing, client


@pytest.mark.parametrize("honour", HONOUR)
@pytest.mark.parametrize("fault", FAULTS)
def test_lost_release_is_applied_exactly_once(make_client, honour: bool, fault: str) -> None:
    sb, _payer, provider, losing, client = _faulty(make_client, honour, fault, "/release-partial")
    try:
        escrow = client.create_escrow(provider.agent_id, "10.00")
        after = client.release_partial(escrow.escrow_id, "2.50", memo="batch 1")
        assert losing.lost == 1
        ledger = sb.escrow(escrow.escrow_id)
        assert len(ledger.releases) == 1
        assert ledger.released == Decimal("2.5")
        assert after == ledger  # the replayed (honour) or read-back (no honour) answer
        assert sb.balance(provider.agent_id) == Decimal("2.475")
        sb.audit()
    finally:
        sb.close()


@pytest.mark.parametrize("honour", HONOUR)
def test_release_lost_on_every_attempt_is_paid_at_most_once(make_client, honour: bool) -> None:
    sb, _payer, provider, losing, client = _faulty(
        make_client, honour, "timeout", "/release-partial", times=100
    )
    try:
        escrow = client.create_escrow(provider.agent_id, "10.00")
        if not honour:
            # Read back after the first loss: the release is there, so it is not re-sent.
            assert client.release_partial(escrow.escrow_id, "1.00").released == Decimal("1")
            assert losing.lost == 1
        else:
            # Every replay is lost too: the client cannot know, and says so with the key.
            with pytest.raises(errors.AmbiguousRelease) as info:
                client.release_partial(escrow.escrow_id, "1.00")
            assert losing.lost == 1 + client.max_retries
            losing.left = 0
            after = client.release_partial(
                escrow.escrow_id, "1.00", idempotency_key=info.value.idempotency_key
            )
            assert after.released == Decimal("1")
        assert len(sb.escrow(escrow.escrow_id).releases) == 1
    finally:
        sb.close()


def test_ambiguous_release_retried_with_its_key_on_a_server_without_keys(make_client) -> None:
    """The hard case: no idempotency on the server, the answer lost, the read-back failing."""
    sb, _payer, provider, losing, client = _faulty(
        make_client, False, "timeout", "/release-partial", times=1
    )
    try:
        escrow = client.create_escrow(provider.agent_id, "10.00")
        fail_gets = {"on": True}
        inner_handle = losing.inner

        class FailingReads(httpx.BaseTransport, httpx.AsyncBaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                if request.method == "GET" and fail_gets["on"]:
                    raise httpx.ConnectError("down", request=request)
                return inner_handle.handle_request(request)

            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                if request.method == "GET" and fail_gets["on"]:
                    raise httpx.ConnectError("down", request=request)
                return await inner_handle.handle_async_request(request)

        losing.inner = FailingReads()
        with pytest.raises(errors.AmbiguousRelease) as info:
            client.release_partial(escrow.escrow_id, "1.00", memo="b1")
        fail_gets["on"] = False
        after = client.release_partial(
            escrow.escrow_id, "1.00", memo="b1", idempotency_key=info.value.idempotency_key
        )
        assert after.released == Decimal("1")
        assert len(sb.escrow(escrow.escrow_id).releases) == 1
    finally:
        sb.close()


@pytest.mark.parametrize("honour", HONOUR)
@pytest.mark.parametrize("fault", FAULTS)
def test_lost_create_makes_one_escrow(make_client, honour: bool, fault: str) -> None:
    sb, payer, provider, losing, client = _faulty(make_client, honour, fault, "/escrow")
    try:
        escrow = client.create_escrow(provider.agent_id, "10.00", memo="job")
        assert losing.lost == 1
        assert [e.escrow_id for e in client.list_escrows()] == [escrow.escrow_id]
        assert sb.balance(payer.agent_id) == Decimal("90")
    finally:
        sb.close()


@pytest.mark.parametrize("honour", HONOUR)
@pytest.mark.parametrize("fault", FAULTS)
def test_lost_refund_refunds_once(make_client, honour: bool, fault: str) -> None:
    sb, payer, provider, _losing, client = _faulty(make_client, honour, fault, "/refund")
    try:
        escrow = client.create_escrow(provider.agent_id, "10.00")
        client.release_partial(escrow.escrow_id, "4.00")
        refunded = client.refund(escrow.escrow_id)
        assert refunded.status == "refunded" and refunded.refunded == Decimal("6")
        assert sb.balance(payer.agent_id) == Decimal("96")
        sb.audit()
    finally:
        sb.close()
