"""The installed ``pf-metered`` command, run as a subprocess against a sandbox on loopback.

Every run is checked for the API key in stdout and stderr: it must never be there (except
``sandbox serve --print-keys``, which is asked to print it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from pf_metered.sandbox import Sandbox, SandboxAgent
from pf_metered.sandbox._http import AppRequest

BIN = Path(sys.executable).with_name("pf-metered")
pytestmark = pytest.mark.skipif(not BIN.exists(), reason="pf-metered is not installed in the venv")

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_API, EXIT_CONFIG = 0, 1, 2, 3, 4


class World:
    """A sandbox served on loopback with a funded payer and a provider."""

    def __init__(self) -> None:
        self.sandbox = Sandbox()
        self.payer: SandboxAgent = self.sandbox.add_agent(balance="100.00")
        self.provider: SandboxAgent = self.sandbox.add_agent()
        self.server = self.sandbox.serve(port=0)
        self.base_url = self.server.base_url
        self.secrets = {self.payer.api_key, self.provider.api_key}

    def agent(self, balance: str = "0") -> SandboxAgent:
        agent = self.sandbox.add_agent(balance=balance)
        self.secrets.add(agent.api_key)
        return agent

    def env(self, key: str | None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
        env["PF_BASE_URL"] = self.base_url
        if key is not None:
            env["PF_API_KEY"] = key
            self.secrets.add(key)
        env.update(extra)
        return env

    def run(
        self, *argv: str, key: str | None = "payer", timeout: float = 20, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        """Run ``pf-metered argv`` as the payer (or ``key``) with stdin closed (not a TTY)."""
        proc = subprocess.run(
            [str(BIN), *argv],
            env=self.env(self._key(key), **extra),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        self.assert_no_secret(proc.stdout, proc.stderr)
        return proc

    def run_many(self, argvs: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
        """Run several commands at once (they are independent) to keep the suite fast."""
        procs = [
            subprocess.Popen(
                [str(BIN), *a],
                env=self.env(self.payer.api_key),
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            for a in argvs
        ]
        done = []
        for argv, p in zip(argvs, procs):
            out, err = p.communicate(timeout=30)
            self.assert_no_secret(out, err)
            done.append(subprocess.CompletedProcess([str(BIN), *argv], p.returncode, out, err))
        return done

    def _key(self, key: str | None) -> str | None:
        if key == "payer":
            return self.payer.api_key
        if key == "provider":
            return self.provider.api_key
        return key

    def assert_no_secret(self, *texts: str) -> None:
        for text in texts:
            for secret in self.secrets:
                assert secret not in text, "an API key was printed"

    def close(self) -> None:
        self.sandbox.close()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    w = World()
    try:
        yield w
    finally:
        w.close()


def _json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == EXIT_OK, proc.stderr
    return json.loads(proc.stdout)


# -- help ---------------------------------------------------------------------------------


def test_help_runs_from_the_installed_command(world: World) -> None:
    top, leaf, bare = world.run_many([["--help"], ["stream", "watch", "--help"], []])
    assert top.returncode == EXIT_OK and top.stdout.startswith("usage: pf-metered")
    for word in ("PF_API_KEY", "PF_BASE_URL", "exit codes", "escrow", "mcp", "sandbox serve"):
        assert word in top.stdout
    assert leaf.returncode == EXIT_OK
    assert "--interval" in leaf.stdout and "--once" in leaf.stdout and "example" in leaf.stdout
    assert bare.returncode == EXIT_USAGE and "COMMAND" in bare.stderr


# -- escrows: table and JSON --------------------------------------------------------------


def test_escrow_create_list_status_release_refund(world: World) -> None:
    prov = world.provider.agent_id
    created = world.run("escrow", "create", prov, "5.00", "--memo", "translation job")
    assert created.returncode == EXIT_OK, created.stderr
    assert "Locked 5.00 USDC for " + prov in created.stdout
    escrow_id = re.search(r"escrow\s+(\S+)", created.stdout).group(1)

    listed = world.run("escrow", "list")
    assert listed.returncode == EXIT_OK
    header = listed.stdout.splitlines()[0].split()
    assert header == [
        "ESCROW",
        "STATUS",
        "AMOUNT",
        "RELEASED",
        "REMAINING",
        "REFUNDED",
        "PROVIDER",
        "MEMO",
    ]
    row = next(line for line in listed.stdout.splitlines() if line.startswith(escrow_id))
    assert row.split()[:6] == [escrow_id, "locked", "5.00", "0.00", "5.00", "0.00"]
    assert "translation job" in row and "[idem:" not in row

    released = world.run("escrow", "release", escrow_id, "1.25", "--memo", "chapter 1")
    assert released.returncode == EXIT_OK, released.stderr
    assert "Released 1.25 USDC" in released.stdout
    assert re.search(r"remaining\s+3\.75 USDC", released.stdout)

    data = _json(world.run("--json", "escrow", "release", escrow_id, "0.000001"))
    assert data["released_now"] == "0.000001"
    assert (data["released"], data["remaining"]) == ("1.250001", "3.749999")
    assert world.sandbox.escrow(escrow_id).released == Decimal("1.250001")

    status = world.run("escrow", "status", escrow_id)
    assert status.returncode == EXIT_OK
    assert re.search(r"released\s+1\.250001 USDC \(25\.0%\)", status.stdout)
    assert "releases (2):" in status.stdout and "chapter 1" in status.stdout
    assert re.search(r"progress\s+\[#######\.+\]", status.stdout)

    detail = _json(world.run("escrow", "status", escrow_id, "--json"))  # --json after the command
    assert detail["escrow_id"] == escrow_id and detail["status"] == "locked"
    assert [r["amount"] for r in detail["releases"]] == ["1.25", "0.000001"]

    listing = _json(world.run("escrow", "list", "--json", "--status", "locked"))
    assert escrow_id in [e["escrow_id"] for e in listing["escrows"]]
    assert listing["count"] == len(listing["escrows"])

    refunded = _json(world.run("--json", "escrow", "refund", escrow_id))
    assert (refunded["status"], refunded["refunded"], refunded["remaining"]) == (
        "refunded",
        "3.749999",
        "0.00",
    )
    assert world.sandbox.escrow(escrow_id).status == "refunded"

    again = world.run("escrow", "refund", escrow_id)
    assert again.returncode == EXIT_API
    assert again.stderr.startswith("pf-metered: error: ") and "invalid_status" in again.stderr


def test_escrow_list_empty_table(world: World) -> None:
    loner = world.agent()
    proc = world.run("escrow", "list", key=loner.api_key)
    assert proc.returncode == EXIT_OK and proc.stdout.strip() == "No escrows yet."
    assert _json(world.run("escrow", "list", "--json", key=loner.api_key)) == {
        "escrows": [],
        "count": 0,
    }


def test_faucet_claim_once(world: World) -> None:
    newcomer = world.agent()
    first = world.run("faucet", "claim", key=newcomer.api_key)
    assert first.returncode == EXIT_OK, first.stderr
    assert re.search(r"credited\s+1\.00 USDC", first.stdout)
    assert world.sandbox.balance(newcomer.agent_id) == Decimal("1.00")
    second = world.run("--json", "faucet", "claim", key=newcomer.api_key)
    assert second.returncode == EXIT_API and second.stdout == ""
    error = json.loads(second.stderr)["error"]
    assert error["api_code"] == "already_claimed" and error["exit_code"] == EXIT_API
    assert error["http_status"] == 409 and error["kind"] == "api"


def test_faucet_claim_for_an_agent_id_on_the_deployed_faucet(world: World) -> None:
    root = world.base_url.removesuffix("/api/v1")
    faucet = f"{root}/faucet"
    newcomer, other = world.agent(), world.agent()
    # no key needed: the deployed faucet takes the agent id
    first = world.run(
        "faucet", "claim", "--agent-id", newcomer.agent_id, key=None, PF_FAUCET_URL=faucet
    )
    assert first.returncode == EXIT_OK, first.stderr
    assert re.search(r"credited\s+1\.00 USDC", first.stdout)
    assert re.search(r"agent\s+" + newcomer.agent_id, first.stdout)
    # one claim per client address a day: the second is refused at once, saying when
    by_flag = world.run(
        "--json", "faucet", "claim", "--agent-id", other.agent_id, "--faucet-url", faucet, key=None
    )
    assert by_flag.returncode == EXIT_API
    refusal = json.loads(by_flag.stdout or by_flag.stderr)["error"]
    assert refusal["api_code"] == "ip_rate_limited"
    assert "try again in ~24h" in refusal["message"].lower()
    assert world.sandbox.balance(newcomer.agent_id) == Decimal("1.00")
    assert world.sandbox.balance(other.agent_id) == Decimal("0")
    # the deployed escrow dialect has no keyed faucet call: the error says what to type
    needs_id, stray_url = world.run_many(
        [
            ["faucet", "claim", "--base-url", f"{root}/deployed"],
            ["faucet", "claim", "--faucet-url", faucet],
        ]
    )
    for proc in (needs_id, stray_url):
        assert proc.returncode == EXIT_USAGE and "--agent-id" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


# -- exit codes -----------------------------------------------------------------------------


def test_usage_errors_exit_2(world: World) -> None:
    results = world.run_many(
        [
            ["escrow", "release", "esc_x", "1.1234567"],  # 7 places: refused before any request
            ["--json", "escrow", "list", "--status", "bogus"],
        ]
    )
    for proc in results:
        assert proc.returncode == EXIT_USAGE, (proc.args, proc.stderr)
        assert proc.stdout == ""
    assert "AMOUNT has more than 6 decimal places" in results[0].stderr
    assert "--status" in results[1].stderr


def test_api_errors_exit_3(world: World) -> None:
    results = world.run_many(
        [
            ["--json", "escrow", "status", "esc_nope"],
            ["escrow", "create", world.provider.agent_id, "100000.00"],  # more than the balance
        ]
    )
    for proc in results:
        assert proc.returncode == EXIT_API, (proc.args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert json.loads(results[0].stderr)["error"]["type"] == "NotFound"
    assert "insufficient_balance" in results[1].stderr


def test_bad_key_is_an_api_error_and_never_printed(world: World) -> None:
    odd_key = "Sup3rSecretKeyWithNoPrefix_0123456789"
    proc = world.run("escrow", "list", key=odd_key)
    assert proc.returncode == EXIT_API
    assert "unauthorized" in proc.stderr
    # run() already asserted the key is in neither stream; check once more for the record
    assert odd_key not in proc.stdout + proc.stderr


def test_config_errors_exit_4(world: World) -> None:
    no_key = world.run("escrow", "list", key=None)
    assert no_key.returncode == EXIT_CONFIG
    assert "PF_API_KEY" in no_key.stderr and "sandbox serve" in no_key.stderr
    insecure = world.run("escrow", "list", "--base-url", "http://escrow.example.com/api/v1")
    assert insecure.returncode == EXIT_CONFIG and "https" in insecure.stderr


def test_key_arguments_are_refused_without_echo(world: World) -> None:
    secret = "pf_live_ShouldNeverBeEchoed0123456789"
    world.secrets.add(secret)
    proc = world.run("escrow", "list", "--api-key", secret)
    assert proc.returncode == EXIT_USAGE
    assert "PF_API_KEY" in proc.stderr and "not shown" in proc.stderr


# -- stream watch ---------------------------------------------------------------------------


def _new_escrow(world: World, amount: str) -> str:
    with world.sandbox.client(world.payer.api_key) as client:
        return client.create_escrow(world.provider.agent_id, amount, memo="watch").escrow_id


def test_stream_watch_once_table_and_json(world: World) -> None:
    escrow_id = _new_escrow(world, "2.00")
    table, as_json, unknown = world.run_many(
        [
            ["stream", "watch", escrow_id, "--once"],
            ["stream", "watch", escrow_id, "--once", "--json"],
            ["stream", "watch", "esc_missing"],
        ]
    )
    assert unknown.returncode == EXIT_API and "not_found" in unknown.stderr
    assert table.returncode == EXIT_OK
    assert re.search(r"progress\s+\[\.{30}\]", table.stdout)
    assert re.search(r"remaining\s+2\.00 USDC", table.stdout)
    data = _json(as_json)
    assert (data["released"], data["remaining"], data["open"]) == ("0.00", "2.00", True)


def test_stream_watch_follows_releases_until_closed(world: World) -> None:
    escrow_id = _new_escrow(world, "2.00")
    reads = threading.Condition()
    watcher_reads = [0]

    def on_request(request: AppRequest) -> None:
        # count the watcher's reads (over loopback; the payer below talks in-process)
        if (
            request.method == "GET"
            and escrow_id in request.path
            and (request.client != "in-process")
        ):
            with reads:
                watcher_reads[0] += 1
                reads.notify_all()

    def after_read(n: int) -> None:
        """Wait until the watcher has *started* read ``n``, so read ``n - 1`` was answered."""
        with reads:
            assert reads.wait_for(lambda: watcher_reads[0] >= n, timeout=20), "watcher stalled"

    def pay_then_refund() -> None:
        # each step waits for the watcher's next read: no sleeps, yet every step is seen
        # after the watcher has shown the escrow untouched (its first line)
        with world.sandbox.client(world.payer.api_key) as client:
            for step in range(3):
                after_read(2 + step)
                client.release_partial(escrow_id, "0.50")
            after_read(5)
            client.refund(escrow_id)

    world.sandbox.before_handle = on_request
    payer = threading.Thread(target=pay_then_refund)
    payer.start()
    try:
        proc = world.run("stream", "watch", escrow_id, "--interval", "0.2", timeout=30)
    finally:
        payer.join()
        world.sandbox.before_handle = None
    assert proc.returncode == EXIT_OK, proc.stderr
    lines = proc.stdout.splitlines()
    # stdout is a pipe: one line per change, never a repeated line
    assert len(lines) == len(set(lines)) and len(lines) >= 2
    assert "released 0.00 / 2.00 USDC" in lines[0]
    assert "[" + "#" * 22 + "~" * 8 + "]" in lines[-1] and "refunded" in lines[-1]
    assert "released 1.50 / 2.00 USDC" in lines[-1] and "75.0%" in lines[-1]
    assert "is refunded" in proc.stderr

    ndjson = world.run("stream", "watch", escrow_id, "--json")
    rows = [json.loads(line) for line in ndjson.stdout.splitlines()]
    assert rows[-1]["status"] == "refunded" and rows[-1]["releases"] == 3


def test_stream_watch_timeout(world: World) -> None:
    escrow_id = _new_escrow(world, "1.00")
    timed = world.run("stream", "watch", escrow_id, "--interval", "0.2", "--timeout", "0.5")
    assert timed.returncode == EXIT_OK and "stopped watching" in timed.stderr


# -- sandbox serve ---------------------------------------------------------------------------


def _start_sandbox(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
    proc = subprocess.Popen(
        [str(BIN), "sandbox", "serve", "--port", "0", *extra],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    m = re.match(r"pf-metered sandbox serving (http://127\.0\.0\.1:\d+/api/v1)", first)
    assert m, first + (proc.stderr.read() if proc.poll() is not None else "")
    return proc, m.group(1)


def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM, then what is left on stdout/stderr (read through the same text buffers)."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == EXIT_OK, err
    return out, err


def test_sandbox_serve_keys_file_and_ledger(tmp_path: Path) -> None:
    keys = tmp_path / "demo.env"
    ledger = tmp_path / "sandbox.db"
    proc, base_url = _start_sandbox(
        tmp_path, "--keys-file", str(keys), "--ledger", str(ledger), "--balance", "12.50"
    )
    try:
        assert stat.S_IMODE(keys.stat().st_mode) == 0o600
        exports = dict(re.findall(r"^export (\w+)=(\S+)", keys.read_text(), re.M))
        assert exports["PF_BASE_URL"] == base_url
        payer_key = exports["PF_API_KEY"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PF_")}
        env.update(PF_BASE_URL=base_url, PF_API_KEY=payer_key)
        listed = subprocess.run(
            [str(BIN), "escrow", "list"],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert listed.returncode == EXIT_OK and listed.stdout.strip() == "No escrows yet."
        assert payer_key not in listed.stdout + listed.stderr
        # the file also points register and the agent-id faucet at this sandbox
        root = base_url.removesuffix("/api/v1")
        assert (exports["PF_FAUCET_URL"], exports["PF_CASINO_URL"]) == (
            f"{root}/faucet",
            f"{root}/casino",
        )
        env.pop("PF_API_KEY")
        env.update(PF_FAUCET_URL=exports["PF_FAUCET_URL"], PF_CASINO_URL=exports["PF_CASINO_URL"])
        agent_file = tmp_path / "agent.env"
        registered = subprocess.run(
            [str(BIN), "--json", "register", "--keys-file", str(agent_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        new_agent = _json(registered)["agent_id"]
        new_key = re.search(r"PF_API_KEY=(\S+)", agent_file.read_text()).group(1)
        assert new_key not in registered.stdout + registered.stderr
        # a second register into the same file is refused before any agent is made: that
        # file's key has no other copy
        again = subprocess.run(
            [str(BIN), "register", "--keys-file", str(agent_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert again.returncode == EXIT_USAGE and "already exists" in again.stderr
        assert new_key in agent_file.read_text()
        claimed = subprocess.run(
            [str(BIN), "faucet", "claim", "--agent-id", new_agent],
            env=env,
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        # registration already credited the $1 grant: the faucet refuses a second one
        assert claimed.returncode == EXIT_API and "already_claimed" in claimed.stderr
    finally:
        out, err = _stop(proc)
    assert payer_key not in out + err and exports["PF_PROVIDER_API_KEY"] not in out + err
    assert "balance 12.50 USDC" in out and f"source {keys}" in out
    assert "pf_test_" not in out  # keys hidden without --print-keys
    assert ledger.exists() and ledger.stat().st_size > 0


def test_sandbox_serve_print_keys_only_when_asked(tmp_path: Path) -> None:
    proc, _ = _start_sandbox(tmp_path, "--print-keys")
    out, _err = _stop(proc)
    assert re.search(r"export PF_API_KEY=pf_test_\S+", out)


def test_mcp_caps_release_only_what_the_tools_created_unless_opted_in():
    from pf_metered.cli._args import build_parser
    from pf_metered.cli._mcp import _caps

    parser = build_parser()
    assert _caps(parser.parse_args(["mcp", "--sandbox"])).release_any_escrow is False  # type: ignore[attr-defined]
    opted = _caps(parser.parse_args(["mcp", "--sandbox", "--release-any-escrow"]))
    assert opted.release_any_escrow is True  # type: ignore[attr-defined]
