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
    and never more than that**: every ``claim`` (so every release) first commits this
    process's buffered units in the same transaction, so a release never pays for units that
    are not on disk, and a unit that was paid for is never lost. ``sync()`` (and ``close()``,
    ``load()`` and interpreter exit) waits until every unit counted so far is durable; with
    ``group_wait=True`` each ``add_units`` waits for its group's commit (concurrent recorders
    share one fsync) and nothing returned is ever at risk.
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


class _Buffer:
    """One stream's in-memory side in group mode: units counted, not yet committed.

    ``lease`` is budget this process holds in the file and has not used; ``pending`` units
    were counted against it and await the flusher; ``reserved`` is held by calls in progress.
    The invariant ``pending + reserved + lease == the lease row in the file`` holds between
    flushes, so the file's ``units + Σ leases ≤ max_units`` bounds what every process counts.
    """

    __slots__ = ("known", "lease", "lock", "open", "pending", "reserved", "stream_id")

    def __init__(self, stream_id: str, known: int, is_open: bool) -> None:
        self.stream_id = stream_id
        self.lock = threading.Lock()
        self.known = known  # units committed to the file, as last seen by this process
        self.lease = 0
        self.pending = 0
        self.reserved = 0
        self.open = is_open


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
        self._buffers: dict[str, _Buffer] = {}
        self._buffers_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._flushed = threading.Condition(threading.Lock())
        self._generation = 0  # bumped (under _gen_lock) after buffered units are counted
        self._gen_lock = threading.Lock()
        self._durable_generation = 0  # the generation the last flush made durable
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
                self._buffers = {}
                self._flusher = None
                self._owner = new_owner_id()
            self._conn = self._connect()
            self._pid = pid
        return self._conn

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
        if self.durability == "group" and stream_id in self._buffers:
            self.sync()
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
        buf = self._buffers.get(stream_id)
        if buf is not None:
            with buf.lock:
                buf.open = status in ("new", "open")

    def add_units(self, stream_id: str, units: int) -> int:
        """Count ``units`` within the budget; see the module docstring for when it is durable."""
        self._check_units(units)
        if self.durability == "group":
            return self._group_add(stream_id, units)
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
        buf = self._buffers.get(stream_id) if self.durability == "group" else None
        if buf is not None and final:
            with buf.lock:
                buf.open = False  # nothing may be counted locally after the final claim
        with self._tx() as db:
            if buf is not None:
                self._flush_one(db, buf, final=final)
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
        buf = self._buffers.get(stream_id)
        if buf is not None:
            with buf.lock:
                buf.open = False

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
                if owner == self._owner or owner_alive(str(owner)) is not True:
                    db.execute(
                        "DELETE FROM leases WHERE stream_id = ? AND owner = ?", (stream_id, owner)
                    )
        with self._buffers_lock:
            buf = self._buffers.pop(stream_id, None)
        if buf is not None and (buf.pending or buf.reserved):
            # Our own buffer: put it back so the units are not lost.
            with self._buffers_lock:
                self._buffers[stream_id] = buf
            with buf.lock:
                buf.lease = 0
            with self._tx() as db:
                self._take_lease(db, buf, buf.pending + buf.reserved, exact=True)

    # ------------------------------------------------------------ group mode
    def _buffer(self, stream_id: str) -> _Buffer:
        buf = self._buffers.get(stream_id)
        if buf is not None:
            return buf
        with self._buffers_lock:
            buf = self._buffers.get(stream_id)
            if buf is None:
                with self._lock:
                    row = self._row(self._db(), stream_id)
                buf = _Buffer(stream_id, int(row["units"]), row["status"] == "open")
                self._buffers[stream_id] = buf
            if self._flusher is None or not self._flusher.is_alive():
                self._stop.clear()
                self._flusher = threading.Thread(
                    target=self._flush_loop, name="pf-metered-sqlite-flusher", daemon=True
                )
                self._flusher.start()
        return buf

    def _group_add(self, stream_id: str, units: int) -> int:
        buf = self._buffer(stream_id)
        with buf.lock:
            if buf.open and units <= buf.lease:
                buf.lease -= units
                buf.pending += units
                total = buf.known + buf.pending
                gen = self._next_generation()
            else:
                gen = -1
        if gen < 0:
            total, gen = self._group_add_slow(buf, units)
        if self.group_wait:
            self._wait_durable(gen)
        return total

    def _group_add_slow(self, buf: _Buffer, units: int) -> tuple[int, int]:
        """The lease ran out (or the stream is not open): top it up in the file, then count."""
        with self._tx() as db:
            self._take_lease(db, buf, units)
            with buf.lock:
                if not buf.open or units > buf.lease:
                    row = self._row(db, buf.stream_id)
                    left = int(row["max_units"]) - int(row["units"])
                    left -= self._leased(db, buf.stream_id)
                    raise self._refusal(
                        buf.stream_id,
                        "open" if buf.open else str(row["status"]),
                        units,
                        left + buf.lease,
                    )
                buf.lease -= units
                buf.pending += units
                return buf.known + buf.pending, self._next_generation()

    def _take_lease(
        self, db: sqlite3.Connection, buf: _Buffer, need: int, *, exact: bool = False
    ) -> None:
        """Grow this process's lease so that ``need`` more units fit (inside a transaction)."""
        row = self._row(db, buf.stream_id)
        status, max_units, units = str(row["status"]), int(row["max_units"]), int(row["units"])
        with buf.lock:
            buf.known = units
            buf.open = buf.open and status == "open"
            if status != "open":
                return
            held = buf.pending + buf.reserved + buf.lease
            free = max_units - units - self._leased(db, buf.stream_id)
            want = need if exact else max(need, self.lease_units) - buf.lease
            grant = max(0, min(want, free))
            if grant == 0:
                return
            buf.lease += grant
            db.execute(
                "INSERT INTO leases (stream_id, owner, units) VALUES (?, ?, ?) "
                "ON CONFLICT (stream_id, owner) DO UPDATE SET units = ?",
                (buf.stream_id, self._owner, held + grant, held + grant),
            )

    def _flush_one(self, db: sqlite3.Connection, buf: _Buffer, *, final: bool = False) -> None:
        """Commit ``buf``'s counted units inside the caller's transaction."""
        with buf.lock:
            pending, buf.pending = buf.pending, 0
        if not pending:
            return
        row = self._row(db, buf.stream_id)
        status = str(row["status"])
        if status != "open":
            self.refused_units += pending
            log.error(
                "pf_metered: %d units counted in this process could not be committed: "
                "stream %s is %s (closed by another process)",
                pending,
                buf.stream_id,
                status,
            )
            return
        db.execute(
            "UPDATE streams SET units = units + ? WHERE stream_id = ?", (pending, buf.stream_id)
        )
        db.execute(
            "UPDATE leases SET units = MAX(units - ?, 0) WHERE stream_id = ? AND owner = ?",
            (pending, buf.stream_id, self._owner),
        )
        with buf.lock:
            buf.known = int(row["units"]) + pending
        del final

    def _next_generation(self) -> int:
        """Number the units just counted (called under their buffer's lock, after counting).

        Why a lock: a flush that has read generation ``g`` must find every unit numbered
        ``≤ g`` already in its buffer, or a ``group_wait`` caller could return before its unit
        is on disk. Serialising the numbering after the count gives exactly that.
        """
        with self._gen_lock:
            self._generation += 1
            return self._generation

    def _flush_all(self) -> None:
        with self._gen_lock:
            gen = self._generation
        buffers = list(self._buffers.values())
        # Under the store lock: a flush that finds nothing pending must not report `gen`
        # durable while another flush that took those units has not committed yet.
        with self._lock:
            if any(b.pending for b in buffers):
                with self._tx() as db:
                    for buf in buffers:
                        self._flush_one(db, buf)
                        if buf.open and buf.lease < self.lease_units // 2:
                            self._take_lease(db, buf, 0)
        with self._flushed:
            self._durable_generation = max(self._durable_generation, gen)
            self._flushed.notify_all()

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._kick.wait(self.group_interval)
            self._kick.clear()
            try:
                self._flush_all()
            except Exception:  # keep flushing; sync() surfaces errors
                log.exception("pf_metered: SQLite group commit failed; retrying")
                time.sleep(min(self.group_interval * 10, 1.0))

    def _wait_durable(self, gen: int) -> None:
        with self._flushed:
            if self._durable_generation >= gen:
                return
        self._kick.set()
        with self._flushed:
            while self._durable_generation < gen:
                if not self._flushed.wait(timeout=1.0) and not (
                    self._flusher and self._flusher.is_alive()
                ):
                    break
        if self._durable_generation < gen:
            self._flush_all()

    def sync(self) -> None:
        """Wait until every unit counted so far in this process is durable (group mode)."""
        if self.durability == "group" and self._buffers:
            self._flush_all()

    def close(self) -> None:
        """Commit what is buffered, stop the flusher, close the connection. Idempotent."""
        if self._closed:
            return
        if self._pid == os.getpid():
            self.sync()
            self._return_leases()
        self._stop.set()
        self._kick.set()
        flusher = self._flusher
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(timeout=5)
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
            self._closed = True
        _LIVE.discard(self)

    def _return_leases(self) -> None:
        """Give back the budget this process leased and did not use (others may use it)."""
        buffers = [b for b in self._buffers.values() if b.lease]
        if not buffers:
            return
        with self._tx() as db:
            for buf in buffers:
                self._flush_one(db, buf)
                with buf.lock:
                    buf.lease = 0
                    held = buf.pending + buf.reserved
                db.execute(
                    "UPDATE leases SET units = ? WHERE stream_id = ? AND owner = ?",
                    (held, buf.stream_id, self._owner),
                )

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
            return store._group_add(self._sid, units)
        # Reservations held here by calls in progress count against the budget too.
        store._check_units(units)
        return store._add_durable(self._sid, units, self._local)

    def reserve(self, units: int) -> None:
        store = self._store
        if store.durability == "group":
            buf = store._buffer(self._sid)
            with buf.lock:
                if buf.open and units <= buf.lease:
                    buf.lease -= units
                    buf.reserved += units
                    return
            with store._tx() as db:
                store._take_lease(db, buf, units)
                with buf.lock:
                    if not buf.open or units > buf.lease:
                        status = "open" if buf.open else "closing"
                        raise store._refusal(self._sid, status, units, buf.lease)
                    buf.lease -= units
                    buf.reserved += units
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
            buf = store._buffer(self._sid)
            with buf.lock:
                buf.reserved -= units
                buf.pending += units
                gen = store._next_generation()
                total = buf.known + buf.pending
            if store.group_wait:
                store._wait_durable(gen)
            return total
        with self._lock:
            self._local -= units
        return store.add_units(self._sid, units)

    def units_left(self) -> int | None:
        return None  # other processes may hold leases: the file knows

    def cancel(self, units: int) -> None:
        store = self._store
        if store.durability == "group":
            buf = store._buffer(self._sid)
            with buf.lock:
                buf.reserved -= units
                buf.lease += units
            return
        with self._lock:
            self._local -= units
