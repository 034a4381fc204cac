"""The v1 (streaming) dialect of the Purple Flea escrow API — docs/WIRE.md in code.

What this module is for: every path, body field name, error code and answer shape of v1 lives
here and nowhere else. It builds :class:`RequestSpec` objects (bodies serialised once, keys
sorted, so a retry sends the same bytes) and turns decoded answers into models.

What it must never do: accept a JSON number where money belongs (v1 sends money as decimal
strings; a number has been through a float somewhere), perform I/O, or see the API key.
"""

from __future__ import annotations

import json
from typing import Any, Final
from urllib.parse import quote

from pydantic import ValidationError

from pf_metered.errors import (
    APIError,
    AuthError,
    Conflict,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    InvalidResponse,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    UnsupportedByDialect,
)
from pf_metered.models import Escrow, FaucetClaim, ReleasePage
from pf_metered.money import format_usdc

from ._dialect import ActionAnswer, DialectCapabilities, RequestSpec

__all__ = ["ERROR_CLASSES", "IN_PROGRESS_CODE", "V1", "V1Dialect", "validation_summary"]

V1_BASE_URL: Final = "https://escrow.purpleflea.com/api/v1"
"""Where the product documentation puts v1 (the host does not serve it today)."""
PROBE_ID: Final = "pfm_dialect_probe"
"""An escrow id no one has: reading it moves no money and tells v1 (404 ``not_found`` with a
message, or 401 for a key it does not know) from a host that has no such path."""

ESCROWS: Final = "/escrow"
FAUCET_CLAIM: Final = "/faucet/claim"
IN_PROGRESS_CODE: Final = "request_in_progress"

ERROR_CLASSES: Final[dict[int, type[APIError]]] = {
    400: InvalidRequest,
    401: AuthError,
    402: InsufficientFunds,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    422: IdempotencyConflict,
    429: RateLimited,
}

_ESCROW_MONEY: Final = ("amount", "released", "remaining", "refunded")
_RELEASE_MONEY: Final = ("amount", "fee")


def _body(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _escrow_path(escrow_id: str, suffix: str = "") -> str:
    return f"{ESCROWS}/{quote(escrow_id, safe='')}{suffix}"


def validation_summary(exc: ValidationError) -> str:
    """A short account of what was wrong, from locations and messages only (never inputs)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc or 'answer'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


def _require_money_strings(obj: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(obj, dict):
        raise InvalidResponse(f"{where} is not a JSON object")
    for name in fields:
        if name in obj and not isinstance(obj[name], str):
            raise InvalidResponse(
                f"{where}.{name} is a JSON {type(obj[name]).__name__}, not a decimal string"
            )


class V1Dialect:
    """``/api/v1``: partial releases, refunds, the faucet, ``{error, message}`` errors."""

    name = "v1"
    root = "/api/v1"
    default_base_url = V1_BASE_URL
    capabilities = DialectCapabilities(
        partial_release=True,
        listing=True,
        refund=True,
        release_history=True,
        complete_and_dispute=False,
        keyed_faucet=True,
        honours_idempotency_keys=None,  # learnt from Idempotency-Supported / -Replayed
        min_escrow_micro=1_000_000,  # "1.00"
        max_auto_release_hours=8760,
        limits={},
    )
    supports_partial_release = capabilities.partial_release
    min_escrow_micro = capabilities.min_escrow_micro
    max_auto_release_hours = capabilities.max_auto_release_hours

    # -- requests ------------------------------------------------------------------------

    def create_escrow(
        self,
        *,
        to_agent_id: str,
        amount_micro: int,
        memo: str,
        auto_release_hours: int | None,
        idempotency_key: str,
    ) -> RequestSpec:
        body = _body(
            {
                "to_agent_id": to_agent_id,
                "amount": format_usdc(amount_micro),
                "memo": memo,
                "auto_release_hours": auto_release_hours,
            }
        )
        return RequestSpec("POST", ESCROWS, body, idempotency_key)

    def release_partial(
        self, *, escrow_id: str, amount_micro: int, memo: str, idempotency_key: str
    ) -> RequestSpec:
        body = _body({"amount": format_usdc(amount_micro), "memo": memo})
        return RequestSpec(
            "POST", _escrow_path(escrow_id, "/release-partial"), body, idempotency_key
        )

    def get_escrow(self, escrow_id: str) -> RequestSpec:
        return RequestSpec("GET", _escrow_path(escrow_id))

    def list_escrows(self) -> RequestSpec:
        return RequestSpec("GET", ESCROWS)

    def list_releases(self, escrow_id: str, *, offset: int, limit: int) -> RequestSpec:
        return RequestSpec(
            "GET", _escrow_path(escrow_id, f"/releases?offset={offset:d}&limit={limit:d}")
        )

    def refund(self, *, escrow_id: str, idempotency_key: str) -> RequestSpec:
        return RequestSpec("POST", _escrow_path(escrow_id, "/refund"), _body({}), idempotency_key)

    def claim_faucet(self, *, idempotency_key: str) -> RequestSpec:
        return RequestSpec("POST", FAUCET_CLAIM, _body({}), idempotency_key)

    def release_whole(self, *, escrow_id: str, idempotency_key: str | None = None) -> RequestSpec:
        raise UnsupportedByDialect(
            "v1 releases an escrow whole as a partial release of what remains (the client "
            "does that for release())"
        )

    def complete(self, *, escrow_id: str, idempotency_key: str | None = None) -> RequestSpec:
        raise UnsupportedByDialect("the v1 dialect has no complete call")

    def dispute(
        self, *, escrow_id: str, reason: str = "", idempotency_key: str | None = None
    ) -> RequestSpec:
        raise UnsupportedByDialect("the v1 dialect has no dispute call")

    def probe(self) -> RequestSpec:
        return RequestSpec("GET", _escrow_path(PROBE_ID))

    def recognises(self, status: int, data: Any) -> bool:
        """A v1 answer to the probe: 404 ``not_found`` or 401 ``unauthorized`` *with* a
        message, in v1's ``{error, message}`` shape (the deployed host answers the same path
        with a bare ``{"error": "not_found", "_info": ...}`` of its router)."""
        if status not in (401, 404) or not isinstance(data, dict):
            return False
        code, message = data.get("error"), data.get("message")
        return (
            code == ("not_found" if status == 404 else "unauthorized")
            and isinstance(message, str)
            and bool(message)
            and "_info" not in data
        )

    # -- answers -------------------------------------------------------------------------

    def parse_escrow(self, data: Any) -> Escrow:
        _require_money_strings(data, _ESCROW_MONEY, "escrow")
        releases = data.get("releases", [])
        if releases is not None:
            if not isinstance(releases, list):
                raise InvalidResponse("escrow.releases is not a list")
            for i, rel in enumerate(releases):
                _require_money_strings(rel, _RELEASE_MONEY, f"escrow.releases[{i}]")
        try:
            return Escrow.model_validate(data)
        except ValidationError as exc:
            summary = validation_summary(exc)
        # Outside the handler: pydantic's error quotes the input, which may be hostile.
        raise InvalidResponse(f"malformed escrow: {summary}")

    def parse_release_page(self, data: Any) -> ReleasePage:
        if not isinstance(data, dict) or not isinstance(data.get("releases"), list):
            raise InvalidResponse('release page is not {"releases": [...], ...}')
        for i, rel in enumerate(data["releases"]):
            _require_money_strings(rel, _RELEASE_MONEY, f"page.releases[{i}]")
        try:
            return ReleasePage.model_validate(data)
        except ValidationError as exc:
            summary = validation_summary(exc)
        raise InvalidResponse(f"malformed release page: {summary}")

    def parse_escrow_list(self, data: Any) -> list[Escrow]:
        if not isinstance(data, dict) or not isinstance(data.get("escrows"), list):
            raise InvalidResponse('escrow list is not {"escrows": [...]}')
        return [self.parse_escrow(item) for item in data["escrows"]]

    def parse_faucet_claim(self, data: Any) -> FaucetClaim:
        _require_money_strings(data, ("credited",), "faucet claim")
        try:
            return FaucetClaim.model_validate(data)
        except ValidationError as exc:
            summary = validation_summary(exc)
        raise InvalidResponse(f"malformed faucet claim: {summary}")

    def parse_action(self, data: Any, action: str) -> ActionAnswer:
        raise UnsupportedByDialect("v1 answers every action with the escrow itself")

    def escrow_from_release(self, told: ActionAnswer) -> Escrow:
        raise UnsupportedByDialect("v1 answers every release with the escrow itself")

    # -- errors --------------------------------------------------------------------------

    def error_class(self, status: int, code: str | None) -> type[APIError]:
        if 500 <= status <= 599:
            return ServerError
        return ERROR_CLASSES.get(status, APIError)

    def is_in_progress(self, status: int, code: str | None) -> bool:
        return status == 409 and code == IN_PROGRESS_CODE


V1: Final = V1Dialect()
