"""The tools' durable state: what one run made, the next run can release, refund and close.

Each test owns its sandbox (the escrow service) and its state file under ``tmp_path``; a
"restart" closes the state file and opens it again in a new tool context, as a new server
process would.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from toolcalls import call, refusal

from pf_metered.errors import ConfigError
from pf_metered.sandbox import Sandbox, SandboxAgent
from pf_metered.tools import Caps, ToolContext, ToolError, ToolState, get_definition
from pf_metered.tools.restore import restore
from pf_metered.tools.state import default_state_path, strip_memo_tag


@pytest.fixture
def world() -> Iterator[tuple[Sandbox, SandboxAgent, SandboxAgent]]:
    with Sandbox() as sb:
        yield sb, sb.add_agent(balance="10.00"), sb.add_agent()


def context(sb: Sandbox, payer: SandboxAgent, state: ToolState, **caps: Any) -> ToolContext:
    return ToolContext(
        sb.client(payer.api_key),
        caps=Caps(**caps),
        store=state.meter_store,
        book=state.book("stdio"),
        auto_release_hours=24,
    )


def test_a_restarted_context_releases_refunds_and_closes_what_the_first_made(
    world: tuple[Sandbox, SandboxAgent, SandboxAgent], tmp_path: Path
) -> None:
    sb, payer, provider = world
    path = tmp_path / "state.sqlite3"
    state = ToolState(path)
    ctx = context(sb, payer, state)
    first = call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="2.50", memo="job")
    second = call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="1.00")
    behind = call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="1.00")
    opened = call(ctx, "stream_open", provider=provider.agent_id, rate="0.01", budget="2.00")
    call(ctx, "stream_record", stream_id=opened["stream_id"], units=37)
    assert sb.escrow(first["escrow_id"]).auto_release_at is not None  # the operator's default
    assert first["memo"] == "job"
    # the server dies: nothing is closed, the state file is all that is left
    state.close()
    sb.client(payer.api_key).refund(behind["escrow_id"])  # given back behind the tools' back
    with pytest.raises(ToolError, match="not created with escrow_create"):
        get_definition("escrow_release").call(
            ToolContext(sb.client(payer.api_key)), {"escrow_id": first["escrow_id"], "amount": "1"}
        )

    state = ToolState(path)
    ctx = context(sb, payer, state)
    found = restore(ctx)
    assert found.streams == [opened["stream_id"]] and found.problems == []
    assert found.escrows == [first["escrow_id"], second["escrow_id"]]  # read back: not `behind`
    assert "2 open escrow(s), 1 open stream(s)" in state.describe_found()

    released = call(ctx, "escrow_release", escrow_id=first["escrow_id"], amount="2.50")
    assert (released["released"], released["remaining"]) == ("2.50", "0.00")
    refunded = call(ctx, "escrow_refund", escrow_id=second["escrow_id"])
    assert (refunded["status"], refunded["refunded"]) == ("refunded", "1.00")
    receipt = call(ctx, "stream_close", stream_id=opened["stream_id"])
    assert (receipt["units"], receipt["paid"], receipt["refunded"]) == (37, "0.37", "1.63")
    listing = call(ctx, "stream_list")
    assert (listing["locked"], listing["paid"], listing["refunded"]) == ("0.00", "2.87", "3.63")

    # the ledger is exact: 10.00 = payer + provider + fees, the provider got 2.87 less 1%
    paid = Decimal("2.87")
    assert sb.balance(payer.agent_id) == Decimal("10.00") - paid
    assert sb.balance(provider.agent_id) + sb.fees() == paid
    assert sb.fees() == Decimal("0.028700")  # 1% of 2.50 + 1% of 0.37
    state.close()


def test_max_locked_counts_paid_and_refunded_money_back(
    world: tuple[Sandbox, SandboxAgent, SandboxAgent],
) -> None:
    sb, payer, provider = world
    state = ToolState()
    ctx = context(sb, payer, state, max_locked="3.00")
    made = call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="2.00")
    err = refusal(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="1.50")
    assert "max_locked" in err.message and "1.00 USDC free" in err.message
    assert "escrow_refund" in err.message and made["escrow_id"] in err.message
    assert "stream_close" not in err.message  # no stream exists: not offered as a next step
    call(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="2.00")  # paid in full
    assert call(ctx, "stream_list")["locked"] == "0.00"
    again = call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="3.00")
    call(ctx, "escrow_refund", escrow_id=again["escrow_id"])
    call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="3.00")  # room is back
    assert call(ctx, "stream_list")["locked"] == "3.00"


def test_max_spend_is_kept_in_the_state_file_across_restarts(
    world: tuple[Sandbox, SandboxAgent, SandboxAgent], tmp_path: Path
) -> None:
    sb, payer, provider = world
    path = tmp_path / "state.sqlite3"
    state = ToolState(path)
    ctx = context(sb, payer, state, max_spend="3.00")
    made = call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="2.00")
    call(ctx, "escrow_release", escrow_id=made["escrow_id"], amount="2.00")
    state.close()

    state = ToolState(path)
    ctx = context(sb, payer, state, max_spend="3.00")
    err = refusal(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="1.50")
    assert "max_spend" in err.message and "2.00 USDC was already paid" in err.message
    assert "1.00 USDC left" in err.message and "use at most 1.00 USDC" in err.message
    call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="1.00")
    err = refusal(ctx, "stream_open", provider=provider.agent_id, rate="0.01", budget="1.00")
    assert "max_spend" in err.message and "escrow_refund" in err.message
    state.close()


def test_one_process_per_state_file(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    state = ToolState(path)
    with pytest.raises(ConfigError, match="in use by another"):
        ToolState(path)
    state.close()
    ToolState(path).close()


def test_default_path_is_under_the_data_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_state_path() == tmp_path / "pf-metered" / "mcp-state.sqlite3"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_state_path() == Path.home() / ".local/share/pf-metered/mcp-state.sqlite3"


def test_memo_tag_is_stripped_only_when_it_is_the_clients() -> None:
    assert strip_memo_tag("job [idem:pfm_1a2b]") == "job"
    assert strip_memo_tag("[idem:pfm_1a2b]") == ""
    assert strip_memo_tag("about [idem:x] and more") == "about [idem:x] and more"
    assert strip_memo_tag("plain") == "plain"


def test_escrow_list_is_newest_first(world: tuple[Sandbox, SandboxAgent, SandboxAgent]) -> None:
    sb, payer, provider = world
    ctx = context(sb, payer, ToolState())
    ids = [
        call(ctx, "escrow_create", to_agent_id=provider.agent_id, amount="1.00")["escrow_id"]
        for _ in range(3)
    ]
    listing = call(ctx, "escrow_list", limit=2)
    assert [e["escrow_id"] for e in listing["escrows"]] == [ids[2], ids[1]]
    assert listing["count"] == 3 and listing["shown"] == 2
