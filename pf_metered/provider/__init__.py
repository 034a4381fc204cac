"""The provider's side: serve only while the stream paying for the work pays.

``PaymentGate`` / ``AsyncPaymentGate`` verify the stream a request names (the escrow exists, is
locked, pays this provider, carries the caller's proof, has enough left) and meter what is
served against what the escrow shows released, refusing with a reason and the amount owed once
more than ``credit`` units are unpaid. Faces: :mod:`.asgi` (HTTP services), :mod:`.mcp` (paid
MCP tools), :mod:`.langchain` (a provider agent's tools). The consumer's half is
``PaymentStream.auth()`` / ``provider_headers()``.

What this package must never do: import Starlette, mcp or LangChain on ``import pf_metered``
(the faces are separate modules), or admit work on an escrow that failed a check.
"""

from pf_metered.provider._core import (
    REASONS,
    AccountView,
    Admission,
    Claim,
    GateCore,
    PaymentRefused,
)
from pf_metered.provider._gate import AsyncPaymentGate, PaymentGate, Reconciliation, Served
from pf_metered.stream._provider_auth import (
    HEADER_ESCROW,
    HEADER_PROOF,
    HEADER_TRANCHES,
    PaymentAuth,
)

__all__ = [
    "HEADER_ESCROW",
    "HEADER_PROOF",
    "HEADER_TRANCHES",
    "REASONS",
    "AccountView",
    "Admission",
    "AsyncPaymentGate",
    "Claim",
    "GateCore",
    "PaymentAuth",
    "PaymentGate",
    "PaymentRefused",
    "Reconciliation",
    "Served",
]
