"""The v1 dialect on its own (paths, bodies, error mapping) and the client's public face."""

from __future__ import annotations

import inspect
import json

import pytest

import pf_metered
import pf_metered.client as client_pkg
from pf_metered import errors
from pf_metered.client import AsyncEscrowClient, Dialect, EscrowClient
from pf_metered.client.v1 import V1


def test_v1_is_a_dialect() -> None:
    dialect: Dialect = V1
    assert dialect.name == "v1" and dialect.supports_partial_release


def test_requests_are_built_once_with_sorted_exact_bodies() -> None:
    spec = V1.create_escrow(
        to_agent_id="agent_b",
        amount_micro=1_500_000,
        memo="m",
        auto_release_hours=None,
        idempotency_key="k1",
    )
    assert (spec.method, spec.path, spec.idempotency_key) == ("POST", "/escrow", "k1")
    assert (
        spec.body
        == b'{"amount":"1.50","auto_release_hours":null,"memo":"m","to_agent_id":"agent_b"}'
    )
    rel = V1.release_partial(escrow_id="esc:1", amount_micro=1_500, memo="", idempotency_key="k")
    assert rel.path == "/escrow/esc%3A1/release-partial"
    assert json.loads(rel.body or b"") == {"amount": "0.0015", "memo": ""}
    assert V1.get_escrow("esc_1").body is None
    assert V1.refund(escrow_id="esc_1", idempotency_key="k").path == "/escrow/esc_1/refund"
    assert V1.claim_faucet(idempotency_key="k").path == "/faucet/claim"
    assert V1.list_escrows().method == "GET"


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (400, "invalid_amount", errors.InvalidRequest),
        (401, "unauthorized", errors.AuthError),
        (402, "insufficient_balance", errors.InsufficientFunds),
        (403, "forbidden", errors.PermissionDenied),
        (404, "not_found", errors.NotFound),
        (409, "invalid_status", errors.Conflict),
        (422, "idempotency_key_reused", errors.IdempotencyConflict),
        (429, "rate_limited", errors.RateLimited),
        (500, "internal_error", errors.ServerError),
        (599, None, errors.ServerError),
        (405, None, errors.APIError),
    ],
)
def test_error_classes(status: int, code: str | None, cls: type) -> None:
    assert V1.error_class(status, code) is cls


def test_in_progress_is_only_the_409_code() -> None:
    assert V1.is_in_progress(409, "request_in_progress")
    assert not V1.is_in_progress(409, "invalid_status")
    assert not V1.is_in_progress(422, "request_in_progress")


def test_sync_and_async_clients_have_the_same_face() -> None:
    def public(cls: type) -> set[str]:
        return {n for n in vars(cls) if not n.startswith("_")}

    assert public(EscrowClient) - {"close"} == public(AsyncEscrowClient) - {"aclose"}
    for name in ("create_escrow", "release_partial", "get_escrow", "list_escrows", "refund"):
        sync_sig = inspect.signature(getattr(EscrowClient, name))
        async_sig = inspect.signature(getattr(AsyncEscrowClient, name))
        assert sync_sig == async_sig, name
        assert inspect.iscoroutinefunction(getattr(AsyncEscrowClient, name))
    assert (
        inspect.signature(EscrowClient.__init__).parameters.keys()
        == inspect.signature(AsyncEscrowClient.__init__).parameters.keys()
    )


def test_exported_members() -> None:
    assert client_pkg.__all__ == sorted(client_pkg.__all__, key=lambda n: (not n.isupper(), n))
    assert {"EscrowClient", "AsyncEscrowClient", "Capabilities", "Dialect"} <= set(
        client_pkg.__all__
    )
    assert pf_metered.EscrowClient is EscrowClient
    assert pf_metered.AsyncEscrowClient is AsyncEscrowClient
    assert "EscrowClient" in pf_metered.__all__ and "AsyncEscrowClient" in pf_metered.__all__


def test_every_client_module_says_what_it_is_for_and_must_never_do() -> None:
    from pf_metered.client import _async, _base, _dialect, _retry, _secrets, _sync, v1

    for mod in (_async, _base, _dialect, _retry, _secrets, _sync, v1):
        doc = (mod.__doc__ or "").lower()
        assert "for" in doc and "never" in doc, mod.__name__
