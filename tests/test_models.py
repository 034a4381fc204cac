"""Answers are believed only when they are exact and add up."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from pydantic import ValidationError

from pf_metered.models import (
    Escrow,
    EscrowList,
    FaucetClaim,
    Registration,
    Release,
    ReleasePage,
)


def escrow(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "escrow_id": "esc_abc123",
        "status": "locked",
        "amount": "10.00",
        "released": "1.50",
        "remaining": "8.50",
    }
    base.update(over)
    return base


def test_a_sound_escrow_parses_to_exact_decimals() -> None:
    e = Escrow.model_validate(
        escrow(releases=[{"amount": "1.00"}, {"amount": "0.50", "memo": "batch:units 1-500"}])
    )
    assert e.amount == Decimal("10")
    assert e.released_micro == 1_500_000
    assert e.remaining_micro == 8_500_000
    assert e.is_open
    assert [r.amount_micro for r in e.releases] == [1_000_000, 500_000]


@pytest.mark.parametrize(
    "bad",
    [
        escrow(amount=10),  # a JSON number has been through a float somewhere
        escrow(released=1.5),
        escrow(amount="NaN"),
        escrow(amount="Infinity"),
        escrow(released="-1.00", remaining="11.00"),
        escrow(released="1.0000001", remaining="8.4999999"),
        escrow(status="exploded"),
        escrow(released="11.00", remaining="-1.00"),
        escrow(remaining="9.00"),  # 1.50 + 9.00 != 10.00
        escrow(releases=[{"amount": "1.00"}]),  # history does not sum to released
        escrow(releases=[{"amount": "1.00"}], release_count=1),  # complete, and does not sum
        escrow(releases=[{"amount": "1.00"}, {"amount": "0.50"}], release_count=1),  # more listed
        escrow(release_count=-1),
        escrow(release_count=0),  # no releases at all, yet 1.50 released
        escrow(release_count="3"),
        escrow(release_count=3.0),
        escrow(release_count=True),
        escrow(releases=[{"amount": "1.00"}, {"amount": "0.60"}], release_count=5),  # > released
        escrow(escrow_id="../../etc/passwd"),
        escrow(escrow_id=""),
        escrow(amount=True),
        {"status": "locked"},
    ],
)
def test_hostile_or_malformed_escrows_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Escrow.model_validate(bad)


def test_a_truncated_history_is_the_most_recent_releases_and_a_count() -> None:
    e = Escrow.model_validate(escrow(releases=[{"amount": "0.50"}], release_count=3))
    assert not e.history_complete and e.total_releases == 3
    # the recent window need not sum to released; a complete one must
    whole = Escrow.model_validate(
        escrow(releases=[{"amount": "1.00"}, {"amount": "0.50"}], release_count=2)
    )
    assert whole.history_complete and whole.total_releases == 2
    legacy = Escrow.model_validate(escrow(releases=[{"amount": "1.50"}]))  # no count: complete
    assert legacy.history_complete and legacy.release_count is None
    fresh = Escrow.model_validate(escrow(released="0.00", remaining="10.00", release_count=0))
    assert fresh.history_complete and fresh.total_releases == 0


def test_release_pages_must_fit_their_count() -> None:
    page = ReleasePage.model_validate(
        {"escrow_id": "esc_1", "release_count": 3, "offset": 1, "releases": [{"amount": "1.00"}]}
    )
    assert page.offset == 1 and len(page.releases) == 1
    for bad in (
        {"escrow_id": "esc_1", "release_count": 1, "offset": 1, "releases": [{"amount": "1.00"}]},
        {"escrow_id": "esc_1", "release_count": -1, "offset": 0, "releases": []},
        {"escrow_id": "esc_1", "release_count": 1, "offset": -1, "releases": []},
    ):
        with pytest.raises(ValidationError):
            ReleasePage.model_validate(bad)


def test_refunded_escrow_adds_up_with_the_refund() -> None:
    e = Escrow.model_validate(escrow(status="refunded", remaining="0.00", refunded="8.50"))
    assert not e.is_open
    assert e.refunded_micro == 8_500_000


def test_models_are_frozen() -> None:
    e = Escrow.model_validate(escrow())
    with pytest.raises(ValidationError):
        e.released = Decimal(0)  # type: ignore[misc]


def test_list_and_faucet() -> None:
    lst = EscrowList.model_validate({"escrows": [escrow(), escrow(escrow_id="esc_2")]})
    assert [e.escrow_id for e in lst.escrows] == ["esc_abc123", "esc_2"]
    claim = FaucetClaim.model_validate({"credited": "1.00", "claim_id": "clm_1"})
    assert claim.credited_micro == 1_000_000
    with pytest.raises(ValidationError):
        FaucetClaim.model_validate({"credited": 1.0, "claim_id": "clm_1"})


def test_release_memo_is_bounded() -> None:
    with pytest.raises(ValidationError):
        Release.model_validate({"amount": "1.00", "memo": "x" * 1001})


def test_registration_keeps_the_key_secret() -> None:
    reg = Registration.model_validate({"agent_id": "ag_1", "api_key": "pf_live_CANARY123456"})
    assert "CANARY" not in repr(reg)
    assert "CANARY" not in str(reg)
    assert reg.api_key.get_secret_value() == "pf_live_CANARY123456"
    with pytest.raises(ValidationError) as info:
        Registration.model_validate({"agent_id": "bad id!", "api_key": "pf_live_CANARY123456"})
    assert "CANARY" not in str(info.value)
