"""The consumer's half of the payment gate: which stream pays for a request, and proof of it.

Why a proof: an escrow id is not a secret (the provider sees it, and on the deployed dialect
anyone holding it can read the escrow), so a caller naming an escrow proves nothing. Each
stream therefore makes a random *proof* when it is built and writes only its commitment
(``pfgate=<32 hex>``, a SHA-256 of the proof) into the escrow's memo, which every tranche of a
chain repeats. A request carries the proof itself (``X-PF-Proof``); the provider's gate
(:mod:`pf_metered.provider`) hashes it and compares it with the memo of every escrow named.
Someone else's escrow carries someone else's commitment, so it is refused before any work.
The provider learns the proof, but it is the one being paid: the proof can only make it serve.

The wire, as headers (the gate reads the same constants):

* ``X-PF-Escrow``: the stream's escrow id (``chain:<first tranche>`` on the deployed dialect);
* ``X-PF-Tranche``: on a tranche chain, the ids of its recent tranches, newest first, so the
  gate meets every new tranche while it is still locked;
* ``X-PF-Proof``: the proof (absent for a stream resumed from its store by another process:
  the proof lives only in the process that built the stream).

What this module must never do: put the proof in a repr, a log record or an exception, or do I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

import httpx

from pf_metered.errors import StreamClosed

if TYPE_CHECKING:
    from pf_metered.meter.store import StreamConfig

__all__ = [
    "HEADER_ESCROW",
    "HEADER_PROOF",
    "HEADER_TRANCHES",
    "MAX_TRANCHES_NAMED",
    "PaymentAuth",
    "commitment_in",
    "proof_commitment",
    "proof_matches",
    "stream_headers",
    "with_proof",
]

HEADER_ESCROW: Final = "X-PF-Escrow"
HEADER_TRANCHES: Final = "X-PF-Tranche"
HEADER_PROOF: Final = "X-PF-Proof"

MAX_TRANCHES_NAMED: Final = 8
"""Tranche ids a request names at most: the live ones and the most recently released."""

_TAG: Final = "pfgate="
_TAG_RE: Final = re.compile(r"(?:^|\s)pfgate=([0-9a-f]{32})(?:\s|$)")
_MEMO_MAX: Final = 500
_TRANCHE_MEMO_KEEPS: Final = 400  # a tranche chain repeats only memo[:400]


def proof_commitment(proof: str) -> str:
    """What the memo carries for ``proof``: 32 hex digits of SHA-256 (not reversible)."""
    return hashlib.sha256(b"pf-gate-proof:" + proof.encode()).hexdigest()[:32]


def commitment_in(memo: str) -> str | None:
    """The commitment an escrow memo carries, if any."""
    match = _TAG_RE.search(memo)
    return match.group(1) if match else None


def proof_matches(memo: str, proof: str | None) -> bool:
    """Whether ``proof`` is the one committed to in ``memo`` (constant-time comparison)."""
    committed = commitment_in(memo)
    if committed is None or not proof:
        return False
    return hmac.compare_digest(committed, proof_commitment(proof))


def with_proof(config: StreamConfig) -> tuple[StreamConfig, str | None]:
    """A fresh proof and the config whose memo commits to it.

    A memo that already carries a commitment (a stream rebuilt from its store) keeps it, and
    this process has no proof for it (``None``). The tag goes at the end of the memo when the
    tranche chain's truncation keeps it there, else at the front.
    """
    if commitment_in(config.memo) is not None:
        return config, None
    proof = secrets.token_hex(16)
    tag = _TAG + proof_commitment(proof)
    memo = config.memo
    if len(memo) + 1 + len(tag) <= _TRANCHE_MEMO_KEEPS:
        memo = f"{memo} {tag}" if memo else tag
    else:
        memo = f"{tag} {memo}"[:_MEMO_MAX]
    return replace(config, memo=memo), proof


def _tranche_ids(client: Any) -> tuple[str, ...]:
    """The chain's recent tranche ids, newest first, from its public ``report()``."""
    report = getattr(client, "report", None)
    if not callable(report):
        return ()
    tranches = getattr(report(), "tranches", ())
    named = [
        t.escrow_id
        for t in reversed(tranches)
        if t.escrow_id and getattr(t, "state", "") in ("live", "released")
    ]
    return tuple(named[:MAX_TRANCHES_NAMED])


def stream_headers(escrow_id: str | None, client: Any, proof: str | None) -> dict[str, str]:
    """The headers a request paid by this stream carries (see the module docstring)."""
    if escrow_id is None:
        raise StreamClosed("the stream is not open: open it before calling a provider")
    headers = {HEADER_ESCROW: escrow_id}
    if escrow_id.startswith("chain:"):
        ids = _tranche_ids(client)
        if ids:
            headers[HEADER_TRANCHES] = ",".join(ids)
    if proof:
        headers[HEADER_PROOF] = proof
    return headers


class PaymentAuth(httpx.Auth):
    """An httpx auth that adds a stream's payment headers to every request (sync and async).

    ``httpx.Client(auth=stream.auth())``; the headers are read at each request, so a tranche
    locked mid-stream is named from the next request on. The proof never shows in ``repr``.
    """

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers.update(self._stream.provider_headers())
        yield request

    def __repr__(self) -> str:
        return f"PaymentAuth(escrow_id={self._stream.escrow_id!r}, proof='***')"
