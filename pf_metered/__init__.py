"""pf_metered: pay other agents per call, per token, per data point or per second of compute.

A budget is locked in a Purple Flea escrow; units are counted on the hot path with no I/O;
partial payments are released in batches in the background; closing pays the last partial
batch and refunds the rest.
"""

from pf_metered.client import AsyncEscrowClient, EscrowClient
from pf_metered.client._ratelimit import RateLimit
from pf_metered.client.deployed import aclaim_faucet, aregister, claim_faucet, register
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
    NotFound,
    PermissionDenied,
    PFMeteredError,
    RateLimited,
    ServerError,
    StreamClosed,
    UnsupportedByDialect,
)
from pf_metered.meter import BatchPolicy, MemoryStore, Store, every
from pf_metered.meter.open import open_store
from pf_metered.meter.sqlite_store import SQLiteStore
from pf_metered.models import Escrow, EscrowList, FaucetClaim, Release
from pf_metered.money import Rate, format_usdc, parse_amount, parse_rate
from pf_metered.sandbox import Sandbox
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
    "EscrowList",
    "FaucetClaim",
    "IdempotencyConflict",
    "InsufficientFunds",
    "InvalidInput",
    "InvalidRequest",
    "InvalidResponse",
    "KeyedStreams",
    "MemoryStore",
    "Metered",
    "NotFound",
    "PFMeteredError",
    "PaymentStream",
    "PermissionDenied",
    "Rate",
    "RateLimit",
    "RateLimited",
    "Receipt",
    "Release",
    "SQLiteStore",
    "Sandbox",
    "ServerError",
    "StatusReport",
    "Store",
    "StreamClosed",
    "UnsupportedByDialect",
    "__version__",
    "aclaim_faucet",
    "aregister",
    "claim_faucet",
    "every",
    "format_usdc",
    "metered",
    "open_store",
    "parse_amount",
    "parse_rate",
    "register",
]


def __getattr__(name: str) -> object:
    """``pf_metered.RedisStore`` on first use: redis is an optional extra (``pf_metered[redis]``)
    and must not be imported with the package."""
    if name == "RedisStore":
        from pf_metered.meter.redis_store import RedisStore

        return RedisStore
    raise AttributeError(f"module 'pf_metered' has no attribute {name!r}")
