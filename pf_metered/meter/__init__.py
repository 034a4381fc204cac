"""The meter: counting units, deciding when a batch is due, and where its state is kept."""

from pf_metered.meter.core import Meter, OpenEscrow, RefundRest, ReleaseDue, plan_stream
from pf_metered.meter.policy import BatchPolicy, every
from pf_metered.meter.receipt import Receipt, ReleaseRecord, StatusReport
from pf_metered.meter.store import (
    Intent,
    MemoryStore,
    Store,
    StreamConfig,
    StreamState,
    UnitCounter,
    intent_amount_micro,
    intent_key,
)

__all__ = [
    "BatchPolicy",
    "Intent",
    "MemoryStore",
    "Meter",
    "OpenEscrow",
    "Receipt",
    "RefundRest",
    "ReleaseDue",
    "ReleaseRecord",
    "StatusReport",
    "Store",
    "StreamConfig",
    "StreamState",
    "UnitCounter",
    "every",
    "intent_amount_micro",
    "intent_key",
    "plan_stream",
]
