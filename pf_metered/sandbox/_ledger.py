"""The escrow ledger: accounts, escrows, releases, the fee account and the faucet, in SQLite.

Why it is dialect-neutral: the v1 streaming API and the deployed service's older dialect name
things differently (``locked`` vs ``funded``, ``amount`` vs ``amount_usd``, partial vs whole
releases) but move money the same way. Every operation here is one of *lock*, *release an
amount*, *refund the rest*, *auto-release what is due*, *read*, *list*, *faucet*; an HTTP
dialect maps its paths, fields and error codes onto them and never touches a table itself.

Every operation takes the open connection of a write transaction (see :mod:`._db`), so the
caller decides what commits together (the v1 app stores the idempotent answer in the same
transaction as the money moving: a replay can never disagree with the books).

Invariants kept here, checked by :meth:`Ledger.audit`:

* money is integer micro-USDC everywhere; no balance is ever negative (a ``CHECK`` as well);
* Σ balances (fee account included) + Σ remaining of open escrows == Σ minted;
* per escrow: released + refunded + remaining == amount, Σ release amounts == released,
  Σ release fees == fee == ``fee_micro(released)`` (the 1% on the *cumulative* release), and
  the escrow's ``release_count`` counter == its number of release rows (answers report the
  count without scanning the history).

What this module must never do: parse wire formats, know an HTTP status, accept a float, or
write outside a transaction.
"""

from __future__ import annotations

import secrets
import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, Literal

from pf_metered.money import fee_micro, micro_to_decimal
from pf_metered.sandbox._db import Database

__all__ = [
    "FAUCET_MICRO",
    "FEE_ACCOUNT_ID",
    "AuditReport",
    "EscrowRecord",
    "Ledger",
    "LedgerError",
    "ReleaseRecord",
]

FEE_ACCOUNT_ID: Final = "pf_fee"
"""The account every fee is credited to. It has no key and cannot be paid by an escrow."""

FAUCET_MICRO: Final = 1_000_000
"""What the faucet credits a new agent, once: one USDC."""

LedgerStatus = Literal["locked", "released", "refunded", "disputed"]
ErrorKind = Literal[
    "not_found",
    "forbidden",
    "insufficient_balance",
    "invalid_status",
    "invalid_amount",
    "invalid_request",
    "already_claimed",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    account_id   TEXT PRIMARY KEY,
    kind         TEXT NOT NULL CHECK (kind IN ('agent', 'fee')),
    key_hash     TEXT UNIQUE,
    balance      INTEGER NOT NULL CHECK (balance >= 0),
    faucet_claim TEXT,
    created_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS mints (
    mint_id     INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id  TEXT NOT NULL REFERENCES accounts(account_id),
    kind        TEXT NOT NULL CHECK (kind IN ('funding', 'faucet')),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS escrows (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    escrow_id       TEXT NOT NULL UNIQUE,
    from_agent_id   TEXT NOT NULL REFERENCES accounts(account_id),
    to_agent_id     TEXT NOT NULL REFERENCES accounts(account_id),
    amount          INTEGER NOT NULL CHECK (amount > 0),
    released        INTEGER NOT NULL DEFAULT 0 CHECK (released >= 0),
    refunded        INTEGER NOT NULL DEFAULT 0 CHECK (refunded >= 0),
    fee             INTEGER NOT NULL DEFAULT 0 CHECK (fee >= 0),
    status          TEXT NOT NULL
                    CHECK (status IN ('locked', 'released', 'refunded', 'disputed')),
    memo            TEXT NOT NULL DEFAULT '',
    created_at      INTEGER NOT NULL,
    auto_release_at INTEGER,
    closed_at       INTEGER,
    release_count   INTEGER NOT NULL DEFAULT 0 CHECK (release_count >= 0),
    CHECK (released + refunded <= amount)
);
CREATE INDEX IF NOT EXISTS escrows_due ON escrows(status, auto_release_at);
CREATE INDEX IF NOT EXISTS escrows_from ON escrows(from_agent_id);
CREATE INDEX IF NOT EXISTS escrows_to ON escrows(to_agent_id);
CREATE TABLE IF NOT EXISTS releases (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id  TEXT NOT NULL UNIQUE,
    escrow_id   TEXT NOT NULL REFERENCES escrows(escrow_id),
    kind        TEXT NOT NULL CHECK (kind IN ('partial', 'auto')),
    amount      INTEGER NOT NULL CHECK (amount > 0),
    fee         INTEGER NOT NULL CHECK (fee >= 0),
    memo        TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS releases_escrow ON releases(escrow_id, seq);
-- deployed dialect: the 1% the service keeps when an escrow expires back to its creator
CREATE TABLE IF NOT EXISTS refund_fees (
    escrow_id   TEXT PRIMARY KEY REFERENCES escrows(escrow_id),
    fee         INTEGER NOT NULL CHECK (fee >= 0),
    created_at  INTEGER NOT NULL
);
"""

_ESCROW_COLUMNS = (
    "escrow_id, from_agent_id, to_agent_id, amount, released, refunded, fee, status, memo, "
    "created_at, auto_release_at, closed_at"
)


class LedgerError(Exception):
    """An operation refused by the ledger's rules; ``kind`` is dialect-neutral.

    Raised before any write of the refused operation (or inside a savepoint the caller rolls
    back), so a refused operation leaves nothing half-done.
    """

    def __init__(self, kind: ErrorKind, message: str) -> None:
        self.kind: ErrorKind = kind
        self.message = message
        super().__init__(f"{kind}: {message}")


@dataclass(frozen=True, slots=True)
class EscrowRecord:
    """An escrow's row; amounts in micro-USDC, times in microseconds since the epoch."""

    escrow_id: str
    from_agent_id: str
    to_agent_id: str
    amount: int
    released: int
    refunded: int
    fee: int
    status: LedgerStatus
    memo: str
    created_at: int
    auto_release_at: int | None
    closed_at: int | None

    @property
    def remaining(self) -> int:
        """What is still locked: amount − released − refunded."""
        return self.amount - self.released - self.refunded

    @property
    def is_open(self) -> bool:
        return self.status == "locked"


@dataclass(frozen=True, slots=True)
class ReleaseRecord:
    """One movement from an escrow to its provider (``kind`` ``auto`` for an auto-release)."""

    release_id: str
    escrow_id: str
    kind: Literal["partial", "auto"]
    amount: int
    fee: int
    memo: str
    created_at: int


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The ledger's books at one instant, and whatever does not add up.

    ``minted == balances + fees + escrowed`` is conservation of money; ``problems`` lists every
    broken invariant in words (empty when the books are sound).
    """

    minted_micro: int
    balances_micro: int
    fees_micro: int
    escrowed_micro: int
    agents: int
    escrows: int
    open_escrows: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def minted(self) -> Decimal:
        return micro_to_decimal(self.minted_micro)

    @property
    def balances(self) -> Decimal:
        return micro_to_decimal(self.balances_micro)

    @property
    def fees(self) -> Decimal:
        return micro_to_decimal(self.fees_micro)

    @property
    def escrowed(self) -> Decimal:
        return micro_to_decimal(self.escrowed_micro)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _escrow(row: tuple[object, ...]) -> EscrowRecord:
    return EscrowRecord(*row)  # type: ignore[arg-type]


class Ledger:
    """The escrow ledger's operations. Each takes a connection inside a write transaction."""

    def __init__(self, db: Database, now_us: int) -> None:
        """Create the schema (idempotent) and the fee account if this database is new."""
        db.executescript(_SCHEMA)
        with db.transaction() as conn:
            columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(escrows)").fetchall()}
            if "release_count" not in columns:  # a sandbox file from before the counter
                conn.execute(
                    "ALTER TABLE escrows ADD COLUMN release_count INTEGER NOT NULL DEFAULT 0 "
                    "CHECK (release_count >= 0)"
                )
                conn.execute(
                    "UPDATE escrows SET release_count = (SELECT COUNT(*) FROM releases "
                    "WHERE releases.escrow_id = escrows.escrow_id)"
                )
            conn.execute(
                "INSERT OR IGNORE INTO accounts (account_id, kind, key_hash, balance, created_at) "
                "VALUES (?, 'fee', NULL, 0, ?)",
                (FEE_ACCOUNT_ID, now_us),
            )

    # -- accounts ------------------------------------------------------------------------

    def create_agent(
        self, conn: sqlite3.Connection, agent_id: str, key_hash: str, balance: int, now_us: int
    ) -> None:
        """Open an agent's account; ``balance`` is minted as funding."""
        if balance < 0:
            raise LedgerError("invalid_amount", "an opening balance cannot be negative")
        if self._account(conn, agent_id) is not None:
            raise LedgerError("invalid_request", f"agent {agent_id} already exists")
        conn.execute(
            "INSERT INTO accounts (account_id, kind, key_hash, balance, created_at) "
            "VALUES (?, 'agent', ?, 0, ?)",
            (agent_id, key_hash, now_us),
        )
        if balance:
            self.mint(conn, agent_id, balance, "funding", now_us)

    def mint(
        self,
        conn: sqlite3.Connection,
        account_id: str,
        amount: int,
        kind: Literal["funding", "faucet"],
        now_us: int,
    ) -> None:
        """Create money in an agent's account, and record that it was created."""
        if amount <= 0:
            raise LedgerError("invalid_amount", "a mint must be positive")
        if self._account(conn, account_id) != "agent":
            raise LedgerError("not_found", f"no agent {account_id}")
        conn.execute(
            "INSERT INTO mints (account_id, kind, amount, created_at) VALUES (?, ?, ?, ?)",
            (account_id, kind, amount, now_us),
        )
        self._credit(conn, account_id, amount)

    def agent_for_key(self, conn: sqlite3.Connection, key_hash: str) -> str | None:
        """The agent whose key hashes to ``key_hash``, if any."""
        row = conn.execute(
            "SELECT account_id FROM accounts WHERE key_hash = ? AND kind = 'agent'", (key_hash,)
        ).fetchone()
        return None if row is None else str(row[0])

    def is_agent(self, conn: sqlite3.Connection, agent_id: str) -> bool:
        return self._account(conn, agent_id) == "agent"

    def balance(self, conn: sqlite3.Connection, account_id: str) -> int:
        """An account's balance in micro-USDC (``not_found`` for an unknown account)."""
        row = conn.execute(
            "SELECT balance FROM accounts WHERE account_id = ?", (account_id,)
        ).fetchone()
        if row is None:
            raise LedgerError("not_found", f"no account {account_id}")
        return int(row[0])

    def agent_ids(self, conn: sqlite3.Connection) -> list[str]:
        rows = conn.execute(
            "SELECT account_id FROM accounts WHERE kind = 'agent' ORDER BY created_at, rowid"
        ).fetchall()
        return [str(r[0]) for r in rows]

    def claim_faucet(self, conn: sqlite3.Connection, agent_id: str, now_us: int) -> str:
        """Credit one USDC to an agent that never claimed; returns the claim id."""
        row = conn.execute(
            "SELECT faucet_claim FROM accounts WHERE account_id = ? AND kind = 'agent'",
            (agent_id,),
        ).fetchone()
        if row is None:
            raise LedgerError("not_found", f"no agent {agent_id}")
        if row[0] is not None:
            raise LedgerError("already_claimed", "this agent already claimed the faucet")
        claim_id = _new_id("claim")
        conn.execute(
            "UPDATE accounts SET faucet_claim = ? WHERE account_id = ?", (claim_id, agent_id)
        )
        self.mint(conn, agent_id, FAUCET_MICRO, "faucet", now_us)
        return claim_id

    # -- escrows -------------------------------------------------------------------------

    def lock(
        self,
        conn: sqlite3.Connection,
        *,
        payer: str,
        payee: str,
        amount: int,
        memo: str,
        auto_release_at: int | None,
        now_us: int,
        escrow_id: str | None = None,
    ) -> EscrowRecord:
        """Move ``amount`` from the payer's balance into a new open escrow for ``payee``
        (``escrow_id``: the id to give it, in a dialect's own shape; a fresh one by default)."""
        if amount <= 0:
            raise LedgerError("invalid_amount", "an escrow amount must be positive")
        if not self.is_agent(conn, payee):
            raise LedgerError("not_found", f"no agent {payee}")
        if payer == payee:
            raise LedgerError("invalid_request", "an agent cannot open an escrow to itself")
        self._debit(conn, payer, amount)
        if escrow_id is None:
            escrow_id = _new_id("esc")
        conn.execute(
            "INSERT INTO escrows (escrow_id, from_agent_id, to_agent_id, amount, status, memo, "
            "created_at, auto_release_at) VALUES (?, ?, ?, ?, 'locked', ?, ?, ?)",
            (escrow_id, payer, payee, amount, memo, now_us, auto_release_at),
        )
        return self.read(conn, escrow_id)

    def release(
        self,
        conn: sqlite3.Connection,
        escrow_id: str,
        *,
        caller: str,
        amount: int,
        memo: str,
        now_us: int,
    ) -> EscrowRecord:
        """Pay ``amount`` of an open escrow to its provider, less the fee difference.

        The fee owed is ``fee_micro(released so far + amount)``; this release is charged what
        that exceeds the fee already paid, so a thousand releases of 0.10 pay exactly 1.00.
        """
        esc = self._payer_only(conn, escrow_id, caller, "release")
        if amount <= 0:
            raise LedgerError("invalid_amount", "a release must be positive")
        if amount > esc.remaining:
            raise LedgerError(
                "invalid_amount", "the release is more than what remains in the escrow"
            )
        self._pay_out(conn, esc, amount=amount, memo=memo, kind="partial", at_us=now_us)
        return self.read(conn, escrow_id)

    def refund(
        self, conn: sqlite3.Connection, escrow_id: str, *, caller: str, now_us: int
    ) -> EscrowRecord:
        """Close an open escrow and give what remains back to the payer."""
        esc = self._payer_only(conn, escrow_id, caller, "refund")
        rest = esc.remaining
        conn.execute(
            "UPDATE escrows SET refunded = refunded + ?, status = 'refunded', closed_at = ? "
            "WHERE escrow_id = ?",
            (rest, now_us, escrow_id),
        )
        if rest:
            self._credit(conn, esc.from_agent_id, rest)
        return self.read(conn, escrow_id)

    def refund_less_fee(
        self, conn: sqlite3.Connection, escrow_id: str, now_us: int
    ) -> EscrowRecord:
        """Deployed dialect's expiry: close an open escrow, what remains back to the payer
        *less* the 1% fee (kept in ``refund_fees``, so the audit can account for it)."""
        esc = self.read(conn, escrow_id)
        if not esc.is_open:
            raise LedgerError("invalid_status", f"the escrow is {esc.status}, not open")
        rest = esc.remaining
        fee = fee_micro(rest)
        conn.execute(
            "UPDATE escrows SET refunded = refunded + ?, status = 'refunded', closed_at = ? "
            "WHERE escrow_id = ?",
            (rest, now_us, escrow_id),
        )
        conn.execute(
            "INSERT INTO refund_fees (escrow_id, fee, created_at) VALUES (?, ?, ?)",
            (escrow_id, fee, now_us),
        )
        if rest - fee:
            self._credit(conn, esc.from_agent_id, rest - fee)
        if fee:
            self._credit(conn, FEE_ACCOUNT_ID, fee)
        return self.read(conn, escrow_id)

    def apply_due(self, conn: sqlite3.Connection, now_us: int) -> int:
        """Auto-release every open escrow whose deadline has passed; returns how many.

        What remains goes to the provider (less the fee) and the escrow is ``released``. Run
        lazily before every request and by ``Sandbox.tick()``, so a moved clock takes effect
        at the next look.
        """
        rows = conn.execute(
            f"SELECT {_ESCROW_COLUMNS} FROM escrows WHERE status = 'locked' "  # noqa: S608
            "AND auto_release_at IS NOT NULL AND auto_release_at <= ? ORDER BY seq",
            (now_us,),
        ).fetchall()
        for row in rows:
            esc = _escrow(row)
            due_at = esc.auto_release_at if esc.auto_release_at is not None else now_us
            if esc.remaining:
                self._pay_out(
                    conn, esc, amount=esc.remaining, memo="auto-release", kind="auto", at_us=due_at
                )
            else:  # pragma: no cover - a locked escrow with nothing left is closed at release
                conn.execute(
                    "UPDATE escrows SET status = 'released', closed_at = ? WHERE escrow_id = ?",
                    (now_us, esc.escrow_id),
                )
        return len(rows)

    def read(
        self, conn: sqlite3.Connection, escrow_id: str, caller: str | None = None
    ) -> EscrowRecord:
        """One escrow; with a ``caller``, only a party to it may read it (``forbidden``)."""
        row = conn.execute(
            f"SELECT {_ESCROW_COLUMNS} FROM escrows WHERE escrow_id = ?",  # noqa: S608
            (escrow_id,),
        ).fetchone()
        if row is None:
            raise LedgerError("not_found", f"no escrow {escrow_id}")
        esc = _escrow(row)
        if caller is not None and caller not in (esc.from_agent_id, esc.to_agent_id):
            raise LedgerError("forbidden", "only the payer or the provider may read this escrow")
        return esc

    def releases(self, conn: sqlite3.Connection, escrow_id: str) -> list[ReleaseRecord]:
        """An escrow's release history, oldest first."""
        rows = conn.execute(
            "SELECT release_id, escrow_id, kind, amount, fee, memo, created_at FROM releases "
            "WHERE escrow_id = ? ORDER BY seq",
            (escrow_id,),
        ).fetchall()
        return [ReleaseRecord(*r) for r in rows]

    def release_count(self, conn: sqlite3.Connection, escrow_id: str) -> int:
        """How many releases an escrow has had (a counter kept with the escrow: O(1))."""
        row = conn.execute(
            "SELECT release_count FROM escrows WHERE escrow_id = ?", (escrow_id,)
        ).fetchone()
        return 0 if row is None else int(row[0])

    def recent_releases(
        self, conn: sqlite3.Connection, escrow_id: str, limit: int
    ) -> list[ReleaseRecord]:
        """An escrow's ``limit`` most recent releases, oldest first (an index range, O(limit))."""
        rows = conn.execute(
            "SELECT release_id, escrow_id, kind, amount, fee, memo, created_at FROM releases "
            "WHERE escrow_id = ? ORDER BY seq DESC LIMIT ?",
            (escrow_id, limit),
        ).fetchall()
        return [ReleaseRecord(*r) for r in reversed(rows)]

    def releases_page(
        self, conn: sqlite3.Connection, escrow_id: str, offset: int, limit: int
    ) -> list[ReleaseRecord]:
        """Releases ``offset .. offset + limit - 1`` of an escrow's history, oldest first."""
        rows = conn.execute(
            "SELECT release_id, escrow_id, kind, amount, fee, memo, created_at FROM releases "
            "WHERE escrow_id = ? ORDER BY seq LIMIT ? OFFSET ?",
            (escrow_id, limit, offset),
        ).fetchall()
        return [ReleaseRecord(*r) for r in rows]

    def list_for(self, conn: sqlite3.Connection, agent_id: str) -> list[EscrowRecord]:
        """Every escrow the agent pays or is paid by, oldest first."""
        rows = conn.execute(
            f"SELECT {_ESCROW_COLUMNS} FROM escrows "  # noqa: S608
            "WHERE from_agent_id = ? OR to_agent_id = ? ORDER BY seq",
            (agent_id, agent_id),
        ).fetchall()
        return [_escrow(r) for r in rows]

    # -- audit ---------------------------------------------------------------------------

    def audit(self, conn: sqlite3.Connection) -> AuditReport:
        """Check conservation of money and every per-escrow invariant; never raises."""
        problems: list[str] = []
        minted = int(conn.execute("SELECT COALESCE(SUM(amount), 0) FROM mints").fetchone()[0])
        balances = int(
            conn.execute(
                "SELECT COALESCE(SUM(balance), 0) FROM accounts WHERE kind = 'agent'"
            ).fetchone()[0]
        )
        fees = self.balance(conn, FEE_ACCOUNT_ID)
        negative = conn.execute("SELECT COUNT(*) FROM accounts WHERE balance < 0").fetchone()[0]
        if negative:
            problems.append(f"{negative} account(s) have a negative balance")
        escrowed = 0
        open_count = 0
        fee_total = 0
        escrows = conn.execute(f"SELECT {_ESCROW_COLUMNS} FROM escrows").fetchall()  # noqa: S608
        sums = {
            str(r[0]): (int(r[1]), int(r[2]), int(r[3]))
            for r in conn.execute(
                "SELECT escrow_id, SUM(amount), SUM(fee), COUNT(*) FROM releases GROUP BY escrow_id"
            ).fetchall()
        }
        counts = {
            str(r[0]): int(r[1])
            for r in conn.execute("SELECT escrow_id, release_count FROM escrows").fetchall()
        }
        for row in escrows:
            esc = _escrow(row)
            fee_total += esc.fee
            if esc.remaining < 0:
                problems.append(f"{esc.escrow_id}: released + refunded exceed the amount")
            if esc.is_open:
                open_count += 1
                escrowed += esc.remaining
            elif esc.remaining:
                problems.append(f"{esc.escrow_id}: closed ({esc.status}) with money left in it")
            rel_sum, rel_fees, rel_count = sums.get(esc.escrow_id, (0, 0, 0))
            if rel_count != counts.get(esc.escrow_id, 0):
                problems.append(
                    f"{esc.escrow_id}: {rel_count} releases, counter says "
                    f"{counts.get(esc.escrow_id, 0)}"
                )
            if rel_sum != esc.released:
                problems.append(f"{esc.escrow_id}: releases sum to {rel_sum}, not {esc.released}")
            if rel_fees != esc.fee:
                problems.append(f"{esc.escrow_id}: release fees sum to {rel_fees}, not {esc.fee}")
            if esc.fee != fee_micro(esc.released):
                problems.append(
                    f"{esc.escrow_id}: fee {esc.fee} is not 1% of released {esc.released}"
                )
            if esc.status == "released" and esc.refunded:
                problems.append(f"{esc.escrow_id}: released escrow has a refund")
        fee_total += int(  # deployed dialect: fees kept on expiry refunds
            conn.execute("SELECT COALESCE(SUM(fee), 0) FROM refund_fees").fetchone()[0]
        )
        if fee_total != fees:
            problems.append(f"fee account holds {fees}, escrows charged {fee_total}")
        if balances + fees + escrowed != minted:
            problems.append(
                f"money not conserved: balances {balances} + fees {fees} + escrowed {escrowed}"
                f" != minted {minted}"
            )
        agents = int(
            conn.execute("SELECT COUNT(*) FROM accounts WHERE kind = 'agent'").fetchone()[0]
        )
        return AuditReport(
            minted_micro=minted,
            balances_micro=balances,
            fees_micro=fees,
            escrowed_micro=escrowed,
            agents=agents,
            escrows=len(escrows),
            open_escrows=open_count,
            problems=tuple(problems),
        )

    # -- internals -----------------------------------------------------------------------

    def _account(self, conn: sqlite3.Connection, account_id: str) -> str | None:
        row = conn.execute(
            "SELECT kind FROM accounts WHERE account_id = ?", (account_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def _payer_only(
        self, conn: sqlite3.Connection, escrow_id: str, caller: str, what: str
    ) -> EscrowRecord:
        esc = self.read(conn, escrow_id)
        if caller != esc.from_agent_id:
            raise LedgerError("forbidden", f"only the payer may {what} this escrow")
        if not esc.is_open:
            raise LedgerError("invalid_status", f"the escrow is {esc.status}, not open")
        return esc

    def _pay_out(
        self,
        conn: sqlite3.Connection,
        esc: EscrowRecord,
        *,
        amount: int,
        memo: str,
        kind: Literal["partial", "auto"],
        at_us: int,
    ) -> None:
        released = esc.released + amount
        fee = fee_micro(released) - esc.fee
        closes = released + esc.refunded == esc.amount
        cur = conn.execute(
            "UPDATE escrows SET released = ?, fee = fee + ?, status = ?, closed_at = ?, "
            "release_count = release_count + 1 "
            "WHERE escrow_id = ? AND status = 'locked' AND released = ?",
            (
                released,
                fee,
                "released" if closes else "locked",
                at_us if closes else None,
                esc.escrow_id,
                esc.released,
            ),
        )
        if cur.rowcount != 1:  # pragma: no cover - the transaction lock makes this impossible
            raise RuntimeError(f"escrow {esc.escrow_id} changed under a release")
        conn.execute(
            "INSERT INTO releases (release_id, escrow_id, kind, amount, fee, memo, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (_new_id("rel"), esc.escrow_id, kind, amount, fee, memo, at_us),
        )
        self._credit(conn, esc.to_agent_id, amount - fee)
        if fee:
            self._credit(conn, FEE_ACCOUNT_ID, fee)

    def _credit(self, conn: sqlite3.Connection, account_id: str, amount: int) -> None:
        cur = conn.execute(
            "UPDATE accounts SET balance = balance + ? WHERE account_id = ?", (amount, account_id)
        )
        if cur.rowcount != 1:  # pragma: no cover - accounts are checked before money moves
            raise LedgerError("not_found", f"no account {account_id}")

    def _debit(self, conn: sqlite3.Connection, account_id: str, amount: int) -> None:
        cur = conn.execute(
            "UPDATE accounts SET balance = balance - ? WHERE account_id = ? AND balance >= ?",
            (amount, account_id, amount),
        )
        if cur.rowcount != 1:
            raise LedgerError("insufficient_balance", "the balance cannot cover this escrow")
