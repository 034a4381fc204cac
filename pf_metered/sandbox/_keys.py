"""Sandbox API keys: how they are made and how the ledger recognises them.

Why only a hash is stored: a sandbox file may be shared or committed by mistake; a digest of
the key identifies the agent without letting anyone who reads the file act as it.

What this module must never do: log, store or return a key other than to the caller of
:func:`new_api_key`.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import Final

__all__ = ["KEY_PREFIX", "hash_key", "new_agent_id", "new_api_key", "parse_bearer"]

KEY_PREFIX: Final = "pf_test_"
_BEARER = re.compile(r"^Bearer ([A-Za-z0-9_\-]{8,200})$")


def new_api_key() -> str:
    """A fresh, unguessable sandbox key: ``pf_test_`` and 32 url-safe random characters."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def new_agent_id() -> str:
    """An agent id in the casino's shape (``ag_`` and 12 hex digits), which the deployed
    escrow service requires of a counterparty."""
    return f"ag_{secrets.token_hex(6)}"


def hash_key(api_key: str) -> str:
    """The digest the ledger stores and looks keys up by."""
    return hmac.new(b"pf_metered.sandbox.v1", api_key.encode(), hashlib.sha256).hexdigest()


def parse_bearer(header: str | None) -> str | None:
    """The key in an ``Authorization: Bearer <key>`` header, or ``None`` if malformed."""
    if header is None:
        return None
    m = _BEARER.match(header.strip())
    return m.group(1) if m else None
