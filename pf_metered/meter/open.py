"""Turn what a user passes as ``store=`` into a store object.

Why: ``PaymentStream(..., store="meter.db")`` should just work. ``None`` is a fresh
:class:`~pf_metered.meter.store.MemoryStore`; a ``str`` or ``os.PathLike`` is a
:class:`~pf_metered.meter.sqlite_store.SQLiteStore` file (``"sqlite:///path"`` too, and
``"path?durability=group"`` picks group commit); ``"redis://…"``/``"rediss://…"``/
``"unix://…"`` is a :class:`~pf_metered.meter.redis_store.RedisStore`; anything that already
implements the store contract is returned as is.

What it must never do: import ``redis`` unless a Redis URL was asked for, or guess: an
unrecognised object is refused with ``InvalidInput("store", …)`` before anything is locked.
"""

from __future__ import annotations

import os
from urllib.parse import parse_qsl

from pf_metered.errors import InvalidInput
from pf_metered.meter.store import MemoryStore, Store

__all__ = ["StoreSpec", "open_store"]

StoreSpec = Store | str | os.PathLike[str] | None
"""What ``store=`` accepts."""

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
_CONTRACT = ("create", "load", "set_escrow", "add_units", "claim", "settle", "mark_closed")


def open_store(spec: object) -> Store:
    """The store ``spec`` names (see the module docstring)."""
    if spec is None:
        return MemoryStore()
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, bytes):
        raise InvalidInput("store", "must be a str path, not bytes")
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise InvalidInput("store", "must be a path, a redis:// URL or a store object")
        if text.startswith(_REDIS_SCHEMES):
            from pf_metered.meter.redis_store import RedisStore

            return RedisStore(text)
        if text.startswith("sqlite:///"):
            text = text[len("sqlite:///") :]
        elif "://" in text:
            raise InvalidInput("store", f"unknown store URL scheme: {text.split('://')[0]!r}")
        path, _, query = text.partition("?")
        from pf_metered.meter.sqlite_store import SQLiteStore

        options = dict(parse_qsl(query, strict_parsing=False)) if query else {}
        unknown = set(options) - {"durability"}
        if unknown:
            raise InvalidInput("store", f"unknown SQLite option(s): {sorted(unknown)}")
        durability = options.get("durability", "per_record")
        if durability not in ("per_record", "group"):
            raise InvalidInput("store", f"durability must be per_record or group: {durability!r}")
        return SQLiteStore(path, durability="group" if durability == "group" else "per_record")
    if all(callable(getattr(spec, name, None)) for name in _CONTRACT):
        store: Store = spec  # type: ignore[assignment]
        return store
    raise InvalidInput(
        "store", f"must be None, a path, a redis:// URL or a store, not {type(spec).__name__}"
    )
