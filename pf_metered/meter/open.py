"""Turn what a user passes as ``store=`` into a store object.

Why: ``PaymentStream(..., store="meter.db")`` should just work. ``None`` is a fresh
:class:`~pf_metered.meter.store.MemoryStore`; a ``str`` or ``os.PathLike`` is a
:class:`~pf_metered.meter.sqlite_store.SQLiteStore` file (``"sqlite:///path"`` too, and
``"path?durability=group"`` picks group commit); ``"redis://…"``/``"rediss://…"``/
``"unix://…"`` is a :class:`~pf_metered.meter.redis_store.RedisStore` (:data:`FACTORIES` maps
each URL scheme to its factory); an object that ``isinstance(obj, Store)`` (the whole contract;
subclass :class:`~pf_metered.meter.store.BaseStore`) is returned as is.

A scheme not in :data:`FACTORIES` names its module: ``"<scheme>://…"`` opens with
``pf_metered.meter.<scheme>_store.open_url(text)``, imported on first use. So a new store
(``postgres_store.py`` with ``open_url``, for ``postgres://``) is one module: nothing else in
the package lists it.

What it must never do: import ``redis`` unless a Redis URL was asked for, or guess: an
unrecognised object is refused with ``InvalidInput("store", …)`` before anything is locked.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from urllib.parse import parse_qsl

from pf_metered.errors import InvalidInput
from pf_metered.meter.store import MemoryStore, Store

__all__ = ["FACTORIES", "StoreSpec", "factory", "open_store"]

StoreSpec = Store | str | os.PathLike[str] | None
"""What ``store=`` accepts."""


def _redis(url: str) -> Store:
    from pf_metered.meter.redis_store import RedisStore

    return RedisStore(url)


def _sqlite(text: str) -> Store:
    """``path`` or ``sqlite:///path``, with ``?durability=per_record|group``."""
    if text.startswith("sqlite:///"):
        text = text[len("sqlite:///") :]
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


FACTORIES: dict[str, Callable[[str], Store]] = {
    "redis": _redis,
    "rediss": _redis,
    "unix": _redis,
    "sqlite": _sqlite,
}
"""URL scheme → factory of the store it names (given the whole text): the built-in schemes and
their aliases (a program may add its own). A text with no scheme is a SQLite path; any other
scheme is looked up by module name (:func:`factory`)."""


def factory(scheme: str) -> Callable[[str], Store] | None:
    """The factory for ``scheme``: :data:`FACTORIES`, else the ``open_url`` of the module
    ``pf_metered.meter.<scheme>_store`` (imported now; ``MissingExtra`` if its driver is not
    installed), else ``None``."""
    found = FACTORIES.get(scheme)
    if found is not None:
        return found
    if not (scheme.isascii() and scheme.isidentifier() and scheme.islower()):
        return None
    name = f"pf_metered.meter.{scheme}_store"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return None
        raise
    opener = vars(module).get("open_url")
    return opener if callable(opener) else None


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
        scheme, sep, _ = text.partition("://")
        if not sep:
            return _sqlite(text)
        opener = factory(scheme)
        if opener is None:
            raise InvalidInput("store", f"unknown store URL scheme: {scheme!r}")
        store = opener(text)
        if not isinstance(store, Store):
            raise InvalidInput("store", f"{scheme}:// opened a {type(store).__name__}, no Store")
        return store
    if isinstance(spec, Store):
        return spec
    raise InvalidInput(
        "store",
        f"must be None, a path, a redis:// URL or a Store (subclass "
        f"pf_metered.meter.store.BaseStore), not {type(spec).__name__}",
    )
