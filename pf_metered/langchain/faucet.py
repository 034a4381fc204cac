"""The LangChain ``faucet_claim`` tool: a new agent's one-time 1.00 USDC credit.

Why a family of its own: operators often want an agent that may pay but may not claim the
faucet; a separate family makes that one word in ``PurpleFleaToolkit(allowed=...)``.

What this module must never do: define a second description or schema for the tool.
"""

from __future__ import annotations

from pydantic import BaseModel

from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.tools.escrow import FAUCET_CLAIM
from pf_metered.tools.schemas import FaucetClaimArgs

__all__ = ["FaucetClaimTool"]


class FaucetClaimTool(PurpleFleaTool):
    """Claim the faucet once for a new agent."""

    definition = FAUCET_CLAIM
    name: str = FAUCET_CLAIM.name
    description: str = FAUCET_CLAIM.description
    args_schema: type[BaseModel] = FaucetClaimArgs
