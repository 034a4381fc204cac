"""``pf-metered provider watch``: the table it prints and the URLs it refuses."""

from __future__ import annotations

import pytest

from pf_metered.cli import main
from pf_metered.cli._provider import render_accounts


def test_the_table_names_every_stream_and_its_figures():
    text = render_accounts(
        {
            "credit": 200,
            "accounts": [
                {
                    "escrow_id": "esc_1",
                    "status": "locked",
                    "served": 120,
                    "paid_units": 100,
                    "paid": "0.10",
                    "owed": "0.02",
                    "max_unpaid": 40,
                    "refusals": {"unpaid": 2},
                },
            ],
        }
    )
    head, row, credit = text.splitlines()
    assert head.split()[:3] == ["STREAM", "STATUS", "SERVED"]
    assert row.split() == ["esc_1", "locked", "120", "100", "0.10", "0.02", "40", "unpaid×2"]
    assert credit == "credit: 200 units per stream"
    assert render_accounts({"accounts": []}) == "No paying streams yet."


@pytest.mark.parametrize("url", ["http://example.com/_gate", "ftp://127.0.0.1/x", "not a url"])
def test_plain_http_off_loopback_is_refused_before_any_request(url, capsys):
    assert main(["provider", "watch", url, "--once"]) == 2
    err = capsys.readouterr().err
    assert "loopback" in err or "not a URL" in err
