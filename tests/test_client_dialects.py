"""The dialect seam: a client with no base URL and no ``dialect=`` asks the host which dialect
it speaks (once, a read, no money moved); ``dialect=`` forces one; when no dialect answers,
the error says what was tried. Probes run against the sandbox in-process and over loopback —
never the live host."""

from __future__ import annotations

from decimal import Decimal

import httpx
import pytest

from pf_metered.client import AsyncEscrowClient, EscrowClient
from pf_metered.client._base import DEFAULT_BASE_URL
from pf_metered.client._dialect import Dialect
from pf_metered.client._dialects import REGISTRY, default_dialect_for, dialect_named
from pf_metered.errors import ConfigError, InvalidInput, UnsupportedByDialect
from pf_metered.sandbox import Sandbox


@pytest.fixture(autouse=True)
def _no_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PF_BASE_URL", raising=False)


class Counting(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """The sandbox's transport, counting what is sent (method, path)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.seen: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        return self.inner.handle_request(request)  # type: ignore[attr-defined,no-any-return]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.method, request.url.path))
        return await self.inner.handle_async_request(request)  # type: ignore[attr-defined,no-any-return]


def test_the_default_host_serving_the_deployed_dialect_is_probed_once_and_used():
    with Sandbox(at_root="deployed", deployed_rate_limits=None) as sb:
        payer, provider = sb.add_agent("5"), sb.add_agent()
        t = Counting(sb.transport())
        with EscrowClient(payer.api_key, transport=t, rate_limits=False) as c:
            assert DEFAULT_BASE_URL == "https://escrow.purpleflea.com"
            assert not c.dialect_resolved and c.base_url == DEFAULT_BASE_URL
            assert c.capabilities.dialect == "deployed"  # the first look probes
            assert c.capabilities.supports_partial_release is False
            assert t.seen == [("GET", "/openapi.json")]  # one read, nothing else
            assert sb.balance(payer.agent_id) == 5  # no money moved
            esc = c.create_escrow(provider.agent_id, "1.00")
            assert c.release(esc.escrow_id).status == "released"
            assert c.resolve_dialect() == "deployed"
        assert [p for _m, p in t.seen].count("/openapi.json") == 1  # cached for the client
        assert ("POST", "/escrow/create") in t.seen  # the deployed paths, at the root


def test_a_host_serving_only_v1_is_found_by_its_read_path():
    with Sandbox() as sb:
        payer, provider = sb.add_agent("5"), sb.add_agent()
        t = Counting(sb.transport())
        with EscrowClient(payer.api_key, transport=t) as c:
            assert c.resolve_dialect() == "v1"
            assert c.base_url == DEFAULT_BASE_URL + "/api/v1"
            assert [m for m, _p in t.seen] == ["GET", "GET"]  # deployed's probe, then v1's
            esc = c.create_escrow(provider.agent_id, "2.00")
            assert c.release_partial(esc.escrow_id, "0.50").released == Decimal("0.5")
        assert sb.balance(payer.agent_id) == 3


def test_dialect_forces_one_and_nothing_is_probed():
    with Sandbox(at_root="deployed") as sb:
        payer = sb.add_agent("1")
        t = Counting(sb.transport())
        with EscrowClient(payer.api_key, transport=t, dialect="v1") as c:
            assert c.dialect_resolved and c.capabilities.dialect == "v1"
            assert c.base_url == "https://escrow.purpleflea.com/api/v1"
        with EscrowClient(payer.api_key, transport=t, dialect="deployed") as c:
            assert c.capabilities.dialect == "deployed" and c.base_url == DEFAULT_BASE_URL
        assert t.seen == []


def test_when_no_dialect_answers_the_error_says_what_was_tried():
    t = httpx.MockTransport(lambda req: httpx.Response(404, json={"error": "not_found"}))
    with EscrowClient("pf_test_probeprobe", transport=t) as c, pytest.raises(ConfigError) as info:
        c.get_escrow("esc_1")
    text = str(info.value)
    assert "escrow.purpleflea.com" in text
    assert "GET /openapi.json (deployed): HTTP 404" in text
    assert "GET /api/v1/escrow/pfm_dialect_probe (v1): HTTP 404" in text
    assert "dialect=" in text and "PF_BASE_URL" in text
    assert "pf_test_probeprobe" not in text


def test_a_probe_that_cannot_connect_says_so():
    def refuse(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    t = httpx.MockTransport(refuse)
    with (
        EscrowClient("pf_test_probeprobe", transport=t) as c,
        pytest.raises(ConfigError, match="ConnectError"),
    ):
        c.resolve_dialect()


def test_bad_input_is_refused_before_the_probe():
    t = httpx.MockTransport(lambda req: pytest.fail("nothing may be sent"))
    with EscrowClient("pf_test_probeprobe", transport=t) as c:
        with pytest.raises(InvalidInput):
            c.create_escrow("agent b", "1.00")
        with pytest.raises(InvalidInput):
            c.create_escrow("ag_x", "1.0000001")


def test_auto_probes_a_given_loopback_host():
    with Sandbox(at_root="deployed") as sb:
        payer, provider = sb.add_agent("5"), sb.add_agent()
        server = sb.serve()
        root = server.base_url.removesuffix("/api/v1")
        with EscrowClient(payer.api_key, base_url=root, dialect="auto", rate_limits=False) as c:
            assert c.resolve_dialect() == "deployed" and c.base_url == root
            esc = c.create_escrow(provider.agent_id, "0.50")
            assert c.get_escrow(esc.escrow_id).amount == Decimal("0.5")


async def test_async_client_probes_too():
    with Sandbox(at_root="deployed") as sb:
        payer = sb.add_agent("1")
        c = AsyncEscrowClient(payer.api_key, transport=sb.transport())
        assert await c.resolve_dialect() == "deployed"
        await c.aclose()
        c = AsyncEscrowClient(payer.api_key, transport=sb.transport())
        assert c.capabilities.dialect == "deployed"  # a property: one blocking read
        await c.aclose()


def test_the_registry_names_every_dialect_and_each_is_complete():
    assert list(REGISTRY) == ["deployed", "v1"]
    for name, dialect in REGISTRY.items():
        assert dialect.name == name and dialect_named(name) is dialect
        caps = dialect.capabilities
        assert caps.min_escrow_micro > 0 and caps.max_auto_release_hours >= 720
        for method in [m for m in dir(Dialect) if not m.startswith("_")]:
            assert hasattr(dialect, method), (name, method)
    assert REGISTRY["deployed"].capabilities.limits["^/escrow/create$"] == 20
    with pytest.raises(InvalidInput, match="dialect"):
        dialect_named("v2")
    with pytest.raises(ConfigError, match="dialect"):
        dialect_named(123)
    assert default_dialect_for("https://escrow.purpleflea.com") == "deployed"


def test_a_dialect_without_a_call_says_so_before_sending():
    t = httpx.MockTransport(lambda req: pytest.fail("nothing may be sent"))
    with (
        EscrowClient("pf_test_probeprobe", transport=t, dialect="v1") as c,
        pytest.raises(UnsupportedByDialect),
    ):
        c.complete("esc_1")
    with EscrowClient("pf_test_probeprobe", transport=t, dialect="deployed") as c:
        with pytest.raises(UnsupportedByDialect):
            c.refund("esc_1")
        with pytest.raises(UnsupportedByDialect):
            c.release_partial("esc_1", "1.00")
