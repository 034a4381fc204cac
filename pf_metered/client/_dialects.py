"""The dialect registry and how a client's dialect is chosen: by name, by base URL, or by
asking the host.

What this module is for: the one place that knows which dialects exist and how to pick one,
so the client core imports no dialect module. Resolution, in order:

1. ``dialect=`` given (a registered name or a :class:`~._dialect.Dialect` object): that one;
   its ``default_base_url`` unless a base URL is given. ``dialect="auto"`` probes the base
   URL (or the default host) as in 3.
2. A base URL given (argument or ``PF_BASE_URL``): the dialect its path says
   (:func:`default_dialect_for`: ``…/api/v1`` is v1, a bare host is the deployed service).
3. Neither: the default host (:data:`DEFAULT_HOST`) is *probed* — each registered dialect's
   ``probe()`` (a read that moves no money) is sent to ``host + dialect.root``, in registry
   order, and the first whose answer the dialect ``recognises()`` is used, with its root
   appended to the host. The answer is cached per host for the life of the process. When no
   dialect answers, the error says what was tried.

What it must never do: perform I/O itself (the client's drivers send the probes), or guess a
dialect silently when a probe could not tell.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

from pf_metered.errors import InvalidInput

from ._dialect import Dialect, RequestSpec, check_dialect
from .deployed import DEPLOYED, DEPLOYED_BASE_URL
from .v1 import V1

__all__ = [
    "AUTO",
    "DEFAULT_HOST",
    "REGISTRY",
    "Choice",
    "ProbeCache",
    "choose",
    "default_dialect_for",
    "dialect_named",
    "probe_requests",
]

AUTO: Final = "auto"
"""``dialect="auto"``: probe the base URL's host (the default when neither a dialect nor a
base URL is given, with the live host)."""

REGISTRY: Final[Mapping[str, Dialect]] = {
    "deployed": DEPLOYED,
    "v1": V1,
}
"""Every dialect the client speaks, by name, in the order a host is probed (the service as it
is deployed first: that is what the live host answers)."""

DEFAULT_HOST: Final = DEPLOYED_BASE_URL
"""The live host. It serves the deployed dialect at its root; ``/api/v1`` is not there (404),
so a client with no base URL and no dialect asks the host which it speaks."""


def dialect_named(name: object) -> Dialect:
    """A registered dialect by name (an unknown name: ``InvalidInput`` listing the names), or
    a dialect object as it is (anything else: ``ConfigError`` naming ``dialect``)."""
    if isinstance(name, str):
        found = REGISTRY.get(name)
        if found is None:
            known = ", ".join(repr(n) for n in REGISTRY)
            raise InvalidInput("dialect", f"must be one of {known}, got {name[:40]!r}")
        return found
    return check_dialect(name)  # ConfigError naming dialect for anything else


def default_dialect_for(base_url: str) -> str:
    """The dialect a base URL's path names.

    ``…/api/v1`` is the v1 streaming API; a bare host (``https://escrow.purpleflea.com``,
    the deployed service's shape, its paths starting at ``/escrow/…``) or the sandbox's
    ``/deployed`` mount is the deployed one. Anything else is assumed v1 (our documented
    contract); pass ``dialect=`` to be explicit.
    """
    path = urlsplit(base_url).path.rstrip("/")
    if path.endswith("/api/v1"):
        return "v1"
    if path == "" or path.endswith("/deployed"):
        return "deployed"
    return "v1"


@dataclass(frozen=True)
class Choice:
    """What a client was configured to speak: ``dialect`` is ``None`` until probed."""

    dialect: Dialect | None
    base_url: str
    probe_host: str | None = None


def choose(dialect: object, base_url: str | None, env_base_url: str | None) -> Choice:
    """The dialect and base URL for a client's arguments (see the module docstring)."""
    given = base_url if base_url is not None else (env_base_url or None)
    if dialect == AUTO:
        host = given if given is not None else DEFAULT_HOST
        return Choice(None, host, probe_host=host.rstrip("/"))
    if dialect is not None:
        chosen = dialect_named(dialect)
        return Choice(chosen, given if given is not None else chosen.default_base_url)
    if given is not None:
        return Choice(REGISTRY[default_dialect_for(given)], given)
    return Choice(None, DEFAULT_HOST, probe_host=DEFAULT_HOST)


def probe_requests() -> list[tuple[Dialect, RequestSpec]]:
    """Each registered dialect and its probe, its path made absolute on the host."""
    out = []
    for dialect in REGISTRY.values():
        spec = dialect.probe()
        out.append((dialect, RequestSpec(spec.method, dialect.root + spec.path)))
    return out


class ProbeCache:
    """Which dialect each probed host speaks, for the life of the process (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}

    def get(self, host: str) -> Dialect | None:
        with self._lock:
            name = self._known.get(host)
        return None if name is None else REGISTRY[name]

    def put(self, host: str, dialect: Dialect) -> None:
        with self._lock:
            self._known[host] = dialect.name

    def clear(self) -> None:
        with self._lock:
            self._known.clear()


PROBED: Final = ProbeCache()
"""The process-wide cache of probed hosts."""
