"""Exit, SIGTERM and fork in one module with explicit phases (issue 13.13).

A stream a process opened and never closed must not lock money silently: a stream nothing
else could finish (in-memory store) is closed at exit — its counted units paid, the rest
refunded — and one whose state is journaled (SQLite) is flushed and reported on stderr with
its escrow id and the commands that free it. Each child below is a real process that exits
without calling ``close()``, against a loopback sandbox it does not own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pf_metered import _lifecycle
from pf_metered.sandbox import Sandbox

_CHILD = """
import os, sys
from pf_metered.client import EscrowClient
from pf_metered.stream import PaymentStream
client = EscrowClient(os.environ["PFM_KEY"], base_url=os.environ["PFM_BASE_URL"])
s = PaymentStream(client, os.environ["PFM_PROVIDER"], "0.01", batch=1000, budget="2",
                  store=os.environ.get("PFM_JOURNAL") or None)
s.open()
s.record(7)
print(s.escrow_id, s.stream_id, flush=True)
# exits without close()
"""


def _run_child(sb: Sandbox, journal: str = "") -> tuple[str, str, str]:
    payer, provider = sb.add_agent(balance="10"), sb.add_agent()
    server = sb.serve()
    env = {
        **os.environ,
        "PFM_KEY": payer.api_key,
        "PFM_BASE_URL": server.base_url,
        "PFM_PROVIDER": provider.agent_id,
        "PFM_JOURNAL": journal,
    }
    done = subprocess.run(
        [sys.executable, "-c", _CHILD],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    escrow_id, stream_id = done.stdout.split()
    return escrow_id, stream_id, done.stderr


def test_an_in_memory_stream_is_closed_at_exit() -> None:
    with Sandbox() as sb:
        escrow_id, _sid, _err = _run_child(sb)
        escrow = sb.escrow(escrow_id)
        assert escrow.released_micro == 70_000  # the 7 counted units, paid
        assert escrow.refunded_micro == 2_000_000 - 70_000  # the rest back to the payer
        assert not escrow.is_open


def test_a_journaled_stream_is_flushed_and_reported_with_the_way_out(tmp_path: Path) -> None:
    journal = str(tmp_path / "j.db")
    with Sandbox() as sb:
        escrow_id, stream_id, err = _run_child(sb, journal)
        escrow = sb.escrow(escrow_id)
        assert escrow.released_micro == 70_000  # flushed
        assert escrow.is_open  # kept for resume: the journal knows the stream
        assert escrow_id in err and stream_id in err
        assert "PaymentStream.resume" in err
        assert f"pf-metered escrow refund {escrow_id}" in err


def test_phases_run_in_their_order_and_a_failing_hook_does_not_stop_the_rest() -> None:
    seen: list[str] = []

    def boom() -> None:
        seen.append("close-boom")
        raise RuntimeError("a hook that fails (test)")

    hooks = {
        _lifecycle.STORES: lambda: seen.append("stores"),
        _lifecycle.REPORT: lambda: seen.append("report"),
        _lifecycle.FLUSH: lambda: seen.append("flush"),
    }
    for phase, hook in hooks.items():  # registered in reverse: order must not matter
        _lifecycle.on(phase, hook)
    _lifecycle.on(_lifecycle.CLOSE, boom)
    try:
        assert _lifecycle.run_exit(timeout=10)
    finally:
        for phase, hook in hooks.items():
            _lifecycle._hooks[phase].remove(hook)
        _lifecycle._hooks[_lifecycle.CLOSE].remove(boom)
    mine = [s for s in seen if s in ("close-boom", "flush", "report", "stores")]
    assert mine == ["close-boom", "flush", "report", "stores"]


def test_unknown_phase_is_refused() -> None:
    with pytest.raises(ValueError, match="phase"):
        _lifecycle.on("later", lambda: None)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_the_parents_streams() -> None:
    class Probe:
        pass

    probe = Probe()
    _lifecycle.track(probe, close_at_exit=True)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report how many streams it would close at exit
            os.write(w, str(len(_lifecycle.tracked("close"))).encode())
            os._exit(0)
        os.close(w)
        got = os.read(r, 16).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert got == "0"
        assert probe in _lifecycle.tracked("close")
    finally:
        _lifecycle.forget(probe)
