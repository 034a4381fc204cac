"""The v1 streaming dialect (docs/WIRE.md): paths, field names and error codes over the ledger.

Why this is the only module that knows v1's wire shape: the deployed service's older dialect
will be mounted beside it (its own module) over the *same* ledger. Here a request is routed,
authenticated, rate-limited, checked for a reused idempotency key, validated field by field,
turned into one ledger operation, and the result (or the ledger's refusal) is rendered as v1
JSON. The ledger operation and the stored idempotent answer commit in one transaction.

What this module must never do: move money itself (only through :class:`Ledger`), accept an
amount that is not a decimal string of at most six places, echo a key, or answer in any shape
other than the contract's (``{error, message}`` for errors).
"""

from __future__ import annotations

import functools
import re
import sqlite3
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from pf_metered.errors import InvalidInput
from pf_metered.money import format_usdc, parse_amount
from pf_metered.sandbox._clock import Clock, isoformat_us
from pf_metered.sandbox._db import Database
from pf_metered.sandbox._http import (
    AppRequest,
    AppResponse,
    InvalidJSON,
    error_response,
    json_response,
    parse_json_object,
)
from pf_metered.sandbox._idempotency import IdempotencyStore, StoredAnswer, fingerprint
from pf_metered.sandbox._keys import hash_key, parse_bearer
from pf_metered.sandbox._ledger import (
    FAUCET_MICRO,
    ErrorKind,
    EscrowRecord,
    Ledger,
    LedgerError,
    ReleaseRecord,
)
from pf_metered.sandbox._ratelimit import RateLimiter

__all__ = ["MAX_PAGE", "MIN_ESCROW_MICRO", "RECENT_RELEASES", "V1App", "escrow_json"]

MIN_ESCROW_MICRO: Final = 1_000_000
"""v1's smallest escrow: 1.00 USDC."""

RECENT_RELEASES: Final = 100
"""How many of the most recent releases ``GET /escrow/{id}`` carries (with ``release_count``)."""

MAX_PAGE: Final = 1000
"""The largest ``limit`` of ``GET /escrow/{id}/releases`` (the default is 100)."""

MAX_MEMO: Final = 1000
MAX_AUTO_RELEASE_HOURS: Final = 8760
_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}\Z")
_IDEM_KEY = re.compile(r"^[\x21-\x7e]{1,255}\Z")

_STATUS_OF: Final[dict[ErrorKind, int]] = {
    "invalid_request": 400,
    "invalid_amount": 400,
    "insufficient_balance": 402,
    "forbidden": 403,
    "not_found": 404,
    "invalid_status": 409,
    "already_claimed": 409,
}

BeforeHandle = Callable[[AppRequest], None]


class _Refusal(Exception):
    """A request refused by v1 validation; rendered as ``{error, message}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


def _iso(us: int | None) -> str | None:
    return None if us is None else isoformat_us(us)


@functools.lru_cache(maxsize=4096)
def release_json(rel: ReleaseRecord) -> dict[str, Any]:
    """A release in v1's shape; cached because successive reads repeat the recent window.

    Releases are immutable once written, so the rendering of one never changes. Callers must
    not mutate the returned dict.
    """
    return {
        "release_id": rel.release_id,
        "amount": format_usdc(rel.amount),
        "fee": format_usdc(rel.fee),
        "memo": rel.memo,
        "created_at": isoformat_us(rel.created_at),
    }


def escrow_json(
    esc: EscrowRecord, releases: list[ReleaseRecord], release_count: int | None = None
) -> dict[str, Any]:
    """An escrow in v1's shape: every amount a decimal string, every time RFC 3339 UTC.

    ``releases`` is the history carried (the whole of it, or the most recent ones, oldest
    first); ``release_count`` the total number of releases (default: ``len(releases)``).
    """
    return {
        "escrow_id": esc.escrow_id,
        "status": esc.status,
        "amount": format_usdc(esc.amount),
        "released": format_usdc(esc.released),
        "remaining": format_usdc(esc.remaining),
        "refunded": format_usdc(esc.refunded),
        "to_agent_id": esc.to_agent_id,
        "from_agent_id": esc.from_agent_id,
        "memo": esc.memo,
        "created_at": isoformat_us(esc.created_at),
        "auto_release_at": _iso(esc.auto_release_at),
        "releases": [release_json(r) for r in releases],
        "release_count": len(releases) if release_count is None else release_count,
    }


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    escrow_id: str | None = None


def _only(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise _Refusal(400, "invalid_request", f"unknown field(s): {', '.join(unknown)[:200]}")


def _amount(body: dict[str, Any]) -> int:
    if "amount" not in body or body["amount"] is None:
        raise _Refusal(400, "invalid_amount", "amount is required (a decimal string)")
    value = body["amount"]
    if not isinstance(value, str):
        raise _Refusal(
            400, "invalid_amount", 'amount must be a decimal string such as "1.50", not a number'
        )
    try:
        return parse_amount(value, "amount")
    except InvalidInput as exc:
        raise _Refusal(400, "invalid_amount", f"amount {exc.problem}") from None


def _page(query: str) -> tuple[int, int]:
    """``offset`` (default 0) and ``limit`` (default 100, at most :data:`MAX_PAGE`)."""
    try:
        params = urllib.parse.parse_qs(query, strict_parsing=bool(query), max_num_fields=10)
    except ValueError:
        raise _Refusal(400, "invalid_request", "malformed query string") from None
    unknown = sorted(set(params) - {"offset", "limit"})
    if unknown:
        raise _Refusal(400, "invalid_request", f"unknown parameter(s): {', '.join(unknown)[:200]}")
    out = {"offset": 0, "limit": RECENT_RELEASES}
    for name, values in params.items():
        raw = values[-1]
        if len(values) != 1 or not raw.isascii() or not raw.isdigit() or len(raw) > 9:
            raise _Refusal(400, "invalid_request", f"{name} must be one whole number")
        out[name] = int(raw)
    if not 1 <= out["limit"] <= MAX_PAGE:
        raise _Refusal(400, "invalid_request", f"limit must be between 1 and {MAX_PAGE}")
    return out["offset"], out["limit"]


def _memo(body: dict[str, Any]) -> str:
    memo = body.get("memo")
    if memo is None:
        return ""
    if not isinstance(memo, str):
        raise _Refusal(400, "invalid_request", "memo must be a string")
    if len(memo) > MAX_MEMO:
        raise _Refusal(400, "invalid_request", f"memo is longer than {MAX_MEMO} characters")
    return memo


class V1App:
    """Serves docs/WIRE.md over a :class:`Ledger` (mounted at ``/api/v1``)."""

    def __init__(
        self,
        *,
        db: Database,
        ledger: Ledger,
        clock: Clock,
        idempotency: IdempotencyStore | None,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        self._db = db
        self._ledger = ledger
        self._clock = clock
        self._idem = idempotency
        self._limiter = rate_limiter
        self.before_handle: BeforeHandle | None = None
        """Called (outside the ledger lock) once a request is admitted, before it runs: a
        test holds a request in flight with it."""

    # -- routing -------------------------------------------------------------------------

    def _route(self, method: str, path: str) -> _Route | AppResponse:
        parts = [p for p in path.rstrip("/").split("/") if p] if path != "/" else []
        name: str | None = None
        escrow_id: str | None = None
        allowed: tuple[str, ...] = ()
        if parts == ["escrow"]:
            allowed = ("GET", "POST")
            name = f"{method} /escrow"
        elif len(parts) == 2 and parts[0] == "escrow":
            allowed, name, escrow_id = ("GET",), "GET /escrow/{id}", parts[1]
        elif len(parts) == 3 and parts[0] == "escrow" and parts[2] in ("release-partial", "refund"):
            allowed = ("POST",)
            name, escrow_id = f"POST /escrow/{{id}}/{parts[2]}", parts[1]
        elif len(parts) == 3 and parts[0] == "escrow" and parts[2] == "releases":
            allowed, name, escrow_id = ("GET",), "GET /escrow/{id}/releases", parts[1]
        elif parts == ["faucet", "claim"]:
            allowed, name = ("POST",), "POST /faucet/claim"
        if name is None:
            return error_response(404, "not_found", "no such endpoint")
        if method not in allowed:
            return error_response(
                405,
                "invalid_request",
                f"use {' or '.join(allowed)} on this path",
                (("allow", ", ".join(allowed)),),
            )
        if escrow_id is not None and not _ID.match(escrow_id):
            return error_response(404, "not_found", "no such escrow")
        return _Route(name, escrow_id)

    # -- the request pipeline ------------------------------------------------------------

    def handle(self, request: AppRequest) -> AppResponse:
        method = request.method.upper()
        route = self._route(method, request.path)
        if isinstance(route, AppResponse):
            return route
        api_key = parse_bearer(request.headers.get("authorization"))
        key_hash = hash_key(api_key) if api_key else None
        agent: str | None = None
        if key_hash is not None:
            with self._db.transaction() as conn:
                agent = self._ledger.agent_for_key(conn, key_hash)
        if self._limiter is not None:
            retry_after = self._limiter.hit(
                key_hash or request.client, route.name, request.path, self._clock.now_us()
            )
            if retry_after is not None:
                return error_response(
                    429,
                    "rate_limited",
                    f"too many requests; retry in {retry_after} s",
                    (("retry-after", str(retry_after)),),
                )
        if agent is None or key_hash is None:
            return error_response(
                401, "unauthorized", "a valid 'Authorization: Bearer <api key>' is required"
            )
        idem_key: str | None = None
        extra: tuple[tuple[str, str], ...] = ()
        if self._idem is not None:
            extra = (("idempotency-supported", "true"),)
            if method == "POST":
                idem_key = request.headers.get("idempotency-key")
                if idem_key is not None and not _IDEM_KEY.match(idem_key):
                    return error_response(
                        400,
                        "invalid_request",
                        "Idempotency-Key must be 1-255 printable ASCII characters",
                        extra,
                    )
        if idem_key is None or self._idem is None:
            self._before(request)
            with self._db.transaction() as conn:
                answer = self._run(conn, route, request, agent)
            return AppResponse(answer.status, answer.body, answer.headers + extra)
        if not self._idem.begin(key_hash, idem_key):
            return error_response(
                409,
                "request_in_progress",
                "a request with this Idempotency-Key is still being handled",
                extra,
            )
        try:
            self._before(request)
            return self._idempotent(
                route,
                request=request,
                agent=agent,
                key_hash=key_hash,
                idem_key=idem_key,
                extra=extra,
            )
        finally:
            self._idem.end(key_hash, idem_key)

    def _before(self, request: AppRequest) -> None:
        hook = self.before_handle
        if hook is not None:
            hook(request)

    def _idempotent(
        self,
        route: _Route,
        *,
        request: AppRequest,
        agent: str,
        key_hash: str,
        idem_key: str,
        extra: tuple[tuple[str, str], ...],
    ) -> AppResponse:
        """Replay the stored answer, refuse a reused key, or run and store in one transaction."""
        assert self._idem is not None
        try:
            parsed: Any = parse_json_object(request.body, empty_ok=True)
        except InvalidJSON:
            parsed = None
        digest = fingerprint(request.method, request.path, request.body, parsed)
        with self._db.transaction() as conn:
            now = self._clock.now_us()
            stored = self._idem.lookup(conn, key_hash, idem_key, now)
            if stored is not None:
                if stored.fingerprint != digest:
                    return error_response(
                        422,
                        "idempotency_key_reused",
                        "this Idempotency-Key was used with a different request",
                        extra,
                    )
                return AppResponse(
                    stored.status, stored.body, (("idempotent-replayed", "true"), *extra)
                )
            answer = self._run(conn, route, request, agent)
            if answer.status < 500 and answer.status != 429:
                self._idem.save(
                    conn, key_hash, idem_key, StoredAnswer(digest, answer.status, answer.body), now
                )
        return AppResponse(answer.status, answer.body, answer.headers + extra)

    def _run(
        self, conn: sqlite3.Connection, route: _Route, request: AppRequest, agent: str
    ) -> AppResponse:
        """Apply due auto-releases, then the route's operation inside a savepoint."""
        now = self._clock.now_us()
        self._ledger.apply_due(conn, now)
        try:
            with self._db.savepoint(conn):
                status, obj = self._operation(conn, route, request, agent, now)
        except _Refusal as exc:
            return error_response(exc.status, exc.code, exc.message)
        except LedgerError as exc:
            return error_response(_STATUS_OF[exc.kind], exc.kind, exc.message)
        return json_response(status, obj)

    # -- operations ----------------------------------------------------------------------

    def _operation(
        self, conn: sqlite3.Connection, route: _Route, request: AppRequest, agent: str, now: int
    ) -> tuple[int, Any]:
        ledger = self._ledger
        name = route.name
        if name == "GET /escrow":
            escrows = ledger.list_for(conn, agent)
            return 200, {
                "escrows": [
                    escrow_json(e, [], ledger.release_count(conn, e.escrow_id)) for e in escrows
                ]
            }
        if name == "GET /escrow/{id}":
            assert route.escrow_id is not None
            return 200, self._escrow(
                conn, ledger.read(conn, route.escrow_id, agent), recent=RECENT_RELEASES
            )
        if name == "GET /escrow/{id}/releases":
            assert route.escrow_id is not None
            offset, limit = _page(request.query)
            esc = ledger.read(conn, route.escrow_id, agent)
            return 200, {
                "escrow_id": esc.escrow_id,
                "release_count": ledger.release_count(conn, esc.escrow_id),
                "offset": offset,
                "limit": limit,
                "releases": [
                    release_json(r)
                    for r in ledger.releases_page(conn, esc.escrow_id, offset, limit)
                ],
            }
        body = self._body(request, empty_ok=name != "POST /escrow")
        if name == "POST /escrow":
            return 201, self._create(conn, body, agent, now)
        if name == "POST /escrow/{id}/release-partial":
            assert route.escrow_id is not None
            _only(body, frozenset({"amount", "memo"}))
            amount = _amount(body)
            memo = _memo(body)
            ledger.read(conn, route.escrow_id)  # 404 before 400 for an unknown escrow
            esc = ledger.release(
                conn, route.escrow_id, caller=agent, amount=amount, memo=memo, now_us=now
            )
            return 200, self._escrow(conn, esc, recent=1)  # the release just made
        if name == "POST /escrow/{id}/refund":
            assert route.escrow_id is not None
            _only(body, frozenset())
            esc = ledger.refund(conn, route.escrow_id, caller=agent, now_us=now)
            return 200, self._escrow(conn, esc, recent=0)
        if name == "POST /faucet/claim":
            _only(body, frozenset())
            claim_id = ledger.claim_faucet(conn, agent, now)
            return 200, {
                "credited": format_usdc(FAUCET_MICRO),
                "claim_id": claim_id,
                "agent_id": agent,
            }
        raise AssertionError(f"unrouted {name}")  # pragma: no cover

    def _create(
        self, conn: sqlite3.Connection, body: dict[str, Any], agent: str, now: int
    ) -> dict[str, Any]:
        _only(body, frozenset({"to_agent_id", "amount", "memo", "auto_release_hours"}))
        to_agent = body.get("to_agent_id")
        if not isinstance(to_agent, str) or not _ID.match(to_agent):
            raise _Refusal(400, "invalid_request", "to_agent_id must be an agent id string")
        amount = _amount(body)
        if amount < MIN_ESCROW_MICRO:
            raise _Refusal(
                400, "invalid_amount", f"the minimum escrow is {format_usdc(MIN_ESCROW_MICRO)}"
            )
        memo = _memo(body)
        hours = body.get("auto_release_hours")
        if hours is not None and (
            isinstance(hours, bool)
            or not isinstance(hours, int)
            or not 1 <= hours <= MAX_AUTO_RELEASE_HOURS
        ):
            raise _Refusal(
                400,
                "invalid_request",
                f"auto_release_hours must be a whole number 1..{MAX_AUTO_RELEASE_HOURS} or null",
            )
        due = None if hours is None else now + hours * 3600 * 1_000_000
        esc = self._ledger.lock(
            conn,
            payer=agent,
            payee=to_agent,
            amount=amount,
            memo=memo,
            auto_release_at=due,
            now_us=now,
        )
        return escrow_json(esc, [], 0)

    def _body(self, request: AppRequest, *, empty_ok: bool) -> dict[str, Any]:
        try:
            return parse_json_object(request.body, empty_ok=empty_ok)
        except InvalidJSON as exc:
            raise _Refusal(400, "invalid_request", str(exc)) from None

    def _escrow(
        self, conn: sqlite3.Connection, esc: EscrowRecord, *, recent: int
    ) -> dict[str, Any]:
        """The escrow with its ``recent`` latest releases and the total count: answers stay
        the same small size however long the history grows."""
        releases = self._ledger.recent_releases(conn, esc.escrow_id, recent) if recent else []
        return escrow_json(esc, releases, self._ledger.release_count(conn, esc.escrow_id))
