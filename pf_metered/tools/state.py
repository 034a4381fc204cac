"""Durable tool state: which escrows and streams the tools made, and the money the caps watch.

Why a file: an MCP server is a long-lived process that an operator restarts (upgrades,
crashes, a laptop closing). What the agent built up — the escrows it made with
``escrow_create``, the streams it opened, how much of the operator's money is locked and how
much was ever paid out — must outlive the process, or a restarted server can neither release
nor refund what the previous one locked, and a lifetime spending cap starts again from zero.

:class:`ToolState` is one SQLite file (``ToolState("~/.local/share/pf-metered/mcp-state.sqlite3")``,
or ``ToolState()`` / ``":memory:"`` for throwaway state). It holds three tables of its own
(``mcp_escrows``, ``mcp_streams``, ``mcp_other_releases``) and, in the same file, the streams'
meter journal (:class:`~pf_metered.meter.sqlite_store.SQLiteStore`: counted units and release
intents), so a stream the previous process left open is resumed by the existing recovery
(``PaymentStream.resume``). One process at a time may use a file (an exclusive ``flock`` on
``PATH.lock``): two servers adopting the same escrows would pay twice.

A :class:`Book` is one owner's view (``state.book("stdio")``; each streamable-HTTP session has
its own owner), used by a :class:`~pf_metered.tools.ToolContext`. Caps are counted over the
whole file, whoever the owner:

* **locked** — money locked at once: each open escrow's remaining amount, each open stream's
  budget less what it has paid, and reservations of calls in flight. Paid and refunded money
  counts back. Capped by ``Caps(max_locked=...)``.
* **committed** — what may yet leave the payer over the server's life: everything ever
  released (escrows, streams, releases of other escrows) plus what is locked now (an escrow can
  auto-release whole). Capped by ``Caps(max_spend=...)``, so the cap holds even if every open
  escrow auto-releases.

What this module must never do: hold money as float (integers of micro-USDC only), perform
HTTP, forget a row (rows are never deleted: the lifetime spend is their sum), or let two calls
in flight together pass a cap (holds are taken under one lock before any I/O).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from pf_metered.errors import ConfigError
from pf_metered.money import format_usdc
from pf_metered.tools.errors import ToolError, offers

if TYPE_CHECKING:
    from pf_metered.meter.store import Store
    from pf_metered.models import Escrow
    from pf_metered.tools.caps import Caps

__all__ = [
    "MEMORY",
    "Book",
    "EscrowRecord",
    "Figures",
    "StreamRecord",
    "ToolState",
    "default_state_path",
    "strip_memo_tag",
]

MEMORY: Final = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mcp_escrows (
    escrow_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    provider TEXT NOT NULL,
    amount_micro INTEGER NOT NULL CHECK (amount_micro >= 0),
    released_micro INTEGER NOT NULL DEFAULT 0 CHECK (released_micro >= 0),
    refunded_micro INTEGER NOT NULL DEFAULT 0 CHECK (refunded_micro >= 0),
    remaining_micro INTEGER NOT NULL CHECK (remaining_micro >= 0),
    status TEXT NOT NULL,
    is_open INTEGER NOT NULL,
    memo TEXT NOT NULL,
    auto_release_at TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS mcp_streams (
    owner TEXT NOT NULL,
    handle TEXT NOT NULL,
    stream_id TEXT NOT NULL UNIQUE,
    provider TEXT NOT NULL,
    rate TEXT NOT NULL,
    budget_micro INTEGER NOT NULL CHECK (budget_micro >= 0),
    max_units INTEGER,
    is_open INTEGER NOT NULL,
    paid_micro INTEGER NOT NULL DEFAULT 0 CHECK (paid_micro >= 0),
    refunded_micro INTEGER NOT NULL DEFAULT 0 CHECK (refunded_micro >= 0),
    still_locked_micro INTEGER NOT NULL DEFAULT 0 CHECK (still_locked_micro >= 0),
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, handle)
);
CREATE TABLE IF NOT EXISTS mcp_other_releases (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL,
    escrow_id TEXT NOT NULL,
    amount_micro INTEGER NOT NULL CHECK (amount_micro >= 0),
    created_at REAL NOT NULL
);
"""


def default_state_path() -> Path:
    """``$XDG_DATA_HOME/pf-metered/mcp-state.sqlite3`` (``~/.local/share`` when unset).

    Why the data directory and not the working directory: an MCP runtime starts the server
    wherever it likes (often ``/``), and the state must be found again by the next start.
    """
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "share"
    return root / "pf-metered" / "mcp-state.sqlite3"


def strip_memo_tag(memo: str) -> str:
    """The memo as the caller wrote it: without the `` [idem:KEY]`` tag the client appends.

    Why the client puts the tag there at all: the deployed service ignores idempotency keys and
    the memo (``description``) is the only field it stores and returns, so the tag is how a
    create or release whose answer was lost is recognised on read-back instead of being sent
    twice. The model and the operator should see their own words.
    """
    text = memo.rstrip()
    if text.endswith("]"):
        start = text.rfind("[idem:")
        if start != -1 and "]" not in text[start:-1]:
            return text[:start].rstrip()
    return memo


@dataclass(frozen=True, slots=True)
class EscrowRecord:
    """An escrow made with ``escrow_create`` by the tools, as last seen."""

    escrow_id: str
    owner: str
    provider: str
    amount_micro: int
    released_micro: int
    refunded_micro: int
    remaining_micro: int
    status: str
    is_open: bool
    memo: str
    auto_release_at: str | None


@dataclass(frozen=True, slots=True)
class StreamRecord:
    """A stream opened with ``stream_open``; ``stream_id`` is its id in the meter journal."""

    owner: str
    handle: str
    stream_id: str
    provider: str
    rate: str
    budget_micro: int
    max_units: int | None
    is_open: bool
    paid_micro: int
    refunded_micro: int
    still_locked_micro: int = 0
    """A closed stream's money the service still holds (unused tranches until their timeout)."""


@dataclass(frozen=True, slots=True)
class Figures:
    """Money figures (micro-USDC) of one owner or of the whole file."""

    locked_micro: int
    paid_micro: int
    refunded_micro: int
    committed_micro: int

    def as_answer(self) -> dict[str, str]:
        return {
            "locked": format_usdc(self.locked_micro),
            "paid": format_usdc(self.paid_micro),
            "refunded": format_usdc(self.refunded_micro),
        }


class ToolState:
    """The state file (see the module docstring). ``ToolState()`` keeps it in memory."""

    def __init__(self, path: str | os.PathLike[str] = MEMORY) -> None:
        text = str(path)
        if not text:
            raise ConfigError("the state path is empty: give a file path or ':memory:'")
        self.path = text
        self._lock = threading.RLock()
        self._lockfile: IO[bytes] | None = None
        self._held_micro = 0
        if text == MEMORY:
            from pf_metered.meter.store import MemoryStore

            self._db = sqlite3.connect(MEMORY, isolation_level=None, check_same_thread=False)
            self.meter_store: Store = MemoryStore()
        else:
            file = Path(text).expanduser()
            try:
                file.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create the state directory {file.parent}: {exc}"
                ) from None
            self.path = str(file)
            self._claim(file)
            from pf_metered.meter.sqlite_store import SQLiteStore

            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 30000")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self.meter_store = SQLiteStore(self.path)
        self._db.row_factory = sqlite3.Row
        self._db.executescript(_SCHEMA)

    def _claim(self, file: Path) -> None:
        import fcntl

        lock_path = file.with_name(file.name + ".lock")
        handle = open(lock_path, "ab")  # noqa: SIM115 - held for the state's life
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ConfigError(
                f"the state file {file} is in use by another pf-metered mcp process; stop it, "
                "or give this server its own file with --state PATH (or --state :memory:)"
            ) from None
        self._lockfile = handle

    def __repr__(self) -> str:
        return f"ToolState({self.path!r})"

    @property
    def durable(self) -> bool:
        return self.path != MEMORY

    def close(self) -> None:
        """Close the file (the meter journal too) and let another process have it."""
        with self._lock:
            self.meter_store.close()
            self._db.close()
            if self._lockfile is not None:
                self._lockfile.close()
                self._lockfile = None

    def book(self, owner: str) -> Book:
        """The view of one owner (``"stdio"``, an HTTP session) over this file."""
        if not owner:
            raise ConfigError("a book needs an owner name")
        return Book(self, owner)

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- reading ---------------------------------------------------------------------------

    def _rows(self, table: str, owner: str | None, open_only: bool) -> list[sqlite3.Row]:
        """One table's rows (of ``owner``, or all; open ones only if asked), oldest first."""
        assert table in ("mcp_escrows", "mcp_streams")  # never a caller's text
        sql = f"SELECT * FROM {table} WHERE 1=1"  # noqa: S608 - the table is one of two names
        params: list[object] = []
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        if open_only:
            sql += " AND is_open = 1"
        with self._lock:
            rows: list[sqlite3.Row] = self._db.execute(
                sql + " ORDER BY created_at, rowid", params
            ).fetchall()
        return rows

    def escrows(self, owner: str | None = None, *, open_only: bool = False) -> list[EscrowRecord]:
        """Escrows the tools made (of ``owner``, or all), oldest first."""
        rows = self._rows("mcp_escrows", owner, open_only)
        return [
            EscrowRecord(
                r["escrow_id"],
                r["owner"],
                r["provider"],
                r["amount_micro"],
                r["released_micro"],
                r["refunded_micro"],
                r["remaining_micro"],
                r["status"],
                bool(r["is_open"]),
                r["memo"],
                r["auto_release_at"],
            )
            for r in rows
        ]

    def streams(self, owner: str | None = None, *, open_only: bool = False) -> list[StreamRecord]:
        """Streams the tools opened (of ``owner``, or all), oldest first; an open stream's
        ``paid_micro`` is read from its meter journal."""
        rows = self._rows("mcp_streams", owner, open_only)
        out = []
        for r in rows:
            paid = r["paid_micro"]
            if r["is_open"]:
                paid = self._journal_paid(r["stream_id"], paid)
            out.append(
                StreamRecord(
                    r["owner"],
                    r["handle"],
                    r["stream_id"],
                    r["provider"],
                    r["rate"],
                    r["budget_micro"],
                    r["max_units"],
                    bool(r["is_open"]),
                    paid,
                    r["refunded_micro"],
                    r["still_locked_micro"],
                )
            )
        return out

    def _journal_paid(self, stream_id: str, fallback: int) -> int:
        try:
            state = self.meter_store.load(stream_id)
        except Exception:  # a damaged journal must not hide the row; the row's figure stands
            return fallback
        return fallback if state is None else state.paid_micro

    def figures(self, owner: str | None = None) -> Figures:
        """Locked, paid, refunded and committed money (see the module docstring)."""
        locked = paid = refunded = 0
        for e in self.escrows(owner):
            paid += e.released_micro
            refunded += e.refunded_micro
            if e.is_open:
                locked += e.remaining_micro
        for s in self.streams(owner):
            paid += s.paid_micro
            refunded += s.refunded_micro
            if s.is_open:
                locked += max(s.budget_micro - s.paid_micro, 0)
            else:
                locked += s.still_locked_micro
        sql = "SELECT COALESCE(SUM(amount_micro), 0) FROM mcp_other_releases"
        params: tuple[object, ...] = ()
        if owner is not None:
            sql += " WHERE owner = ?"
            params = (owner,)
        with self._lock:
            other = int(self._db.execute(sql, params).fetchone()[0])
            held = self._held_micro if owner is None else 0
        paid += other
        return Figures(locked + held, paid, refunded, paid + locked + held)

    def describe_found(self) -> str:
        """What the file holds that still binds money, in a few lines (for startup)."""
        escrows = self.escrows(open_only=True)
        streams = self.streams(open_only=True)
        total = self.figures()
        where = f"state file {self.path}" if self.durable else "state in memory"
        head = (
            f"{where}: {len(escrows)} open escrow(s), {len(streams)} open stream(s); "
            f"{format_usdc(total.locked_micro)} USDC locked, {format_usdc(total.paid_micro)} paid "
            "over the server's life"
        )
        lines = [head]
        for e in escrows:
            until = f", auto-release at {e.auto_release_at}" if e.auto_release_at else ""
            lines.append(
                f"  escrow {e.escrow_id} ({e.owner}): {format_usdc(e.remaining_micro)} of "
                f"{format_usdc(e.amount_micro)} USDC locked for {e.provider}{until}"
            )
        for s in streams:
            lines.append(
                f"  stream {s.handle} ({s.owner}): budget {format_usdc(s.budget_micro)}, paid "
                f"{format_usdc(s.paid_micro)} USDC to {s.provider}"
            )
        return "\n".join(lines)


class Book:
    """One owner's escrows and streams in a :class:`ToolState`, and the caps' holds."""

    def __init__(self, state: ToolState, owner: str) -> None:
        self.state = state
        self.owner = owner

    def __repr__(self) -> str:
        return f"Book({self.owner!r}, {self.state!r})"

    # -- caps ------------------------------------------------------------------------------

    def hold(self, amount_micro: int, caps: Caps, *, what: str) -> None:
        """Hold ``amount_micro`` against ``max_locked`` and ``max_spend`` before it is locked;
        a :class:`ToolError` naming the cap and a next step if it does not fit."""
        state = self.state
        with state._lock:
            total = state.figures()
            if caps.max_locked_micro is not None:
                room = caps.max_locked_micro - total.locked_micro
                if amount_micro > room:
                    raise ToolError(
                        f"Cap max_locked exceeded: locking {what} {format_usdc(amount_micro)} "
                        f"USDC would make {format_usdc(total.locked_micro + amount_micro)} USDC "
                        f"locked at once; the operator's max_locked is "
                        f"{format_usdc(caps.max_locked_micro)} USDC "
                        f"({format_usdc(max(room, 0))} USDC free). {self._free_up(room)}",
                        kind="cap_exceeded",
                    )
            if caps.max_spend_micro is not None:
                room = caps.max_spend_micro - total.committed_micro
                if amount_micro > room:
                    raise ToolError(
                        f"Cap max_spend exceeded: {what} {format_usdc(amount_micro)} USDC could "
                        f"all be paid out, and {format_usdc(total.paid_micro)} USDC was already "
                        f"paid over this server's life with {format_usdc(total.locked_micro)} "
                        f"USDC still locked; the operator's max_spend is "
                        f"{format_usdc(caps.max_spend_micro)} USDC "
                        f"({format_usdc(max(room, 0))} USDC left). {self._spend_next(room)}",
                        kind="cap_exceeded",
                    )
            state._held_micro += amount_micro

    def _free_up(self, room: int) -> str:
        streams = [s.handle for s in self.state.streams(self.owner, open_only=True)]
        escrows = [e.escrow_id for e in self.state.escrows(self.owner, open_only=True)]
        steps = []
        if room > 0:
            steps.append(f"use at most {format_usdc(room)} USDC")
        if streams and offers("stream_close"):
            steps.append(f"close a stream you are done with (stream_close: {', '.join(streams)})")
        ways = [w for w in ("escrow_release", "escrow_refund") if offers(w)]
        if escrows and ways:
            steps.append(f"settle an escrow ({' or '.join(ways)}: {', '.join(escrows[-5:])})")
        if not steps and (streams or escrows):
            return (
                "Next: ask the user to settle what this session holds, or to have the operator "
                "raise max_locked."
            )
        if not steps:
            return (
                "Nothing of this session is locked; the room is held by other work. Try again "
                "later, or ask the user to have the operator raise max_locked."
            )
        return "Next: " + "; or ".join(steps) + "."

    def _spend_next(self, room: int) -> str:
        steps = []
        if room > 0:
            steps.append(f"use at most {format_usdc(room)} USDC")
        if offers("escrow_refund") and self.state.escrows(self.owner, open_only=True):
            steps.append("refund an escrow you no longer need (escrow_refund)")
        if offers("stream_close") and self.state.streams(self.owner, open_only=True):
            steps.append("close a stream (stream_close): its unused budget stops counting")
        if not steps:
            return (
                "This server may pay out nothing more; tell the user, whose operator can raise "
                "max_spend (the total is kept in the server's state file)."
            )
        return "Next: " + "; or ".join(steps) + "."

    def unhold(self, amount_micro: int) -> None:
        """Give back a hold whose lock failed."""
        with self.state._lock:
            self.state._held_micro = max(self.state._held_micro - amount_micro, 0)

    def check_spend(self, amount_micro: int, caps: Caps, *, what: str) -> None:
        """Refuse a release of an escrow the tools did not make that would pass ``max_spend``."""
        if caps.max_spend_micro is None:
            return
        total = self.state.figures()
        room = caps.max_spend_micro - total.committed_micro
        if amount_micro > room:
            raise ToolError(
                f"Cap max_spend exceeded: {what} {format_usdc(amount_micro)} USDC would pass the "
                f"operator's max_spend of {format_usdc(caps.max_spend_micro)} USDC over this "
                f"server's life ({format_usdc(max(room, 0))} USDC left). "
                f"{self._spend_next(room)}",
                kind="cap_exceeded",
            )

    # -- escrows ---------------------------------------------------------------------------

    def escrow_made(self, escrow: Escrow, *, provider: str, held_micro: int) -> None:
        """Record an escrow ``escrow_create`` made; its hold becomes the row's locked amount."""
        with self.state._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO mcp_escrows (escrow_id, owner, provider, amount_micro, "
                "released_micro, refunded_micro, remaining_micro, status, is_open, memo, "
                "auto_release_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    escrow.escrow_id,
                    self.owner,
                    escrow.to_agent_id or provider,
                    escrow.amount_micro,
                    escrow.released_micro,
                    escrow.refunded_micro,
                    escrow.remaining_micro,
                    escrow.status,
                    int(escrow.is_open),
                    strip_memo_tag(escrow.memo),
                    escrow.auto_release_at,
                    time.time(),
                ),
            )
            self.state._held_micro = max(self.state._held_micro - held_micro, 0)

    def escrow_seen(self, escrow: Escrow) -> None:
        """Update an escrow of this owner from a fresh answer (release, refund, status)."""
        with self.state._tx() as db:
            db.execute(
                "UPDATE mcp_escrows SET amount_micro = ?, released_micro = ?, refunded_micro = ?, "
                "remaining_micro = ?, status = ?, is_open = ?, "
                "auto_release_at = COALESCE(?, auto_release_at) WHERE escrow_id = ? AND owner = ?",
                (
                    escrow.amount_micro,
                    escrow.released_micro,
                    escrow.refunded_micro,
                    escrow.remaining_micro,
                    escrow.status,
                    int(escrow.is_open),
                    escrow.auto_release_at,
                    escrow.escrow_id,
                    self.owner,
                ),
            )

    def owns_escrow(self, escrow_id: str) -> bool:
        """Whether ``escrow_create`` of this owner made escrow ``escrow_id`` (in any run)."""
        with self.state._lock:
            row = self.state._db.execute(
                "SELECT 1 FROM mcp_escrows WHERE escrow_id = ? AND owner = ?",
                (escrow_id, self.owner),
            ).fetchone()
        return row is not None

    def other_release(self, escrow_id: str, amount_micro: int) -> None:
        """Count a release of an escrow the tools did not make (``release_any_escrow``)."""
        with self.state._tx() as db:
            db.execute(
                "INSERT INTO mcp_other_releases (owner, escrow_id, amount_micro, created_at) "
                "VALUES (?, ?, ?, ?)",
                (self.owner, escrow_id, amount_micro, time.time()),
            )

    # -- streams ---------------------------------------------------------------------------

    def stream_opened(
        self,
        *,
        handle: str,
        stream_id: str,
        provider: str,
        rate: str,
        budget_micro: int,
        max_units: int | None,
        held_micro: int,
    ) -> None:
        """Record a stream ``stream_open`` opened; its hold becomes the row's budget."""
        with self.state._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO mcp_streams (owner, handle, stream_id, provider, rate, "
                "budget_micro, max_units, is_open, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
                (
                    self.owner,
                    handle,
                    stream_id,
                    provider,
                    rate,
                    budget_micro,
                    max_units,
                    time.time(),
                ),
            )
            self.state._held_micro = max(self.state._held_micro - held_micro, 0)

    def stream_closed(
        self, handle: str, *, paid_micro: int, refunded_micro: int, still_locked_micro: int = 0
    ) -> None:
        """Record a stream's receipt: only what the service still holds stays locked."""
        with self.state._tx() as db:
            db.execute(
                "UPDATE mcp_streams SET is_open = 0, paid_micro = ?, refunded_micro = ?, "
                "still_locked_micro = ? WHERE owner = ? AND handle = ?",
                (paid_micro, refunded_micro, still_locked_micro, self.owner, handle),
            )

    def streams(self, *, open_only: bool = False) -> list[StreamRecord]:
        return self.state.streams(self.owner, open_only=open_only)

    def escrows(self, *, open_only: bool = False) -> list[EscrowRecord]:
        return self.state.escrows(self.owner, open_only=open_only)

    def figures(self) -> Figures:
        """This owner's locked, paid and refunded money."""
        return self.state.figures(self.owner)

    def last_handle_number(self) -> int:
        """The highest ``sN`` this owner has used, so new streams never reuse a handle."""
        numbers = [int(s.handle[1:]) for s in self.streams() if s.handle[1:].isdigit()]
        return max(numbers, default=0)
