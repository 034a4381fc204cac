"""LangChain tools for one-off escrows: ``escrow_create``, ``escrow_release``, ``escrow_status``,
``escrow_list``, ``escrow_refund``.

Why thin: each class only names its shared definition (:mod:`pf_metered.tools.escrow`); the
arguments model, description and caps live there, beside the MCP server's view of the same tool.

What this module must never do: define a second description or schema for a tool.
"""

from __future__ import annotations

from pydantic import BaseModel

from pf_metered.langchain._base import PurpleFleaTool
from pf_metered.tools.escrow import ESCROW_CREATE, ESCROW_LIST, ESCROW_RELEASE, ESCROW_STATUS
from pf_metered.tools.refund import ESCROW_REFUND, EscrowRefundArgs
from pf_metered.tools.schemas import (
    EscrowCreateArgs,
    EscrowListArgs,
    EscrowReleaseArgs,
    EscrowStatusArgs,
)

__all__ = [
    "EscrowCreateTool",
    "EscrowListTool",
    "EscrowRefundTool",
    "EscrowReleaseTool",
    "EscrowStatusTool",
]


class EscrowCreateTool(PurpleFleaTool):
    """Lock USDC in a new escrow for a provider (within the operator's caps)."""

    definition = ESCROW_CREATE
    name: str = ESCROW_CREATE.name
    description: str = ESCROW_CREATE.description
    args_schema: type[BaseModel] = EscrowCreateArgs


class EscrowReleaseTool(PurpleFleaTool):
    """Release part of an escrow to its provider."""

    definition = ESCROW_RELEASE
    name: str = ESCROW_RELEASE.name
    description: str = ESCROW_RELEASE.description
    args_schema: type[BaseModel] = EscrowReleaseArgs


class EscrowStatusTool(PurpleFleaTool):
    """Read one escrow's figures and latest releases."""

    definition = ESCROW_STATUS
    name: str = ESCROW_STATUS.name
    description: str = ESCROW_STATUS.description
    args_schema: type[BaseModel] = EscrowStatusArgs


class EscrowListTool(PurpleFleaTool):
    """List the agent's escrows."""

    definition = ESCROW_LIST
    name: str = ESCROW_LIST.name
    description: str = ESCROW_LIST.description
    args_schema: type[BaseModel] = EscrowListArgs


class EscrowRefundTool(PurpleFleaTool):
    """Give back an escrow the agent made and no longer needs."""

    definition = ESCROW_REFUND
    name: str = ESCROW_REFUND.name
    description: str = ESCROW_REFUND.description
    args_schema: type[BaseModel] = EscrowRefundArgs
