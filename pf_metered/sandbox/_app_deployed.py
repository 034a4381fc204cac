"""The deployed escrow service, its casino registration and its faucet, served by the sandbox
over the same ledger as v1 — answering field for field as those services answer.

Why field for field: a user with a real key meets the *deployed* service (DESIGN.md, "The
deployed escrow service"). Once before, this replica returned the whole escrow from every POST
while the service returns a short action answer, and the client that parsed the replica could
not parse the service. ``tests/fixtures/deployed_answers.json`` records the service's answers;
``tests/test_deployed_contract.py`` holds this module and the client to them.

What is reproduced, per path (fixed 60 s windows per path *and* client address, a window
opened by its first request and renewed only once more than 60 s have passed, every request
counted — refused, unauthenticated or not — 429 ``rate_limited`` with no ``Retry-After``):

==================================  =====  ===================================================
``POST /escrow/create``             20     201 ``{escrow_id, amount_usd, commission_usd,
                                           net_to_counterparty, description, creator_id,
                                           counterparty_id, status: "funded", timeout_hours,
                                           auto_release_at, next_steps}``
``POST /escrow/complete/{id}``      30     ``{escrow_id, status: "completed", message,
                                           next_step, auto_release_at}`` (counterparty only)
``POST /escrow/release/{id}``       30     ``{escrow_id, status: "released", amount_released
                                           (the NET paid), commission, referral_commission,
                                           counterparty_id, message}`` (creator only)
``POST /escrow/dispute/{id}``       10     ``{escrow_id, status: "disputed", reason, message,
                                           contact}`` (either party)
``GET /escrow/{id}``                none   the escrow, to anyone with its id; ``events`` only
                                           for its two parties
``POST /api/v1/auth/register``      10     201 ``{agent_id, api_key, referral_code, balance,
                                           …}``; the casino asks the faucet for the agent's
                                           $1 grant at once
``POST /faucet/claim``              5      ``{credited, message, casino_url, claim_id,
                                           agent_id, referral_tracked}``; one claim per agent,
                                           one per client address a day (429
                                           ``ip_rate_limited``, "Try again in ~Nh.")
==================================  =====  ===================================================

and ``GET /health``, ``GET /openapi.json`` (the path list a client probes the dialect by),
``GET /escrow/stats``; anything else is 404 ``{"error": "not_found"}``. Every JSON object an
app answers carries the service's ``_info`` object, as the services' middleware adds it.

Money: the service keeps floats but rounds each figure it sends with ``toFixed(6)``, so what
it sends is a six-place decimal written as a JSON number (an integer when whole):
:func:`float_money` writes the same text from exact micro-USDC. ``timeout_hours`` is floored
and clamped to 1..720 without a word. Minimum 0.10. ``Idempotency-Key`` is ignored. Once
``timeout_hours`` pass, an escrow still funded or completed goes back to its creator *less*
the 1% commission (status ``refunded``; a disputed one stays).

Where the sandbox deliberately differs: amounts with more than six decimal places are refused
(400 ``invalid_amount``) rather than stored as floats, because the ledger keeps exact books,
and a string amount must be a plain ASCII decimal (the service's ``parseFloat`` reads more);
expiry happens at the deadline (the service sweeps every five minutes); the client address is
the socket's when no ``X-Forwarded-For`` / ``X-Real-IP`` is sent (the service would say
``unknown``); no referral commissions (always 0); ``list_path`` (off by default, as on the
service) serves the caller's escrows so the client's reconciliation by nonce can be exercised.

What this module must never do: move money except through the ledger, keep a float anywhere
but in the JSON it renders, echo a key (other than a new agent's own, once, at registration),
or honour an idempotency key.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, ClassVar, Final

from pf_metered.money import MICRO, PLAIN_DECIMAL, decimal_to_micro, fee_micro, format_usdc
from pf_metered.sandbox._clock import Clock
from pf_metered.sandbox._db import Database
from pf_metered.sandbox._http import AppRequest, AppResponse, InvalidJSON, parse_json_object
from pf_metered.sandbox._keys import hash_key, new_agent_id, new_api_key, parse_bearer
from pf_metered.sandbox._ledger import FAUCET_MICRO, EscrowRecord, Ledger, LedgerError
from pf_metered.sandbox._ratelimit import RateLimits

__all__ = [
    "DEFAULT_DEPLOYED_RATE_LIMITS",
    "DEPLOYED_MIN_MICRO",
    "ESCROW_INFO",
    "MAX_TIMEOUT_HOURS",
    "CasinoApp",
    "DeployedApp",
    "FaucetApp",
    "FixedWindows",
    "float_money",
]

DEPLOYED_MIN_MICRO: Final = 100_000
"""The deployed service's smallest escrow: 0.10."""

_MIN_AMOUNT: Final = Decimal("0.1")
_MAX_AMOUNT: Final = Decimal(10**12)
"""The smallest and largest ``amount_usd`` taken, built exactly (constants: arithmetic on
Decimals would use the caller's context)."""
_CENTS: Final = Context(prec=40, rounding=ROUND_HALF_UP)

MIN_TIMEOUT_HOURS: Final = 1
MAX_TIMEOUT_HOURS: Final = 720
DEFAULT_TIMEOUT_HOURS: Final = 24
FAUCET_COOLDOWN_US: Final = 24 * 3600 * MICRO

DEFAULT_DEPLOYED_RATE_LIMITS: Final = RateLimits(
    {
        "POST /escrow/create": 20,
        "POST /escrow/complete/{id}": 30,
        "POST /escrow/release/{id}": 30,
        "POST /escrow/dispute/{id}": 10,
        "POST /api/v1/auth/register": 10,
        "POST /faucet/claim": 5,
    }
)
"""Requests per 60 s window per concrete path and client address, as the services allow
(reads are not limited)."""

ESCROW_INFO: Final = {
    "service": "agent-escrow",
    "docs": "https://escrow.purpleflea.com/llms.txt",
    "referral": "GET /gossip — 15% referral commission on escrow fees",
    "version": "1.0.0",
}
CASINO_INFO: Final = {
    "service": "agent-casino",
    "docs": "https://casino.purpleflea.com/llms.txt",
    "referral": "GET /api/v1/gossip for passive income info",
    "version": "1.0.0",
}
FAUCET_INFO: Final = {
    "service": "agent-faucet",
    "docs": "https://faucet.purpleflea.com/llms.txt",
    "referral": "GET /gossip for referral info",
    "version": "1.0.0",
}

_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}\Z")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deployed_escrows (
    escrow_id     TEXT PRIMARY KEY REFERENCES escrows(escrow_id),
    timeout_hours INTEGER NOT NULL,
    timeout_at    INTEGER NOT NULL,
    completed_at  INTEGER,
    disputed_at   INTEGER,
    expired_at    INTEGER
);
CREATE INDEX IF NOT EXISTS deployed_due ON deployed_escrows(expired_at, timeout_at);
CREATE TABLE IF NOT EXISTS deployed_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL UNIQUE,
    escrow_id  TEXT NOT NULL REFERENCES escrows(escrow_id),
    event      TEXT NOT NULL,
    actor_id   TEXT,
    note       TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deployed_events_escrow ON deployed_events(escrow_id, seq);
CREATE TABLE IF NOT EXISTS faucet_address_claims (
    address    TEXT PRIMARY KEY,
    claimed_at INTEGER NOT NULL
);
"""


# ------------------------------------------------------------------------------ money, time


def float_money(micro: int) -> float | int:
    """An amount as the services render it: an int when whole, else the float whose shortest
    text is the six-place decimal (what ``parseFloat(x.toFixed(6))`` sends).

    The *only* floats in the sandbox live here, on their way into JSON text.
    """
    if micro % MICRO == 0:
        return micro // MICRO
    return float(format_usdc(micro))  # ok: the wire's float, written from exact text


def _iso_seconds(us: int) -> str:
    """A time as the service writes it: whole seconds, ``.000Z`` (it stores unix seconds)."""
    dt = datetime.fromtimestamp(us // MICRO, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _money_text(micro: int) -> str:
    """``toFixed(2)`` of an amount, as the services write dollars in messages: the nearest
    cent to the *float* they hold (so 1.005 shows as 1.00, as it does there)."""
    held = Decimal(float(format_usdc(micro)))  # ok: imitating the service's float, exactly
    return str(_CENTS.quantize(held, Decimal("0.01")))


def _js_number_text(micro: int) -> str:
    """An amount as JavaScript prints a number in a template string (``$0.1``, ``$2``)."""
    return json.dumps(float_money(micro))


# ------------------------------------------------------------------------------ answers


class _Answer(Exception):
    """An answer decided early (a refusal): status and body, ``_info`` added on the way out."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        super().__init__(body.get("error", "answer"))


def _refuse(status: int, code: str, message: str | None = None, **extra: Any) -> _Answer:
    body: dict[str, Any] = {"error": code}
    if message is not None:
        body["message"] = message
    body.update(extra)
    return _Answer(status, body)


def _render(status: int, body: dict[str, Any], info: Mapping[str, str]) -> AppResponse:
    """JSON text as the services send it, with their ``_info`` object appended."""
    out = dict(body)
    out["_info"] = dict(info)
    text = json.dumps(out, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return AppResponse(status, text.encode("utf-8"))


def _client_address(request: AppRequest) -> str:
    """The address the services key limits by: ``X-Forwarded-For``'s first entry, then
    ``X-Real-IP``; the socket's address where the service would say ``unknown``."""
    forwarded = (request.headers.get("x-forwarded-for") or "").split(",")[0].strip()
    return forwarded or (request.headers.get("x-real-ip") or "").strip() or request.client


class FixedWindows:
    """The services' limiter: per ``path:address``, a window opened by its first request and
    renewed once more than 60 s have passed since; every request counts; over the limit is
    refused (the count still grows). Thread-safe; by the sandbox clock."""

    WINDOW_MS: ClassVar[int] = 60_000

    def __init__(self, limits: RateLimits | None, clock: Clock) -> None:
        self._limits = limits
        self._clock = clock
        self._windows: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def check(self, route: str, request: AppRequest) -> _Answer | None:
        limit = None if self._limits is None else self._limits.limits.get(route)
        if limit is None:
            return None
        key = f"{request.path}:{_client_address(request)}"
        now = self._clock.now_us() // 1000
        with self._lock:
            if len(self._windows) > 10_000:
                self._windows = {
                    k: v for k, v in self._windows.items() if now - v[1] <= 2 * self.WINDOW_MS
                }
            count, start = self._windows.get(key, (0, now))
            if count == 0 or now - start > self.WINDOW_MS:
                count, start = 0, now
            count += 1
            self._windows[key] = (count, start)
        if count > limit:
            return _refuse(
                429,
                "rate_limited",
                f"Too many requests. Limit: {limit} per {self.WINDOW_MS // 1000}s",
            )
        return None


def _body(request: AppRequest) -> dict[str, Any]:
    """The body as the services read it: ``c.req.json().catch(() => ({}))``."""
    try:
        return parse_json_object(request.body, empty_ok=True)
    except InvalidJSON:
        return {}


def _js_trim(value: object) -> str | None:
    """``value?.trim()``: ``None`` for a missing field; a non-string throws on the service (a
    500 with nothing changed), here too."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _refuse(500, "internal_error")
    return value.strip()


def _amount_micro(value: object) -> int:
    """``amount_usd`` from a request: a JSON number (exact, from the text) or a numeric string;
    under the minimum (or not a number) is 400 ``invalid_amount`` with the service's words."""
    minimum = _refuse(
        400, "invalid_amount", f"Minimum escrow amount is ${_js_number_text(DEPLOYED_MIN_MICRO)}"
    )
    if isinstance(value, bool):
        raise minimum
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        # Deliberately stricter than the service's parseFloat: only plain ASCII decimals
        # (Decimal() would also read "1_0", "١٠", " 10 " or "1e3"), as the library sends.
        if len(value) > 64 or not PLAIN_DECIMAL.fullmatch(value):
            raise _refuse(400, "invalid_amount", "amount_usd must be a number")
        dec = Decimal(value)
    else:
        raise minimum
    if not dec.is_finite() or dec < _MIN_AMOUNT:
        raise minimum
    if dec > _MAX_AMOUNT:
        raise _refuse(400, "invalid_amount", "amount_usd is too large")
    try:
        return decimal_to_micro(dec)  # exact, whatever the thread's Decimal context
    except ValueError:
        raise _refuse(
            400, "invalid_amount", "amount_usd has more than 6 decimal places (USDC's precision)"
        ) from None


def _timeout_hours(value: object) -> int | None:
    """``min(max(1, floor(timeout_hours ?? 24)), 720)``; ``None`` when the service would get
    NaN (a non-numeric value), which fails its insert."""
    if value is None:
        return DEFAULT_TIMEOUT_HOURS
    number: Decimal
    if isinstance(value, bool):
        number = Decimal(int(value))
    elif isinstance(value, int | Decimal):
        number = Decimal(value)
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip() or "0")
        except InvalidOperation:
            return None
    else:
        return None
    if not number.is_finite():
        return MAX_TIMEOUT_HOURS if number > 0 else None
    floored = math.floor(number)
    return min(max(MIN_TIMEOUT_HOURS, floored), MAX_TIMEOUT_HOURS)


@dataclass(frozen=True, slots=True)
class _Meta:
    timeout_hours: int
    timeout_at: int
    completed_at: int | None
    disputed_at: int | None
    expired_at: int | None


# ------------------------------------------------------------------------------ escrow app


class DeployedApp:
    """Serves the deployed escrow service over a :class:`Ledger` (see the module docstring)."""

    def __init__(
        self,
        *,
        db: Database,
        ledger: Ledger,
        clock: Clock,
        rate_limits: RateLimits | None = DEFAULT_DEPLOYED_RATE_LIMITS,
        list_path: str | None = None,
    ) -> None:
        self._db = db
        self._ledger = ledger
        self._clock = clock
        self._started_us = clock.now_us()
        self._limits = FixedWindows(rate_limits, clock)
        self.list_path = list_path.rstrip("/") if list_path else None
        db.executescript(_SCHEMA)

    # -- expiry --------------------------------------------------------------------------

    def apply_due(self, conn: sqlite3.Connection, now_us: int) -> int:
        """Hand back every funded/completed escrow past its ``timeout_hours``, less 1%.

        Run lazily before every request (and by the Sandbox's ``tick``/``balance``), so a
        moved clock takes effect at the next look.
        """
        rows = conn.execute(
            "SELECT d.escrow_id, d.timeout_at, d.timeout_hours FROM deployed_escrows d "
            "JOIN escrows e ON e.escrow_id = d.escrow_id "
            "WHERE d.expired_at IS NULL AND d.disputed_at IS NULL AND e.status = 'locked' "
            "AND d.timeout_at <= ? ORDER BY e.seq",
            (now_us,),
        ).fetchall()
        for escrow_id, timeout_at, hours in rows:
            self._ledger.refund_less_fee(conn, str(escrow_id), int(timeout_at))
            conn.execute(
                "UPDATE deployed_escrows SET expired_at = ? WHERE escrow_id = ?",
                (int(timeout_at), escrow_id),
            )
            self._event(
                conn,
                str(escrow_id),
                "refunded",
                None,
                f"Auto-refunded after {hours}h timeout",
                now_us=int(timeout_at),
            )
        return len(rows)

    # -- records -------------------------------------------------------------------------

    def _event(
        self,
        conn: sqlite3.Connection,
        escrow_id: str,
        event: str,
        actor: str | None,
        note: str,
        *,
        now_us: int,
    ) -> None:
        suffix = "" if event == "created" else f"_{now_us // 1000}_{secrets.token_hex(2)}"
        conn.execute(
            "INSERT INTO deployed_events (event_id, escrow_id, event, actor_id, note, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (f"{escrow_id}_{event}{suffix}", escrow_id, event, actor, note, now_us // MICRO),
        )

    def _events(self, conn: sqlite3.Connection, escrow_id: str) -> list[dict[str, Any]]:
        rows = conn.execute(
            "SELECT event_id, escrow_id, event, actor_id, note, created_at FROM deployed_events "
            "WHERE escrow_id = ? ORDER BY created_at, seq",
            (escrow_id,),
        ).fetchall()
        keys = ("id", "escrow_id", "event", "actor_id", "note", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def _meta(self, conn: sqlite3.Connection, escrow_id: str) -> _Meta | None:
        row = conn.execute(
            "SELECT timeout_hours, timeout_at, completed_at, disputed_at, expired_at "
            "FROM deployed_escrows WHERE escrow_id = ?",
            (escrow_id,),
        ).fetchone()
        return None if row is None else _Meta(*row)

    def _found(self, conn: sqlite3.Connection, escrow_id: str, body: dict[str, Any]) -> Any:
        """The escrow and its deployed record, or the 404 the calling path answers."""
        meta = self._meta(conn, escrow_id) if _ID.match(escrow_id) else None
        if meta is None:
            raise _Answer(404, body)
        return self._ledger.read(conn, escrow_id), meta

    @staticmethod
    def _status(esc: EscrowRecord, meta: _Meta) -> str:
        if esc.status == "released":
            return "released"
        if esc.status == "refunded":
            return "refunded"
        if meta.disputed_at is not None:
            return "disputed"
        if meta.completed_at is not None:
            return "completed"
        return "funded"

    def render(
        self, conn: sqlite3.Connection, esc: EscrowRecord, *, with_events: bool = False
    ) -> dict[str, Any]:
        """``GET /escrow/{id}``'s answer (``events`` for a party only)."""
        meta = self._meta(conn, esc.escrow_id)
        if meta is None:
            raise _refuse(404, "not_found", "Escrow not found")
        commission = fee_micro(esc.amount)
        closed = _iso_seconds(esc.closed_at) if esc.closed_at is not None else None
        out: dict[str, Any] = {
            "escrow_id": esc.escrow_id,
            "status": self._status(esc, meta),
            "amount_usd": float_money(esc.amount),
            "commission_usd": float_money(commission),
            "net_to_counterparty": float_money(esc.amount - commission),
            "description": esc.memo,
            "creator_id": esc.from_agent_id,
            "counterparty_id": esc.to_agent_id,
            "timeout_hours": meta.timeout_hours,
            "created_at": _iso_seconds(esc.created_at),
            "auto_release_at": _iso_seconds(meta.timeout_at),
            "completed_at": _iso_seconds(meta.completed_at) if meta.completed_at else None,
            "released_at": closed,
            "disputed_at": _iso_seconds(meta.disputed_at) if meta.disputed_at else None,
        }
        if with_events:
            out["events"] = self._events(conn, esc.escrow_id)
        return out

    # -- routing -------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, str | None] | None:
        """``(route, escrow id)`` as the service's router matches, or ``None`` (404)."""
        parts = path.split("/")[1:] if path.startswith("/") else None
        if parts is None:
            return None
        if method == "GET":
            if self.list_path is not None and path.rstrip("/") == self.list_path:
                return "GET list", None
            if path == "/":
                return "GET /", None
            if path in ("/health", "/openapi.json", "/escrow/stats"):
                return f"GET {path}", None
            if len(parts) == 2 and parts[0] == "escrow" and parts[1]:
                return "GET /escrow/{id}", parts[1]
            return None
        if method == "POST":
            if path == "/escrow/create":
                return "POST /escrow/create", None
            if (
                len(parts) == 3
                and parts[0] == "escrow"
                and parts[1] in ("complete", "release", "dispute")
                and parts[2]
            ):
                return f"POST /escrow/{parts[1]}/{{id}}", parts[2]
        return None

    def handle(self, request: AppRequest) -> AppResponse:
        routed = self._route(request.method.upper(), request.path)
        if routed is None:
            return _render(404, {"error": "not_found"}, ESCROW_INFO)
        route, escrow_id = routed
        try:
            limited = self._limits.check(route, request)
            if limited is not None:
                raise limited
            with self._db.transaction() as conn:
                now = self._clock.now_us()
                self.apply_due(conn, now)
                api_key = parse_bearer(request.headers.get("authorization"))
                agent = self._ledger.agent_for_key(conn, hash_key(api_key)) if api_key else None
                with self._db.savepoint(conn):
                    status, body = self._operation(
                        conn, route, escrow_id, request, agent=agent, now=now
                    )
        except _Answer as answer:
            return _render(answer.status, answer.body, ESCROW_INFO)
        return _render(status, body, ESCROW_INFO)

    # -- operations ----------------------------------------------------------------------

    def _operation(
        self,
        conn: sqlite3.Connection,
        route: str,
        escrow_id: str | None,
        request: AppRequest,
        *,
        agent: str | None,
        now: int,
    ) -> tuple[int, dict[str, Any]]:
        if route == "GET /":
            return 200, {
                "service": "agent-escrow",
                "version": "1.0.0",
                "endpoints": {
                    "POST /escrow/create": "Create escrow — deducts from creator casino balance",
                    "POST /escrow/complete/:id": "Counterparty marks task complete",
                    "POST /escrow/release/:id": "Creator releases funds to counterparty",
                    "POST /escrow/dispute/:id": "Flag escrow for manual review",
                    "GET /escrow/:id": "Get escrow status",
                },
            }
        if route == "GET /health":
            uptime = (now - self._started_us) / MICRO  # ok: seconds, not money
            return 200, {"status": "ok", "service": "agent-escrow", "uptime": uptime}
        if route == "GET /openapi.json":
            return 200, _OPENAPI
        if route == "GET /escrow/stats":
            return 200, self._stats(conn)
        if route == "GET list":
            if agent is None:
                raise _refuse(401, "unauthorized")
            rows = conn.execute(
                "SELECT e.escrow_id FROM escrows e JOIN deployed_escrows d "
                "ON d.escrow_id = e.escrow_id WHERE e.from_agent_id = ? OR e.to_agent_id = ? "
                "ORDER BY e.seq",
                (agent, agent),
            ).fetchall()
            return 200, {
                "escrows": [self.render(conn, self._ledger.read(conn, r[0])) for r in rows]
            }
        if route == "POST /escrow/create":
            return 201, self._create(conn, request, agent, now)
        assert escrow_id is not None
        if route == "GET /escrow/{id}":
            esc, _meta = self._found(
                conn, escrow_id, {"error": "not_found", "message": "Escrow not found"}
            )
            party = agent is not None and agent in (esc.from_agent_id, esc.to_agent_id)
            return 200, self.render(conn, esc, with_events=party)
        if agent is None:
            raise _refuse(401, "unauthorized")
        if route == "POST /escrow/release/{id}":
            return 200, self._release(conn, escrow_id, agent, now)
        if route == "POST /escrow/complete/{id}":
            return 200, self._complete(conn, escrow_id, agent, now)
        return 200, self._dispute(conn, escrow_id, request, agent, now)

    def _create(
        self, conn: sqlite3.Connection, request: AppRequest, creator: str | None, now: int
    ) -> dict[str, Any]:
        if creator is None:
            raise _refuse(
                401,
                "unauthorized",
                "Bearer {casino_api_key} required. Register at casino.purpleflea.com.",
            )
        body = _body(request)
        raw_amount = body.get("amount_usd")
        description = _js_trim(body.get("description"))
        counterparty = _js_trim(body.get("counterparty_agent_id"))
        hours = _timeout_hours(body.get("timeout_hours"))
        amount = _amount_micro("0" if raw_amount is None else raw_amount)
        if not description or len(description) < 3:
            raise _refuse(400, "invalid_description", "description is required (min 3 chars)")
        if not counterparty or not counterparty.startswith("ag_"):
            raise _refuse(
                400, "invalid_counterparty", "counterparty_agent_id must be in ag_xxx format"
            )
        if counterparty == creator:
            raise _refuse(400, "self_escrow", "Cannot create escrow with yourself")
        if not _ID.match(counterparty) or not self._ledger.is_agent(conn, counterparty):
            raise _refuse(404, "counterparty_not_found", "Counterparty agent not found in casino")
        balance = self._ledger.balance(conn, creator)
        if balance < amount:
            raise _refuse(
                402,
                "insufficient_balance",
                f"Balance ${_money_text(balance)} < escrow amount ${_money_text(amount)}",
                balance=float_money(balance),
            )
        if hours is None:  # the service's insert fails on NaN hours, and gives the money back
            raise _refuse(500, "internal_error", "Failed to create escrow record.")
        escrow_id = f"esc_{uuid.uuid4().hex[:16]}"
        try:
            esc = self._ledger.lock(
                conn,
                payer=creator,
                payee=counterparty,
                amount=amount,
                memo=description,
                auto_release_at=None,
                now_us=now,
                escrow_id=escrow_id,
            )
        except LedgerError as exc:
            raise _refuse(400, exc.kind, exc.message) from None
        created_s = now // MICRO * MICRO
        timeout_at = created_s + hours * 3600 * MICRO
        conn.execute(
            "INSERT INTO deployed_escrows (escrow_id, timeout_hours, timeout_at) VALUES (?, ?, ?)",
            (esc.escrow_id, hours, timeout_at),
        )
        self._event(
            conn,
            esc.escrow_id,
            "created",
            creator,
            f'Escrow created: ${_js_number_text(amount)} for "{description}"',
            now_us=now,
        )
        commission = fee_micro(amount)
        return {
            "escrow_id": esc.escrow_id,
            "amount_usd": float_money(amount),
            "commission_usd": float_money(commission),
            "net_to_counterparty": float_money(amount - commission),
            "description": description,
            "creator_id": creator,
            "counterparty_id": counterparty,
            "status": "funded",
            "timeout_hours": hours,
            "auto_release_at": _iso_seconds(timeout_at),
            "next_steps": {
                "counterparty": f"POST /escrow/complete/{esc.escrow_id} when task is done",
                "creator": f"POST /escrow/release/{esc.escrow_id} to release funds",
                "dispute": f"POST /escrow/dispute/{esc.escrow_id} if something goes wrong",
            },
        }

    def _release(
        self, conn: sqlite3.Connection, escrow_id: str, agent: str, now: int
    ) -> dict[str, Any]:
        esc, meta = self._found(
            conn, escrow_id, {"error": "not_found", "message": "Escrow not found"}
        )
        if esc.from_agent_id != agent:
            raise _refuse(403, "forbidden", "Only the escrow creator can release funds")
        status = self._status(esc, meta)
        if status not in ("funded", "completed"):
            raise _refuse(409, "invalid_status", f"Cannot release escrow in status '{status}'")
        commission = fee_micro(esc.amount)
        net = esc.amount - commission
        self._ledger.release(
            conn, escrow_id, caller=agent, amount=esc.remaining, memo="release", now_us=now
        )
        self._event(conn, escrow_id, "released", agent, f"Released by creator {agent}", now_us=now)
        return {
            "escrow_id": escrow_id,
            "status": "released",
            "amount_released": float_money(net),
            "commission": float_money(commission),
            "referral_commission": 0,
            "counterparty_id": esc.to_agent_id,
            "message": f"${_money_text(net)} released to counterparty.",
        }

    def _complete(
        self, conn: sqlite3.Connection, escrow_id: str, agent: str, now: int
    ) -> dict[str, Any]:
        esc, meta = self._found(
            conn, escrow_id, {"error": "not_found", "message": "Escrow not found"}
        )
        if esc.to_agent_id != agent:
            raise _refuse(403, "forbidden", "Only the counterparty can mark the task complete")
        status = self._status(esc, meta)
        if status != "funded":
            raise _refuse(409, "invalid_status", f"Cannot complete escrow in status '{status}'")
        conn.execute(
            "UPDATE deployed_escrows SET completed_at = ? WHERE escrow_id = ?", (now, escrow_id)
        )
        self._event(
            conn, escrow_id, "completed", agent, "Counterparty marked task complete", now_us=now
        )
        return {
            "escrow_id": escrow_id,
            "status": "completed",
            "message": "Task marked complete. Waiting for creator to release funds.",
            "next_step": f"Creator should call POST /escrow/release/{escrow_id}",
            "auto_release_at": _iso_seconds(meta.timeout_at),
        }

    def _dispute(
        self, conn: sqlite3.Connection, escrow_id: str, request: AppRequest, agent: str, now: int
    ) -> dict[str, Any]:
        esc, meta = self._found(conn, escrow_id, {"error": "not_found"})
        if agent not in (esc.from_agent_id, esc.to_agent_id):
            raise _refuse(403, "forbidden", "Only escrow participants can dispute")
        status = self._status(esc, meta)
        if status not in ("funded", "completed"):
            raise _refuse(409, "invalid_status", f"Cannot dispute escrow in status '{status}'")
        reason = _js_trim(_body(request).get("reason")) or "No reason provided"
        conn.execute(
            "UPDATE deployed_escrows SET disputed_at = ? WHERE escrow_id = ?", (now, escrow_id)
        )
        self._event(conn, escrow_id, "disputed", agent, reason, now_us=now)
        return {
            "escrow_id": escrow_id,
            "status": "disputed",
            "reason": reason,
            "message": "Escrow flagged for manual review. Purple Flea team will investigate.",
            "contact": "support@purpleflea.com",
        }

    def _stats(self, conn: sqlite3.Connection) -> dict[str, Any]:
        created, volume = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(e.amount), 0) FROM deployed_escrows d "
            "JOIN escrows e ON e.escrow_id = d.escrow_id"
        ).fetchone()
        released, commission = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(e.amount), 0) FROM deployed_escrows d "
            "JOIN escrows e ON e.escrow_id = d.escrow_id WHERE e.status = 'released'"
        ).fetchone()
        disputed = conn.execute(
            "SELECT COUNT(*) FROM deployed_escrows WHERE disputed_at IS NOT NULL"
        ).fetchone()[0]
        return {
            "total_created": int(created),
            "total_released": int(released),
            "total_disputed": int(disputed),
            "total_volume_usd": float_money(int(volume) // 10_000 * 10_000),
            "total_commission_usd": float_money(fee_micro(int(commission)) // 10_000 * 10_000),
            "commission_rate": "1%",
            "referral_commission_rate": "15% of fees",
        }


def _openapi_paths() -> dict[str, Any]:
    def op(method: str, summary: str) -> dict[str, Any]:
        return {method: {"summary": summary}}

    return {
        "/health": op("get", "Health check"),
        "/escrow/create": op("post", "Create escrow — lock funds for a task"),
        "/escrow/complete/{id}": op("post", "Mark task complete (counterparty only)"),
        "/escrow/release/{id}": op("post", "Release funds to counterparty (creator only)"),
        "/escrow/dispute/{id}": op("post", "Flag escrow for manual review"),
        "/escrow/{id}": op("get", "Get escrow status"),
        "/escrow/stats": op("get", "Public escrow volume and commission statistics"),
    }


_OPENAPI: Final[dict[str, Any]] = {
    "openapi": "3.0.0",
    "info": {"title": "Purple Flea Agent Escrow", "version": "1.0.0"},
    "paths": _openapi_paths(),
}
"""The service's ``/openapi.json``, cut to its title and path list (what a dialect probe
reads)."""


# ------------------------------------------------------------------------------ casino + faucet


class _OnePostApp:
    """A service that answers one ``POST`` path, rate limited by its path and address."""

    path: ClassVar[str]
    info: ClassVar[Mapping[str, str]]

    def __init__(
        self,
        *,
        db: Database,
        ledger: Ledger,
        clock: Clock,
        rate_limits: RateLimits | None = DEFAULT_DEPLOYED_RATE_LIMITS,
    ) -> None:
        self._db = db
        self._ledger = ledger
        self._clock = clock
        self._limits = FixedWindows(rate_limits, clock)

    def handle(self, request: AppRequest) -> AppResponse:
        if request.path != self.path or request.method.upper() != "POST":
            return _render(404, self.not_found(request), self.info)
        try:
            limited = self._limits.check(f"POST {self.path}", request)
            if limited is not None:
                raise limited
            status, body = self.post(_body(request), request)
        except _Answer as answer:
            return _render(answer.status, answer.body, self.info)
        return _render(status, body, self.info)

    def not_found(self, request: AppRequest) -> dict[str, Any]:
        return {"error": "not_found"}

    def post(self, body: dict[str, Any], request: AppRequest) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError


class FaucetApp(_OnePostApp):
    """The faucet service: ``POST /faucet/claim {agent_casino_id}`` credits $1 once per agent
    and once per client address a day."""

    path = "/faucet/claim"
    info = FAUCET_INFO

    def post(self, body: dict[str, Any], request: AppRequest) -> tuple[int, dict[str, Any]]:
        agent = body.get("agent_casino_id")
        agent = agent.strip() if isinstance(agent, str) else None
        if not agent or not agent.startswith("ag_"):
            raise _refuse(400, "invalid_request", "agent_casino_id is required (ag_xxx format)")
        return 200, self.claim(agent, _client_address(request))

    def claim(self, agent: str, address: str) -> dict[str, Any]:
        """Credit the grant (one per agent, one per address a day) or refuse as the faucet
        does; also what the casino calls for a new agent at registration."""
        now = self._clock.now_us()
        with self._db.transaction() as conn:
            row = conn.execute(
                "SELECT claimed_at FROM faucet_address_claims WHERE address = ?", (address,)
            ).fetchone()
            if row is not None and now - int(row[0]) < FAUCET_COOLDOWN_US:
                hours = -(-(FAUCET_COOLDOWN_US - (now - int(row[0]))) // (3600 * MICRO))
                raise _refuse(
                    429,
                    "ip_rate_limited",
                    f"Already claimed from this IP today. Try again in ~{hours}h.",
                )
            if not _ID.match(agent) or not self._ledger.is_agent(conn, agent):
                raise _refuse(
                    404,
                    "agent_not_found",
                    "Agent not found in casino. Register at "
                    "https://casino.purpleflea.com/api/v1/auth/register",
                )
            try:
                self._ledger.claim_faucet(conn, agent, now)
            except LedgerError:
                raise _refuse(
                    409, "already_claimed", "This agent has already claimed the faucet bonus."
                ) from None
            conn.execute(
                "INSERT INTO faucet_address_claims (address, claimed_at) VALUES (?, ?) "
                "ON CONFLICT(address) DO UPDATE SET claimed_at = excluded.claimed_at",
                (address, now),
            )
        return {
            "credited": float_money(FAUCET_MICRO),
            "message": "Free $1 credited. Use it to try the casino!",
            "casino_url": "https://casino.purpleflea.com",
            "claim_id": str(uuid.uuid4()),
            "agent_id": agent,
            "referral_tracked": False,
        }


class CasinoApp(_OnePostApp):
    """The casino's registration: ``POST /api/v1/auth/register`` → a new agent, whose $1
    faucet grant the casino claims at once on its behalf."""

    path = "/api/v1/auth/register"
    info = CASINO_INFO

    def __init__(self, *, faucet: FaucetApp, **kw: Any) -> None:
        super().__init__(**kw)
        self._faucet = faucet

    def not_found(self, request: AppRequest) -> dict[str, Any]:
        return {
            "error": "not_found",
            "message": f"{request.method.upper()} {request.path} not found",
            "docs": "/api/v1/docs",
            "openapi": "/openapi.json",
        }

    def post(self, body: dict[str, Any], request: AppRequest) -> tuple[int, dict[str, Any]]:
        agent_id, api_key = new_agent_id(), new_api_key()
        with self._db.transaction() as conn:
            self._ledger.create_agent(conn, agent_id, hash_key(api_key), 0, self._clock.now_us())
        # the casino's own request to the faucet (not counted against the caller's address);
        # as on the service, a faucet refusal never blocks a registration
        with contextlib.suppress(_Answer):
            self._faucet.claim(agent_id, f"casino:{agent_id}")
        return 201, {
            "agent_id": agent_id,
            "api_key": api_key,
            "referral_code": f"ref_{secrets.token_hex(4)}",
            "balance": 0,
            "tier": "free",
            "risk_factor": 0.25,
            "referral_commission": "10% of net losses from referred agents",
            "message": "Store your API key securely — it cannot be recovered.",
            "next_steps": [
                "GET /api/v1/auth/balance — check your balance",
                "POST /api/v1/auth/deposit-address — get a deposit address",
            ],
        }


def deployed_mounts(
    *,
    db: Database,
    ledger: Ledger,
    clock: Clock,
    rate_limits: RateLimits | Mapping[str, int] | None = DEFAULT_DEPLOYED_RATE_LIMITS,
    list_path: str | None = None,
) -> tuple[DeployedApp, CasinoApp, FaucetApp]:
    """The three apps of the deployed services, sharing one ledger and one clock."""
    limits = (
        rate_limits
        if rate_limits is None or isinstance(rate_limits, RateLimits)
        else RateLimits(dict(rate_limits))
    )
    faucet = FaucetApp(db=db, ledger=ledger, clock=clock, rate_limits=limits)
    return (
        DeployedApp(db=db, ledger=ledger, clock=clock, rate_limits=limits, list_path=list_path),
        CasinoApp(faucet=faucet, db=db, ledger=ledger, clock=clock, rate_limits=limits),
        faucet,
    )


def expected_commission_micro(amount_micro: int) -> int:
    """The 1% the service keeps on a release or an expiry, at the micro-USDC."""
    return fee_micro(amount_micro)
