"""Clients of the Purple Flea escrow API: ``EscrowClient`` (blocking) and
``AsyncEscrowClient`` (asyncio), over one shared base.

What this package is for: lock, release in part, read, list and refund escrows, and claim the
faucet, with retries that never pay twice and answers that are validated before anyone sees
them. What it must never do: put the API key anywhere but the ``Authorization`` header.
"""

from ._async import AsyncEscrowClient
from ._base import DEFAULT_BASE_URL, ENV_API_KEY, ENV_BASE_URL, MAX_ANSWER_BYTES, Capabilities
from ._dialect import Dialect, RequestSpec
from ._retry import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOTAL_TIMEOUT,
    RETRY_AFTER_CAP,
)
from ._sync import EscrowClient
from .deployed import claim_faucet as claim_faucet_for
from .deployed import register as register_agent

__all__ = [
    "BACKOFF_BASE",
    "BACKOFF_CAP",
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TOTAL_TIMEOUT",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "MAX_ANSWER_BYTES",
    "RETRY_AFTER_CAP",
    "AsyncEscrowClient",
    "Capabilities",
    "Dialect",
    "EscrowClient",
    "RequestSpec",
    "claim_faucet_for",
    "register_agent",
]
