"""The small interface every API dialect implements, and the request it builds.

What this module is for: letting the client core speak to more than one shape of the Purple
Flea escrow API. A dialect knows paths, field names, error codes and how an answer becomes a
model; the core knows retries, idempotency, reading back and I/O. ``v1.py`` is the first
dialect; the deployed service's older one (DESIGN.md, "two dialects") goes beside it.

What it must never do: perform I/O, see the API key, or let a raw JSON value past ``parse_*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pf_metered.errors import APIError, ConfigError
from pf_metered.models import Escrow, FaucetClaim, ReleasePage

__all__ = ["Dialect", "HistoryDialect", "RequestSpec", "check_dialect"]


@dataclass(frozen=True)
class RequestSpec:
    """One request, built once per logical call so every retry sends identical bytes."""

    method: Literal["GET", "POST"]
    path: str
    body: bytes | None = None
    idempotency_key: str | None = None


class Dialect(Protocol):
    """Paths, field names, error codes and answer parsing of one API dialect."""

    name: str
    supports_partial_release: bool
    min_escrow_micro: int

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

    def get_escrow(self, escrow_id: str) -> RequestSpec: ...

    def list_escrows(self) -> RequestSpec: ...

    def refund(self, *, escrow_id: str, idempotency_key: str) -> RequestSpec: ...

    def claim_faucet(self, *, idempotency_key: str) -> RequestSpec: ...

    def parse_escrow(self, data: Any) -> Escrow: ...

    def parse_escrow_list(self, data: Any) -> list[Escrow]: ...

    def parse_faucet_claim(self, data: Any) -> FaucetClaim: ...

    def error_class(self, status: int, code: str | None) -> type[APIError]: ...

    def is_in_progress(self, status: int, code: str | None) -> bool: ...


@runtime_checkable
class HistoryDialect(Protocol):
    """A dialect whose escrows keep a release history that can be read page by page (v1's
    ``GET /escrow/{id}/releases``); the deployed dialect has none."""

    def list_releases(self, escrow_id: str, *, offset: int, limit: int) -> RequestSpec: ...

    def parse_release_page(self, data: Any) -> ReleasePage: ...


_DIALECT_CALLS = (
    "create_escrow",
    "release_partial",
    "get_escrow",
    "list_escrows",
    "refund",
    "claim_faucet",
    "parse_escrow",
    "parse_escrow_list",
    "parse_faucet_claim",
    "error_class",
    "is_in_progress",
)


def check_dialect(value: object) -> Dialect:
    """``value`` if it is a dialect object (the :class:`Dialect` attributes and calls), else
    ``ConfigError`` naming ``dialect`` — before a client keeps it, so nothing (its ``repr``
    included) trips over a dialect that is not one later."""
    name = getattr(value, "name", None)
    if (
        not isinstance(name, str)
        or not isinstance(getattr(value, "supports_partial_release", None), bool)
        or not isinstance(getattr(value, "min_escrow_micro", None), int)
        or not all(callable(getattr(value, call, None)) for call in _DIALECT_CALLS)
    ):
        raise ConfigError(
            f"dialect must be 'v1', 'deployed' or a Dialect object, not {type(value).__name__}"
        )
    return value  # type: ignore[return-value]
