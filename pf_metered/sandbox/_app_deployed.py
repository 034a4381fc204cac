"""The deployed escrow service's dialect, served by the sandbox over the same ledger as v1.

Why: a user with a real key today meets the *deployed* service (DESIGN.md, "two dialects"),
so every behaviour of it the library must survive is reproduced here, over the sandbox's
dialect-neutral :class:`~pf_metered.sandbox._ledger.Ledger`:

* ``POST /escrow/create {amount_usd, description, counterparty_agent_id, timeout_hours}`` → 201
  with ``status: "funded"``; ``POST /escrow/release/{id}`` releases the **whole** escrow
  (creator, from ``funded`` or ``completed``; a second release is 409 ``invalid_status``);
  ``POST /escrow/complete/{id}`` (counterparty); ``POST /escrow/dispute/{id}`` (either party;
  the money stays locked); ``GET /escrow/{id}``;
* money as JSON **numbers computed with floats** (``commission_usd`` = ``amount × 0.01`` and
  ``net_to_counterparty`` = ``amount − commission`` in binary floating point, so
  ``42.99669999999999`` appears on the wire); whole amounts as integers; ``"2.5"`` accepted as a
  string; minimum 0.10;
* fixed 60-second rate windows per path (so per escrow id) and client address, by the sandbox
  clock, counting failed and unauthenticated requests too, answered 429 ``rate_limited``
  **without** ``Retry-After``;
* ``Idempotency-Key`` ignored: the same create twice makes two escrows;
* what the service calls auto-release: once ``timeout_hours`` pass, an escrow still funded or
  completed goes back to its creator **less** the 1% commission (a disputed one stays locked);
* errors ``{error, message}`` with ``invalid_amount`` 400, ``unauthorized`` 401,
  ``insufficient_balance`` 402, ``forbidden`` 403, ``not_found`` 404, ``invalid_status`` 409,
  ``rate_limited`` 429;
* beside it, the casino's ``POST /api/v1/auth/register`` → ``{agent_id, api_key}`` and the
  faucet's ``POST /faucet/claim {agent_casino_id}`` → ``{credited: 1.0, claim_id}`` (409
  ``already_claimed``), as two more small apps.

Optional (off by default, as on the real service): ``list_path`` serves the caller's escrows, so
the client's reconciliation of a lost create by its description nonce can be exercised.

Where the sandbox deliberately differs: amounts with more than six decimal places are refused
(400 ``invalid_amount``) rather than stored as floats, because the ledger keeps exact books.

What this module must never do: move money except through the ledger, keep a float anywhere
but in the JSON it renders, echo a key (other than a new agent's own, once, at registration),
or honour an idempotency key.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, ClassVar, Final

from pf_metered.money import MICRO, PLAIN_DECIMAL, decimal_to_micro, fee_micro, format_usdc
from pf_metered.sandbox._clock import Clock, isoformat_us
from pf_metered.sandbox._db import Database
from pf_metered.sandbox._http import (
    AppRequest,
    AppResponse,
    InvalidJSON,
    error_response,
    parse_json_object,
)
from pf_metered.sandbox._keys import hash_key, new_agent_id, new_api_key, parse_bearer
from pf_metered.sandbox._ledger import FAUCET_MICRO, EscrowRecord, Ledger, LedgerError
from pf_metered.sandbox._ratelimit import RateLimiter, RateLimits

__all__ = [
    "DEFAULT_DEPLOYED_RATE_LIMITS",
    "DEPLOYED_MIN_MICRO",
    "CasinoApp",
    "DeployedApp",
    "FaucetApp",
    "float_money",
]

DEPLOYED_MIN_MICRO: Final = 100_000
"""The deployed service's smallest escrow: 0.10."""

_MAX_AMOUNT: Final = Decimal(10**12)
"""The largest ``amount_usd`` taken, built exactly (the constructor never rounds)."""

MAX_TIMEOUT_HOURS: Final = 8760
DEFAULT_TIMEOUT_HOURS: Final = 24
MAX_DESCRIPTION: Final = 1000

DEFAULT_DEPLOYED_RATE_LIMITS: Final = RateLimits(
    {
        "POST /escrow/create": 10,
        "POST /api/v1/auth/register": 10,
        "POST /faucet/claim": 10,
        "*": 30,
    }
)
"""Requests per 60 s window per path and client address (the service allows 10–30)."""

_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}\Z")

_STATUS_OF: Final[dict[str, int]] = {
    "invalid_request": 400,
    "invalid_amount": 400,
    "insufficient_balance": 402,
    "forbidden": 403,
    "not_found": 404,
    "invalid_status": 409,
    "already_claimed": 409,
}

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
"""


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


# ------------------------------------------------------------------------------ money


def float_money(micro: int) -> float | int:
    """An amount as the deployed service renders it: an int when whole, else a float.

    The *only* floats in the sandbox live here, on their way into JSON text.
    """
    if micro % MICRO == 0:
        return micro // MICRO
    return micro / MICRO


def _float_figures(amount_micro: int) -> tuple[float | int, float, float]:
    """``(amount_usd, commission_usd, net_to_counterparty)`` computed as the service does, in
    binary floating point (so the float tails it sends appear here too)."""
    amount = float_money(amount_micro)
    commission = float(amount) * 0.01  # ok: imitating the service
    net = float(amount) - commission  # ok: imitating the service
    return amount, commission, net


def _wire_amount(value: object) -> int:
    """``amount_usd`` from a request: a JSON number (exact, from the text) or a numeric string."""
    if isinstance(value, bool) or value is None:
        raise _Refusal(400, "invalid_amount", "amount_usd is required (a number)")
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        # only plain ASCII decimals: Decimal() would also read "1_0", "١٠", " 10 " or "1e3"
        if len(value) > 64 or not PLAIN_DECIMAL.fullmatch(value):
            raise _Refusal(400, "invalid_amount", "amount_usd must be a number")
        dec = Decimal(value)
    else:
        raise _Refusal(400, "invalid_amount", "amount_usd must be a number")
    if not dec.is_finite() or dec <= 0:
        raise _Refusal(400, "invalid_amount", "amount_usd must be a positive number")
    if dec > _MAX_AMOUNT:  # a constant: `Decimal(10) ** 12` would use the caller's context
        raise _Refusal(400, "invalid_amount", "amount_usd is too large")
    try:
        micro = decimal_to_micro(dec)  # exact, whatever the thread's Decimal context
    except ValueError:
        raise _Refusal(
            400, "invalid_amount", "amount_usd has more than 6 decimal places (USDC's precision)"
        ) from None
    if micro < DEPLOYED_MIN_MICRO:
        raise _Refusal(
            400, "invalid_amount", f"the minimum escrow is {format_usdc(DEPLOYED_MIN_MICRO)} USD"
        )
    return micro


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _json(status: int, obj: object) -> AppResponse:
    return AppResponse(status, _dumps(obj))


def _error(status: int, code: str, message: str) -> AppResponse:
    """``{error, message}`` — and never a ``Retry-After``, as on the deployed service."""
    return error_response(status, code, message)


@dataclass(frozen=True, slots=True)
class _Meta:
    timeout_hours: int
    timeout_at: int
    completed_at: int | None
    disputed_at: int | None
    expired_at: int | None


def _body(request: AppRequest, *, empty_ok: bool = True) -> dict[str, Any]:
    try:
        return parse_json_object(request.body, empty_ok=empty_ok)
    except InvalidJSON as exc:
        raise _Refusal(400, "invalid_request", str(exc)) from None


class _Limited:
    """Fixed windows per path and client address; every request counts, refused or not."""

    def __init__(self, limiter: RateLimiter | None, clock: Clock) -> None:
        self._limiter = limiter
        self._clock = clock

    def check(self, request: AppRequest, route: str, path: str) -> AppResponse | None:
        if self._limiter is None:
            return None
        if self._limiter.hit(request.client, route, path, self._clock.now_us()) is None:
            return None
        return _error(429, "rate_limited", "too many requests, please slow down")


# ------------------------------------------------------------------------------ escrow app


class DeployedApp:
    """Serves the deployed escrow dialect over a :class:`Ledger` (see the module docstring)."""

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
        self._limits = _Limited(RateLimiter(rate_limits) if rate_limits else None, clock)
        self.list_path = list_path.rstrip("/") if list_path else None
        db.executescript(_SCHEMA)

    # -- expiry --------------------------------------------------------------------------

    def apply_due(self, conn: sqlite3.Connection, now_us: int) -> int:
        """Hand back every funded/completed escrow past its ``timeout_hours``, less 1%.

        Run lazily before every request (and by the Sandbox's ``tick``/``balance``), so a
        moved clock takes effect at the next look.
        """
        rows = conn.execute(
            "SELECT d.escrow_id, d.timeout_at FROM deployed_escrows d "
            "JOIN escrows e ON e.escrow_id = d.escrow_id "
            "WHERE d.expired_at IS NULL AND d.disputed_at IS NULL AND e.status = 'locked' "
            "AND d.timeout_at <= ? ORDER BY e.seq",
            (now_us,),
        ).fetchall()
        for escrow_id, timeout_at in rows:
            self._ledger.refund_less_fee(conn, str(escrow_id), int(timeout_at))
            conn.execute(
                "UPDATE deployed_escrows SET expired_at = ? WHERE escrow_id = ?",
                (int(timeout_at), escrow_id),
            )
        return len(rows)

    # -- rendering -----------------------------------------------------------------------

    def _meta(self, conn: sqlite3.Connection, escrow_id: str) -> _Meta | None:
        row = conn.execute(
            "SELECT timeout_hours, timeout_at, completed_at, disputed_at, expired_at "
            "FROM deployed_escrows WHERE escrow_id = ?",
            (escrow_id,),
        ).fetchone()
        return None if row is None else _Meta(*row)

    def _status(self, esc: EscrowRecord, meta: _Meta) -> str:
        if esc.status == "released":
            return "released"
        if esc.status == "refunded":
            return "refunded"
        if meta.disputed_at is not None:
            return "disputed"
        if meta.completed_at is not None:
            return "completed"
        return "funded"

    def render(self, conn: sqlite3.Connection, esc: EscrowRecord) -> dict[str, Any]:
        """An escrow in the deployed shape: float money, the service's status names."""
        meta = self._meta(conn, esc.escrow_id)
        if meta is None:
            raise _Refusal(404, "not_found", "escrow not found")
        amount, commission, net = _float_figures(esc.amount)
        status = self._status(esc, meta)
        out: dict[str, Any] = {
            "escrow_id": esc.escrow_id,
            "creator_agent_id": esc.from_agent_id,
            "counterparty_agent_id": esc.to_agent_id,
            "amount_usd": amount,
            "commission_usd": commission,
            "net_to_counterparty": net,
            "description": esc.memo,
            "status": status,
            "timeout_hours": meta.timeout_hours,
            "auto_release_at": isoformat_us(meta.timeout_at),
            "created_at": isoformat_us(esc.created_at),
        }
        if meta.completed_at is not None:
            out["completed_at"] = isoformat_us(meta.completed_at)
        if esc.closed_at is not None:
            out[f"{status}_at"] = isoformat_us(esc.closed_at)
        return out

    # -- routing -------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> tuple[str, str | None] | AppResponse:
        parts = [p for p in path.strip("/").split("/") if p]
        name: str | None = None
        escrow_id: str | None = None
        want = "POST"
        if self.list_path is not None and path.rstrip("/") == self.list_path:
            name, want = "GET list", "GET"
        elif parts == ["escrow", "create"]:
            name = "POST /escrow/create"
        elif (
            len(parts) == 3
            and parts[0] == "escrow"
            and parts[1]
            in (
                "release",
                "complete",
                "dispute",
            )
        ):
            name, escrow_id = f"POST /escrow/{parts[1]}/{{id}}", parts[2]
        elif len(parts) == 2 and parts[0] == "escrow":
            name, escrow_id, want = "GET /escrow/{id}", parts[1], "GET"
        if name is None:
            return _error(404, "not_found", "no such endpoint")
        if method != want:
            return _error(405, "invalid_request", f"use {want} on this path")
        if escrow_id is not None and not _ID.match(escrow_id):
            return _error(404, "not_found", "escrow not found")
        return name, escrow_id

    def handle(self, request: AppRequest) -> AppResponse:
        method = request.method.upper()
        routed = self._route(method, request.path)
        if isinstance(routed, AppResponse):
            return routed
        name, escrow_id = routed
        limited = self._limits.check(request, name, request.path)
        if limited is not None:
            return limited
        api_key = parse_bearer(request.headers.get("authorization"))
        try:
            with self._db.transaction() as conn:
                agent = self._ledger.agent_for_key(conn, hash_key(api_key)) if api_key else None
                if agent is None:
                    return _error(401, "unauthorized", "a valid API key is required")
                now = self._clock.now_us()
                self.apply_due(conn, now)
                with self._db.savepoint(conn):
                    status, obj = self._operation(
                        conn, name, escrow_id, request, agent=agent, now=now
                    )
        except _Refusal as exc:
            return _error(exc.status, exc.code, exc.message)
        except LedgerError as exc:
            return _error(_STATUS_OF.get(exc.kind, 400), exc.kind, exc.message)
        return _json(status, obj)

    # -- operations ----------------------------------------------------------------------

    def _party(self, conn: sqlite3.Connection, escrow_id: str, agent: str) -> EscrowRecord:
        esc = self._ledger.read(conn, escrow_id)
        if self._meta(conn, escrow_id) is None:
            raise _Refusal(404, "not_found", "escrow not found")
        if agent not in (esc.from_agent_id, esc.to_agent_id):
            raise _Refusal(403, "forbidden", "you are not a party to this escrow")
        return esc

    def _operation(
        self,
        conn: sqlite3.Connection,
        name: str,
        escrow_id: str | None,
        request: AppRequest,
        *,
        agent: str,
        now: int,
    ) -> tuple[int, Any]:
        if name == "GET list":
            rows = conn.execute(
                "SELECT e.escrow_id FROM escrows e JOIN deployed_escrows d "
                "ON d.escrow_id = e.escrow_id WHERE e.from_agent_id = ? OR e.to_agent_id = ? "
                "ORDER BY e.seq",
                (agent, agent),
            ).fetchall()
            return 200, {
                "escrows": [self.render(conn, self._ledger.read(conn, r[0])) for r in rows]
            }
        if name == "POST /escrow/create":
            return 201, self._create(conn, _body(request, empty_ok=False), agent, now)
        assert escrow_id is not None
        esc = self._party(conn, escrow_id, agent)
        meta = self._meta(conn, escrow_id)
        assert meta is not None
        status = self._status(esc, meta)
        if name == "GET /escrow/{id}":
            return 200, self.render(conn, esc)
        _body(request)  # a body, if any, must be JSON; its fields are ignored
        if name == "POST /escrow/release/{id}":
            if agent != esc.from_agent_id:
                raise _Refusal(403, "forbidden", "only the creator can release this escrow")
            if status not in ("funded", "completed"):
                raise _Refusal(409, "invalid_status", f"escrow is {status}, cannot release")
            esc = self._ledger.release(
                conn, escrow_id, caller=agent, amount=esc.remaining, memo="release", now_us=now
            )
        elif name == "POST /escrow/complete/{id}":
            if agent != esc.to_agent_id:
                raise _Refusal(403, "forbidden", "only the counterparty can complete this escrow")
            if status != "funded":
                raise _Refusal(409, "invalid_status", f"escrow is {status}, cannot complete")
            conn.execute(
                "UPDATE deployed_escrows SET completed_at = ? WHERE escrow_id = ?",
                (now, escrow_id),
            )
        elif name == "POST /escrow/dispute/{id}":
            if status not in ("funded", "completed"):
                raise _Refusal(409, "invalid_status", f"escrow is {status}, cannot dispute")
            conn.execute(
                "UPDATE deployed_escrows SET disputed_at = ? WHERE escrow_id = ?", (now, escrow_id)
            )
        return 200, self.render(conn, self._ledger.read(conn, escrow_id))

    def _create(
        self, conn: sqlite3.Connection, body: dict[str, Any], agent: str, now: int
    ) -> dict[str, Any]:
        amount = _wire_amount(body.get("amount_usd"))
        counterparty = body.get("counterparty_agent_id")
        if not isinstance(counterparty, str) or not _ID.match(counterparty):
            raise _Refusal(
                400, "invalid_request", "counterparty_agent_id is required (an agent id)"
            )
        description = body.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
            raise _Refusal(
                400, "invalid_request", f"description must be a string of ≤{MAX_DESCRIPTION}"
            )
        hours = body.get("timeout_hours", DEFAULT_TIMEOUT_HOURS)
        if (
            isinstance(hours, bool)
            or not isinstance(hours, int)
            or not (1 <= hours <= MAX_TIMEOUT_HOURS)
        ):
            raise _Refusal(
                400,
                "invalid_request",
                f"timeout_hours must be a whole number 1..{MAX_TIMEOUT_HOURS}",
            )
        esc = self._ledger.lock(
            conn,
            payer=agent,
            payee=counterparty,
            amount=amount,
            memo=description,
            auto_release_at=None,
            now_us=now,
        )
        conn.execute(
            "INSERT INTO deployed_escrows (escrow_id, timeout_hours, timeout_at) VALUES (?, ?, ?)",
            (esc.escrow_id, hours, now + hours * 3600 * MICRO),
        )
        return self.render(conn, esc)


# ------------------------------------------------------------------------------ casino + faucet


class _OnePostApp:
    """A service that answers one ``POST`` path, rate limited like the others.

    Subclasses name the ``path``, whether an empty body is allowed, and answer in :meth:`post`.
    """

    path: ClassVar[str]
    empty_body_ok: ClassVar[bool]

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
        self._limits = _Limited(RateLimiter(rate_limits) if rate_limits else None, clock)

    def handle(self, request: AppRequest) -> AppResponse:
        if request.path.rstrip("/") != self.path:
            return _error(404, "not_found", "no such endpoint")
        if request.method.upper() != "POST":
            return _error(405, "invalid_request", "use POST on this path")
        limited = self._limits.check(request, f"POST {self.path}", request.path)
        if limited is not None:
            return limited
        try:
            body = _body(request, empty_ok=self.empty_body_ok)
        except _Refusal as exc:
            return _error(exc.status, exc.code, exc.message)
        return self.post(body)

    def post(self, body: dict[str, Any]) -> AppResponse:
        raise NotImplementedError


class CasinoApp(_OnePostApp):
    """The casino service's registration: ``POST /api/v1/auth/register`` → a new agent."""

    path = "/api/v1/auth/register"
    empty_body_ok = True

    def post(self, body: dict[str, Any]) -> AppResponse:
        agent_id, api_key = new_agent_id(), new_api_key()
        with self._db.transaction() as conn:
            self._ledger.create_agent(conn, agent_id, hash_key(api_key), 0, self._clock.now_us())
        return _json(201, {"agent_id": agent_id, "api_key": api_key})


class FaucetApp(_OnePostApp):
    """The faucet service: ``POST /faucet/claim {agent_casino_id}`` credits 1 USDC once."""

    path = "/faucet/claim"
    empty_body_ok = False

    def post(self, body: dict[str, Any]) -> AppResponse:
        agent = body.get("agent_casino_id")
        if not isinstance(agent, str) or not _ID.match(agent):
            return _error(400, "invalid_request", "agent_casino_id is required")
        try:
            with self._db.transaction() as conn:
                claim_id = self._ledger.claim_faucet(conn, agent, self._clock.now_us())
                balance = self._ledger.balance(conn, agent)
        except LedgerError as exc:
            return _error(_STATUS_OF.get(exc.kind, 400), exc.kind, exc.message)
        return _json(
            200,
            {
                "credited": float_money(FAUCET_MICRO),
                "claim_id": claim_id,
                "agent_casino_id": agent,
                "new_balance": float_money(balance),
            },
        )


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
    return (
        DeployedApp(db=db, ledger=ledger, clock=clock, rate_limits=limits, list_path=list_path),
        CasinoApp(db=db, ledger=ledger, clock=clock, rate_limits=limits),
        FaucetApp(db=db, ledger=ledger, clock=clock, rate_limits=limits),
    )


def expected_commission_micro(amount_micro: int) -> int:
    """The 1% the service keeps on a release or an expiry, at the micro-USDC."""
    return fee_micro(amount_micro)
