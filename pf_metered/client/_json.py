"""Strict JSON for answers from either dialect: exact numbers, no NaN, no duplicate keys.

Why one place: both dialects decode money from JSON numbers and must read them as ``Decimal``
from the text, never through ``float``; a constant (``NaN``, ``Infinity``) or a key given twice
is refused, so a hostile or broken answer cannot smuggle a second value past a check.

What this module must never do: raise anything but ``ValueError`` or ``RecursionError`` (each
dialect turns those into its own ``InvalidResponse``), or put the body into a message.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, NoReturn

__all__ = ["loads_exact"]


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"JSON constant {name} is not a number")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:40]!r}")
        out[key] = value
    return out


def loads_exact(text: str) -> Any:
    """``json.loads`` with floats as ``Decimal``; ``NaN``, ``Infinity``, duplicate keys refused."""
    return json.loads(
        text,
        parse_float=Decimal,
        parse_constant=_refuse_constant,
        object_pairs_hook=_refuse_duplicates,
    )
