"""RedisStore passes the store contract suite (``tests/store_contract.py``), on the real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from pf_metered.meter.redis_store import RedisStore
from tests.store_contract import StoreContract

pytestmark = pytest.mark.redis


class TestRedisStoreContract(StoreContract):
    concurrent_processes = True

    @pytest.fixture(autouse=True)
    def _redis(self, redis_url: str, redis_prefix: str) -> None:
        self._url, self._prefix = redis_url, redis_prefix

    def make_store(self, tmp_path: Path) -> RedisStore:
        return RedisStore(self._url, prefix=self._prefix, claim_batches=0)


class TestLeasedRedisStoreContract(TestRedisStoreContract):
    """The same contract with client-side batching on (leases of 8 units)."""

    def make_store(self, tmp_path: Path) -> RedisStore:
        return RedisStore(self._url, prefix=self._prefix, claim_batches=0, chunk=8)
