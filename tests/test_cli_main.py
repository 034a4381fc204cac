"""``pf_metered.cli.main`` in-process: the full help/usage/exit-code matrix and the formatters.

The installed command is exercised end to end in ``test_cli.py``; here the many small cases
run without a process each, so the whole matrix stays cheap.
"""

from __future__ import annotations

import io
import json
import time

import pytest

from pf_metered.cli import main
from pf_metered.cli._exit import exit_code_for
from pf_metered.cli._format import Column, progress_bar, render_table, share_text, shown_memo
from pf_metered.cli._secrets import forbid_key_arguments, remember_secret, scrub
from pf_metered.errors import (
    AmbiguousRelease,
    APIConnectionError,
    ConfigError,
    InvalidInput,
    NotFound,
)
from pf_metered.sandbox import Sandbox

COMMAND_PATHS = [
    [],
    ["escrow"],
    ["escrow", "list"],
    ["escrow", "status"],
    ["escrow", "create"],
    ["escrow", "release"],
    ["escrow", "refund"],
    ["faucet"],
    ["faucet", "claim"],
    ["stream"],
    ["stream", "watch"],
    ["sandbox"],
    ["sandbox", "serve"],
    ["mcp"],
    ["register"],
]
GROUPS = {"escrow", "faucet", "stream", "sandbox"}


@pytest.fixture(autouse=True)
def _no_tty_no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    for name in ("PF_API_KEY", "PF_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "pf-metered")
def test_help_of_every_command(path: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*path, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: pf-metered" + "".join(" " + p for p in path))
    assert "--json" in text and "--base-url" in text
    assert "%%" not in text and "%(" not in text
    if path and path[-1] not in GROUPS:
        assert "example" in text  # every command shows how it is used
    for line in text.splitlines():
        assert len(line) <= 100, line
    assert "issue" not in text.lower()  # no tracker jargon on a user's screen


def test_faucet_help_explains_the_agent_id_faucet(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["faucet", "claim", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--agent-id AGENT_ID" in text and "--faucet-url URL" in text
    assert "PF_FAUCET_URL" in text and "deployed" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["escrow", "release", "esc_x", "1.1234567"], "more than 6 decimal places"),
        (["escrow", "release", "esc_x", "-1"], "negative"),
        (["escrow", "release", "esc_x", "abc"], "AMOUNT"),
        (["escrow", "create", "agent_x", "1,50"], "AMOUNT"),
        (["escrow", "status"], "ESCROW_ID"),
        (["escrow", "list", "--status", "bogus"], "--status"),
        (["escrow", "frobnicate"], "frobnicate"),
        (["escrow"], "ACTION"),
        (["escrow", "create", "agent_x", "5", "--auto-release-hours", "0"], "8760"),
        (["stream", "watch", "esc_x", "--interval", "0"], "--interval"),
        (["sandbox", "serve", "--host", "0.0.0.0"], "--host"),
        (["sandbox", "serve", "--port", "70000"], "--port"),
        (["nonsense"], "nonsense"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert needle in captured.err


def test_usage_error_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "escrow", "create", "agent_x", "0.1234567"]) == 2
    error = json.loads(capsys.readouterr().err)["error"]
    assert error == {
        "kind": "usage",
        "message": error["message"],
        "exit_code": 2,
        "type": "InvalidInput",
        "field": "AMOUNT",
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["--api-key", "pf_live_Secret0123456789", "escrow", "list"],
        ["--api-key=pf_live_Secret0123456789", "escrow", "list"],
        ["escrow", "list", "--token", "NotPrefixedSecret0123"],
        ["escrow", "list", "--key=NotPrefixedSecret0123"],
        ["escrow", "status", "pf_live_Secret0123456789"],
        ["mcp", "--api-key", "pf_test_Secret0123456789"],
        ["escrow", "status", "sk_live_Secret0123456789"],  # the deployed service's key shape
    ],
)
def test_key_arguments_refused_without_echo(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Secret0123" not in captured.out + captured.err
    assert "PF_API_KEY" in captured.err


def test_no_key_without_a_terminal_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "faucet", "claim"]) == 4
    error = json.loads(capsys.readouterr().err)["error"]
    assert error["kind"] == "config" and "PF_API_KEY" in error["message"]


def test_prompted_key_is_used_and_not_echoed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with Sandbox() as sandbox:
        payer = sandbox.add_agent(balance="3.00")
        server = sandbox.serve(port=0)
        monkeypatch.setenv("PF_BASE_URL", server.base_url)

        class TTY(io.StringIO):
            def isatty(self) -> bool:
                return True

        prompts: list[str] = []
        monkeypatch.setattr("sys.stdin", TTY(""))
        monkeypatch.setattr(
            "getpass.getpass", lambda prompt="": prompts.append(prompt) or payer.api_key
        )
        assert main(["escrow", "list"]) == 0
        captured = capsys.readouterr()
    assert prompts and "input hidden" in prompts[0]
    assert captured.out.strip() == "No escrows yet."
    assert payer.api_key not in captured.out + captured.err


def test_register_needs_a_keys_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register"]) == 2  # the new key is written to a file, never printed
    assert "--keys-file" in capsys.readouterr().err


def test_unreachable_service_is_an_api_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PF_API_KEY", "pf_test_unreachable0123456789")
    monkeypatch.setattr(time, "sleep", lambda _s: None)  # skip the client's backoff
    assert main(["escrow", "list", "--base-url", "http://127.0.0.1:9/api/v1"]) == 3
    err = capsys.readouterr().err
    *waits, last = err.strip().splitlines()
    assert last.startswith("pf-metered: error: ") and "Traceback" not in err
    assert "http://127.0.0.1:9/api/v1" in last and "pf-metered sandbox serve" in last
    assert [w.split(" in ")[0] for w in waits] == ["pf-metered: retrying GET /escrow"] * 3
    assert "unreachable0123" not in err


def test_exit_code_table() -> None:
    assert exit_code_for(InvalidInput("amount", "bad")) == 2
    assert exit_code_for(NotFound("no", status=404)) == 3
    assert exit_code_for(APIConnectionError("refused")) == 3
    assert exit_code_for(AmbiguousRelease("unknown")) == 3
    assert exit_code_for(ConfigError("no key")) == 4
    assert exit_code_for(RuntimeError("bug")) == 1
    assert exit_code_for(KeyboardInterrupt()) == 130


# -- formatting -------------------------------------------------------------------------------


def test_progress_bar_and_share_are_exact_integers() -> None:
    assert progress_bar(0, 0, 10_000_000, width=10) == "[..........]"
    assert progress_bar(2_500_000, 0, 10_000_000, width=10) == "[##........]"
    assert progress_bar(6_000_000, 4_000_000, 10_000_000, width=10) == "[######~~~~]"
    assert progress_bar(10_000_000, 0, 10_000_000, width=10) == "[##########]"
    assert progress_bar(0, 0, 0, width=4) == "[....]"
    assert share_text(1_250_001, 5_000_000) == "25.0%"
    assert share_text(1, 3) == "33.3%" and share_text(2, 3) == "66.7%"
    assert share_text(5, 0) == "0.0%"


def test_table_alignment_and_memo_tag() -> None:
    cols = [
        Column("id", "ID"),
        Column("amount", "AMOUNT", right=True),
        Column("memo", "MEMO", show=shown_memo),
    ]
    text = render_table(
        cols,
        [
            {"id": "esc_1", "amount": "5.00", "memo": "job [idem:pfm_abc]"},
            {"id": "esc_22", "amount": "0.000001", "memo": None},
        ],
    )
    assert text.splitlines() == [
        "ID        AMOUNT  MEMO",
        "esc_1       5.00  job",
        "esc_22  0.000001  -",
    ]


def test_scrub_hides_known_and_key_shaped_secrets() -> None:
    remember_secret("weird-but-secret-value")
    assert scrub("x weird-but-secret-value y") == "x *** y"
    assert "abcdef" not in scrub("token pf_live_abcdef123456")
    with pytest.raises(Exception, match="not shown"):
        forbid_key_arguments(["--api-key", "whatever"])
    forbid_key_arguments(["escrow", "list", "--", "--api-key"])  # after -- nothing is an option


def test_stream_watch_redraws_in_place_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class TTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    with Sandbox() as sandbox:
        payer, provider = sandbox.add_agent(balance="5.00"), sandbox.add_agent()
        server = sandbox.serve(port=0)
        with sandbox.client(payer.api_key) as client:
            escrow_id = client.create_escrow(provider.agent_id, "4.00").escrow_id
            client.release_partial(escrow_id, "1.00")
            client.refund(escrow_id)
        monkeypatch.setenv("PF_BASE_URL", server.base_url)
        monkeypatch.setenv("PF_API_KEY", payer.api_key)
        monkeypatch.setenv("COLUMNS", "200")  # wide enough for the full line (30-column bar)
        screen, err = TTY(), io.StringIO()
        monkeypatch.setattr("sys.stdout", screen)
        monkeypatch.setattr("sys.stderr", err)
        assert main(["stream", "watch", escrow_id]) == 0
    text = screen.getvalue()
    assert text.startswith("\r\x1b[2K" + escrow_id) and text.endswith("\n")
    assert "[#######~~~~~~~~~~~~~~~~~~~~~~~]" in text and "25.0%" in text
    assert "is refunded" in err.getvalue()
