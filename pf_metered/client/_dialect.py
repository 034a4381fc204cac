"""The interface every API dialect implements, what it declares it can do, and the request it
builds.

What this module is for: letting the client core speak to more than one shape of the Purple
Flea escrow API through one seam. A dialect knows paths, field names, error codes, its
capabilities and how an answer becomes a model; the core (``_base.py``) knows retries,
idempotency, reading back, checking answers against requests, and pacing, and asks the
dialect's declared :class:`DialectCapabilities` rather than its type. ``v1.py`` and
``deployed.py`` are the two dialects; ``_dialects.py`` registers them and picks one.

Adding a dialect: one module implementing :class:`Dialect`, one line in
``_dialects.REGISTRY``, and one sandbox app beside ``sandbox/_v1.py`` and
``sandbox/_app_deployed.py`` (mounted in ``sandbox/__init__.py``) so it can be tested.

What it must never do: perform I/O, see the API key, or let a raw JSON value past ``parse_*``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from pf_metered.errors import APIError, ConfigError
from pf_metered.models import Escrow, FaucetClaim, ReleasePage

__all__ = [
    "ACTION_STATUS",
    "ActionAnswer",
    "Dialect",
    "DialectCapabilities",
    "RequestSpec",
    "check_dialect",
]

Action = Literal["release", "complete", "dispute"]

ACTION_STATUS: Final[dict[str, str]] = {
    "release": "released",
    "complete": "completed",
    "dispute": "disputed",
}
"""The status each action's answer reports (and the escrow reads) once applied."""


@dataclass(frozen=True)
class RequestSpec:
    """One request, built once per logical call so every retry sends identical bytes."""

    method: Literal["GET", "POST"]
    path: str
    body: bytes | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class DialectCapabilities:
    """What a dialect's service can do, declared once so the core never guesses from a type.

    ``limits``: the service's rate limits, path regex → requests per 60 s (per concrete path
    and client address); empty when it publishes none. ``honours_idempotency_keys``: ``True``
    / ``False`` when known, ``None`` when the client should learn it from the
    ``Idempotency-Supported`` header.
    """

    partial_release: bool
    listing: bool
    refund: bool
    release_history: bool
    complete_and_dispute: bool
    keyed_faucet: bool
    honours_idempotency_keys: bool | None
    min_escrow_micro: int
    max_auto_release_hours: int
    limits: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ActionAnswer:
    """What a service answered to a release, complete or dispute, checked field by field.

    On a dialect whose action answers are short accounts rather than the escrow (deployed:
    a release answers ``amount_released`` — the NET paid — and ``commission``; gross = their
    sum), the core reads the escrow back and believes the action only once the two agree.
    ``problem`` says what was missing or contradictory (``None``: nothing).
    """

    action: str
    escrow_id: str | None
    status: str | None
    net_micro: int | None = None
    commission_micro: int | None = None
    referral_micro: int | None = None
    counterparty_id: str | None = None
    problem: str | None = None

    @property
    def gross_micro(self) -> int | None:
        if self.net_micro is None or self.commission_micro is None:
            return None
        return self.net_micro + self.commission_micro


class Dialect(Protocol):
    """Paths, field names, error codes, capabilities and answer parsing of one API dialect.

    ``root`` is where the dialect lives on a host (``"/api/v1"``, or ``""`` at the root);
    ``probe()`` is a request that moves no money and ``recognises()`` says whether its answer
    is this dialect's. A call the dialect's service lacks raises
    :class:`~pf_metered.errors.UnsupportedByDialect` from the request builder, before
    anything is sent; its capabilities say so up front.
    """

    name: str
    root: str
    default_base_url: str
    capabilities: DialectCapabilities

    # -- requests --------------------------------------------------------------------

    def create_escrow(
        self,
        *,
        to_agent_id: str,
        amount_micro: int,
        memo: str,
        auto_release_hours: int | None,
        idempotency_key: str,
    ) -> RequestSpec: ...

    def release_partial(
        self, *, escrow_id: str, amount_micro: int, memo: str, idempotency_key: str
    ) -> RequestSpec: ...

    def release_whole(
        self, *, escrow_id: str, idempotency_key: str | None = None
    ) -> RequestSpec: ...

    def complete(self, *, escrow_id: str, idempotency_key: str | None = None) -> RequestSpec: ...

    def dispute(
        self, *, escrow_id: str, reason: str = "", idempotency_key: str | None = None
    ) -> RequestSpec: ...

    def get_escrow(self, escrow_id: str) -> RequestSpec: ...

    def list_escrows(self) -> RequestSpec: ...

    def list_releases(self, escrow_id: str, *, offset: int, limit: int) -> RequestSpec: ...

    def refund(self, *, escrow_id: str, idempotency_key: str) -> RequestSpec: ...

    def claim_faucet(self, *, idempotency_key: str) -> RequestSpec: ...

    def probe(self) -> RequestSpec: ...

    # -- answers ---------------------------------------------------------------------

    def recognises(self, status: int, data: Any) -> bool: ...

    def parse_escrow(self, data: Any) -> Escrow: ...

    def parse_escrow_list(self, data: Any) -> list[Escrow]: ...

    def parse_release_page(self, data: Any) -> ReleasePage: ...

    def parse_faucet_claim(self, data: Any) -> FaucetClaim: ...

    def parse_action(self, data: Any, action: str) -> ActionAnswer: ...

    def escrow_from_release(self, told: ActionAnswer) -> Escrow: ...

    # -- errors ----------------------------------------------------------------------

    def error_class(self, status: int, code: str | None) -> type[APIError]: ...

    def is_in_progress(self, status: int, code: str | None) -> bool: ...


_DIALECT_CALLS: Final = tuple(
    name
    for name in Dialect.__dict__
    if not name.startswith("_") and callable(Dialect.__dict__[name])
)


def check_dialect(value: object) -> Dialect:
    """``value`` if it is a dialect object (the :class:`Dialect` attributes and calls), else
    ``ConfigError`` naming ``dialect`` — before a client keeps it, so nothing (its ``repr``
    included) trips over a dialect that is not one later."""
    if (
        not isinstance(getattr(value, "name", None), str)
        or not isinstance(getattr(value, "root", None), str)
        or not isinstance(getattr(value, "capabilities", None), DialectCapabilities)
        or not all(callable(getattr(value, call, None)) for call in _DIALECT_CALLS)
    ):
        raise ConfigError(
            f"dialect must be 'v1', 'deployed', 'auto' or a Dialect object, not "
            f"{type(value).__name__}"
        )
    return value  # type: ignore[return-value]
