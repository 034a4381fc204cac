"""Redis leased mode: a worker SIGKILLed right after recording loses at most one chunk.

Issue 13.12: with ``chunk=32`` a worker killed right after ``record(50)`` lost all 50 units
(its lease had been grown to fit the 50). Now a count larger than a chunk goes to Redis in
one atomic call, and a worker pushes what it consumed before its unpushed units would pass a
chunk, so what a kill can take is at most ``chunk`` units, as the docs say. Each worker below
is a real process that kills itself (SIGKILL: no exit hook runs) right after its last count.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

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
