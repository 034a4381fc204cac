"""A durable meter store in one SQLite file: counted units and release intents survive a crash.

Why SQLite: a stream that pays per unit must not forget a unit it counted, nor a release it
decided to send, when the process dies. The file is the journal: a unit is counted by a
committed transaction, and an intent (its sequence number, hence its idempotency key, and the
unit range it pays for) is committed by :meth:`SQLiteStore.claim` *before* the stream sends
it. The answer is recorded by :meth:`SQLiteStore.settle` after. After a crash,
``PaymentStream.resume`` reads the file back and finishes what was started with the same keys.

How: WAL journal, ``synchronous=FULL`` (every commit is fsynced, so it survives power loss,
not only a process crash), ``BEGIN IMMEDIATE`` for every write (takes the write lock up front,
so ``busy_timeout`` applies and two processes never interleave a read-check-write), one
connection per process guarded by a lock (threads), and the budget checked inside the same
transaction that counts (no overspend however many threads or processes race).

Durability modes (what a counted unit costs, and which units a crash may take):

``durability="per_record"`` (default)
    Every ``add_units`` is its own fsynced transaction. A unit whose ``record()`` returned is
    on disk. Costs one fsync per call (see ``benchmarks/durability.py``).

``durability="group"``
    Group commit. ``add_units`` counts in memory against a *lease* of budget the process took
    from the file (so several processes sharing a stream still never overspend), and returns
    at once — no I/O on the hot path. A flusher thread commits everything counted every
    ``group_interval`` seconds in one transaction. **At risk on a crash: the units whose
    ``record()`` returned within the last** ``group_interval`` **seconds (plus one commit),
    and never more than one lease** (``lease_units``: a process commits before its uncommitted
    units would pass it): every ``claim`` (so every release) first commits this process's
    buffered units, so a release never pays for units that are not on disk, and a unit that
    was paid for is never lost. ``sync()`` (and ``close()``, ``load()`` and interpreter exit)
    waits until every unit counted so far is durable; with ``group_wait=True`` each
    ``add_units`` waits for a commit that covers it (concurrent recorders share one fsync) and
    nothing returned is ever at risk. The lease engine is
    :class:`~pf_metered.meter.lease.LeasedCounter`, shared with the Redis store; this module
    is its backend (one transaction per push).
    Several processes recording into one stream in group mode: a unit a process counts after
    *another* process claimed the stream's final release cannot be committed; it is refused
    at flush, logged, and counted in :attr:`SQLiteStore.refused_units` (``per_record`` has no
    such window: the refusal is raised to the recorder).

Leases of a process that died hold budget (never units) until :meth:`SQLiteStore.reclaim`
(called by ``resume``) gives them back.

What this module must never do: perform HTTP, store money as a float, hand out a second
intent while one is pending, count a unit the budget does not cover, or let a release be
claimed for units that are not committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pf_metered import _lifecycle
from pf_metered.errors import BudgetExhausted, InvalidInput, StreamClosed
from pf_metered.meter.lease import Grant, LeasedCounter, Push, grant
from pf_metered.meter.store import (
    BaseStore,
    Intent,
    StreamConfig,
    StreamState,
    StreamStatus,
    UnitCounter,
    new_owner_id,
    owner_alive,
)

__all__ = ["Durability", "SQLiteStore"]

log = logging.getLogger("pf_metered.meter.sqlite")

Durability = Literal["per_record", "group"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    stream_id TEXT PRIMARY KEY,
    to_agent_id TEXT NOT NULL,
    rate TEXT NOT NULL,
    budget_micro INTEGER NOT NULL,
    max_units INTEGER NOT NULL,
    memo TEXT NOT NULL,
    auto_release_hours INTEGER,
    batch_units INTEGER,
    every_seconds TEXT,
    status TEXT NOT NULL CHECK (status IN ('new', 'open', 'closing', 'closed')),
    escrow_id TEXT,
    units INTEGER NOT NULL DEFAULT 0 CHECK (units >= 0),
    claimed_units INTEGER NOT NULL DEFAULT 0,
    paid_micro INTEGER NOT NULL DEFAULT 0,
    releases INTEGER NOT NULL DEFAULT 0,
    refunded_micro INTEGER,
    next_seq INTEGER NOT NULL DEFAULT 1,
    CHECK (units <= max_units),
    CHECK (claimed_units <= units)
);
CREATE TABLE IF NOT EXISTS intents (
    stream_id TEXT NOT NULL REFERENCES streams(stream_id),
    seq INTEGER NOT NULL,
    units_from INTEGER NOT NULL,
    units_to INTEGER NOT NULL,
    final INTEGER NOT NULL,
    settled INTEGER NOT NULL DEFAULT 0,
    amount_micro INTEGER,
    owner TEXT,
    claimed_at REAL,
    PRIMARY KEY (stream_id, seq)
);
CREATE UNIQUE INDEX IF NOT EXISTS one_pending_intent ON intents(stream_id) WHERE settled = 0;
CREATE TABLE IF NOT EXISTS leases (
    stream_id TEXT NOT NULL REFERENCES streams(stream_id),
    owner TEXT NOT NULL,
    units INTEGER NOT NULL CHECK (units >= 0),
    PRIMARY KEY (stream_id, owner)
);
"""

_STREAM_COLS = (
    "stream_id, to_agent_id, rate, budget_micro, max_units, memo, auto_release_hours, "
    "batch_units, every_seconds, status, escrow_id, units, claimed_units, paid_micro, "
    "releases, refunded_micro, next_seq"
)

_LIVE: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()


def _sync_all_at_exit() -> None:
    """Exit, phase STORES: make every buffered unit durable (group mode), give leases back."""
    for store in list(_LIVE):
        try:
            store.close()
        except Exception:  # exit must go on; the error is logged
            log.exception("pf_metered: could not flush a SQLite store at exit")


_lifecycle.on(_lifecycle.STORES, _sync_all_at_exit)


def _forget_leases_after_fork() -> None:
    """In a forked child: the parent's leases and flusher are the parent's (see ``_db``)."""
    for store in list(_LIVE):
        store._after_fork()


_lifecycle.on(_lifecycle.FORK, _forget_leases_after_fork)


class _FileLeases:
    """The lease backend over the file (:class:`~pf_metered.meter.lease.LeaseBackend`): a push
    is one ``BEGIN IMMEDIATE`` transaction that counts the used units and resizes this
    process's row in ``leases``; the file keeps ``units + Σ leases ≤ max_units``.

    A failed transaction is rolled back, so the engine's re-send of the same push applies it
    once (no sequence is needed here).
    """

    __slots__ = ("_store",)

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

    def take(self, stream_id: str, push: Push) -> Grant:
        return self._exchange(stream_id, push, giving=False)

    def give_back(self, stream_id: str, push: Push) -> Grant:
        return self._exchange(stream_id, push, giving=True)

    def _exchange(self, stream_id: str, push: Push, *, giving: bool) -> Grant:
        store = self._store
        owner = store.owner
        with store._tx() as db:
            row = store._row(db, stream_id)
            status, max_units = str(row["status"]), int(row["max_units"])
            units = before = int(row["units"])
            mine = db.execute(
                "SELECT units FROM leases WHERE stream_id = ? AND owner = ?", (stream_id, owner)
            ).fetchone()
            lease = int(mine[0]) if mine is not None else 0
            others = store._leased(db, stream_id) - lease
            from_lease = min(push.used, lease)
            units += from_lease
            lease -= from_lease
            late = push.used - from_lease  # our lease no longer covers them (reclaimed)
            refused = 0
            if late:
                if status == "open" and units + lease + others + late <= max_units:
                    units += late
                else:
                    refused = late
            if status != "open":
                lease = 0
            elif giving:
                lease = min(lease, push.want)
            else:
                avail = max_units - units - lease - others
                lease = grant(lease, push.want, push.need, avail, exact=push.exact)
            if units != before:
                db.execute("UPDATE streams SET units = ? WHERE stream_id = ?", (units, stream_id))
            if lease:
                db.execute(
                    "INSERT INTO leases (stream_id, owner, units) VALUES (?, ?, ?) "
                    "ON CONFLICT (stream_id, owner) DO UPDATE SET units = ?",
                    (stream_id, owner, lease, lease),
                )
            elif mine is not None:
                db.execute(
                    "DELETE FROM leases WHERE stream_id = ? AND owner = ?", (stream_id, owner)
                )
        if refused:  # after the commit: a rolled back push is re-sent and must not count twice
            store.refused_units += refused
            log.error(
                "pf_metered: %d units counted in this process could not be committed: "
                "stream %s is %s (closed by another process)",
                refused,
                stream_id,
                status,
            )
        return Grant(status, units, lease, max_units - units - lease - others)


class SQLiteStore(BaseStore):
    """The durable store (see the module docstring). ``SQLiteStore("meter.db")``.

    Safe to share between threads (one connection, one lock) and between processes opening
    the same file (``BEGIN IMMEDIATE`` + ``busy_timeout``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "per_record",
        group_interval: float = 0.005,
        group_wait: bool = False,
        lease_units: int = 65_536,
        busy_timeout: float = 30.0,
        intent_lease: float = 30.0,
    ) -> None:
        if durability not in ("per_record", "group"):
            raise InvalidInput("durability", f"must be 'per_record' or 'group', not {durability!r}")
        if (
            isinstance(group_interval, bool)
            or not isinstance(group_interval, int | float)
            or not (0 < group_interval <= 60)
        ):
            raise InvalidInput("group_interval", "must be a number of seconds in (0, 60]")
        if isinstance(lease_units, bool) or not isinstance(lease_units, int) or lease_units < 1:
            raise InvalidInput("lease_units", "must be a whole number ≥ 1")
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise InvalidInput("path", "must be a file path")
        self.path = str(Path(path))
        self.durability: Durability = durability
        self.group_interval = float(group_interval)  # ok: seconds
        self.group_wait = bool(group_wait)
        self.lease_units = lease_units
        if (
            isinstance(intent_lease, bool)
            or not isinstance(intent_lease, int | float)
            or not (0 <= intent_lease <= 86_400)
        ):
            raise InvalidInput("intent_lease", "must be a number of seconds in [0, 86400]")
        self.intent_lease = float(intent_lease)  # ok: seconds
        """Seconds after which an unsettled intent's owner is presumed gone (``take_over``)."""
        self._busy_ms = int(busy_timeout * 1000)
        self._owner = new_owner_id()
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        # group mode: this process's side of its leases (the flusher is its background round)
        self._leases = LeasedCounter(
            _FileLeases(self),
            chunk=lease_units,
            interval=self.group_interval,
            name="pf-metered-sqlite-flusher",
        )
        self._closed = False
        self.refused_units = 0
        """Units counted in group mode that could not be committed (the stream was closed
        by another process first). Always 0 in a single process."""
        with self._lock:
            db = self._db()
            db.executescript(_SCHEMA)
            cols = {row[1] for row in db.execute("PRAGMA table_info(intents)")}
            for col, kind in (("owner", "TEXT"), ("claimed_at", "REAL")):  # older files
                if col not in cols:
                    with contextlib.suppress(sqlite3.OperationalError):  # another process
                        db.execute(f"ALTER TABLE intents ADD COLUMN {col} {kind}")
        _LIVE.add(self)

    # ------------------------------------------------------------ plumbing
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.row_factory = sqlite3.Row
        return conn

    def _db(self) -> sqlite3.Connection:
        pid = os.getpid()
        if self._conn is None or self._pid != pid:
            # A forked child must not use its parent's connection (or its buffers).
            if self._pid not in (-1, pid):
                self._leases.reset()
                self._owner = new_owner_id()
            self._conn = self._connect()
            self._pid = pid
        return self._conn

    def _after_fork(self) -> None:
        """A forked child: a new owner, no leases, its own connection (opened when used)."""
        self._leases.reset()
        self._owner = new_owner_id()
        self._lock = threading.RLock()  # the parent's may have been held at fork
        self._conn = None
        self._pid = os.getpid()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: ``BEGIN IMMEDIATE`` … ``COMMIT`` (rolled back on error)."""
        with self._lock:
            if self._closed:
                raise StreamClosed("this SQLiteStore was closed")
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.rollback()
                raise
            else:
                db.execute("COMMIT")

    @staticmethod
    def _row(db: sqlite3.Connection, stream_id: str) -> sqlite3.Row:
        row = db.execute(
            f"SELECT {_STREAM_COLS} FROM streams WHERE stream_id = ?",  # noqa: S608
            (stream_id,),
        ).fetchone()
        if row is None:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        row_: sqlite3.Row = row
        return row_

    @staticmethod
    def _leased(db: sqlite3.Connection, stream_id: str) -> int:
        row = db.execute(
            "SELECT COALESCE(SUM(units), 0) FROM leases WHERE stream_id = ?", (stream_id,)
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _refusal(
        stream_id: str, status: str, units: int, left: int
    ) -> BudgetExhausted | StreamClosed:
        if status != "open":
            return StreamClosed(f"stream {stream_id} is {status}; it takes no units")
        return BudgetExhausted(
            f"{units} more units would exceed the budget; {max(left, 0)} left",
            remaining_units=max(left, 0),
        )

    @staticmethod
    def _check_units(units: int) -> None:
        if isinstance(units, bool) or not isinstance(units, int) or units < 0:
            raise InvalidInput("units", f"must be a whole number ≥ 0, not {units!r}")

    # ------------------------------------------------------------ contract
    def create(self, config: StreamConfig) -> None:
        try:
            with self._tx() as db:
                db.execute(
                    f"INSERT INTO streams ({_STREAM_COLS}) VALUES "  # noqa: S608
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?, 'new', NULL, 0, 0, 0, 0, NULL, 1)",
                    (
                        config.stream_id,
                        config.to_agent_id,
                        config.rate,
                        config.budget_micro,
                        config.max_units,
                        config.memo,
                        config.auto_release_hours,
                        config.batch_units,
                        config.every_seconds,
                    ),
                )
        except sqlite3.IntegrityError:
            raise InvalidInput("stream_id", f"already exists: {config.stream_id!r}") from None

    def load(self, stream_id: str) -> StreamState | None:
        """The stream as the file holds it (this process's buffered units committed first)."""
        if self._leases.holds(stream_id):
            self._leases.push(stream_id)
        with self._lock:
            db = self._db()
            db.execute("BEGIN")
            try:
                row = db.execute(
                    f"SELECT {_STREAM_COLS} FROM streams WHERE stream_id = ?",  # noqa: S608
                    (stream_id,),
                ).fetchone()
                if row is None:
                    return None
                intents = db.execute(
                    "SELECT seq, units_from, units_to, final, settled, amount_micro FROM intents"
                    " WHERE stream_id = ? ORDER BY seq",
                    (stream_id,),
                ).fetchall()
            finally:
                db.execute("COMMIT")
        (
            sid,
            to_agent,
            rate,
            budget,
            max_units,
            memo,
            arh,
            batch,
            every_s,
            status,
            escrow,
            units,
            claimed,
            paid,
            releases,
            refunded,
            next_seq,
        ) = tuple(row)
        config = StreamConfig(
            stream_id=sid,
            to_agent_id=to_agent,
            rate=rate,
            budget_micro=budget,
            max_units=max_units,
            memo=memo,
            auto_release_hours=arh,
            batch_units=batch,
            every_seconds=every_s,
        )
        pending: list[Intent] = []
        settled: list[tuple[Intent, int]] = []
        for seq, u_from, u_to, final, is_settled, amount in intents:
            intent = Intent(sid, seq, u_from, u_to, bool(final))
            if is_settled:
                settled.append((intent, int(amount)))
            else:
                pending.append(intent)
        state_status: StreamStatus = status
        return StreamState(
            config=config,
            status=state_status,
            escrow_id=escrow,
            units=units,
            claimed_units=claimed,
            paid_micro=paid,
            releases=releases,
            pending=tuple(pending),
            refunded_micro=refunded,
            next_seq=next_seq,
            settled=tuple(settled),
        )

    def set_escrow(self, stream_id: str, escrow_id: str) -> None:
        with self._tx() as db:
            row = self._row(db, stream_id)
            current, status = row["escrow_id"], row["status"]
            if current not in (None, escrow_id):
                raise InvalidInput("escrow_id", "the stream is already bound to another escrow")
            db.execute(
                "UPDATE streams SET escrow_id = ?, status = ? WHERE stream_id = ?",
                (escrow_id, "open" if status == "new" else status, stream_id),
            )

    def add_units(self, stream_id: str, units: int) -> int:
        """Count ``units`` within the budget; see the module docstring for when it is durable."""
        self._check_units(units)
        if self.durability == "group":
            return self._leases.add(stream_id, units, self.group_wait)
        return self._add_durable(stream_id, units)

    def _add_durable(self, stream_id: str, units: int, held_here: int = 0) -> int:
        """Per-record mode: check the budget and count in one fsynced transaction."""
        with self._tx() as db:
            row = self._row(db, stream_id)
            status, current = str(row["status"]), int(row["units"])
            left = int(row["max_units"]) - current - self._leased(db, stream_id) - held_here
            if status != "open" or units > left:
                raise self._refusal(stream_id, status, units, left)
            db.execute(
                "UPDATE streams SET units = units + ? WHERE stream_id = ?", (units, stream_id)
            )
            return current + units

    def claim(self, stream_id: str, *, min_units: int, final: bool = False) -> Intent | None:
        if self._leases.holds(stream_id):
            if final:  # nothing may be counted locally after the final claim
                self._leases.close_local(stream_id, "closing")
            # the units this process buffered are committed before the claim reads the total
            self._leases.push(stream_id, release=final)
        with self._tx() as db:
            row = self._row(db, stream_id)
            status, units = row["status"], int(row["units"])
            claimed, next_seq = int(row["claimed_units"]), int(row["next_seq"])
            if status in ("new", "closing", "closed"):  # one final intent per stream
                return None
            if db.execute(
                "SELECT 1 FROM intents WHERE stream_id = ? AND settled = 0", (stream_id,)
            ).fetchone():
                return None
            if not final and units - claimed < max(min_units, 1):
                return None
            intent = Intent(stream_id, next_seq, claimed, units, final)
            db.execute(
                "INSERT INTO intents (stream_id, seq, units_from, units_to, final, owner, "
                "claimed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    stream_id,
                    intent.seq,
                    intent.units_from,
                    intent.units_to,
                    int(final),
                    self._owner,
                    time.time(),
                ),
            )
            db.execute(
                "UPDATE streams SET claimed_units = ?, next_seq = ?, status = ? "
                "WHERE stream_id = ?",
                (units, next_seq + 1, "closing" if final else status, stream_id),
            )
            if final:
                db.execute("DELETE FROM leases WHERE stream_id = ?", (stream_id,))
            return intent

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        if isinstance(amount_micro, bool) or not isinstance(amount_micro, int) or amount_micro < 0:
            raise InvalidInput("amount_micro", "must be a whole number of micro-USDC ≥ 0")
        with self._tx() as db:
            self._row(db, stream_id)
            found = db.execute(
                "SELECT settled FROM intents WHERE stream_id = ? AND seq = ?", (stream_id, seq)
            ).fetchone()
            if found is None or found[0]:
                return
            db.execute(
                "UPDATE intents SET settled = 1, amount_micro = ? WHERE stream_id = ? AND seq = ?",
                (amount_micro, stream_id, seq),
            )
            db.execute(
                "UPDATE streams SET paid_micro = paid_micro + ?, releases = releases + ? "
                "WHERE stream_id = ?",
                (amount_micro, 1 if amount_micro else 0, stream_id),
            )

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        with self._tx() as db:
            row = self._row(db, stream_id)
            if row["status"] == "closed":
                return
            db.execute(
                "UPDATE streams SET status = 'closed', refunded_micro = ? WHERE stream_id = ?",
                (refunded_micro, stream_id),
            )
            db.execute("DELETE FROM leases WHERE stream_id = ?", (stream_id,))
        self._leases.close_local(stream_id, "closed")

    # ------------------------------------------------------------ extension
    def counter(self, stream_id: str) -> UnitCounter:
        """The stream's hot-path handle: ``add`` / ``reserve`` / ``commit`` / ``cancel``.

        In group mode reservations are taken from this process's lease (no I/O); in
        per-record mode they are held in this process and checked against the file's total,
        and ``commit`` counts durably (the file stays the authority on the budget).
        """
        if self.load(stream_id) is None:
            raise InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")
        return _Counter(self, stream_id)

    def take_over(self, stream_id: str, *, lease_seconds: float | None = None) -> Intent | None:
        """The pending intent, if this store object claimed it or its owner has not settled it
        within ``lease_seconds`` (default :attr:`intent_lease`; the owner is presumed gone);
        it becomes ours with a fresh claim time. Else ``None``: another live process is
        sending it. The intent keeps its sequence, hence its idempotency key.
        """
        lease = self.intent_lease if lease_seconds is None else float(lease_seconds)  # ok: seconds
        with self._tx() as db:
            self._row(db, stream_id)
            row = db.execute(
                "SELECT seq, units_from, units_to, final, owner, claimed_at FROM intents "
                "WHERE stream_id = ? AND settled = 0",
                (stream_id,),
            ).fetchone()
            if row is None:
                return None
            seq, u_from, u_to, final, owner, claimed_at = tuple(row)
            now = time.time()
            # No owner: written by an older version, which had no notion of one.
            claimed = None if claimed_at is None else float(claimed_at)  # ok: seconds
            stale = owner is None or claimed is None or now - claimed >= lease
            if owner != self._owner and not stale:
                return None
            db.execute(
                "UPDATE intents SET owner = ?, claimed_at = ? WHERE stream_id = ? AND seq = ?",
                (self._owner, now, stream_id, seq),
            )
            return Intent(stream_id, int(seq), int(u_from), int(u_to), bool(final))

    def pending_owner(self, stream_id: str) -> tuple[str | None, float] | None:
        """The owner of the stream's pending intent and its claim's age in seconds, or
        ``None`` when nothing is pending (``resume`` asks before taking it over)."""
        with self._lock:
            row = (
                self._db()
                .execute(
                    "SELECT owner, claimed_at FROM intents WHERE stream_id = ? AND settled = 0",
                    (stream_id,),
                )
                .fetchone()
            )
        if row is None:
            return None
        owner, claimed_at = row[0], row[1]
        age = float("inf") if claimed_at is None else time.time() - float(claimed_at)  # ok: s
        return (None if owner is None else str(owner)), age

    @property
    def owner(self) -> str:
        """This store object's owner id (``host:pid:nonce``) on intents and leases."""
        return self._owner

    @property
    def location(self) -> str | None:
        """The file's path (what ``open_store`` and ``resume`` take)."""
        return self.path

    def reclaim(self, stream_id: str) -> None:
        """Give back the leases of processes that are gone (or cannot be told alive).

        Called by ``resume``, which takes the stream over: a lease holds only budget, never
        units, so dropping a dead process's lease loses nothing. A lease of a process known
        to be alive on this host is kept: its buffered units still need it.
        """
        with self._tx() as db:
            self._row(db, stream_id)
            for (owner,) in db.execute(
                "SELECT owner FROM leases WHERE stream_id = ?", (stream_id,)
            ).fetchall():
                ours = owner == self._owner and self._leases.holds(stream_id)
                if not ours and (owner == self._owner or owner_alive(str(owner)) is not True):
                    db.execute(
                        "DELETE FROM leases WHERE stream_id = ? AND owner = ?", (stream_id, owner)
                    )
        if self._leases.holds(stream_id):
            # Our own lease: commit what we counted, keep only what running calls hold.
            self._leases.push(stream_id, release=True)

    def sync(self) -> None:
        """Wait until every unit counted so far in this process is durable (group mode)."""
        if self.durability == "group":
            self._leases.push_all()

    def close(self) -> None:
        """Commit what is buffered, stop the flusher, close the connection. Idempotent."""
        if self._closed:
            return
        self._leases.stop()
        if self._pid == os.getpid():
            self._leases.push_all(release=True)  # commit what is buffered, give leases back
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._closed = True
        _LIVE.discard(self)

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, durability={self.durability!r})"


class _Counter:
    """``UnitCounter`` over a :class:`SQLiteStore` (see :meth:`SQLiteStore.counter`)."""

    __slots__ = ("_local", "_lock", "_sid", "_store")

    def __init__(self, store: SQLiteStore, stream_id: str) -> None:
        self._store = store
        self._sid = stream_id
        self._lock = threading.Lock()
        self._local = 0  # per-record mode: units reserved by calls in progress here

    def add(self, units: int) -> int:
        store = self._store
        if store.durability == "group":
            return store._leases.add(self._sid, units, store.group_wait)
        # Reservations held here by calls in progress count against the budget too.
        store._check_units(units)
        return store._add_durable(self._sid, units, self._local)

    def reserve(self, units: int) -> None:
        store = self._store
        if store.durability == "group":
            store._leases.reserve(self._sid, units)
            return
        with self._lock:
            state = store.load(self._sid)
            assert state is not None
            left = state.config.max_units - state.units - self._local
            if state.status != "open" or units > left:
                raise store._refusal(self._sid, state.status, units, left)
            self._local += units

    def commit(self, units: int) -> int:
        store = self._store
        if store.durability == "group":
            return store._leases.commit(self._sid, units, store.group_wait)
        with self._lock:
            self._local -= units
        return store.add_units(self._sid, units)

    def units_left(self) -> int | None:
        return None  # other processes may hold leases: the file knows

    def cancel(self, units: int) -> None:
        store = self._store
        if store.durability == "group":
            store._leases.cancel(self._sid, units)
            return
        with self._lock:
            self._local -= units
