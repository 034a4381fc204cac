"""pf_metered: pay other agents per call, per token, per data point or per second of compute.

A budget is locked in a Purple Flea escrow; units are counted on the hot path with no I/O;
partial payments are released in batches in the background; closing pays the last partial
batch and refunds the rest.

What is public (the rule ``tests/test_exported_members.py`` pins): a name is in ``__all__``
here when the README or an example uses it, when a public call returns it (``Escrow``,
``Receipt``, ``Registration`` ...), or when it is an exception a caller can catch — every
exception this library raises to its callers is importable from here, whatever module defines
it. Nothing else is: parsers, store factories, rate-limit settings and dialect internals stay
importable from their own modules (``pf_metered.money.parse_amount``,
``pf_metered.meter.open.open_store``, ``pf_metered.client.deployed`` ...) but are not
promised here, and a module whose name starts with ``_`` is never a place to import from.
One name means one thing: :meth:`EscrowClient.claim_faucet` claims with the caller's key
(v1 API); :func:`claim_faucet_for` claims for an agent id on the separate faucet service
(no key), and :func:`register_agent` makes a new agent (whose registration already credits
the faucet grant). Optional extras load on first use: ``pf_metered.RedisStore`` imports
redis only when asked for, and says which ``pip install`` line it needs when it is missing.
"""

from typing import TYPE_CHECKING

from pf_metered.client import AsyncEscrowClient, EscrowClient
from pf_metered.client.deployed import aclaim_faucet as aclaim_faucet_for
from pf_metered.client.deployed import aregister as aregister_agent
from pf_metered.client.deployed import claim_faucet as claim_faucet_for
from pf_metered.client.deployed import register as register_agent
from pf_metered.decorators import Metered, metered
from pf_metered.errors import (
    AmbiguousCreate,
    AmbiguousOutcome,
    AmbiguousRelease,
    APIConnectionError,
    APIError,
    APITimeout,
    AuthError,
    BudgetExhausted,
    ConfigError,
    Conflict,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidInput,
    InvalidRequest,
    InvalidResponse,
    MissingExtra,
    NotFound,
    PermissionDenied,
    PFMeteredError,
    RateLimited,
    ServerError,
    StoreError,
    StoreUnavailable,
    StreamBusy,
    StreamClosed,
    UnsupportedByDialect,
)
from pf_metered.meter import BatchPolicy, MemoryStore, Store, every
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.models import Escrow, FaucetClaim, Registration, Release
from pf_metered.money import format_usdc
from pf_metered.sandbox import LedgerInvariantError, Sandbox
from pf_metered.stream import (
    AsyncClock,
    AsyncPaymentStream,
    Clock,
    DataFeedPayments,
    KeyedStreams,
    PaymentStream,
    Receipt,
    StatusReport,
)
from pf_metered.stream._tranches import TrancheFailure

if TYPE_CHECKING:  # imported on first use by __getattr__: redis is an optional extra
    from pf_metered.meter.redis_store import RedisStore

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeout",
    "AmbiguousCreate",
    "AmbiguousOutcome",
    "AmbiguousRelease",
    "AsyncClock",
    "AsyncEscrowClient",
    "AsyncPaymentStream",
    "AuthError",
    "BatchPolicy",
    "BudgetExhausted",
    "Clock",
    "ConfigError",
    "Conflict",
    "DataFeedPayments",
    "Escrow",
    "EscrowClient",
    "FaucetClaim",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidInput",
    "InvalidRequest",
    "InvalidResponse",
    "KeyedStreams",
    "LedgerInvariantError",
    "MemoryStore",
    "Metered",
    "MissingExtra",
    "NotFound",
    "PFMeteredError",
    "PaymentStream",
    "PermissionDenied",
    "RateLimited",
    "Receipt",
    "RedisStore",
    "Registration",
    "Release",
    "SQLiteStore",
    "Sandbox",
    "ServerError",
    "StatusReport",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StreamBusy",
    "StreamClosed",
    "TrancheFailure",
    "UnsupportedByDialect",
    "__version__",
    "aclaim_faucet_for",
    "aregister_agent",
    "claim_faucet_for",
    "every",
    "format_usdc",
    "metered",
    "register_agent",
]


def __getattr__(name: str) -> object:
    """``pf_metered.RedisStore`` on first use: redis is an optional extra (``pf_metered[redis]``)
    and must not be imported with the package; without it this raises :class:`MissingExtra`
    (an ``ImportError`` too) naming the ``pip install`` line."""
    if name == "RedisStore":
        from pf_metered.meter.redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module 'pf_metered' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
