"""Idempotency keys: the first answer to (api key, Idempotency-Key) is the answer, forever.

Why the answer is stored in the ledger's own transaction: a POST whose answer was lost is
retried with the same key. If the money moved, the retry must get the *same* answer back
(``Idempotent-Replayed: true``) and move nothing; if it did not, the retry must do the work.
Storing the answer in the transaction that moved the money means those two can never disagree,
not even after a crash of a file-backed sandbox.

Semantics (Stripe's and the IETF draft's): same key + same method, path and body → the first
answer (status and body, errors included); same key + another request → 422
``idempotency_key_reused``; same key while the first is still being handled → 409
``request_in_progress``. Entries expire after 24 hours of sandbox time. Keys are scoped by a
hash of the API key, never the key itself.

What this module must never do: store an API key, replay an answer across two API keys, or
store an answer whose transaction rolled back.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from pf_metered.sandbox._db import Database

__all__ = ["IDEMPOTENCY_TTL_SECONDS", "IdempotencyStore", "StoredAnswer", "fingerprint"]

IDEMPOTENCY_TTL_SECONDS: Final = 24 * 3600

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key_hash    TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      INTEGER NOT NULL,
    body        BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (key_hash, idem_key)
);
"""


@dataclass(frozen=True, slots=True)
class StoredAnswer:
    """The first answer given under a key, and what request it answered."""

    fingerprint: str
    status: int
    body: bytes


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return {"$decimal": str(obj)}
    if isinstance(obj, dict):
        return {k: _canonical(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_canonical(v) for v in obj]
    return obj


def fingerprint(method: str, path: str, body: bytes, parsed: Any = None) -> str:
    """A digest of what a request asks for: the method, the path and the body.

    When the body parsed as JSON, the digest covers its canonical form (sorted keys, no
    whitespace), so a client that re-serialises the same body on a retry is not refused.
    """
    h = hashlib.sha256()
    h.update(method.upper().encode())
    h.update(b"\0")
    h.update(path.encode())
    h.update(b"\0")
    if parsed is not None:
        h.update(json.dumps(_canonical(parsed), sort_keys=True, separators=(",", ":")).encode())
    else:
        h.update(b"raw:" + body)
    return h.hexdigest()


class IdempotencyStore:
    """Stored answers (in the database) and keys in flight (in memory)."""

    def __init__(self, db: Database, ttl_seconds: int = IDEMPOTENCY_TTL_SECONDS) -> None:
        db.executescript(_SCHEMA)
        self._ttl_us = ttl_seconds * 1_000_000
        self._in_flight: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def begin(self, key_hash: str, idem_key: str) -> bool:
        """Mark a key as being handled; ``False`` if it already is (answer 409)."""
        with self._lock:
            if (key_hash, idem_key) in self._in_flight:
                return False
            self._in_flight.add((key_hash, idem_key))
            return True

    def end(self, key_hash: str, idem_key: str) -> None:
        with self._lock:
            self._in_flight.discard((key_hash, idem_key))

    def lookup(
        self, conn: sqlite3.Connection, key_hash: str, idem_key: str, now_us: int
    ) -> StoredAnswer | None:
        """The answer stored under this key, unless it expired (then it is forgotten)."""
        row = conn.execute(
            "SELECT fingerprint, status, body, created_at FROM idempotency "
            "WHERE key_hash = ? AND idem_key = ?",
            (key_hash, idem_key),
        ).fetchone()
        if row is None:
            return None
        if int(row[3]) + self._ttl_us <= now_us:
            conn.execute(
                "DELETE FROM idempotency WHERE key_hash = ? AND idem_key = ?",
                (key_hash, idem_key),
            )
            return None
        return StoredAnswer(str(row[0]), int(row[1]), bytes(row[2]))

    def save(
        self,
        conn: sqlite3.Connection,
        key_hash: str,
        idem_key: str,
        answer: StoredAnswer,
        now_us: int,
    ) -> None:
        conn.execute(
            "INSERT INTO idempotency (key_hash, idem_key, fingerprint, status, body, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key_hash, idem_key, answer.fingerprint, answer.status, answer.body, now_us),
        )
