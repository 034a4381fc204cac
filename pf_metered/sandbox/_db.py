"""One SQLite connection, one lock, and write transactions that cannot lose an update.

Why one connection behind a lock: the sandbox is driven from many threads at once (a
ThreadingHTTPServer, tests that hammer it, asyncio clients whose requests run in worker
threads). Serialising every transaction on one lock makes "read balance, check, write" atomic
without relying on SQLite's busy handling, and ``BEGIN IMMEDIATE`` takes SQLite's write lock at
the start so a second *process* sharing a file waits (``busy_timeout``) instead of failing half
way through. A file database uses WAL with ``synchronous=FULL``: this is a ledger.

What this module must never do: hand out the connection outside the lock, leave a transaction
open after an exception, or commit a transaction whose body raised.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Database", "DatabaseClosed"]


class DatabaseClosed(RuntimeError):
    """The sandbox was closed; nothing more can be read or written."""


class Database:
    """A serialised SQLite connection with a write-transaction context manager."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            path, check_same_thread=False, isolation_level=None, timeout=10.0
        )
        self._conn.execute("PRAGMA foreign_keys = ON")
        self._conn.execute("PRAGMA busy_timeout = 10000")
        if path != ":memory:" and not path.startswith("file::memory:"):
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and an immediate write transaction; commit on success, else roll back.

        Re-entrant on the same thread: a nested call joins the outer transaction (the lock is
        an RLock and SQLite's transaction is already open), so helpers may open one freely.
        """
        with self._lock:
            conn = self._require()
            if conn.in_transaction:
                yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def savepoint(self, conn: sqlite3.Connection, name: str = "op") -> Iterator[None]:
        """Undo only the enclosed writes if they raise (the outer transaction carries on)."""
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")

    def executescript(self, script: str) -> None:
        """Run DDL outside any transaction (``executescript`` commits whatever is open)."""
        with self._lock:
            self._require().executescript(script)

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatabaseClosed("the sandbox is closed")
        return self._conn

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the connection; later transactions raise :class:`DatabaseClosed`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
