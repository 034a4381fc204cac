"""resume() while the stream's first process is still alive (issue 13.2).

The first holder has claimed a batch and its release is on the wire (held inside the sandbox
by ``before_handle``). A resume from a second store handle must refuse to take that release
over (``StreamBusy`` naming the owner and what to do) — on a server that ignores idempotency
keys, taking it over would pay the batch twice. When the owner is gone (another process that
exited), resume takes over at once.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pf_metered import PaymentStream
from pf_metered.errors import StreamBusy
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import new_owner_id, owner_alive
from pf_metered.sandbox import Sandbox
from pf_metered.sandbox._http import AppRequest


def test_resume_refuses_a_live_owners_release_and_nothing_is_paid_twice(tmp_path: Path) -> None:
    sb = Sandbox(honour_idempotency=False)  # like a server that ignores Idempotency-Key
    payer = sb.add_agent(balance="100")
    provider = sb.add_agent()
    client = sb.client(payer.api_key)
    db = str(tmp_path / "meter.db")
    stream = PaymentStream(
        client, provider.agent_id, "0.25", batch=4, budget="10", store=db, background=False
    ).open()
    on_wire = threading.Event()
    go_on = threading.Event()

    def hold_first_release(request: AppRequest) -> None:
        if request.method == "POST" and "release" in request.path and not on_wire.is_set():
            on_wire.set()
            assert go_on.wait(30)

    sb.before_handle = hold_first_release
    stream.record(4)  # one batch due: 1.00 owed
    sender = threading.Thread(target=stream.pump)
    sender.start()
    assert on_wire.wait(30)
    other = sb.client(payer.api_key)
    with pytest.raises(StreamBusy) as refused:
        PaymentStream.resume(db, stream.stream_id, other)
    message = str(refused.value)
    assert "alive" in message and "retry" in message.lower()
    assert refused.value.owner.split(":")[1].isdigit()
    go_on.set()
    sender.join(30)
    sb.before_handle = None
    escrow = sb.escrow(stream.escrow_id)
    assert escrow.released_micro == 1_000_000  # paid once, not twice
    receipt = stream.close()
    assert receipt.paid_micro == 1_000_000
    assert sb.escrow(stream.escrow_id).released_micro == 1_000_000
    sb.close()


_HOLDER = """
import os, sys
from pf_metered.client import EscrowClient
from pf_metered.stream import PaymentStream
client = EscrowClient(os.environ["PFM_KEY"], base_url=os.environ["PFM_BASE_URL"],
                      server_honours_idempotency=False)
s = PaymentStream(client, os.environ["PFM_PROVIDER"], "0.25", batch=4, budget="10",
                  store=os.environ["PFM_JOURNAL"], background=False)
s.open()
s.record(4)
print(s.stream_id, s.escrow_id, flush=True)
s.pump()  # the release is held on the wire by the parent's server
sys.stdin.readline()
s.close()
print("closed", flush=True)
"""


def test_resume_refuses_while_another_live_process_sends(tmp_path: Path) -> None:
    import os

    sb = Sandbox(honour_idempotency=False)
    payer, provider = sb.add_agent(balance="100"), sb.add_agent()
    server = sb.serve()
    on_wire, go_on = threading.Event(), threading.Event()

    def hold(request: AppRequest) -> None:
        if request.method == "POST" and "release" in request.path and not on_wire.is_set():
            on_wire.set()
            assert go_on.wait(30)

    sb.before_handle = hold
    db = str(tmp_path / "meter.db")
    env = {
        **os.environ,
        "PFM_KEY": payer.api_key,
        "PFM_BASE_URL": server.base_url,
        "PFM_PROVIDER": provider.agent_id,
        "PFM_JOURNAL": db,
        "PF_METERED_SIGTERM": "0",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        stream_id, escrow_id = proc.stdout.readline().split()
        assert on_wire.wait(30)
        with pytest.raises(StreamBusy) as refused:
            PaymentStream.resume(db, stream_id, sb.client(payer.api_key))
        assert f":{proc.pid}:" in refused.value.owner
        assert "alive" in str(refused.value) and "retry" in str(refused.value)
        go_on.set()
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "closed"
        assert proc.wait(30) == 0
    finally:
        go_on.set()
        if proc.poll() is None:
            proc.kill()
    sb.before_handle = None
    escrow = sb.escrow(escrow_id)
    assert escrow.released_micro == 1_000_000  # paid once
    assert escrow.refunded_micro == 9_000_000
    sb.close()


def test_resume_takes_over_at_once_when_the_owner_exited(tmp_path: Path) -> None:
    """A pending intent whose owner process has exited is taken over with no lease wait."""
    sb = Sandbox(honour_idempotency=False)
    payer = sb.add_agent(balance="100")
    provider = sb.add_agent()
    client = sb.client(payer.api_key)
    db = str(tmp_path / "meter.db")
    stream = PaymentStream(
        client, provider.agent_id, "0.25", batch=4, budget="10", store=db, background=False
    ).open()
    stream.record(4)
    store = SQLiteStore(db)
    intent = store.claim(stream.stream_id, min_units=1)
    assert intent is not None
    # Hand the claim to a process that is gone: a child that printed its own owner id.
    child = subprocess.run(
        [sys.executable, "-c", "from pf_metered.meter.store import new_owner_id as n; print(n())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = child.stdout.strip()
    assert owner_alive(dead) is False
    store.close()
    conn = sqlite3.connect(db)  # the test plays the dead process's journal entry
    with conn:
        conn.execute("UPDATE intents SET owner = ? WHERE stream_id = ?", (dead, stream.stream_id))
    conn.close()
    resumed = PaymentStream.resume(db, stream.stream_id, sb.client(payer.api_key))
    assert resumed.status().released_micro == 1_000_000
    receipt = resumed.close()
    assert receipt.paid_micro == 1_000_000
    assert sb.escrow(stream.escrow_id).released_micro == 1_000_000
    sb.close()


def test_owner_ids_carry_host_and_pid() -> None:
    assert owner_alive(new_owner_id()) is True
    assert owner_alive("not-an-owner-id") is None
    assert owner_alive("some-other-host:123:abc") is None
