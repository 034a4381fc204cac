"""The error tree: catchable broadly, informative, and never carrying a key."""

from __future__ import annotations

import pytest

import pf_metered
from pf_metered import errors


def test_every_error_is_a_pfmetered_error() -> None:
    for name in errors.__all__:
        obj = getattr(errors, name)
        if isinstance(obj, type):
            assert issubclass(obj, errors.PFMeteredError), name


def test_tree_is_drawn_in_the_module_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        if isinstance(getattr(errors, name), type):
            assert name in doc, f"{name} missing from the drawn tree"


def test_invalid_input_names_the_field_and_is_a_value_error() -> None:
    exc = errors.InvalidInput("rate", "must be greater than zero")
    assert isinstance(exc, ValueError)
    assert str(exc) == "rate must be greater than zero"


@pytest.mark.parametrize(
    "message",
    [
        "bad key pf_live_CANARYabcdef123",
        "Authorization: Bearer pf_test_CANARYxyz",
        "header was Bearer CANARYtoken",
    ],
)
def test_api_error_redacts_keys_from_server_messages(message: str) -> None:
    exc = errors.AuthError(message, status=401, code="unauthorized", request_id="req_1")
    assert "CANARY" not in str(exc)
    assert "CANARY" not in repr(exc)
    assert "req_1" in str(exc)
    assert "401" in str(exc)


def test_api_error_truncates_huge_messages() -> None:
    exc = errors.ServerError("x" * 10_000, status=500)
    assert len(exc.message) <= 300


def test_rate_limited_carries_retry_after() -> None:
    exc = errors.RateLimited("slow down", retry_after=2.5, status=429, code="rate_limited")
    assert exc.retry_after == 2.5
    assert isinstance(exc, errors.APIError)


def test_package_reexports_the_tree() -> None:
    assert pf_metered.PFMeteredError is errors.PFMeteredError
    assert pf_metered.BudgetExhausted is errors.BudgetExhausted
