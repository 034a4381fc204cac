"""Calling a tool definition straight on a :class:`ToolContext`, as the tool tests do.

One copy for every test file that drives the framework-neutral tools without a framework:
the answer as the parsed JSON the model reads, or the :class:`ToolError` the call raised.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pf_metered.tools import ToolContext, ToolError, get_definition


def call(ctx: ToolContext, name: str, **args: Any) -> dict[str, Any]:
    """Tool ``name``'s sync answer, parsed."""
    answer: dict[str, Any] = json.loads(get_definition(name).call(ctx, args))
    return answer


async def acall(ctx: ToolContext, name: str, **args: Any) -> dict[str, Any]:
    """Tool ``name``'s async answer, parsed."""
    answer: dict[str, Any] = json.loads(await get_definition(name).acall(ctx, args))
    return answer


def refusal(ctx: ToolContext, name: str, **args: Any) -> ToolError:
    """The :class:`ToolError` a sync call of ``name`` raises (the test fails if none)."""
    with pytest.raises(ToolError) as info:
        get_definition(name).call(ctx, args)
    return info.value
