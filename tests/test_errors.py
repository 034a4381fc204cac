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


# -- every server-supplied string is redacted before it reaches an exception (issue 13 #7) --

ODD_KEY = "sk-odd-shaped-0123456789abcdefghijklmnopq"
"""A key of no known shape: only the registry of live keys can recognise it."""


def _texts(exc: BaseException) -> str:
    return "\n".join([str(exc), repr(exc), repr(exc.args), repr(vars(exc))])


def _assert_no_fragment(text: str, key: str) -> None:
    low = text.lower()
    assert key[:10].lower() not in low  # a prefix of meaningful length
    for size in (len(key), 40, 20, 16):  # and a run of 16 from anywhere
        for start in range(0, len(key) - size + 1):
            assert key[start : start + size].lower() not in low, (size, start)


@pytest.mark.parametrize("key", [ODD_KEY, ODD_KEY.upper(), "pf_live_canary0123456789abcdefsecret"])
def test_code_request_id_and_message_are_redacted_in_any_case(key: str) -> None:
    from pf_metered.client._secrets import Secret

    holder = Secret(key)  # what a client holds while it lives
    for echoed in (key, key.lower(), key.upper(), key[:40], key.lower()[:40]):
        exc = errors.InvalidRequest(f"bad {echoed}", status=400, code=echoed, request_id=echoed)
        _assert_no_fragment(_texts(exc), key)
        _assert_no_fragment(_texts(exc).lower(), key)  # the CLI prints the code lower-cased
        assert exc.code is not None and exc.request_id is not None  # redacted, not dropped
    del holder


def test_truncation_cannot_defeat_masking() -> None:
    from pf_metered.client._secrets import Secret

    holder = Secret(ODD_KEY)
    # the key straddles the 300-character cut of the message, and a 40-character cut
    exc = errors.ServerError("x" * 290 + ODD_KEY, status=500, code=ODD_KEY[:40])
    _assert_no_fragment(_texts(exc), ODD_KEY)
    assert errors.redact("prefix " + ODD_KEY[:10]) == "prefix ***"
    assert errors.redact("nine " + ODD_KEY[:9]) == "nine " + ODD_KEY[:9]  # too short to mean much
    assert errors.redact("mid " + ODD_KEY[5:21]) == "mid ***"
    assert errors.redact("mid " + ODD_KEY[5:20]) == "mid " + ODD_KEY[5:20]
    del holder


def test_a_key_made_of_words_does_not_mask_those_words() -> None:
    from pf_metered.client._secrets import Secret

    holder = Secret("pf_test_refused_connection_0123")
    assert errors.redact("APIConnectionError: connection refused") == (
        "APIConnectionError: connection refused"
    )
    del holder


@pytest.mark.parametrize("prefix", ["pf_live_", "pf_test_", "sk_live_", "sk_test_"])
def test_key_shaped_codes_are_redacted_without_a_live_key(prefix: str) -> None:
    # sk_live_ is what the deployed service's registration hands out
    exc = errors.AuthError("no", status=401, code=prefix + "unregistered0123456789")
    assert "unregistered" not in str(exc) and "unregistered" not in repr(vars(exc))
