"""The store contract in code (issue 14.3): ``Store`` is the whole contract, ``BaseStore``
gives every extension's default, ``open_store`` checks ``isinstance`` and maps URL schemes to
factories.

A store written against ``BaseStore`` with only the seven core methods passes the whole
``StoreContract`` and pays exactly through ``@metered`` — that is what "adding a store is one
module plus one contract subclass" means.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
from store_contract import StoreContract

from pf_metered import PaymentStream, metered
from pf_metered.errors import InvalidInput
from pf_metered.meter.open import FACTORIES, open_store
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.meter.store import (
    AddUnitsCounter,
    BaseStore,
    Intent,
    MemoryStore,
    Store,
    StreamConfig,
    StreamState,
)


class CoreOnly(BaseStore):
    """Only the seven core methods (delegated to an in-memory ledger); defaults for the rest."""

    def __init__(self, ledger: MemoryStore) -> None:
        self._ledger = ledger

    def create(self, config: StreamConfig) -> None:
        self._ledger.create(config)

    def load(self, stream_id: str) -> StreamState | None:
        return self._ledger.load(stream_id)

    def set_escrow(self, stream_id: str, escrow_id: str) -> None:
        self._ledger.set_escrow(stream_id, escrow_id)

    def add_units(self, stream_id: str, units: int) -> int:
        return self._ledger.add_units(stream_id, units)

    def claim(self, stream_id: str, *, min_units: int, final: bool = False) -> Intent | None:
        return self._ledger.claim(stream_id, min_units=min_units, final=final)

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        self._ledger.settle(stream_id, seq, amount_micro)

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        self._ledger.mark_closed(stream_id, refunded_micro)


_LEDGERS: dict[Path, MemoryStore] = {}


class TestCoreOnlyStoreContract(StoreContract):
    def make_store(self, tmp_path: Path) -> Store:
        return CoreOnly(_LEDGERS.setdefault(tmp_path, MemoryStore()))


def test_every_store_is_a_store(tmp_path: Path) -> None:
    for store in (MemoryStore(), SQLiteStore(tmp_path / "a.db"), CoreOnly(MemoryStore())):
        assert isinstance(store, Store)
        assert isinstance(store, BaseStore)
        store.close()


def test_a_duck_typed_object_without_the_extensions_is_refused() -> None:
    class Partial:
        def create(self, config: Any) -> None: ...
        def load(self, stream_id: str) -> None: ...
        def set_escrow(self, stream_id: str, escrow_id: str) -> None: ...
        def add_units(self, stream_id: str, units: int) -> int: ...
        def claim(self, stream_id: str, **kw: Any) -> None: ...
        def settle(self, stream_id: str, seq: int, amount_micro: int) -> None: ...
        def mark_closed(self, stream_id: str, refunded_micro: int) -> None: ...

    with pytest.raises(InvalidInput) as refused:
        open_store(Partial())
    assert refused.value.field == "store" and "BaseStore" in str(refused.value)


def test_schemes_map_to_factories(tmp_path: Path) -> None:
    assert set(FACTORIES) >= {"redis", "rediss", "unix", "sqlite"}
    store = open_store(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(store, SQLiteStore)
    store.close()
    with pytest.raises(InvalidInput, match="scheme"):
        open_store("postgres://127.0.0.1/x")


def test_a_core_only_store_pays_exactly_through_metered(agents: Any) -> None:
    store = CoreOnly(MemoryStore())
    stream = PaymentStream(
        agents.client, agents.provider.agent_id, "0.001", batch=10, budget="1", store=store
    )
    stream.open()

    @metered(stream=stream)
    def work(i: int) -> int:
        return i

    assert [work(i) for i in range(25)] == list(range(25))
    receipt = stream.close()
    assert receipt.units == 25 and receipt.paid_micro == 25_000
    assert agents.escrow(stream.escrow_id).released_micro == 25_000
    assert isinstance(store.counter(stream.stream_id), AddUnitsCounter)


def test_a_new_scheme_is_one_module_named_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``toy://`` opens through ``pf_metered.meter.toy_store.open_url`` with nothing else in
    the package naming it: that is all a Postgres store would add besides its tests."""
    module = types.ModuleType("pf_metered.meter.toy_store")
    opened: list[str] = []

    def open_url(url: str) -> Store:
        opened.append(url)
        return CoreOnly(MemoryStore())

    module.open_url = open_url  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pf_metered.meter.toy_store", module)
    assert "toy" not in FACTORIES
    store = open_store("toy://somewhere/db")
    assert isinstance(store, CoreOnly) and opened == ["toy://somewhere/db"]
    module.open_url = lambda url: object()  # type: ignore[attr-defined]
    with pytest.raises(InvalidInput, match="no Store"):
        open_store("toy://x")
    with pytest.raises(InvalidInput, match="scheme"):
        open_store("Not-A-Module://x")


def test_no_store_is_probed_with_getattr() -> None:
    """The ``Store`` Protocol is the whole contract: no ``getattr``/``hasattr`` on a store or
    its counter anywhere in the package (issue 14.3)."""
    import re

    import pf_metered

    probe = re.compile(r"\b(?:getattr|hasattr)\(\s*[\w.]*(?:store|_c|counter)\b", re.I)
    root = Path(pf_metered.__file__).parent
    found = [
        f"{path.relative_to(root)}:{no}"
        for path in root.rglob("*.py")
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []


def test_a_meter_refuses_what_is_not_a_store() -> None:
    from pf_metered.meter.core import Meter, plan_stream

    config, policy = plan_stream("ag_p", "0.001", budget="1", batch=10)
    with pytest.raises(InvalidInput, match="Store"):
        Meter(object(), config, policy)  # type: ignore[arg-type]
