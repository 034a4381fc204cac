"""The meter: counting units, deciding when a batch is due, and where its state is kept."""

from pf_metered.meter.store import (
    Intent,
    MemoryStore,
    Store,
    StreamConfig,
    StreamState,
    intent_amount_micro,
    intent_key,
)

__all__ = [
    "Intent",
    "MemoryStore",
    "Store",
    "StreamConfig",
    "StreamState",
    "intent_amount_micro",
    "intent_key",
]
