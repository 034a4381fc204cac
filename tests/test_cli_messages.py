"""What a newcomer sees when something is wrong: each message names the setting to check.

``pf_metered.cli.main`` runs in-process against a sandbox this test serves on a loopback port of
its own; the missing-extra case runs in a subprocess (it hides a package from the import system).
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pf_metered import PaymentStream, Sandbox, StreamClosed
from pf_metered.cli import main
from pf_metered.client._secrets import redact_text


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_tty_no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    for name in ("PF_API_KEY", "PF_BASE_URL", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def served() -> Iterator[tuple[Sandbox, str]]:
    with Sandbox() as sandbox:
        yield sandbox, sandbox.serve(port=0).base_url


def _last_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("pf-metered: error: "), err
    assert "Traceback" not in err
    return lines[-1]


def test_wrong_key_says_check_pf_api_key(
    served: tuple[Sandbox, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, url = served
    monkeypatch.setenv("PF_BASE_URL", url)
    monkeypatch.setenv("PF_API_KEY", "pf_test_Qm4Tz8Wc1Yh6Jn3Fs0")
    assert main(["escrow", "list"]) == 3
    err = _last_error(capsys.readouterr().err)
    assert "API key refused (HTTP 401): check PF_API_KEY" in err
    assert url in err
    assert "B[redacted]" not in err and "Bearer" in err  # the scrubber no longer eats the scheme
    assert "Qm4Tz8Wc1Y" not in err


def test_redaction_keeps_the_auth_scheme_and_hides_the_value() -> None:
    assert redact_text("a valid 'Authorization: Bearer <api key>' is required").startswith(
        "a valid 'Authorization: Bearer "
    )
    shown = redact_text("Authorization: Bearer pf_live_abcdef0123456789")
    assert shown.startswith("Authorization: Bearer ") and "abcdef0123" not in shown
    headers = redact_text(str([(b"Authorization", b"Bearer Zq9secretvalue77")]))
    assert "secretvalue" not in headers and "Bearer" in headers
    assert "s3cr3tvalue" not in redact_text("authorization: s3cr3tvalue")


def test_refused_connection_names_the_url_and_the_sandbox(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:  # bound, never listening: connections to it are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1"
        monkeypatch.setenv("PF_API_KEY", "pf_test_Zx9Qw7Lp3Kd8Vb2Nr5")
        monkeypatch.setattr(time, "sleep", lambda _s: None)  # the client's backoff, skipped
        assert main(["escrow", "list", "--base-url", url]) == 3
    err = capsys.readouterr().err
    last = _last_error(err)
    assert f"cannot reach {url}" in last
    assert "is `pf-metered sandbox serve` running?" in last
    # each retry said what it waits for, before the final error
    assert re.search(r"pf-metered: retrying GET /escrow in [0-9.]+ s after APIConnectionError", err)


def test_sandbox_port_in_use_is_a_usage_error_suggesting_port_0(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert main(["sandbox", "serve", "--port", str(port)]) == 2
    err = _last_error(capsys.readouterr().err)
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port 0" in err
    assert "bug" not in err


def test_ctrl_c_at_the_key_prompt_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(prompt: str = "") -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("sys.stdin", TTY(""))
    monkeypatch.setattr("getpass.getpass", interrupted)
    assert main(["escrow", "list"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "run in a terminal" not in err


def test_ctrl_d_at_the_key_prompt_says_no_key_was_entered(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("sys.stdin", TTY(""))
    monkeypatch.setattr("getpass.getpass", eof)
    assert main(["escrow", "list"]) == 4
    err = _last_error(capsys.readouterr().err)
    assert "no API key entered" in err and "run in a terminal" not in err


def test_missing_extra_prints_the_pip_line() -> None:
    code = (
        "import sys; sys.modules['mcp'] = None\n"  # as if the mcp extra were not installed
        "from pf_metered.cli import main\n"
        "sys.exit(main(['mcp', '--sandbox']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert proc.returncode == 4, proc.stderr
    assert "pip install 'pf-metered[mcp]'" in proc.stderr


def _drawn_lines(screen: str) -> list[str]:
    assert screen.startswith("\r\x1b[2K")
    return [part for part in screen.rstrip("\n").split("\r\x1b[2K") if part]


@pytest.mark.parametrize("columns", [80, 120, 40])
def test_stream_watch_fits_the_terminal_and_redraws_in_place(
    columns: int,
    served: tuple[Sandbox, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sandbox, url = served
    payer, provider = sandbox.add_agent(balance="5.00"), sandbox.add_agent()
    with sandbox.client(payer.api_key) as client:
        escrow_id = client.create_escrow(provider.agent_id, "4.00").escrow_id
        client.release_partial(escrow_id, "1.00")
        client.refund(escrow_id)
    monkeypatch.setenv("PF_BASE_URL", url)
    monkeypatch.setenv("PF_API_KEY", payer.api_key)
    monkeypatch.setenv("COLUMNS", str(columns))  # what shutil.get_terminal_size() reads first
    screen = TTY()
    monkeypatch.setattr("sys.stdout", screen)
    assert main(["stream", "watch", escrow_id]) == 0
    lines = _drawn_lines(screen.getvalue())
    assert lines and all(len(line) < columns for line in lines)  # never wraps into stale rows
    assert "\n" not in "".join(lines)
    assert "25.0%" in lines[-1]  # the share released always shows
    if columns >= 80:  # and at 80 columns every figure that matters, with a bar
        assert "released 1.00 / 4.00 USDC" in lines[-1] and "refunded 3.00" in lines[-1]
        assert re.search(r"\[#+~+\]", lines[-1])


def test_record_after_close_says_the_stream_is_closed() -> None:
    with Sandbox() as sandbox:
        payer, provider = sandbox.add_agent(balance="5.00"), sandbox.add_agent()
        stream = PaymentStream(
            sandbox.client(payer.api_key), provider.agent_id, rate="0.01", batch=10, budget="1.00"
        )
        with pytest.raises(StreamClosed, match=r"call open\(\)"):
            stream.record()  # never opened: the hint to open it is right
        stream.open()
        stream.record(3)
        stream.close()
        with pytest.raises(StreamClosed) as closed:
            stream.record()
    assert "closed" in str(closed.value) and "open()" not in str(closed.value)
