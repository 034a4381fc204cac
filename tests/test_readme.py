"""The README is a real program: every Python block runs on its own, every shell line is run.

Python blocks run one by one, each in a fresh namespace with no ``PF_*`` variable set, so a
block that leans on a name from another block, or on a key, fails here. Shell lines run against
``pf-metered sandbox serve`` started by this test on a free loopback port of its own; each line
of every ``sh`` block must be run below or listed in ``NOT_RUN`` with the reason, so a new line
cannot slip into the README untested.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BIN = Path(sys.executable).with_name("pf-metered")


def _blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def python_blocks() -> list[str]:
    return _blocks("python")


def shell_lines() -> list[str]:
    """Every command in the README's ``sh`` blocks, comments and continuation lines dropped."""
    lines = []
    for block in _blocks("sh"):
        for raw in block.splitlines():
            command = raw.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                lines.append(command)
    return lines


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PF_")}


def _run_block(block: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, object], str]:
    for name in [k for k in os.environ if k.startswith("PF_")]:
        monkeypatch.delenv(name)
    out = io.StringIO()
    namespace: dict[str, object] = {"__name__": "readme"}
    with contextlib.redirect_stdout(out):
        exec(compile(block, str(README), "exec"), namespace)  # our own README
    return namespace, out.getvalue()


# -- Python ------------------------------------------------------------------------------------


def test_the_readme_has_the_blocks_these_tests_expect() -> None:
    assert len(python_blocks()) >= 5
    assert all("Sandbox()" in block for block in python_blocks()), "each block runs on Sandbox()"


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_runs_on_its_own(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, out = _run_block(python_blocks()[index], monkeypatch)
    assert out.strip(), "each block prints what it shows"
    sandbox = namespace["sandbox"]
    sandbox.audit()  # type: ignore[attr-defined]  # the ledger adds up after every block
    sandbox.close()  # type: ignore[attr-defined]


def test_quick_start_runs_and_pays_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    namespace, out = _run_block(python_blocks()[0], monkeypatch)
    receipt = str(namespace["stream"].receipt)  # type: ignore[attr-defined]
    assert out.strip() == receipt.strip()
    assert "1,234" in receipt  # units
    assert "1.234 USDC" in receipt  # paid: rate × units, exact
    assert "3.766 USDC" in receipt  # refunded: budget − paid


def test_streams_block_shows_status_and_a_closed_receipt(monkeypatch: pytest.MonkeyPatch) -> None:
    block = next(b for b in python_blocks() if "every(units=100)" in b)
    namespace, out = _run_block(block, monkeypatch)
    receipt = namespace["receipt"]
    assert receipt.units == 1 and receipt.paid_micro == 1000  # type: ignore[attr-defined]
    assert out.splitlines()[0] == "1"  # status().pending_units before close: the one unit


def test_too_small_a_budget_is_refused_by_the_constructor_naming_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    block = next(b for b in python_blocks() if "except InvalidInput" in b)
    _, out = _run_block(block, monkeypatch)
    assert out.startswith("budget - must be at least 1.00")


def test_compute_time_and_feeds_block_pays_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    block = next(b for b in python_blocks() if "DataFeedPayments" in b)
    namespace, out = _run_block(block, monkeypatch)
    job = namespace["job"].receipt  # type: ignore[attr-defined]
    assert job.units > 0 and job.paid_micro + job.refunded_micro == job.budget_micro
    assert out.strip().splitlines()[-1] == "0.250000"  # 2,500 price ticks at 0.0001


def test_readme_imports_only_public_names() -> None:
    import pf_metered

    for block in python_blocks():
        for names in re.findall(r"^from pf_metered import (.+)$", block, flags=re.M):
            for name in names.split(","):
                assert name.strip() in pf_metered.__all__, name


def test_readme_names_the_two_commands_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./scripts/demo" in text
    assert "./scripts/test" in text and "./scripts/test" in ci


# -- shell -------------------------------------------------------------------------------------

NOT_RUN = {
    "./scripts/test": "it is the command that runs this test",
    "pf-metered stream watch esc_…": "run below with a real escrow id and --once",
    "export PF_PROVIDER_ID=ag_…": "demo.env exports the sandbox provider's id",
}
"""README shell lines not run verbatim, and why."""


class Served:
    """``pf-metered sandbox serve --keys-file demo.env`` in a directory of the test's own."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            # --port 0: the README's command on a port this test owns, not the default 8787
            [str(BIN), "sandbox", "serve", "--keys-file", "demo.env", "--port", "0"],
            cwd=workdir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        match = re.match(r"pf-metered sandbox serving (http://127\.0\.0\.1:\d+/api/v1)", first)
        assert match, first
        self.base_url = match.group(1)
        self.ran: list[str] = []

    def sh(self, line: str, *, sources: tuple[str, ...] = ("demo.env",), timeout: float = 60):
        """Run one README line in bash, with the keys files sourced as the README says."""
        prefix = "".join(f"source {shlex.quote(f)} && " for f in sources)
        proc = subprocess.run(
            ["bash", "-c", prefix + line],
            cwd=self.workdir,
            env={
                **_clean_env(),
                "PATH": f"{BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "XDG_DATA_HOME": str(self.workdir),  # `pf-metered mcp`'s state file stays here
            },
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, f"{line!r} exited {proc.returncode}: {proc.stderr[-2000:]}"
        assert "pf_test_" not in proc.stdout + proc.stderr, "a key was printed"
        return proc

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    server = Served(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def _demo_argv(line: str) -> str:
    """``./scripts/demo ARGS`` without its bootstrap: scripts/demo execs exactly this."""
    demo = (ROOT / "scripts" / "demo").read_text(encoding="utf-8")
    assert 'exec python examples/inference_stream.py "$@"' in demo
    args = line.removeprefix("./scripts/demo").strip()
    example = ROOT / "examples" / "inference_stream.py"
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(example))} {args}".strip()


def test_every_shell_line_is_run_or_says_why_not() -> None:
    handled = set(NOT_RUN) | set(RUN_BY_THE_TESTS_BELOW)
    missing = [line for line in shell_lines() if line not in handled]
    assert not missing, f"README shell lines no test runs: {missing}"
    stale = [line for line in handled if line not in shell_lines()]
    assert not stale, f"lines these tests expect that the README no longer has: {stale}"


RUN_BY_THE_TESTS_BELOW = {
    "./scripts/demo",
    "pf-metered sandbox serve --keys-file demo.env",
    "source demo.env && pf-metered escrow list",
    'pf-metered escrow create "$PF_PROVIDER_ID" 5.00 --memo demo',
    "pf-metered mcp",
    "pf-metered mcp --sandbox",
    "pf-metered register --keys-file agent.env",
    "source agent.env",
    "./scripts/demo --calls 200 --budget 1.00",
}


def test_the_command_line_block_against_a_served_sandbox(served: Served) -> None:
    listed = served.sh("pf-metered escrow list", sources=("demo.env",))
    assert listed.stdout.strip() == "No escrows yet."
    created = served.sh('pf-metered escrow create "$PF_PROVIDER_ID" 5.00 --memo demo')
    escrow_id = re.search(r"\besc_[0-9a-f]+", created.stdout)
    assert escrow_id and "Locked 5.00 USDC" in created.stdout
    watched = served.sh(f"pf-metered stream watch {escrow_id.group(0)} --once")
    assert "5.00 USDC" in watched.stdout and "locked" in watched.stdout
    assert "serving on stdio" in served.sh("pf-metered mcp").stderr
    assert "serving on stdio (sandbox)" in served.sh("pf-metered mcp --sandbox").stderr


def test_the_demo_runs_as_the_two_commands_section_says() -> None:
    proc = subprocess.run(
        ["bash", "-c", _demo_argv("./scripts/demo")],
        cwd=ROOT,
        env=_clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\| paid\s+\|\s+1\.234 USDC \|", proc.stdout), proc.stdout


def test_going_live_in_three_steps_against_a_served_sandbox(served: Served) -> None:
    """The README's three steps, with the sandbox standing in for the live service."""
    # 1. get a key: the registration service is the sandbox's (demo.env sets PF_CASINO_URL)
    registered = served.sh("pf-metered register --keys-file agent.env")
    agent = re.search(r"Registered agent (\S+);", registered.stdout)
    assert agent, registered.stdout
    keys = (served.workdir / "agent.env").read_text(encoding="utf-8")
    assert (served.workdir / "agent.env").stat().st_mode & 0o077 == 0  # only the owner reads it
    assert "export PF_API_KEY=" in keys and "PF_API_KEY" not in registered.stdout
    # 2. fund it: registration itself credits the faucet's grant (as the live service does), and
    # says so; a faucet claim afterwards is refused as a second grant (409, or 429 once a day per
    # address), and the stream below spends the grant.
    assert "no faucet claim is needed" in registered.stdout, registered.stdout
    claim = subprocess.run(
        ["bash", "-c", f"source demo.env && pf-metered faucet claim --agent-id {agent.group(1)}"],
        cwd=served.workdir,
        env={**_clean_env(), "PATH": f"{BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    refused = ("already_claimed", "ip_rate_limited")
    assert claim.returncode != 0 and any(r in claim.stderr for r in refused), claim.stderr
    # 3. the same stream, on the new agent's key: source agent.env after demo.env (its URLs)
    ran = served.sh(
        _demo_argv("./scripts/demo --calls 200 --budget 1.00"),
        sources=("demo.env", "agent.env"),
        timeout=120,
    )
    assert re.search(r"\| units\s+\|\s+200 \|", ran.stdout), ran.stdout
    assert re.search(r"\| paid\s+\|\s+0\.20 USDC \|", ran.stdout), ran.stdout  # 200 × 0.001
    assert re.search(r"\| refunded\s+\|\s+0\.80 USDC \|", ran.stdout), ran.stdout
