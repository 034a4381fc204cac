"""The embedded sandbox: a real escrow ledger in SQLite behind the live service's v1 HTTP API.

Why a real ledger and not a mock: every example and test runs against it, so it must keep the
books the way the service does (balances, escrows, partial releases with the 1% fee on the
cumulative amount, refunds, the faucet, auto-release by a clock tests can move, idempotency
keys) and refuse what the service refuses, with the same ``{error, message}`` answers. It plugs
into a client in-process (:meth:`Sandbox.transport`, no socket) or serves over loopback
(:meth:`Sandbox.serve`).

::

    with Sandbox() as sb:
        payer, provider = sb.add_agent(balance="10.00"), sb.add_agent()
        with sb.client(payer.api_key) as client:
            escrow = client.create_escrow(provider.agent_id, "5.00")

Layering: the sandbox needs only money, models and errors (and the client, lazily, for
:meth:`Sandbox.client`); nothing in the library imports it except examples, tests and the CLI.

What it must never do: bind a non-loopback address, store or print an API key it was not asked
for, move money outside a ledger transaction, or let the books stop adding up (see
:meth:`Sandbox.audit`).
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from pf_metered.errors import InvalidInput, PFMeteredError
from pf_metered.models import Escrow
from pf_metered.money import AmountLike, micro_to_decimal, parse_amount
from pf_metered.sandbox._app_deployed import DEFAULT_DEPLOYED_RATE_LIMITS, deployed_mounts
from pf_metered.sandbox._clock import Clock, ManualClock, SandboxClock
from pf_metered.sandbox._db import Database
from pf_metered.sandbox._http import AppRequest, AppResponse, Dispatcher
from pf_metered.sandbox._idempotency import IdempotencyStore
from pf_metered.sandbox._keys import hash_key, new_agent_id, new_api_key
from pf_metered.sandbox._ledger import FEE_ACCOUNT_ID, AuditReport, Ledger, LedgerError
from pf_metered.sandbox._ratelimit import RateLimiter, RateLimits
from pf_metered.sandbox._server import SandboxServer
from pf_metered.sandbox._transport import SandboxTransport
from pf_metered.sandbox._v1 import V1App, escrow_json

if TYPE_CHECKING:
    from pf_metered.client import AsyncEscrowClient, EscrowClient

__all__ = [
    "FEE_ACCOUNT_ID",
    "AuditReport",
    "Clock",
    "LedgerInvariantError",
    "ManualClock",
    "RateLimits",
    "Sandbox",
    "SandboxAgent",
    "SandboxClock",
    "SandboxServer",
    "SandboxTransport",
    "serve_forever",
]

IN_PROCESS_BASE_URL = "http://localhost/api/v1"
# the deployed services, mounted beside v1 over the same ledger (_app_deployed.py)
DEPLOYED_BASE_URL = "http://localhost/deployed"
CASINO_BASE_URL = "http://localhost/casino"
FAUCET_BASE_URL = "http://localhost/faucet"
_AGENT_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}\Z")


class LedgerInvariantError(PFMeteredError):
    """The sandbox's books do not add up: a bug in the ledger, never a user error.

    ``report`` is the :class:`AuditReport` that found it; ``problems`` lists what broke.
    """

    def __init__(self, report: AuditReport) -> None:
        self.report = report
        self.problems = report.problems
        super().__init__("sandbox ledger invariant broken: " + "; ".join(report.problems[:5]))


@dataclass(frozen=True, slots=True)
class SandboxAgent:
    """An agent of the sandbox: its id and its key (the key is never shown by ``repr``)."""

    agent_id: str
    api_key: str = field(repr=False)

    def __repr__(self) -> str:
        return f"SandboxAgent(agent_id={self.agent_id!r}, api_key='pf_test_***')"


class Sandbox:
    """A real escrow ledger (SQLite) serving the v1 API in-process and over loopback.

    ``path`` is ``":memory:"`` (default) or a file, which keeps the ledger across runs.
    ``clock`` defaults to wall time that :meth:`advance`-style calls can push forward
    (``sandbox.clock.advance(3600)``); pass :class:`ManualClock` for fully frozen time.
    ``honour_idempotency=False`` makes it behave like a server that ignores
    ``Idempotency-Key`` (no replay, no ``Idempotency-Supported`` header).
    ``rate_limits`` (off by default): ``{"POST /escrow/{id}/release-partial": 10, "*": 30}``
    requests per 60 s window per caller and path, or a :class:`RateLimits`.
    ``at_root``: also serve that dialect at the root path, as the live host serves the
    deployed one (for tests of a client that probes which dialect a host speaks).
    """

    def __init__(
        self,
        path: str = ":memory:",
        *,
        clock: Clock | None = None,
        honour_idempotency: bool = True,
        rate_limits: RateLimits | Mapping[str, int] | None = None,
        dialect: str = "v1",
        deployed_rate_limits: RateLimits | Mapping[str, int] | None = DEFAULT_DEPLOYED_RATE_LIMITS,
        deployed_list_path: str | None = None,
        at_root: str | None = None,
    ) -> None:
        if not isinstance(path, str) or not path:
            raise InvalidInput("path", "must be ':memory:' or a file path")
        self.path = path
        self.clock: Any = clock if clock is not None else SandboxClock()
        self.honour_idempotency = bool(honour_idempotency)
        if rate_limits is not None and not isinstance(rate_limits, RateLimits):
            rate_limits = RateLimits(dict(rate_limits))
        self.rate_limits: RateLimits | None = rate_limits
        self._db = Database(path)
        self._ledger = Ledger(self._db, self.clock.now_us())
        self._idem = IdempotencyStore(self._db) if self.honour_idempotency else None
        self._v1 = V1App(
            db=self._db,
            ledger=self._ledger,
            clock=self.clock,
            idempotency=self._idem,
            rate_limiter=RateLimiter(rate_limits) if rate_limits is not None else None,
        )
        self._dispatcher = Dispatcher({"/api/v1": self._v1})
        # deployed dialect: ``dialect`` picks what sandbox.client() speaks by default;
        # both are always served (/deployed, /casino, /faucet), see _app_deployed.py
        if dialect not in ("v1", "deployed"):
            raise InvalidInput("dialect", f"must be 'v1' or 'deployed', got {dialect!r}")
        self.dialect = dialect
        self._deployed, casino, faucet = deployed_mounts(
            db=self._db,
            ledger=self._ledger,
            clock=self.clock,
            rate_limits=deployed_rate_limits,
            list_path=deployed_list_path,
        )
        self._dispatcher.mount("/deployed", self._deployed)
        self._dispatcher.mount("/casino", casino)
        self._dispatcher.mount("/faucet", faucet)
        # ``at_root="deployed"``: the deployed app also answers at the root, as the live host
        # does (``/escrow/create``, ``/openapi.json``), so a client's dialect probe can be
        # tested in-process or over loopback; v1 stays at /api/v1.
        if at_root not in (None, "deployed", "v1"):
            raise InvalidInput("at_root", f"must be None, 'deployed' or 'v1', got {at_root!r}")
        if at_root is not None:
            self._dispatcher.mount("", self._deployed if at_root == "deployed" else self._v1)
        self._transport = SandboxTransport(self._dispatcher)
        self._servers: list[SandboxServer] = []
        self._servers_lock = threading.Lock()

    # -- agents and money ----------------------------------------------------------------

    def add_agent(self, balance: AmountLike = "0", agent_id: str | None = None) -> SandboxAgent:
        """Register an agent with a fresh ``pf_test_`` key and an opening balance (minted)."""
        micro = parse_amount(balance, "balance", allow_zero=True)
        if agent_id is None:
            agent_id = new_agent_id()
        elif not isinstance(agent_id, str) or not _AGENT_ID.match(agent_id):
            raise InvalidInput("agent_id", "must be 1-128 characters of A-Z a-z 0-9 _ . : -")
        if agent_id == FEE_ACCOUNT_ID:
            raise InvalidInput("agent_id", f"{FEE_ACCOUNT_ID!r} is the fee account")
        api_key = new_api_key()
        try:
            with self._db.transaction() as conn:
                self._ledger.create_agent(
                    conn, agent_id, hash_key(api_key), micro, self.clock.now_us()
                )
        except LedgerError as exc:
            raise InvalidInput("agent_id", exc.message) from None
        return SandboxAgent(agent_id, api_key)

    def fund(self, agent_id: str, amount: AmountLike) -> Decimal:
        """Mint ``amount`` into an agent's balance (counted as funding); returns the balance."""
        micro = parse_amount(amount, "amount")
        with self._db.transaction() as conn:
            try:
                self._ledger.mint(conn, agent_id, micro, "funding", self.clock.now_us())
            except LedgerError:
                raise InvalidInput("agent_id", f"no agent {agent_id!r}") from None
            return micro_to_decimal(self._ledger.balance(conn, agent_id))

    def balance(self, agent_id: str) -> Decimal:
        """An agent's balance (or the fee account's, ``FEE_ACCOUNT_ID``), after due releases."""
        with self._db.transaction() as conn:
            self._ledger.apply_due(conn, self.clock.now_us())
            self._deployed.apply_due(conn, self.clock.now_us())
            try:
                return micro_to_decimal(self._ledger.balance(conn, agent_id))
            except LedgerError:
                raise InvalidInput("agent_id", f"no agent {agent_id!r}") from None

    def fees(self) -> Decimal:
        """What the fee account has collected."""
        return self.balance(FEE_ACCOUNT_ID)

    def agent_ids(self) -> list[str]:
        """Every agent's id, oldest first (keys are not kept: only their hashes are)."""
        with self._db.transaction() as conn:
            return self._ledger.agent_ids(conn)

    def escrow(self, escrow_id: str) -> Escrow:
        """An escrow as the v1 API would answer it (validated model), after due releases, but
        with its *whole* release history (a v1 read carries only the most recent releases)."""
        with self._db.transaction() as conn:
            self._ledger.apply_due(conn, self.clock.now_us())
            self._deployed.apply_due(conn, self.clock.now_us())
            try:
                esc = self._ledger.read(conn, escrow_id)
            except LedgerError:
                raise InvalidInput("escrow_id", f"no escrow {escrow_id!r}") from None
            data = escrow_json(esc, self._ledger.releases(conn, escrow_id))
        return Escrow.model_validate(data)

    def tick(self) -> int:
        """Apply every auto-release that is due by the sandbox clock; returns how many."""
        with self._db.transaction() as conn:
            due = self._ledger.apply_due(conn, self.clock.now_us())
            return due + self._deployed.apply_due(conn, self.clock.now_us())

    def audit(self, *, raise_on_error: bool = True) -> AuditReport:
        """Check the books: Σ balances + fees + open escrows == Σ minted, and every escrow adds up.

        Raises :class:`LedgerInvariantError` (typed, not a bare ``AssertionError``) when
        something is broken; with ``raise_on_error=False`` returns the report whatever it
        found (``report.ok``, ``report.problems``). Does not apply due auto-releases: it
        observes the books as they are (call :meth:`tick` first to settle them).
        """
        with self._db.transaction() as conn:
            report = self._ledger.audit(conn)
        if raise_on_error and not report.ok:
            raise LedgerInvariantError(report)
        return report

    # -- HTTP ----------------------------------------------------------------------------

    def transport(self) -> SandboxTransport:
        """The in-process transport (sync and async httpx), shared by every client."""
        return self._transport

    def handle(self, request: AppRequest) -> AppResponse:
        """Answer one request directly (what every transport does underneath)."""
        return self._dispatcher.handle(request)

    @property
    def before_handle(self) -> Callable[[AppRequest], None] | None:
        """A test hook called once a request is admitted, before it touches the ledger."""
        return self._v1.before_handle

    @before_handle.setter
    def before_handle(self, hook: Callable[[AppRequest], None] | None) -> None:
        self._v1.before_handle = hook

    def client(self, api_key: str, **kw: Any) -> EscrowClient:
        """A sync ``EscrowClient`` wired to this sandbox in-process."""
        from pf_metered.client import EscrowClient

        self._dialect_defaults(kw)
        kw.setdefault("transport", self._transport)
        kw.setdefault("server_honours_idempotency", self.honour_idempotency)
        return EscrowClient(api_key, **kw)

    def async_client(self, api_key: str, **kw: Any) -> AsyncEscrowClient:
        """An ``AsyncEscrowClient`` wired to this sandbox in-process."""
        from pf_metered.client import AsyncEscrowClient

        self._dialect_defaults(kw)
        kw.setdefault("transport", self._transport)
        kw.setdefault("server_honours_idempotency", self.honour_idempotency)
        return AsyncEscrowClient(api_key, **kw)

    def _dialect_defaults(self, kw: dict[str, Any]) -> None:
        """Base URL (and dialect) for ``client()`` / ``async_client()``: v1 or deployed."""
        dialect = kw.setdefault("dialect", self.dialect)
        deployed = dialect == "deployed" or getattr(dialect, "name", None) == "deployed"
        kw.setdefault("base_url", DEPLOYED_BASE_URL if deployed else IN_PROCESS_BASE_URL)

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> SandboxServer:
        """Serve over loopback in a background thread; ``port=0`` picks a free port."""
        server = SandboxServer(self._dispatcher, host, port)
        with self._servers_lock:
            self._servers.append(server)
        return server

    # -- life cycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop every server this sandbox started, then close the database."""
        with self._servers_lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        self._db.close()

    @property
    def closed(self) -> bool:
        return self._db.closed

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox({self.path!r}{', closed' if self.closed else ''})"


def serve_forever(
    path: str = ":memory:",
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    agents: int = 2,
    balance: AmountLike = "100.00",
    show_keys: bool = False,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
    ready: Callable[[SandboxServer], None] | None = None,
) -> None:
    """Serve a sandbox over loopback until interrupted (``pf-metered sandbox serve``).

    Creates ``agents`` fresh agents funded with ``balance`` and prints the URL and their ids;
    their keys are printed only with ``show_keys=True`` (a key on a terminal ends up in logs).
    Blocks until Ctrl-C or until ``stop`` is set; ``ready`` is called with the running server.
    """
    stream = out if out is not None else sys.stdout
    if isinstance(agents, bool) or not isinstance(agents, int) or agents < 0:
        raise InvalidInput("agents", "must be a whole number ≥ 0")
    with Sandbox(path) as sandbox:
        made = [sandbox.add_agent(balance) for _ in range(agents)]
        server = sandbox.serve(host, port)
        print(f"pf-metered sandbox serving {server.base_url}  (ledger: {path})", file=stream)
        for agent in made:
            line = f"  agent {agent.agent_id}  balance {sandbox.balance(agent.agent_id)}"
            if show_keys:
                line += f"  key {agent.api_key}"
            print(line, file=stream)
        if not show_keys and made:
            print("  (keys hidden; pass show_keys / --show-keys to print them)", file=stream)
        stream.flush()
        if ready is not None:
            ready(server)
        waiter = stop if stop is not None else threading.Event()
        try:
            while not waiter.wait(0.5):
                pass
        except KeyboardInterrupt:
            print("pf-metered sandbox: stopped", file=stream)
