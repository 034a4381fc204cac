"""A meter store in Redis: one budget and one release queue shared by a fleet of processes.

Why: when one paying agent runs as many workers (processes on one host, or many hosts), they
must count against one escrow and one budget and release each batch exactly once. Redis is
the shared engine; every operation is one Lua script, so "check the budget and count" and
"claim the due units as one intent" are atomic however many workers race (see
:mod:`pf_metered.meter.redis_lua`).

What it adds to the :class:`~pf_metered.meter.store.Store` contract (compatibly: optional
arguments with defaults, and extra methods):

* ``add_units(stream_id, units, op_id=None)``. A command re-sent after a timeout or a dropped
  connection never counts twice. Without ``op_id`` every call carries a (session, sequence)
  pair and the server remembers each session's last reply, so the retries done here and inside
  redis-py are exact-once. If even the retries fail, :class:`StoreUnavailable` says the units
  *may* have been counted; a caller that wants to retry that safely passes its own ``op_id``
  (unique per logical call; remembered for ``op_ttl`` seconds) and re-sends the same one.
* Intents carry an owner and a claim time. :meth:`RedisStore.take_over` hands an intent whose
  owner has not settled it within ``lease_seconds`` to another worker (or a resume) with the
  SAME sequence, hence the same idempotency key: it must be settled by resending that key or by
  reconciling against the escrow's ``released`` figure, never by a new release.
* Client-side batching (``chunk=N``): instead of one round trip per ``add_units`` the worker
  *leases* up to N units of budget headroom atomically in Redis, consumes it locally with no
  I/O, and pushes what it consumed in one call (when the lease runs out, every
  ``push_interval`` seconds from a background thread, on ``flush``/``claim``/``close``). The
  fleet can never overspend: a unit is only consumed from headroom reserved for this worker.
  Leases expire on the server after ``lease_ttl`` seconds unless renewed; a worker never
  consumes from a lease past its own (earlier) local expiry. A crashed worker therefore strands
  at most ``chunk`` units of headroom for at most ``lease_ttl`` seconds (reported as
  ``revoked_units``) and loses at most the units it consumed since its last push (at most
  ``chunk``: a worker pushes before its unpushed count would pass a chunk, and a count larger
  than a chunk goes to Redis at once; the one exception is a single call that *holds* more
  than a chunk, whose units are at risk only while its own push is in flight; a push that
  arrives after its lease was revoked is accepted if the budget still has room, else
  reported as ``lost_units``). ``tests/test_redis_leased_loss.py`` kills workers to check it.
  The worker's side of each lease is :class:`~pf_metered.meter.lease.LeasedCounter` (shared
  with SQLite's group mode); the ``LEASE`` script is its backend.
* Closing for the fleet: the final :meth:`claim` first moves the stream to *draining* (no new
  leases; every worker's next push returns its lease and marks the stream closed locally, so
  its next ``add_units`` raises ``StreamClosed``), waits for the leases to come back (bounded by
  ``lease_ttl``), then claims the final intent. :meth:`fleet_status` shows any worker's view.

What this module must never do: compute money in a float or a Lua number, count a re-sent
command twice, hand out a unit of budget twice, perform HTTP, or import anything above the
meter layer. ``redis`` is an optional extra: nothing in the package imports this module at
import time.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pf_metered import _lifecycle
from pf_metered.errors import (
    BudgetExhausted,
    InvalidInput,
    MissingExtra,
    PFMeteredError,
    StoreUnavailable,
    StreamClosed,
)

try:
    import redis
    from redis.exceptions import NoScriptError
except ModuleNotFoundError as exc:  # the optional extra is not installed
    raise MissingExtra("redis", "RedisStore", missing=exc.name) from None

from pf_metered.meter import redis_lua as lua
from pf_metered.meter.lease import Grant, LeasedCounter, Push
from pf_metered.meter.store import (
    BaseStore,
    Intent,
    StreamConfig,
    StreamState,
    StreamStatus,
    new_owner_id,
)

__all__ = ["FleetStatus", "LeaseInfo", "RedisStore", "StoreUnavailable", "purge_prefix"]

log = logging.getLogger(__name__)

_STREAM_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_NET_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Budget headroom one worker holds: units reserved, not yet counted."""

    worker: str
    units: int
    expires_in_ms: int


@dataclass(frozen=True, slots=True)
class FleetStatus:
    """What any worker can read about the shared stream."""

    state: StreamState
    leases: tuple[LeaseInfo, ...]
    reserved_units: int
    late_units: int
    lost_units: int
    revoked_units: int
    owners: tuple[tuple[int, str, int], ...]
    """``(seq, owner, age_ms)`` of every pending intent."""

    @property
    def remaining_units(self) -> int:
        """Units the fleet may still count (not counted, not leased)."""
        return self.state.config.max_units - self.state.units - self.reserved_units


class _WorkerLeases:
    """The lease backend over Redis (:class:`~pf_metered.meter.lease.LeaseBackend`): each push
    is one ``LEASE`` script, deduplicated by (worker, sequence), so a re-sent push whose answer
    was lost gets the first reply back instead of counting twice."""

    __slots__ = ("_store",)

    def __init__(self, store: RedisStore) -> None:
        self._store = store

    def take(self, stream_id: str, push: Push) -> Grant:
        return self._store._lease_script(stream_id, push, release=False)

    def give_back(self, stream_id: str, push: Push) -> Grant:
        return self._store._lease_script(stream_id, push, release=True)


class _ThreadSession(threading.local):
    """Per-thread (session id, sequence) for exact-once retries of direct ``add_units``."""

    def __init__(self) -> None:
        self.sid = uuid.uuid4().hex[:16]
        self.seq = 0


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


class RedisStore(BaseStore):
    """Meter state in Redis, shared by every process that opens the same stream id.

    ``url`` or ``client`` (a ``redis.Redis``); ``prefix`` namespaces every key. See the module
    docstring for ``chunk``/``lease_ttl``/``push_interval`` (client-side batching),
    ``intent_lease`` (seconds after which another worker may take over an unsettled intent),
    ``claim_batches`` (a non-final claim with ``min_units > 1`` covers at most this many whole
    batches, so each release pays for exactly one batch and memos stay aligned; ``0`` claims
    every unclaimed unit, as ``MemoryStore`` does) and ``op_ttl``.

    Create one store per process (after ``fork``): it owns a connection pool and, with
    ``chunk``, a background pusher thread.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "pfm",
        client: redis.Redis | None = None,
        chunk: int = 0,
        lease_ttl: float = 2.0,
        push_interval: float = 0.2,
        claim_batches: int = 1,
        op_ttl: int = 600,
        retries: int = 5,
        worker: str | None = None,
        intent_lease: float = 30.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", prefix):
            raise InvalidInput("prefix", f"must be 1-64 of [A-Za-z0-9_.:-], got {prefix!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise InvalidInput("chunk", f"must be a whole number >= 0, got {chunk!r}")
        if not 0 < push_interval < lease_ttl:
            raise InvalidInput("push_interval", "must be > 0 and shorter than lease_ttl")
        if claim_batches < 0:
            raise InvalidInput("claim_batches", "must be >= 0")
        self._own_client = client is None
        self._url = url if client is None else None
        self._r: redis.Redis = (
            client
            if client is not None
            else redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        )
        self._prefix = prefix
        self._chunk = chunk
        self._lease_ttl = lease_ttl
        self._push_interval = push_interval
        self._claim_batches = claim_batches
        self._op_ttl = op_ttl
        self._retries = retries
        self._intent_lease = intent_lease
        self.intent_lease = float(intent_lease)  # ok: seconds
        """Seconds after which an unsettled intent's owner is presumed gone (``take_over``)."""
        self._worker = worker or new_owner_id()
        self._shas: dict[str, str] = {}
        self._leases = self._new_leases()
        self._session = _ThreadSession()
        self._closed = False
        self.round_trips = 0
        """Script calls sent to Redis (retries and NOSCRIPT reloads included)."""
        _ALL.add(self)

    def _after_fork(self) -> None:
        """In a forked child: a new identity, no inherited leases, sessions or pusher.

        Sharing the parent's worker id or session would make the child's commands look like
        re-sends of the parent's (and be dropped as replays), or let it consume the parent's
        lease.
        """
        self._worker = new_owner_id()
        self._leases.reset()
        self._session = _ThreadSession()

    # ------------------------------------------------------------------ plumbing

    @property
    def worker(self) -> str:
        """This store's identity as an intent owner and lease holder."""
        return self._worker

    @property
    def client(self) -> redis.Redis:
        return self._r

    def _keys(self, stream_id: str) -> dict[str, str]:
        base = f"{self._prefix}:{{{stream_id}}}"
        return {
            "st": f"{base}:st",
            "sess": f"{base}:sess",
            "pending": f"{base}:pending",
            "settled": f"{base}:settled",
            "leases": f"{base}:leases",
            "op": f"{base}:op:",
        }

    def _eval(self, source: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """EVALSHA (loading the script on NOSCRIPT, e.g. after a Redis restart), with retries.

        Retrying is safe for every script: each is idempotent or carries a dedup id.
        """
        delay = 0.02
        for attempt in range(self._retries + 1):
            sha = self._shas.get(source)
            try:
                self.round_trips += 1
                if sha is None:
                    sha = self._shas[source] = _s(self._r.script_load(source))
                    self.round_trips += 1
                try:
                    return self._r.evalsha(sha, len(keys), *keys, *args)
                except NoScriptError:
                    self._shas.pop(source, None)
                    self.round_trips += 2
                    sha = self._shas[source] = _s(self._r.script_load(source))
                    return self._r.evalsha(sha, len(keys), *keys, *args)
            except _NET_ERRORS as exc:
                if attempt == self._retries:
                    raise StoreUnavailable(
                        f"Redis unreachable after {attempt + 1} attempts: {type(exc).__name__}"
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")  # pragma: no cover

    def _dedup_args(self, op_id: str | None) -> list[str | int]:
        if op_id is not None:
            if not op_id or len(op_id) > 200:
                raise InvalidInput("op_id", "must be 1-200 characters")
            return [op_id, "", 0, self._op_ttl]
        self._session.seq += 1
        return ["", f"{self._worker}/{self._session.sid}", self._session.seq, self._op_ttl]

    @staticmethod
    def _check_id(stream_id: str) -> None:
        if not isinstance(stream_id, str) or not _STREAM_ID.match(stream_id):
            raise InvalidInput("stream_id", "must be 1-128 of [A-Za-z0-9_.:-]")

    def _unknown(self, stream_id: str) -> InvalidInput:
        return InvalidInput("stream_id", f"is not a known stream: {stream_id!r}")

    # ------------------------------------------------------------------ the Store contract

    def create(self, config: StreamConfig) -> None:
        self._check_id(config.stream_id)
        k = self._keys(config.stream_id)
        cfg = json.dumps(
            {
                "stream_id": config.stream_id,
                "to_agent_id": config.to_agent_id,
                "rate": config.rate,
                "budget_micro": config.budget_micro,
                "max_units": config.max_units,
                "memo": config.memo,
                "auto_release_hours": config.auto_release_hours,
                "batch_units": config.batch_units,
                "every_seconds": config.every_seconds,
            }
        )
        dedup = self._dedup_args(None)
        reply = _s(
            self._eval(
                lua.CREATE, [k["st"], k["sess"], k["op"] + "-"], [*dedup, cfg, config.max_units]
            )
        )
        if reply == "exists":
            raise InvalidInput("stream_id", f"already exists: {config.stream_id!r}")

    def load(self, stream_id: str) -> StreamState | None:
        self._check_id(stream_id)
        self._leases.push(stream_id)  # this worker's consumption first (leased mode)
        snap = self._snapshot(stream_id)
        return None if snap is None else snap[0]

    def set_escrow(self, stream_id: str, escrow_id: str) -> None:
        self._check_id(stream_id)
        reply = _s(self._eval(lua.SET_ESCROW, [self._keys(stream_id)["st"]], [escrow_id]))
        if reply == "unknown":
            raise self._unknown(stream_id)
        if reply == "other":
            raise InvalidInput("escrow_id", "the stream is already bound to another escrow")

    def add_units(self, stream_id: str, units: int, op_id: str | None = None) -> int:
        """Count ``units`` within the budget; return the fleet total as this worker knows it.

        Direct mode (``chunk=0``): one atomic script; the total is exact. Leased mode: usually
        no I/O; the total is the fleet's at this worker's last push plus what it has consumed
        since. ``op_id`` makes a caller's own retry exact-once (direct mode; in leased mode a
        consumed unit never leaves the process except in an acknowledged push).
        """
        self._check_id(stream_id)
        if isinstance(units, bool) or not isinstance(units, int) or units < 0:
            raise InvalidInput("units", f"must be a whole number >= 0, got {units!r}")
        if self._chunk and op_id is None and units <= self._chunk:
            # A count larger than a chunk goes to Redis at once (below): consumed locally it
            # would put more than a chunk at risk if this worker died before its next push.
            return self._leases.add(stream_id, units)
        k = self._keys(stream_id)
        dedup = self._dedup_args(op_id)
        opkey = k["op"] + (op_id if op_id is not None else "-")
        reply = _s(self._eval(lua.ADD, [k["st"], k["sess"], opkey, k["leases"]], [*dedup, units]))
        kind, _, rest = reply.partition("|")
        if kind == "ok":
            return int(rest)
        if kind == "budget":
            raise BudgetExhausted(
                f"{units} more units would exceed the budget; {rest} left",
                remaining_units=int(rest),
            )
        if kind == "closed":
            raise StreamClosed(f"stream {stream_id} is {_public_status(rest)}; it takes no units")
        if kind == "unknown":
            raise self._unknown(stream_id)
        raise StoreUnavailable(f"unexpected reply from Redis: {reply[:40]!r}")

    def claim(
        self,
        stream_id: str,
        *,
        min_units: int,
        final: bool = False,
        op_id: str | None = None,
    ) -> Intent | None:
        """Claim due units as one intent owned by this worker (see ``Store.claim``).

        A final claim closes the stream for the whole fleet: it drains the workers' leases
        first (bounded by ``lease_ttl``) so every unit consumed anywhere is in the intent.
        """
        self._check_id(stream_id)
        k = self._keys(stream_id)
        self._leases.push(stream_id, release=final)  # what this worker consumed is in it
        if final:
            self._drain(stream_id)
        while True:
            dedup = self._dedup_args(op_id)
            opkey = k["op"] + (op_id if op_id is not None else "-")
            reply = _s(
                self._eval(
                    lua.CLAIM,
                    [k["st"], k["sess"], opkey, k["pending"], k["leases"]],
                    [*dedup, min_units, "1" if final else "0", self._worker, self._claim_batches],
                )
            )
            if reply == "unknown":
                raise self._unknown(stream_id)
            if reply != "pending":
                return _intent(stream_id, reply)
            if not final:
                return None
            status = self.fleet_status(stream_id)
            if status is None or any(owner == self._worker for _, owner, _ in status.owners):
                return None  # our own release is in flight: the contract's answer
            # Another worker's release is in flight. Wait for it; if its owner has not settled
            # it within the intent lease, take it over: the caller sends it (same key) and
            # claims the final intent after.
            taken = self.take_over(stream_id, lease_seconds=self._intent_lease)
            if taken is not None:
                return taken
            op_id = None
            time.sleep(0.02)

    def settle(self, stream_id: str, seq: int, amount_micro: int) -> None:
        self._check_id(stream_id)
        if isinstance(amount_micro, bool) or not isinstance(amount_micro, int) or amount_micro < 0:
            raise InvalidInput("amount_micro", f"must be a whole number >= 0, got {amount_micro!r}")
        k = self._keys(stream_id)
        self._eval(lua.SETTLE, [k["st"], k["pending"], k["settled"]], [str(seq), str(amount_micro)])

    def mark_closed(self, stream_id: str, refunded_micro: int) -> None:
        self._check_id(stream_id)
        if isinstance(refunded_micro, bool) or not isinstance(refunded_micro, int):
            raise InvalidInput("refunded_micro", "must be a whole number")
        st_key = self._keys(stream_id)["st"]
        reply = _s(self._eval(lua.MARK_CLOSED, [st_key], [str(refunded_micro)]))
        if reply == "unknown":
            raise self._unknown(stream_id)
        self._leases.close_local(stream_id, "closed")

    def counter(self, stream_id: str) -> _RedisCounter:
        """The stream's hot-path handle (the ``UnitCounter`` store extension).

        ``reserve`` holds budget for a call still running: in leased mode out of this worker's
        lease (no I/O), else by leasing exactly what is held (one round trip; ``commit`` pushes
        at once, a second). A reservation a crashed worker never committed expires with its
        lease.
        """
        self._check_id(stream_id)
        return _RedisCounter(self, stream_id)

    # ------------------------------------------------------------------ fleet extensions

    def take_over(self, stream_id: str, *, lease_seconds: float | None = None) -> Intent | None:
        """Take a pending intent whose owner has not settled it within ``lease_seconds``
        (default: the store's ``intent_lease``).

        The intent keeps its sequence, hence its idempotency key. Settle it by resending that
        key or by reconciling against the escrow's ``released`` figure (the stream's resume
        logic), never by a new release. An intent this worker already owns is returned again,
        so a re-sent take-over is harmless.
        """
        self._check_id(stream_id)
        k = self._keys(stream_id)
        reply = _s(
            self._eval(
                lua.TAKE_OVER,
                [k["st"], k["pending"]],
                [
                    self._worker,
                    max(
                        0,
                        int(
                            (self._intent_lease if lease_seconds is None else lease_seconds) * 1000
                        ),
                    ),
                ],
            )
        )
        if reply == "unknown":
            raise self._unknown(stream_id)
        return _intent(stream_id, reply)

    def pending_owner(self, stream_id: str) -> tuple[str | None, float] | None:
        """The owner of the stream's pending intent and its claim's age in seconds, or
        ``None`` when nothing is pending (``resume`` asks before taking it over)."""
        status = self.fleet_status(stream_id)
        if status is None or not status.owners:
            return None
        _seq, owner, age_ms = status.owners[0]
        return (owner or None), age_ms / 1000

    @property
    def owner(self) -> str:
        """This store's owner id on intents and leases (its ``worker``)."""
        return self._worker

    @property
    def location(self) -> str | None:
        """The URL it was opened with (``None`` when a client was passed in)."""
        return self._url

    def fleet_status(self, stream_id: str) -> FleetStatus | None:
        """The shared stream as any worker sees it: state, leases, and what was lost."""
        self._check_id(stream_id)
        snap = self._snapshot(stream_id)
        if snap is None:
            return None
        state, st, pending_raw, leases_raw, now = snap
        leases = []
        for worker, value in sorted(leases_raw.items()):
            rem, _, exp = value.partition("|")
            leases.append(LeaseInfo(worker, int(rem), int(exp) - now))
        owners = []
        for seq, value in sorted(pending_raw.items(), key=lambda kv: int(kv[0])):
            parts = value.split("|", 4)
            owners.append((int(seq), parts[4], now - int(parts[3])))
        return FleetStatus(
            state=state,
            leases=tuple(leases),
            reserved_units=int(st.get("reserved", "0")),
            late_units=int(st.get("late", "0")),
            lost_units=int(st.get("lost", "0")),
            revoked_units=int(st.get("revoked", "0")),
            owners=tuple(owners),
        )

    def begin_close(self, stream_id: str) -> str:
        """Stop new leases for the whole fleet (``open`` → draining); returns the status."""
        self._check_id(stream_id)
        reply = _s(self._eval(lua.BEGIN_CLOSE, [self._keys(stream_id)["st"]], []))
        if reply == "unknown":
            raise self._unknown(stream_id)
        return reply

    def flush(self, stream_id: str | None = None) -> None:
        """Push every unit this process consumed locally to Redis now."""
        ids = [stream_id] if stream_id is not None else self._leases.streams()
        for sid in ids:
            self._leases.push(sid)

    def close(self) -> None:
        """Push what was consumed, give every lease back, stop the pusher; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._leases.stop(timeout=self._lease_ttl + 1)
        for sid in self._leases.streams():
            try:
                self._leases.push(sid, release=True)
            except (StoreUnavailable, PFMeteredError) as exc:
                log.warning("could not return the lease on %s: %s", sid, exc)
        if self._own_client:
            self._r.close()

    def delete(self, stream_id: str) -> None:
        """Remove every key of a stream (tests, and streams closed long ago)."""
        self._check_id(stream_id)
        k = self._keys(stream_id)
        self._r.delete(k["st"], k["sess"], k["pending"], k["settled"], k["leases"])
        for key in self._r.scan_iter(match=k["op"] + "*", count=500):
            self._r.delete(key)

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r}, chunk={self._chunk}, worker={self._worker!r})"

    # ------------------------------------------------------------------ snapshot

    def _snapshot(
        self, stream_id: str
    ) -> tuple[StreamState, dict[str, str], dict[str, str], dict[str, str], int] | None:
        k = self._keys(stream_id)
        raw = self._eval(lua.LOAD, [k["st"], k["pending"], k["settled"], k["leases"]], [])
        if not raw:
            return None
        st = _pairs(raw[0])
        pending_raw = _pairs(raw[1])
        settled_raw = [_s(v) for v in raw[2]]
        leases_raw = _pairs(raw[3])
        now = int(_s(raw[4]))
        cfg = json.loads(st["cfg"])
        config = StreamConfig(**cfg)
        pending = []
        for seq, value in sorted(pending_raw.items(), key=lambda kv: int(kv[0])):
            frm, to, fin, _rest = value.split("|", 3)
            pending.append(Intent(stream_id, int(seq), int(frm), int(to), fin == "1"))
        settled = []
        for value in settled_raw:
            seq, frm, to, fin, amount = value.split("|")
            settled.append(
                (Intent(stream_id, int(seq), int(frm), int(to), fin == "1"), int(amount))
            )
        refunded = st.get("refunded")
        state = StreamState(
            config=config,
            status=_public_status(st["status"]),
            escrow_id=st.get("escrow"),
            units=int(st["units"]),
            claimed_units=int(st["claimed"]),
            paid_micro=int(st["paid"]),
            releases=int(st["releases"]),
            pending=tuple(pending),
            refunded_micro=int(refunded) if refunded is not None else None,
            next_seq=int(st["seq"]),
            settled=tuple(settled),
        )
        return state, st, pending_raw, leases_raw, now

    # ------------------------------------------------------------------ leases

    def _new_leases(self) -> LeasedCounter:
        """This worker's side of its leases; its background round is the pusher (started
        with the first lease, when exit starts to close this store: push, give leases back)."""
        ref = weakref.ref(self)

        def started() -> None:
            store = ref()
            if store is not None:
                _LIVE.add(store)

        return LeasedCounter(
            _WorkerLeases(self),
            chunk=self._chunk,
            return_idle=True,
            interval=self._push_interval,
            name="pfm-redis-pusher",
            on_start=started,
        )

    def _lease_script(self, stream_id: str, push: Push, *, release: bool) -> Grant:
        """One push of the lease engine: the ``LEASE`` script (see ``_WorkerLeases``)."""
        k = self._keys(stream_id)
        reply = _s(
            self._eval(
                lua.LEASE,
                [k["st"], k["sess"], k["op"] + "-", k["leases"]],
                [
                    "",
                    f"lease/{self._worker}",
                    push.seq,
                    self._op_ttl,
                    self._worker,
                    push.used,
                    push.want,
                    int(self._lease_ttl * 1000),
                    int(release),
                    push.need,
                    int(push.exact),
                ],
            )
        )
        if reply == "unknown":
            raise self._unknown(stream_id)
        if reply == "stale":
            return Grant("open", 0, 0, 0, stale=True)
        _, status, total, rem, _granted, ttl_ms, avail = reply.split("|")
        return Grant(
            # draining: the final claim waits for the leases; this worker counts no more
            "closing" if status == "draining" else status,
            int(total),
            int(rem),
            int(avail),
            ttl=int(ttl_ms) / 1000,
        )

    def _drain(self, stream_id: str) -> None:
        """Stop new leases and wait (bounded) until every worker has returned its lease."""
        status = self.begin_close(stream_id)
        if status not in ("draining", "open"):
            return
        deadline = time.monotonic() + self._lease_ttl + self._push_interval + 0.5
        leases = self._keys(stream_id)["leases"]
        while time.monotonic() < deadline:
            if int(self._eval(lua.LIVE_LEASES, [leases], [])) == 0:
                return
            time.sleep(0.01)
        log.warning("stream %s: leases still held at close; revoking them", stream_id)


class _RedisCounter:
    """``UnitCounter`` over a :class:`RedisStore` for one stream (see ``RedisStore.counter``)."""

    __slots__ = ("_sid", "_store")

    def __init__(self, store: RedisStore, stream_id: str) -> None:
        self._store = store
        self._sid = stream_id

    def add(self, units: int) -> int:
        return self._store.add_units(self._sid, units)

    def reserve(self, units: int) -> None:
        self._store._leases.reserve(self._sid, units)

    def commit(self, units: int) -> int:
        return self._store._leases.commit(self._sid, units)

    def cancel(self, units: int) -> None:
        self._store._leases.cancel(self._sid, units)

    def units_left(self) -> int | None:
        return None  # the fleet shares the budget: only Redis knows


_LIVE: weakref.WeakSet[RedisStore] = weakref.WeakSet()
_ALL: weakref.WeakSet[RedisStore] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for store in list(_ALL):
        store._after_fork()
    _LIVE.clear()


_lifecycle.on(_lifecycle.FORK, _reset_after_fork)


def _close_all() -> None:
    """Exit, phase STORES: return leases and push consumption (in-memory counts die with it)."""
    for store in list(_LIVE):
        try:
            store.close()
        except Exception as exc:  # pragma: no cover - best effort at exit
            log.warning("closing %r at exit failed: %s", store, exc)


_lifecycle.on(_lifecycle.STORES, _close_all)


_STATUSES: dict[str, StreamStatus] = {
    "new": "new",
    "open": "open",
    "draining": "open",
    "closing": "closing",
    "closed": "closed",
}


def _public_status(status: str) -> StreamStatus:
    """Map the server's status to the contract's.

    ``draining`` (a final claim is waiting for the fleet's leases and in-flight releases) reads
    as ``open``: the final intent is not claimed yet, and a closer that resumes must claim it.
    ``add_units`` already refuses new units then.
    """
    return _STATUSES.get(status, "closing")


def _intent(stream_id: str, reply: str) -> Intent | None:
    if reply == "none":
        return None
    kind, seq, frm, to, fin = reply.split("|")
    if kind != "intent":
        raise StoreUnavailable(f"unexpected reply from Redis: {reply[:40]!r}")
    return Intent(stream_id, int(seq), int(frm), int(to), fin == "1")


def purge_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (tests, examples and benchmarks clean up with it)."""
    if not re.fullmatch(r"[A-Za-z0-9_.:\-]{1,64}", prefix):
        raise InvalidInput("prefix", "must be 1-64 of [A-Za-z0-9_.:-]")
    n = 0
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        n += int(client.delete(key))
    return n
