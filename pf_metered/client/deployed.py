"""The deployed escrow service's dialect: whole-escrow releases, float money, no idempotency.

What this module is for: every path, field name, error code and answer quirk of the escrow
service as it is deployed today (its public server code, read and run on loopback on
2026-11-27; ``DESIGN.md``, "two dialects") lives here and nowhere else:

=========================================  ================================================
``POST /escrow/create``                    ``{amount_usd, description, counterparty_agent_id,
                                           timeout_hours}`` → 201 ``{escrow_id: "esc_…",
                                           status: "funded", commission_usd,
                                           net_to_counterparty, auto_release_at, …}``
``POST /escrow/release/{id}``              creator; releases the **whole** escrow
``POST /escrow/complete/{id}``             counterparty marks the work done
``POST /escrow/dispute/{id}``              either party; the escrow stays locked
``GET /escrow/{id}``                       the escrow
errors                                     ``{error, message}``: ``invalid_amount`` 400,
                                           ``unauthorized`` 401, ``insufficient_balance``
                                           402, ``forbidden`` 403, ``not_found`` 404,
                                           ``invalid_status`` 409, ``rate_limited`` 429
=========================================  ================================================

and on two other services, for a new agent's bootstrap: ``POST /api/v1/auth/register`` on the
casino service → ``{agent_id, api_key}``, and ``POST /faucet/claim {agent_casino_id}`` on the
faucet service → ``{credited, claim_id}`` (409 ``already_claimed`` the second time).

What the server was seen to do, and what this module does about it:

* money travels as JSON *numbers* held as floats (``42.99669999999999``; whole amounts as
  integers; ``"2.5"`` accepted as a string). Answers are decoded from the JSON **text** with
  ``Decimal`` (:func:`decode_json`), never through ``float``, and rounded half-up to the
  micro-USDC (:func:`wire_money_micro`), so no float tail reaches a model or a receipt.
  Requests carry amounts as JSON number literals written from the exact decimal string.
* statuses ``funded | completed | released | disputed | refunded`` map onto the neutral
  ``locked | completed | released | disputed | refunded``.
* the minimum escrow is 0.10 USDC; no partial release (``release_partial`` raises
  :class:`~pf_metered.errors.UnsupportedByDialect` before anything is sent); no refund call:
  what the server calls auto-release hands an escrow back to its creator *less* the 1%
  commission once ``timeout_hours`` pass.
* ``Idempotency-Key`` is ignored (the same create twice makes two escrows), so the clients
  declare the server as not honouring keys, and every create's ``description`` carries the
  client's nonce (the memo tag `` [idem:<key>]`` the client base adds): where the service lets
  the caller list escrows, a create whose answer was lost is found again by it; where it does
  not, the create is reported as :class:`~pf_metered.errors.AmbiguousCreate` with what is
  known — it is never silently sent a second time.
* fixed 60-second rate windows per path and client address, failed requests counted, 429 with
  no ``Retry-After``: the clients pace themselves with
  :class:`~pf_metered.client._ratelimit.PathRateLimiter`.

What this module must never do: perform I/O, see the API key, parse money through ``float``,
or let a value with more than six decimal places reach a model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from decimal import ROUND_HALF_UP, Context, Decimal, InvalidOperation
from typing import Any, Final, Literal
from urllib.parse import quote

from pydantic import Field, ValidationError

from pf_metered.errors import (
    APIError,
    AuthError,
    Conflict,
    InsufficientFunds,
    InvalidInput,
    InvalidRequest,
    InvalidResponse,
    NotFound,
    PermissionDenied,
    RateLimited,
    ServerError,
    UnsupportedByDialect,
)
from pf_metered.models import USDC, Escrow, EscrowEvent, FaucetClaim, Registration, ReleasePage
from pf_metered.money import (
    MAX_AMOUNT_MICRO,
    MICRO,
    decimal_to_micro,
    fee_micro,
    format_usdc,
    micro_to_decimal,
)

from ._dialect import ACTION_STATUS, ActionAnswer, DialectCapabilities, RequestSpec
from ._json import loads_exact
from ._ratelimit import DEFAULT_DEPLOYED_LIMITS, RateLimit

_log = logging.getLogger("pf_metered.client")

__all__ = [
    "CASINO_BASE_URL",
    "DEPLOYED",
    "DEPLOYED_BASE_URL",
    "DEPLOYED_MINIMUM_MICRO",
    "DEPLOYED_STATUSES",
    "ERROR_CLASSES",
    "FAUCET_BASE_URL",
    "DeployedDialect",
    "DeployedEscrow",
    "decode_json",
    "nonce_in",
    "wire_money_micro",
]

DEPLOYED_BASE_URL: Final = "https://escrow.purpleflea.com"
"""The deployed escrow service (its paths start at the root: ``/escrow/create``)."""

CASINO_BASE_URL: Final = "https://casino.purpleflea.com"
"""Where new agents register (``POST /api/v1/auth/register``)."""

FAUCET_BASE_URL: Final = "https://faucet.purpleflea.com"
"""Where a new agent claims its one free USDC (``POST /faucet/claim``)."""

DEPLOYED_MINIMUM_MICRO: Final = 100_000
"""The smallest escrow the deployed service accepts: 0.10 USDC."""

MAX_TIMEOUT_HOURS: Final = 720
"""The longest ``timeout_hours`` the service keeps (it clamps anything longer to this without
a word; the client refuses it up front instead)."""

DEFAULT_TIMEOUT_HOURS: Final = 24
"""``timeout_hours`` when the caller gives none (the service hands the escrow back, less 1%,
after this long)."""

CREATE: Final = "/escrow/create"
REGISTER: Final = "/api/v1/auth/register"
FAUCET_CLAIM: Final = "/faucet/claim"

DeployedStatus = Literal["funded", "completed", "released", "disputed", "refunded"]
DEPLOYED_STATUSES: Final[dict[str, str]] = {
    "funded": "locked",
    "completed": "completed",
    "released": "released",
    "disputed": "disputed",
    "refunded": "refunded",
}
"""The service's statuses and the neutral model's names for them."""

ERROR_CLASSES: Final[dict[int, type[APIError]]] = {
    400: InvalidRequest,
    401: AuthError,
    402: InsufficientFunds,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    429: RateLimited,
}

_NONCE = re.compile(r"\[idem:([\x21-\x5c\x5e-\x7e]{1,255})\]\s*$")
_MAX_DECIMAL: Final = Decimal(MAX_AMOUNT_MICRO // MICRO)
_QUANTUM: Final = Decimal("0.000001")
_EXACT: Final = Context(prec=40, rounding=ROUND_HALF_UP, traps=[InvalidOperation])
"""Our own context for the one rounding of a wire amount (quantize rounds the exact operand
once, half-up): a caller's thread context (a small ``prec``, half-even) must not apply."""


# ------------------------------------------------------------------------------ money


def decode_json(content: bytes | str) -> Any:
    """Decode an answer with every JSON number as an exact ``Decimal`` (or ``int``).

    Why: the deployed service sends money as JSON numbers that were floats on its side. Read
    through ``float`` a second time they would carry their binary error into our books; read
    as ``Decimal`` from the text, the error is visible and :func:`wire_money_micro` rounds it
    away. ``NaN``, ``Infinity`` and duplicate keys are refused.
    """
    text = content.decode("utf-8") if isinstance(content, bytes) else content
    try:
        return loads_exact(text)
    except (ValueError, RecursionError) as exc:
        problem = type(exc).__name__
    # Raised outside the handler, so the decoder's error (it holds the whole body, which may
    # quote a key or hostile text) is not chained as __context__.
    raise InvalidResponse(f"the answer is not valid JSON ({problem})")


def wire_money_micro(value: object, field: str = "amount") -> int:
    """An amount from the deployed wire, as micro-USDC: rounded half-up to six places.

    Accepts what the service sends — a JSON integer, a JSON number decoded as ``Decimal``
    (``42.99669999999999`` → 42.996700), or a decimal string — and refuses floats (a value
    that already went through ``float`` here is a bug), bools, negatives, non-finite values
    and absurd magnitudes.
    """
    if isinstance(value, bool | float):
        raise InvalidResponse(f"{field} is a {type(value).__name__}, not an exact number")
    if isinstance(value, int):
        dec = Decimal(value)
    elif isinstance(value, Decimal):
        dec = value
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 64:
            raise InvalidResponse(f"{field} is not a number")
        try:
            dec = Decimal(text)
        except InvalidOperation:
            raise InvalidResponse(f"{field} is not a number: {text[:40]!r}") from None
    else:
        raise InvalidResponse(f"{field} is missing or not a number")
    if not dec.is_finite() or dec < 0 or dec > _MAX_DECIMAL:
        raise InvalidResponse(f"{field} is out of range: {dec}")
    # rounded in a context of our own: the caller's thread context must not round money
    return decimal_to_micro(_EXACT.quantize(dec, _QUANTUM))


def _json_number(micro: int) -> str:
    """The exact JSON number literal for an amount (``format_usdc`` text, which is valid JSON)."""
    return format_usdc(micro)


# ------------------------------------------------------------------------------ nonce


def nonce_in(description: str | None) -> str | None:
    """The client nonce (the idempotency key in the `` [idem:KEY]`` tag) a description ends with."""
    if not description:
        return None
    match = _NONCE.search(description)
    return match.group(1) if match else None


# ------------------------------------------------------------------------------ model


class DeployedEscrow(Escrow):
    """An escrow as the deployed service reports it, in the neutral model's terms.

    ``amount`` is the whole escrow; ``released`` is all of it once released (never a part);
    ``refunded`` is all of it once handed back — of which the creator receives
    ``returned_to_creator`` (the service keeps its 1% commission on an expiry too).
    Figures are rounded to the micro-USDC from the service's floats.
    """

    deployed_status: DeployedStatus
    commission: USDC = Decimal(0)
    net_to_counterparty: USDC = Decimal(0)
    timeout_hours: int | None = None
    nonce: str | None = Field(default=None, max_length=128)
    events: tuple[EscrowEvent, ...] = ()
    """The escrow's history (``created``, ``completed``, ``released``, ...), shown only to its
    two parties; empty for anyone else."""

    @property
    def commission_micro(self) -> int:
        return decimal_to_micro(self.commission)

    @property
    def returned_to_creator_micro(self) -> int:
        """What the creator gets back of a refunded (expired) escrow: amount less 1%."""
        if self.status != "refunded":
            return 0
        return self.amount_micro - fee_micro(self.amount_micro)

    @property
    def returned_micro(self) -> int:
        """The refund less the commission the service kept (see :attr:`Escrow.returned_micro`)."""
        return self.returned_to_creator_micro


def _str_field(data: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = data.get(name)
        if isinstance(value, str) and value:
            return value
    return None


# ------------------------------------------------------------------------------ dialect


class DeployedDialect:
    """The deployed service's dialect (see the module docstring).

    ``list_path``: the path of a listing of the caller's escrows, if the service offers one
    (the deployed code read on 2026-11-27 did not; the sandbox can). With it, a create whose
    answer was lost is reconciled by the nonce in its description; without it, such a create
    is an :class:`~pf_metered.errors.AmbiguousCreate`.
    """

    name = "deployed"
    root = ""
    default_base_url = DEPLOYED_BASE_URL
    supports_partial_release = False
    min_escrow_micro = DEPLOYED_MINIMUM_MICRO
    max_auto_release_hours = MAX_TIMEOUT_HOURS

    def __init__(
        self,
        *,
        list_path: str | None = None,
        default_timeout_hours: int = DEFAULT_TIMEOUT_HOURS,
        rate_limits: Mapping[str, RateLimit] | None = None,
    ) -> None:
        if list_path is not None and not list_path.startswith("/"):
            raise InvalidInput("list_path", "must be a path starting with '/'")
        self.list_path = list_path
        self.default_timeout_hours = default_timeout_hours
        limits = rate_limits if rate_limits is not None else DEFAULT_DEPLOYED_LIMITS
        self.capabilities = DialectCapabilities(
            partial_release=False,
            listing=list_path is not None,
            refund=False,
            release_history=False,
            complete_and_dispute=True,
            keyed_faucet=False,
            honours_idempotency_keys=False,
            min_escrow_micro=DEPLOYED_MINIMUM_MICRO,
            max_auto_release_hours=MAX_TIMEOUT_HOURS,
            limits={pattern: limit.per_minute for pattern, limit in limits.items()},
        )

    @property
    def supports_listing(self) -> bool:
        return self.capabilities.listing

    def probe(self) -> RequestSpec:
        """``GET /openapi.json``: the service's own description of its paths (no key, no
        money, not rate limited)."""
        return RequestSpec("GET", "/openapi.json")

    def recognises(self, status: int, data: Any) -> bool:
        """The probe's answer is this service's when its path list has the deployed calls."""
        if status != 200 or not isinstance(data, dict) or not isinstance(data.get("paths"), dict):
            return False
        return {CREATE, "/escrow/release/{id}", "/escrow/{id}"} <= set(data["paths"])

    # -- requests ------------------------------------------------------------------------

    @staticmethod
    def _body(fields: dict[str, Any], money: dict[str, int] | None = None) -> bytes:
        """Serialise once (keys sorted); money is spliced in as exact JSON number literals."""
        parts = {k: json.dumps(v, ensure_ascii=True) for k, v in fields.items()}
        for key, micro in (money or {}).items():
            parts[key] = _json_number(micro)
        inner = ",".join(f"{json.dumps(k)}:{parts[k]}" for k in sorted(parts))
        return ("{" + inner + "}").encode()

    @staticmethod
    def _path(action: str, escrow_id: str) -> str:
        return f"/escrow/{action}/{quote(escrow_id, safe='')}"

    def create_escrow(
        self,
        *,
        to_agent_id: str,
        amount_micro: int,
        memo: str,
        auto_release_hours: int | None,
        idempotency_key: str,
    ) -> RequestSpec:
        if amount_micro < self.min_escrow_micro:
            raise InvalidInput(
                "amount",
                f"{format_usdc(amount_micro)} is under the deployed service's minimum escrow "
                f"of {format_usdc(self.min_escrow_micro)}",
            )
        hours = (
            auto_release_hours if auto_release_hours is not None else (self.default_timeout_hours)
        )
        body = self._body(
            {
                "counterparty_agent_id": to_agent_id,
                "description": memo,
                "timeout_hours": hours,
            },
            {"amount_usd": amount_micro},
        )
        return RequestSpec("POST", CREATE, body, idempotency_key)

    def release_partial(
        self, *, escrow_id: str, amount_micro: int, memo: str, idempotency_key: str
    ) -> RequestSpec:
        raise UnsupportedByDialect(
            "the deployed escrow service releases only whole escrows (POST /escrow/release/"
            "{id}); use release(escrow_id), or a PaymentStream, which pays in tranches there"
        )

    def release_whole(self, *, escrow_id: str, idempotency_key: str | None = None) -> RequestSpec:
        return RequestSpec("POST", self._path("release", escrow_id), b"{}", idempotency_key)

    def complete(self, *, escrow_id: str, idempotency_key: str | None = None) -> RequestSpec:
        return RequestSpec("POST", self._path("complete", escrow_id), b"{}", idempotency_key)

    def dispute(
        self, *, escrow_id: str, reason: str = "", idempotency_key: str | None = None
    ) -> RequestSpec:
        body = self._body({"reason": reason[:1000]}) if reason else b"{}"
        return RequestSpec("POST", self._path("dispute", escrow_id), body, idempotency_key)

    def get_escrow(self, escrow_id: str) -> RequestSpec:
        return RequestSpec("GET", f"/escrow/{quote(escrow_id, safe='')}")

    def list_escrows(self) -> RequestSpec:
        if self.list_path is None:
            raise UnsupportedByDialect(
                "the deployed escrow service offers no listing of a caller's escrows"
            )
        return RequestSpec("GET", self.list_path)

    def list_releases(self, escrow_id: str, *, offset: int, limit: int) -> RequestSpec:
        raise UnsupportedByDialect(
            "the deployed escrow service keeps no release history to page through (an escrow "
            "is released whole, once)"
        )

    def refund(self, *, escrow_id: str, idempotency_key: str) -> RequestSpec:
        raise UnsupportedByDialect(
            "the deployed escrow service has no refund call: an escrow goes back to its "
            "creator, less the 1% commission, when its timeout_hours pass"
        )

    def claim_faucet(self, *, idempotency_key: str) -> RequestSpec:
        raise UnsupportedByDialect(
            "on the deployed services the faucet is its own service: use "
            "pf_metered.claim_faucet_for(agent_id) (or "
            "pf-metered faucet claim --agent-id AGENT_ID)"
        )

    def faucet_claim_request(self, agent_casino_id: str) -> RequestSpec:
        """``POST /faucet/claim {agent_casino_id}`` (on the faucet service's base URL)."""
        return RequestSpec(
            "POST", FAUCET_CLAIM, self._body({"agent_casino_id": agent_casino_id}), None
        )

    def register_request(self, **fields: str) -> RequestSpec:
        """``POST /api/v1/auth/register`` (on the casino service's base URL)."""
        return RequestSpec("POST", REGISTER, self._body(dict(fields)), None)

    # -- answers -------------------------------------------------------------------------

    decode = staticmethod(decode_json)

    def parse_escrow(self, data: Any) -> DeployedEscrow:
        if not isinstance(data, dict):
            raise InvalidResponse("escrow is not a JSON object")
        if isinstance(data.get("escrow"), dict):  # some answers wrap the record
            data = data["escrow"]
        status = data.get("status")
        if status not in DEPLOYED_STATUSES:
            raise InvalidResponse(f"escrow.status is not a known status: {str(status)[:40]!r}")
        amount = wire_money_micro(data.get("amount_usd"), "escrow.amount_usd")
        expected_fee = fee_micro(amount)
        commission = (
            wire_money_micro(data["commission_usd"], "escrow.commission_usd")
            if data.get("commission_usd") is not None
            else expected_fee
        )
        net = (
            wire_money_micro(data["net_to_counterparty"], "escrow.net_to_counterparty")
            if data.get("net_to_counterparty") is not None
            else amount - commission
        )
        # The service computes these with floats: allow one micro-USDC of disagreement, no more.
        if abs(commission - expected_fee) > 1 or abs(amount - commission - net) > 1:
            raise InvalidResponse(
                f"escrow figures do not add up: amount {format_usdc(amount)}, commission "
                f"{format_usdc(commission)}, net {format_usdc(net)}"
            )
        neutral = DEPLOYED_STATUSES[status]
        released = amount if neutral == "released" else 0
        refunded = amount if neutral == "refunded" else 0
        remaining = amount - released - refunded
        description = data.get("description")
        hours = data.get("timeout_hours")
        events = data.get("events", [])
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise InvalidResponse("escrow.events is not a list of objects")
        fields = {
            "escrow_id": data.get("escrow_id"),
            "status": neutral,
            "deployed_status": status,
            "amount": micro_to_decimal(amount),
            "released": micro_to_decimal(released),
            "remaining": micro_to_decimal(remaining),
            "refunded": micro_to_decimal(refunded),
            "commission": micro_to_decimal(commission),
            "net_to_counterparty": micro_to_decimal(net),
            "to_agent_id": _str_field(data, "counterparty_agent_id", "counterparty_id"),
            "from_agent_id": _str_field(
                data, "creator_agent_id", "creator_id", "agent_id", "from_agent_id"
            ),
            "memo": description[:1000] if isinstance(description, str) else "",
            "nonce": nonce_in(description) if isinstance(description, str) else None,
            "auto_release_at": _str_field(data, "auto_release_at"),
            "timeout_hours": hours
            if isinstance(hours, int) and not isinstance(hours, bool)
            else None,
            "events": [
                {k: e.get(k) for k in ("event", "actor_id", "note", "created_at") if k in e}
                for e in events[:1000]
            ],
        }
        try:
            return DeployedEscrow.model_validate(fields)
        except ValidationError as exc:
            raise InvalidResponse(f"malformed escrow: {_summary(exc)}") from None

    def parse_action(self, data: Any, action: str) -> ActionAnswer:
        """A release / complete / dispute answer, checked field by field; what is missing or
        wrong is reported in ``problem`` (never raised: the action may have been applied, so
        the caller reads the escrow back to settle it)."""
        if not isinstance(data, dict):
            return ActionAnswer(action, None, None, problem="the answer is not a JSON object")
        problems: list[str] = []
        escrow_id = data.get("escrow_id") if isinstance(data.get("escrow_id"), str) else None
        status = data.get("status") if isinstance(data.get("status"), str) else None
        if escrow_id is None:
            problems.append("no escrow_id")
        if status != ACTION_STATUS[action]:
            problems.append(f"status {str(status)[:40]!r}, not {ACTION_STATUS[action]!r}")
        figures: dict[str, int | None] = {"amount_released": None, "commission": None}
        referral: int | None = None
        if action == "release":
            for name in figures:
                try:
                    figures[name] = wire_money_micro(data.get(name), name)
                except InvalidResponse as exc:
                    problems.append(exc.message)
            try:
                referral = wire_money_micro(data.get("referral_commission", 0), "referral")
            except InvalidResponse as exc:
                problems.append(exc.message)
            net, commission = figures["amount_released"], figures["commission"]
            if (
                net is not None
                and commission is not None
                and (abs(fee_micro(net + commission) - commission) > 1)
            ):
                problems.append(
                    f"commission {format_usdc(commission)} is not 1% of "
                    f"{format_usdc(net + commission)}"
                )
        return ActionAnswer(
            action,
            escrow_id,
            status,
            net_micro=figures["amount_released"],
            commission_micro=figures["commission"],
            referral_micro=referral,
            counterparty_id=_str_field(data, "counterparty_id", "counterparty_agent_id"),
            problem="; ".join(problems) or None,
        )

    def escrow_from_release(self, told: ActionAnswer) -> DeployedEscrow:
        """The released escrow as a complete release answer describes it (used only when the
        escrow cannot be read back): gross = ``amount_released`` + ``commission``."""
        gross = told.gross_micro
        if gross is None or told.escrow_id is None or told.problem is not None:
            raise InvalidResponse("the release answer does not describe the escrow")
        assert told.net_micro is not None and told.commission_micro is not None
        return DeployedEscrow.model_validate(
            {
                "escrow_id": told.escrow_id,
                "status": "released",
                "deployed_status": "released",
                "amount": micro_to_decimal(gross),
                "released": micro_to_decimal(gross),
                "remaining": Decimal(0),
                "commission": micro_to_decimal(told.commission_micro),
                "net_to_counterparty": micro_to_decimal(told.net_micro),
                "to_agent_id": told.counterparty_id,
            }
        )

    def parse_release_page(self, data: Any) -> ReleasePage:
        raise UnsupportedByDialect("the deployed escrow service has no release history")

    def parse_escrow_list(self, data: Any) -> list[Escrow]:
        items = data.get("escrows") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise InvalidResponse("escrow list is not a list")
        return [self.parse_escrow(item) for item in items]

    def parse_faucet_claim(self, data: Any) -> FaucetClaim:
        if not isinstance(data, dict):
            raise InvalidResponse("faucet claim is not a JSON object")
        credited = wire_money_micro(data.get("credited"), "faucet.credited")
        try:
            return FaucetClaim.model_validate(
                {
                    "credited": micro_to_decimal(credited),
                    "claim_id": str(data.get("claim_id", "")),
                    "agent_id": _str_field(data, "agent_casino_id", "agent_id"),
                }
            )
        except ValidationError as exc:
            raise InvalidResponse(f"malformed faucet claim: {_summary(exc)}") from None

    def parse_registration(self, data: Any) -> Registration:
        if not isinstance(data, dict):
            raise InvalidResponse("registration is not a JSON object")
        try:
            return Registration.model_validate(
                {"agent_id": data.get("agent_id"), "api_key": data.get("api_key")}
            )
        except ValidationError as exc:
            raise InvalidResponse(f"malformed registration: {_summary(exc)}") from None

    # -- errors --------------------------------------------------------------------------

    def error_class(self, status: int, code: str | None) -> type[APIError]:
        if 500 <= status <= 599:
            return ServerError
        return ERROR_CLASSES.get(status, APIError)

    def is_in_progress(self, status: int, code: str | None) -> bool:
        return False


def _summary(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False)[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc or 'answer'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)


DEPLOYED: Final = DeployedDialect()
"""The deployed dialect as the service was read (no listing)."""


# ------------------------------------------------------------------------------ bootstrap
#
# A new agent has no key yet, so registration cannot go through an EscrowClient: these are
# small functions of their own, each one request with retries only where a retry is safe.

ENV_CASINO_URL: Final = "PF_CASINO_URL"
ENV_FAUCET_URL: Final = "PF_FAUCET_URL"
BOOTSTRAP_RETRIES: Final = 3


def _service_url(base_url: str | None, env: str, default: str) -> str:
    import os

    from ._base import check_base_url

    return check_base_url(base_url if base_url is not None else os.environ.get(env) or default)


def _bootstrap_error(answer: Any) -> APIError:
    from pf_metered.errors import redact

    code: str | None = None
    message = "the service refused the request"
    try:
        data = None if answer.too_large else decode_json(answer.body)
    except InvalidResponse:
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("error"), str):
            code = data["error"][:64]
        if isinstance(data.get("message"), str) and data["message"].strip():
            message = redact(data["message"])
    cls = DEPLOYED.error_class(answer.status, code)
    return cls(message, status=answer.status, code=code)


def _bootstrap_plan(kind: Literal["register", "faucet"]) -> Any:
    """The retry decisions of one bootstrap call, as a generator driven by sync or async I/O.

    Receives an :class:`~pf_metered.client._base.Answer` (body read up to
    ``MAX_ANSWER_BYTES``) or the ``httpx`` error; yields ``("send", None)`` or
    ``("sleep", seconds)``; returns the successful answer. A registration whose answer was
    lost is never re-sent (it would make a second agent); a faucet claim is (the faucet pays
    once per agent), and a 409 after a lost attempt means the lost attempt was credited.
    """
    import httpx

    from pf_metered.errors import AmbiguousOutcome, APIConnectionError, APITimeout

    from ._retry import Verdict, backoff_delay, classify_exception

    lost_before = False
    for attempt in range(BOOTSTRAP_RETRIES + 1):
        outcome = yield ("send", None)
        last = attempt == BOOTSTRAP_RETRIES
        if isinstance(outcome, Exception):
            verdict = classify_exception(outcome)
            cls = APITimeout if isinstance(outcome, httpx.TimeoutException) else APIConnectionError
            error: Exception = cls(f"{kind}: {type(outcome).__name__}")
            if verdict is Verdict.LOST:
                if kind == "register":
                    raise AmbiguousOutcome(
                        "the registration may have been made but its answer (with the new key) "
                        "was lost; register again to get a key you hold"
                    ) from None
                lost_before = True
            elif verdict is not Verdict.RETRY:
                raise error
            if last:
                raise error
            yield ("sleep", backoff_delay(attempt + 1))
            continue
        status = outcome.status
        if 200 <= status <= 299:
            return outcome
        api_error = _bootstrap_error(outcome)
        if kind == "faucet" and status == 409 and lost_before:
            raise AmbiguousOutcome(
                "the faucet claim was probably credited by the attempt whose answer was lost "
                "(the retry was refused as already claimed)"
            )
        if status == 429 and kind == "faucet":
            # Never retried: ``ip_rate_limited`` is a 24-hour cooldown per client address, and
            # every retry of a ``rate_limited`` one spends the faucet's 5-a-minute window.
            raise _faucet_refusal(api_error)
        if status == 429 and not last:
            yield ("sleep", max(backoff_delay(attempt + 1), 2.0**attempt))
            continue
        if 500 <= status <= 599 and not last and kind != "register":
            lost_before = True
            yield ("sleep", backoff_delay(attempt + 1))
            continue
        raise api_error
    raise AssertionError("unreachable")  # pragma: no cover


FAUCET_COOLDOWN_CODE: Final = "ip_rate_limited"


def _faucet_refusal(error: APIError) -> APIError:
    """A faucet 429, saying when to try again (the service's words carry the hours left)."""
    if error.code == FAUCET_COOLDOWN_CODE:
        when = (
            "the faucet pays one claim per client address a day"
            if "try again" in error.message.lower()
            else "the faucet pays one claim per client address a day: try again in ~24h"
        )
    else:
        when = "the faucet takes 5 claims a minute per address: try again in a minute"
    return RateLimited(
        f"{error.message} ({when}; not retried)",
        retry_after=None,
        status=error.status,
        code=error.code,
    )


def _drive_sync(plan: Any, send: Any, sleep: Any) -> Any:
    outcome: Any = None
    try:
        while True:
            action, arg = plan.send(outcome)
            if action == "sleep":
                sleep(arg)
                outcome = None
            else:
                try:
                    outcome = send()
                except Exception as exc:  # httpx errors become outcomes the plan judges
                    outcome = exc
    except StopIteration as done:
        return done.value


async def _drive_async(plan: Any, send: Any, sleep: Any) -> Any:
    outcome: Any = None
    try:
        while True:
            action, arg = plan.send(outcome)
            if action == "sleep":
                await sleep(arg)
                outcome = None
            else:
                try:
                    outcome = await send()
                except Exception as exc:
                    outcome = exc
    except StopIteration as done:
        return done.value


def _bootstrap_request(
    kind: Literal["register", "faucet"], base_url: str | None, fields: dict[str, str]
) -> tuple[str, bytes]:
    if kind == "register":
        url = _service_url(base_url, ENV_CASINO_URL, CASINO_BASE_URL)
        spec = DEPLOYED.register_request(**fields)
    else:
        url = _service_url(base_url, ENV_FAUCET_URL, FAUCET_BASE_URL)
        spec = DEPLOYED.faucet_claim_request(fields["agent_casino_id"])
    return url + spec.path, spec.body or b"{}"


_HEADERS: Final = {"Content-Type": "application/json", "Accept": "application/json"}


def _check_agent(agent_casino_id: object) -> str:
    if not isinstance(agent_casino_id, str) or not re.fullmatch(
        r"[A-Za-z0-9_.:\-]{1,128}", agent_casino_id
    ):
        raise InvalidInput("agent_casino_id", "must be 1..128 characters of A-Z a-z 0-9 _ . : -")
    return agent_casino_id


def _bootstrap_answer(answer: Any) -> Any:
    """A successful bootstrap answer decoded; one past ``MAX_ANSWER_BYTES`` is refused."""
    from ._base import MAX_ANSWER_BYTES

    if answer.too_large:
        raise InvalidResponse(
            f"answer larger than {MAX_ANSWER_BYTES} bytes refused", status=answer.status
        )
    return decode_json(answer.body)


def _bootstrap_post(
    kind: Literal["register", "faucet"],
    base_url: str | None,
    fields: dict[str, str],
    *,
    transport: Any,
    timeout: float,
    sleep: Any,
) -> Any:
    """POST one bootstrap request, retried as its plan says; the answer decoded."""
    import time

    import httpx

    from ._base import BodyCollector

    url, body = _bootstrap_request(kind, base_url, fields)
    from ._secrets import trust_env_for  # no proxy for http or loopback: answers carry keys

    with httpx.Client(
        transport=transport,
        timeout=timeout,
        follow_redirects=False,
        trust_env=trust_env_for(url),
    ) as http:

        def send() -> Any:  # the body streamed, read no further than MAX_ANSWER_BYTES
            request = http.build_request("POST", url, content=body, headers=_HEADERS)
            response = http.send(request, stream=True)
            try:
                collector = BodyCollector(response.headers)
                if not collector.too_large:
                    for chunk in response.iter_bytes():
                        if not collector.add(chunk):
                            break
            finally:
                response.close()
            return collector.answer(response)

        answer = _drive_sync(_bootstrap_plan(kind), send, sleep or time.sleep)
    return _bootstrap_answer(answer)


async def _abootstrap_post(
    kind: Literal["register", "faucet"],
    base_url: str | None,
    fields: dict[str, str],
    *,
    transport: Any,
    timeout: float,
    sleep: Any,
) -> Any:
    """:func:`_bootstrap_post` for asyncio."""
    import asyncio

    import httpx

    from ._base import BodyCollector

    url, body = _bootstrap_request(kind, base_url, fields)
    from ._secrets import trust_env_for  # no proxy for http or loopback: answers carry keys

    async with httpx.AsyncClient(
        transport=transport, timeout=timeout, follow_redirects=False, trust_env=trust_env_for(url)
    ) as http:

        async def send() -> Any:
            request = http.build_request("POST", url, content=body, headers=_HEADERS)
            response = await http.send(request, stream=True)
            try:
                collector = BodyCollector(response.headers)
                if not collector.too_large:
                    async for chunk in response.aiter_bytes():
                        if not collector.add(chunk):
                            break
            finally:
                await response.aclose()
            return collector.answer(response)

        answer = await _drive_async(_bootstrap_plan(kind), send, sleep or asyncio.sleep)
    return _bootstrap_answer(answer)


def register(
    *,
    base_url: str | None = None,
    transport: Any = None,
    timeout: float = 30.0,
    _sleep: Any = None,
    **fields: str,
) -> Registration:
    """Register a new agent on the casino service: ``{agent_id, api_key}`` (key as a secret).

    The casino credits the new agent's $1 faucet grant itself, at registration (it asks the
    faucet on the agent's behalf), so there is nothing to claim afterwards: a
    :func:`claim_faucet` for this agent is refused ``already_claimed``. Check the balance if
    it matters — the casino never lets a faucet refusal block a registration.

    ``base_url`` defaults to ``PF_CASINO_URL`` or :data:`CASINO_BASE_URL`; ``transport`` may be
    a sandbox's (``Sandbox.casino_base_url`` names its in-process URL).
    """
    answer = _bootstrap_post(
        "register", base_url, dict(fields), transport=transport, timeout=timeout, sleep=_sleep
    )
    return DEPLOYED.parse_registration(answer)


async def aregister(
    *,
    base_url: str | None = None,
    transport: Any = None,
    timeout: float = 30.0,
    _sleep: Any = None,
    **fields: str,
) -> Registration:
    """:func:`register` for asyncio."""
    answer = await _abootstrap_post(
        "register", base_url, dict(fields), transport=transport, timeout=timeout, sleep=_sleep
    )
    return DEPLOYED.parse_registration(answer)


def claim_faucet(
    agent_casino_id: str,
    *,
    base_url: str | None = None,
    transport: Any = None,
    timeout: float = 30.0,
    _sleep: Any = None,
) -> FaucetClaim:
    """Claim the faucet's one free USDC for an agent that has none yet.

    An agent made by :func:`register` already has it (409 ``already_claimed`` →
    :class:`~pf_metered.errors.Conflict`). The faucet also pays one claim per client address
    a day and takes 5 claims a minute: either 429 is raised at once as
    :class:`~pf_metered.errors.RateLimited` saying when to try again — never retried, since a
    retry cannot succeed sooner and spends the window.

    ``base_url`` defaults to ``PF_FAUCET_URL`` or :data:`FAUCET_BASE_URL`.
    """
    fields = {"agent_casino_id": _check_agent(agent_casino_id)}
    answer = _bootstrap_post(
        "faucet", base_url, fields, transport=transport, timeout=timeout, sleep=_sleep
    )
    return DEPLOYED.parse_faucet_claim(answer)


async def aclaim_faucet(
    agent_casino_id: str,
    *,
    base_url: str | None = None,
    transport: Any = None,
    timeout: float = 30.0,
    _sleep: Any = None,
) -> FaucetClaim:
    """:func:`claim_faucet` for asyncio."""
    fields = {"agent_casino_id": _check_agent(agent_casino_id)}
    answer = await _abootstrap_post(
        "faucet", base_url, fields, transport=transport, timeout=timeout, sleep=_sleep
    )
    return DEPLOYED.parse_faucet_claim(answer)
