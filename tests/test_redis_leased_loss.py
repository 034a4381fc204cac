"""Redis leased mode: a worker SIGKILLed right after recording, or from outside while it
counts, loses at most one chunk (one lease).

Issue 13.12: with ``chunk=32`` a worker killed right after ``record(50)`` lost all 50 units
(its lease had been grown to fit the 50). Now a count larger than a chunk goes to Redis in
one atomic call, and a worker pushes what it consumed before its unpushed units would pass a
chunk, so what a kill can take is at most ``chunk`` units, as the docs say. Each worker below
is a real process that kills itself (SIGKILL: no exit hook runs) right after its last count.
"""

from __future__ import annotations

import mmap
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pf_metered.meter.redis_store import RedisStore
from pf_metered.meter.store import StreamConfig

pytestmark = pytest.mark.redis

CHUNK = 32

_WORKER = """
import os, signal, sys
from pf_metered.meter.redis_store import RedisStore
store = RedisStore(sys.argv[1], prefix=sys.argv[2], chunk=int(sys.argv[3]))
for n in map(int, sys.argv[5].split(",")):
    store.add_units(sys.argv[4], n)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize(
    "counts",
    [[50], [10, 10, 10, 10], [1] * 100, [31, 2, 31, 33], [32, 32, 32]],
    ids=["one-50", "4x10", "100x1", "mixed", "3x32"],
)
def test_killed_worker_loses_at_most_one_chunk(
    redis_url: str, redis_prefix: str, counts: list[int]
) -> None:
    sid = uuid.uuid4().hex
    store = RedisStore(redis_url, prefix=redis_prefix)
    store.create(
        StreamConfig(
            stream_id=sid, to_agent_id="ag_p", rate="0.001", budget_micro=10_000, max_units=10_000
        )
    )
    store.set_escrow(sid, "esc_test")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _WORKER,
            redis_url,
            redis_prefix,
            str(CHUNK),
            sid,
            ",".join(map(str, counts)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == -9, done.stderr  # died of SIGKILL, after its last count
    fleet = store.fleet_status(sid)
    assert fleet is not None
    recorded = sum(counts)
    counted = fleet.state.units
    assert counted <= recorded
    assert recorded - counted <= CHUNK, f"lost {recorded - counted} units with chunk={CHUNK}"
    store.close()


_FLEET_WORKER = """
import mmap, struct, sys
from pf_metered.meter.redis_store import RedisStore
url, prefix, sid, chunk, path = sys.argv[1:6]
store = RedisStore(url, prefix=prefix, chunk=int(chunk))
with open(path, "r+b") as f:
    mm = mmap.mmap(f.fileno(), 16)
n = 0
while not mm[8]:  # the test sets byte 8 to stop a survivor
    n += 1
    mm[:8] = struct.pack("q", n)  # before the add: n counts the one under way
    store.add_units(sid, 1)
store.close()  # a survivor pushes what it consumed and gives its lease back
print(n)
"""


def _count(mm: mmap.mmap) -> int:
    return int(struct.unpack("q", mm[:8])[0])


def test_workers_killed_mid_traffic_lose_at_most_one_lease_each(
    redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    """Four worker processes count into one stream; the test SIGKILLs two of them while they
    count (at different points, from outside). Each killed worker loses at most one lease
    (``chunk`` units) plus the one add it was inside; the survivors lose nothing; nothing is
    counted twice."""
    sid = uuid.uuid4().hex
    store = RedisStore(redis_url, prefix=redis_prefix)
    store.create(StreamConfig(sid, "ag_p", "0.000001", 10**9, 10**9))
    store.set_escrow(sid, "esc_test")
    maps, procs = [], []
    argv = [sys.executable, "-c", _FLEET_WORKER, redis_url, redis_prefix, sid, str(CHUNK)]
    for i in range(4):
        path = tmp_path / f"w{i}"
        path.write_bytes(bytes(16))
        with path.open("r+b") as f:
            maps.append(mmap.mmap(f.fileno(), 16))
        procs.append(
            subprocess.Popen(
                [*argv, str(path)],
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + 120
    for victim, at in ((0, 20 * CHUNK + 7), (1, 45 * CHUNK + 19)):
        while _count(maps[victim]) < at:  # wait for the victim to get there (or die trying)
            assert procs[victim].poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        procs[victim].send_signal(signal.SIGKILL)
        assert procs[victim].wait(timeout=30) == -signal.SIGKILL
    told_killed = _count(maps[0]) + _count(maps[1])
    for p, mm in zip(procs[2:], maps[2:], strict=True):
        while _count(mm) < 3 * CHUNK + 5:  # a survivor, too, counts past a few leases
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.001)
        mm[8] = 1
    survivors = [int(p.communicate(timeout=60)[0]) for p in procs[2:]]
    assert survivors == [_count(maps[2]), _count(maps[3])] and min(survivors) > 0
    fleet = store.fleet_status(sid)
    assert fleet is not None
    counted_killed = fleet.state.units - sum(survivors)  # survivors: every unit counted
    assert 0 <= counted_killed <= told_killed  # nothing counted twice
    assert counted_killed > 20 * CHUNK  # the victims had pushed: a kill mid-traffic
    assert told_killed - counted_killed <= 2 * (CHUNK + 1)  # ≤ one lease (+ the add) each
    assert fleet.lost_units == 0  # no push arrived after its lease was revoked
    for mm in maps:
        mm.close()
    store.close()
