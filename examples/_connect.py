"""Where the examples get their money: the embedded sandbox by default, the live API with a key.

With no ``PF_API_KEY`` every example runs on an in-process :class:`~pf_metered.Sandbox` with a
funded payer and a fresh provider: no key, no network. With ``PF_API_KEY`` set it pays the agent
named by ``PF_PROVIDER_ID`` on the live service, and shows on stderr what the library logs at
INFO — each retry and rate-limit pause, saying what it waits for — so a long wait is never silent.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from pf_metered import AsyncEscrowClient, EscrowClient, Sandbox


@dataclass(frozen=True)
class World:
    """A payer's client, the provider being paid, and the sandbox when there is one."""

    client: Any
    provider: str
    sandbox: Sandbox | None


def show_waits() -> None:
    """Print the library's INFO records (retries, pauses and what they wait for) on stderr."""
    logger = logging.getLogger("pf_metered")
    if not any(getattr(h, "pf_metered_waits", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("  (pf_metered: %(message)s)"))
        handler.pf_metered_waits = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def connect(*, asynchronous: bool = False, balance: str = "100.00") -> World:
    """The client an example pays with, live or sandboxed (see the module docstring)."""
    if os.environ.get("PF_API_KEY"):
        provider = os.environ.get("PF_PROVIDER_ID")
        if not provider:
            raise SystemExit("set PF_PROVIDER_ID to the agent you are paying")
        show_waits()
        client = AsyncEscrowClient() if asynchronous else EscrowClient()
        return World(client, provider, None)
    sandbox = Sandbox()
    payer = sandbox.add_agent(balance=balance)
    client = sandbox.async_client(payer.api_key) if asynchronous else sandbox.client(payer.api_key)
    return World(client, sandbox.add_agent().agent_id, sandbox)
