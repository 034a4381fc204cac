"""The one base both clients share: configuration, validation, request building, the retry
loop, reading back after a lost answer, and answer parsing — everything except I/O.

What this module is for: each public call is turned into an *operation*, a generator that
yields :class:`Send` and :class:`Sleep` actions and receives what happened (an
:class:`Answer` or the httpx error). ``EscrowClient`` and ``AsyncEscrowClient`` only drive
these generators, one with blocking I/O, one with ``await``; there is no second copy of any
decision (tenacity's ``iter()`` shape).

The rules it keeps:

* every argument is validated before the operation exists, so bad input sends nothing;
* a POST gets one ``Idempotency-Key`` per logical call (the caller's or a fresh uuid4), and
  the request is built once, so every retry sends the same bytes and the same key;
* a POST whose answer was lost is re-sent only if the server honours idempotency keys
  (declared, or advertised with ``Idempotency-Supported: true``); otherwise the escrow is read
  back first, and the key — carried in the memo as `` [idem:KEY]`` — says whether it landed;
* a read-back looks for the tag in the escrow's most recent releases (the window a v1 read
  carries); a release older than the window is looked for in the paged history, and when that
  cannot be read the outcome is ambiguous, never a re-send;
* an answer is believed only after it has been decoded (≤ 1 MiB, JSON without NaN/Infinity or
  duplicate keys, floats as Decimal) and validated into a model about the escrow asked for.

What it must never do: send a request after a validation error, make a new idempotency key
for a retry, retry a 4xx other than 408/409-in-progress/429, let the API key or a URL with
credentials into an exception or log message, or sleep itself (sleeping is the driver's).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import uuid
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, Generic, TypeVar

import httpx

from pf_metered.errors import (
    AmbiguousCreate,
    AmbiguousOutcome,
    AmbiguousRelease,
    APIConnectionError,
    APIError,
    APITimeout,
    ConfigError,
    Conflict,
    IdempotencyConflict,
    InvalidInput,
    InvalidResponse,
    PFMeteredError,
    RateLimited,
    UnsupportedByDialect,
    redact,
)
from pf_metered.models import Escrow, FaucetClaim, Release, ReleasePage
from pf_metered.money import format_usdc, micro_to_decimal, parse_amount

from ._dialect import ACTION_STATUS, ActionAnswer, Dialect, RequestSpec
from ._dialects import DEFAULT_HOST, PROBED, REGISTRY, choose, probe_requests
from ._json import loads_exact
from ._ratelimit import PathRateLimiter, RateLimit, limiter_for
from ._retry import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    Verdict,
    backoff_delay,
    classify_exception,
    classify_status,
    parse_retry_after,
)
from ._secrets import Secret, install_log_redaction, redact_text

__all__ = [
    "DEFAULT_BASE_URL",
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "MAX_ANSWER_BYTES",
    "MAX_MEMO",
    "Answer",
    "BaseEscrowClient",
    "Capabilities",
    "Op",
    "Send",
    "Sleep",
    "check_base_url",
    "memo_tag",
]

log = logging.getLogger("pf_metered.client")

T = TypeVar("T")

DEFAULT_BASE_URL: Final = DEFAULT_HOST
"""The live host (``https://escrow.purpleflea.com``): it serves the deployed dialect at its
root. With no base URL and no ``dialect=``, a client asks it which dialect it speaks."""
CREATE_PATH: Final = "/escrow/create"
"""The deployed service's create path, whose limit bounds how fast escrows can be locked."""
DEFAULT_REFUSAL: Final = "the escrow service refused the request"
ENV_API_KEY: Final = "PF_API_KEY"
ENV_BASE_URL: Final = "PF_BASE_URL"
MAX_ANSWER_BYTES: Final = 1 << 20
"""Answers larger than this (1 MiB) are refused unread."""
MAX_MEMO: Final = 1000
HISTORY_PAGE: Final = 100
"""The default page size of :meth:`list_releases` / ``iter_releases``."""
MAX_HISTORY_PAGE: Final = 1000
"""The largest page v1 serves (docs/WIRE.md); the read-back's history search uses it."""
MAX_RETRIES_LIMIT: Final = 20
MIN_AUTO_RELEASE_HOURS: Final = 1
MAX_AUTO_RELEASE_HOURS: Final = 8760
IDEMPOTENCY_SUPPORTED: Final = "Idempotency-Supported"
IDEMPOTENT_REPLAYED: Final = "Idempotent-Replayed"
USER_AGENT: Final = "pf-metered/0.1.0 (python; httpx)"
LOG_WAITS_OVER: Final = 2.0
"""Any wait longer than this many seconds is logged at INFO with what it waits for."""

_ID_RE: Final = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_HAS_ALNUM: Final = re.compile(r"[A-Za-z0-9]")
_IDEM_RE: Final = re.compile(r"^[\x20-\x7e]{1,255}$")
_CODE_RE: Final = re.compile(r"^[a-z0-9_.\-]{1,64}$")
_REQUEST_ID_RE: Final = re.compile(r"^[\x21-\x7e]{1,128}$")


# -- actions and outcomes ----------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send this request and report what happened."""

    spec: RequestSpec


@dataclass(frozen=True)
class Sleep:
    """Wait this many seconds (the driver's sleep, injectable in tests)."""

    seconds: float


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, its body read up to :data:`MAX_ANSWER_BYTES`."""

    status: int
    headers: httpx.Headers
    body: bytes
    too_large: bool = False


Action = Send | Sleep
Outcome = Answer | Exception | None
Op = Generator[Action, Outcome, T]


@dataclass(frozen=True)
class Capabilities:
    """What the client knows it can rely on — its dialect's declared capabilities, plus what
    it learnt of the server (the public face the stream and tranche layers plan by).

    ``honours_idempotency`` is ``True`` when declared or advertised by the server, ``False``
    when declared not to, ``None`` while unknown (the client then reads back before re-sending
    a POST whose answer was lost). ``limits``: requests per 60 s the service allows on each
    path pattern (per concrete path and client address); ``creates_per_minute``: how many
    escrows a minute the client's pacing sustains (``None``: not paced).
    """

    dialect: str
    supports_partial_release: bool
    honours_idempotency: bool | None
    min_escrow_micro: int = 0
    """The smallest escrow the service locks, in micro-USDC (1.00 on v1, 0.10 on deployed)."""
    supports_listing: bool = True
    supports_refund: bool = True
    supports_complete_and_dispute: bool = False
    max_auto_release_hours: int = 8760
    limits: Mapping[str, int] = field(default_factory=dict)
    creates_per_minute: float | None = None


@dataclass(frozen=True)
class _Failure:
    verdict: Verdict
    error: PFMeteredError
    retry_after: float | None = None


class _Lost(Exception):
    """A POST's answer was lost (it may have taken effect); ``final``: no retries left."""

    def __init__(self, error: PFMeteredError, *, final: bool = False) -> None:
        self.error = error
        self.final = final
        super().__init__(str(error))


class _Budget:
    """Retries left for one logical call, shared by its sends and read-backs."""

    def __init__(self, retries: int) -> None:
        self.left = retries
        self.used = 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.used += 1
        return True


class _Found(Enum):
    FOUND = "found"
    ABSENT = "absent"
    UNKNOWN = "unknown"


class BodyCollector:
    """Accumulates an answer's body, refusing it once it passes :data:`MAX_ANSWER_BYTES`."""

    def __init__(self, headers: httpx.Headers) -> None:
        self._buf = bytearray()
        declared = headers.get("content-length", "")
        self.too_large = declared.isdigit() and int(declared) > MAX_ANSWER_BYTES

    def add(self, chunk: bytes) -> bool:
        """Keep ``chunk``; ``False`` when the body is now too large (stop reading)."""
        self._buf += chunk
        if len(self._buf) > MAX_ANSWER_BYTES:
            self.too_large = True
            self._buf.clear()
            return False
        return True

    def answer(self, response: httpx.Response) -> Answer:
        body = b"" if self.too_large else bytes(self._buf)
        return Answer(response.status_code, response.headers, body, self.too_large)


# -- validation --------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(raw: object) -> str:
    """The base URL, refused unless https or http to a loopback host; no credentials, query
    or fragment. Errors name the scheme and host only, never the whole URL."""
    if not isinstance(raw, str) or not raw.strip():
        raise ConfigError("base_url must be a non-empty string")
    url: httpx.URL | None
    try:
        url = httpx.URL(raw.strip())
    except (httpx.InvalidURL, TypeError, ValueError):
        url = None  # raised below, outside the handler: httpx's error may quote the URL
    if url is None:
        raise ConfigError("base_url is not a valid URL")
    if url.scheme not in ("http", "https"):
        raise ConfigError("base_url must start with https:// (or http:// for loopback)")
    host = (url.host or "").lower()
    if not host:
        raise ConfigError("base_url has no host")
    if url.userinfo:
        raise ConfigError(
            "base_url must not carry credentials (user:password@host); pass the key as api_key"
        )
    if url.query or url.fragment:
        raise ConfigError("base_url must not carry a query or fragment")
    if url.scheme == "http" and not _is_loopback(host):
        raise ConfigError(
            f"base_url must use https unless its host is loopback (127.0.0.0/8, ::1, "
            f"localhost); refused http://{host[:100]}"
        )
    return str(url).rstrip("/")


def _check_id(value: object, field: str) -> str:
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or not _HAS_ALNUM.search(value):
        raise InvalidInput(field, "must be 1..128 characters of letters, digits and _ . : -")
    return value


def _check_memo(value: object, limit: int, field: str = "memo") -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, f"must be a str, not {type(value).__name__}")
    if len(value) > limit:
        raise InvalidInput(
            field,
            f"must be at most {limit} characters, got {len(value)}"
            + (
                ""
                if limit == MAX_MEMO
                else f" ({MAX_MEMO - limit} are reserved for the idempotency tag)"
            ),
        )
    return value


def _check_hours(
    value: object, maximum: int = MAX_AUTO_RELEASE_HOURS, dialect: str = ""
) -> int | None:
    """``auto_release_hours``, refused up front outside ``1..maximum`` — the service's own
    range (the deployed one clamps to 1..720 without a word, which would silently move the
    deadline the caller asked for)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("auto_release_hours", f"must be an int, not {type(value).__name__}")
    if not MIN_AUTO_RELEASE_HOURS <= value <= maximum:
        where = f" (the {dialect} service's maximum is {maximum})" if dialect else ""
        raise InvalidInput(
            "auto_release_hours",
            f"must be between {MIN_AUTO_RELEASE_HOURS} and {maximum}, got {value}{where}",
        )
    return value


def _check_idempotency_key(value: object) -> tuple[str, bool]:
    """The key to use and whether the caller gave it."""
    if value is None:
        return f"pfm_{uuid.uuid4().hex}", False
    if not isinstance(value, str) or not _IDEM_RE.fullmatch(value) or value != value.strip():
        raise InvalidInput(
            "idempotency_key", "must be 1..255 printable ASCII characters, no outer spaces"
        )
    return value, True


def memo_tag(idempotency_key: str) -> str:
    """What a POST's memo ends with when the server is not known to honour keys."""
    return f"[idem:{idempotency_key}]"


def decode_json(body: bytes) -> Any:
    """Decode an answer strictly: UTF-8, floats as Decimal, no NaN/Infinity, no duplicate keys."""
    try:
        return loads_exact(body.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        problem = type(exc).__name__
    # Raised outside the handler so the decoder's error (which holds the whole body, and a
    # hostile body may quote the key) is not chained as __context__.
    raise InvalidResponse(f"answer is not valid JSON ({problem})")


def _request_id(headers: httpx.Headers) -> str | None:
    value = headers.get("x-request-id")
    if value is None or not _REQUEST_ID_RE.fullmatch(value):
        return None
    return redact(value)


# -- the base ----------------------------------------------------------------------------


class _Absent:
    """What a settle/reconcile step returns when the call certainly did not take effect."""


ABSENT: Final = _Absent()


class _Call(Generic[T]):
    """One logical POST, driven by :meth:`BaseEscrowClient._post_gen` — the one loop.

    Subclasses say what the call's answer must show (:meth:`accept`), how a lost answer is
    settled (:meth:`settle`: read back, then the result, :data:`ABSENT` to send again, or
    raise an ambiguous outcome), what a refusal after a lost attempt means
    (:meth:`refused_after_lost`), and, for a caller-given key, what to check before sending
    anything (:meth:`first`).
    """

    what = "request"

    def __init__(self, client: BaseEscrowClient, spec: RequestSpec, key: str | None) -> None:
        self.client = client
        self.spec = spec
        self.key = key

    def first(self) -> Op[T | _Absent]:
        return ABSENT
        yield  # pragma: no cover - makes this a generator

    def settle(self, lost: _Lost, may_retry: bool, pause: Sleep) -> Op[T | _Absent]:
        raise NotImplementedError

    def accept(self, answer: Answer) -> Op[T]:
        raise NotImplementedError

    def refused_after_lost(self, error: APIError) -> Op[T | _Absent]:
        return ABSENT
        yield  # pragma: no cover


class BaseEscrowClient:
    """Configuration and every decision; subclasses add only the I/O."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        server_honours_idempotency: bool | None = None,
        dialect: Dialect | str | None = None,
        rate_limits: Any = None,
    ) -> None:
        install_log_redaction()
        key = api_key if api_key is not None else os.environ.get(ENV_API_KEY)
        if not key:
            raise ConfigError(
                f"no API key: pass api_key=... or set the {ENV_API_KEY} environment variable"
            )
        self._secret = Secret(key)
        choice = choose(dialect, base_url, os.environ.get(ENV_BASE_URL))
        self._base_url = check_base_url(choice.base_url)
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < float("inf")  # ok: seconds, not money
        ):
            raise ConfigError("timeout must be a positive number of seconds")
        if (
            isinstance(max_retries, bool)
            or not isinstance(max_retries, int)
            or not 0 <= max_retries <= MAX_RETRIES_LIMIT
        ):
            raise ConfigError(f"max_retries must be an int between 0 and {MAX_RETRIES_LIMIT}")
        if server_honours_idempotency not in (None, True, False):
            raise ConfigError("server_honours_idempotency must be True, False or None")
        if not (rate_limits is None or isinstance(rate_limits, bool | dict | PathRateLimiter)):
            raise InvalidInput(
                "rate_limits", "must be None, False, a {path regex: RateLimit} dict or a limiter"
            )
        self._timeout = httpx.Timeout(float(timeout))  # ok: seconds, not money
        self._max_retries = max_retries
        self._rate_limits_arg = rate_limits
        self._honours_arg = server_honours_idempotency
        self._probe_host = choice.probe_host
        self._probe_shared = True
        """Whether this client may use (and fill) the process-wide probe cache: a client
        with its own transport (a sandbox, a test) probes for itself."""
        self._limiter: PathRateLimiter | None = None
        self._honours_declared: bool | None = server_honours_idempotency
        self._dialect: Dialect = next(iter(REGISTRY.values()))  # until probed
        self._resolved = False
        if choice.dialect is not None:
            self._adopt(choice.dialect, self._base_url)
        self._honours_seen = False
        self._rand: Callable[[], float] = random.random

    def _adopt(self, dialect: Dialect, base_url: str) -> None:
        """Speak ``dialect`` at ``base_url`` from now on: its pacing and idempotency rules."""
        self._dialect = dialect
        self._base_url = check_base_url(base_url)
        self._limiter = limiter_for(dialect.capabilities, self._rate_limits_arg)
        honours = self._honours_arg
        if dialect.capabilities.honours_idempotency_keys is False:
            honours = False
        self._honours_declared = honours
        self._resolved = True

    # -- public, I/O-free ----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Where requests go (the host until a probe has found the dialect's root)."""
        return self._base_url

    @property
    def max_retries(self) -> int:
        return self._max_retries

    @property
    def dialect_name(self) -> str | None:
        """The dialect's name once known, else ``None`` — never probes (for descriptions and
        messages that must not cause a request)."""
        return self._dialect.name if self._resolved else None

    @property
    def dialect_resolved(self) -> bool:
        """Whether the dialect is known (given, named by the base URL, or probed)."""
        return self._resolved

    @property
    def capabilities(self) -> Capabilities:
        """What this client can rely on. With neither ``dialect=`` nor a base URL, the first
        look asks the host which dialect it speaks (one read, cached; see ``_dialects.py``)."""
        if not self._resolved:
            self._resolve_blocking()
        caps = self._dialect.capabilities
        honours = self._honours_declared
        if honours is None and self._honours_seen:
            honours = True
        create_limit = None if self._limiter is None else self._limiter.limit_for(CREATE_PATH)
        return Capabilities(
            dialect=self._dialect.name,
            supports_partial_release=caps.partial_release,
            honours_idempotency=honours,
            min_escrow_micro=caps.min_escrow_micro,
            supports_listing=caps.listing,
            supports_refund=caps.refund,
            supports_complete_and_dispute=caps.complete_and_dispute,
            max_auto_release_hours=caps.max_auto_release_hours,
            limits=dict(caps.limits),
            creates_per_minute=(
                None if create_limit is None else create_limit.sustained_per_minute
            ),
        )

    def pacing_for(self, path: str) -> RateLimit | None:
        """The limit this client paces ``path`` by (``None``: not paced)."""
        return None if self._limiter is None else self._limiter.limit_for(path)

    def __repr__(self) -> str:
        dialect = self._dialect.name if self._resolved else "(to be probed)"
        return (
            f"{type(self).__name__}(base_url={self._base_url!r}, api_key={self._secret!r}, "
            f"dialect={dialect!r})"
        )

    # -- dialect resolution ----------------------------------------------------------------

    def _resolve_blocking(self) -> None:
        """Probe the host now, from a property (the sync client runs the probe; the async
        client overrides this)."""
        raise ConfigError(
            "the dialect is not known yet: pass dialect=... or a base URL, or resolve it first"
        )

    def _resolve_gen(self) -> Op[Dialect]:
        """Find the dialect the host speaks: each registered dialect's probe, in order; the
        first recognised wins, its root appended to the host. Cached per host."""
        if self._resolved:
            return self._dialect
        host = self._probe_host or self._base_url
        cached = PROBED.get(host) if self._probe_shared else None
        if cached is not None:
            self._adopt(cached, host + cached.root)
            return cached
        tried: list[str] = []
        saved = self._base_url
        self._base_url = host
        try:
            for dialect, spec in probe_requests():
                label = f"GET {spec.path} ({dialect.name})"
                outcome = yield Send(spec)
                if not isinstance(outcome, Answer):
                    tried.append(f"{label}: {type(outcome).__name__}")
                    continue
                data = None
                if not outcome.too_large:
                    try:
                        data = decode_json(outcome.body)
                    except InvalidResponse:
                        data = None
                if dialect.recognises(outcome.status, data):
                    log.info("%s speaks the %s dialect (probed once)", host, dialect.name)
                    if self._probe_shared:
                        PROBED.put(host, dialect)
                    self._adopt(dialect, host + dialect.root)
                    return dialect
                tried.append(f"{label}: HTTP {outcome.status}, not this dialect's answer")
        finally:
            if not self._resolved:
                self._base_url = saved
        raise ConfigError(
            f"could not tell which escrow API {host} speaks: tried "
            + "; ".join(tried)
            + f". Pass dialect= ({', '.join(repr(n) for n in REGISTRY)}) or set "
            f"{ENV_BASE_URL}"
        )

    def _resolved_op(self, make: Callable[[], Op[T]]) -> Op[T]:
        """``make()``'s operation, once the dialect is known (probing first if need be)."""
        if not self._resolved:
            yield from self._resolve_gen()
        return (yield from make())

    # -- request building ----------------------------------------------------------------

    def _default_headers(self) -> dict[str, str]:
        return {"User-Agent": USER_AGENT, "Accept": "application/json"}

    def _url(self, spec: RequestSpec) -> str:
        return self._base_url + spec.path

    def _headers(self, spec: RequestSpec) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._secret.reveal()}"}
        if spec.body is not None:
            headers["Content-Type"] = "application/json"
        if spec.idempotency_key is not None:
            headers["Idempotency-Key"] = spec.idempotency_key
        return headers

    def _honours_now(self) -> bool:
        if self._honours_declared is not None:
            return self._honours_declared
        return self._honours_seen

    def _learn(self, headers: httpx.Headers) -> None:
        if self._honours_declared is None and (
            headers.get(IDEMPOTENCY_SUPPORTED, "").strip().lower() == "true"
            or headers.get(IDEMPOTENT_REPLAYED, "").strip().lower() == "true"
        ):
            self._honours_seen = True

    # -- judging one outcome -------------------------------------------------------------

    def _judge(self, spec: RequestSpec, outcome: Outcome) -> Answer | _Failure:
        if outcome is None:  # pragma: no cover - a driver bug
            raise RuntimeError("the driver sent no outcome for a Send")
        if isinstance(outcome, Exception):
            verdict = classify_exception(outcome)
            cls = APITimeout if isinstance(outcome, httpx.TimeoutException) else APIConnectionError
            detail = redact_text(str(outcome))[:200]
            return _Failure(
                verdict,
                cls(f"{spec.method} {spec.path}: {type(outcome).__name__}: {detail}".rstrip(": ")),
            )
        self._learn(outcome.headers)
        if 200 <= outcome.status <= 299:
            return outcome
        error = self._error_from(outcome)
        code = error.code if isinstance(error, APIError) else None
        verdict = classify_status(
            outcome.status, in_progress=self._dialect.is_in_progress(outcome.status, code)
        )
        retry_after = parse_retry_after(outcome.headers.get("retry-after"))
        return _Failure(verdict, error, retry_after)

    def _error_from(self, answer: Answer) -> APIError:
        status, rid = answer.status, _request_id(answer.headers)
        if not 400 <= status <= 599:
            return InvalidResponse(
                f"unexpected HTTP {status} answer", status=status, request_id=rid
            )
        code: str | None = None
        message = DEFAULT_REFUSAL
        if not answer.too_large and answer.body:
            try:
                data = decode_json(answer.body)
            except InvalidResponse:
                data = None
            if isinstance(data, dict):
                raw_code, raw_message = data.get("error"), data.get("message")
                if isinstance(raw_code, str) and _CODE_RE.fullmatch(raw_code):
                    code = raw_code
                if isinstance(raw_message, str) and raw_message.strip():
                    message = redact_text(raw_message[:1000])
        cls = self._dialect.error_class(status, code)
        if issubclass(cls, RateLimited):
            return cls(
                message,
                retry_after=parse_retry_after(answer.headers.get("retry-after")),
                status=status,
                code=code,
                request_id=rid,
            )
        return cls(message, status=status, code=code, request_id=rid)

    # -- parsing answers -----------------------------------------------------------------

    def _parse(self, answer: Answer, parse: Callable[[Any], T]) -> T:
        rid = _request_id(answer.headers)
        if answer.too_large:
            message = f"answer larger than {MAX_ANSWER_BYTES} bytes refused"
        else:
            try:
                return parse(decode_json(answer.body))
            except InvalidResponse as exc:
                message = exc.message
        raise InvalidResponse(redact_text(message), status=answer.status, request_id=rid)

    def _escrow_answer(self, answer: Answer, expected_id: str) -> Escrow:
        escrow = self._parse(answer, self._dialect.parse_escrow)
        if escrow.escrow_id != expected_id:
            raise InvalidResponse(
                f"asked about escrow {expected_id} but the answer is about another escrow",
                status=answer.status,
                request_id=_request_id(answer.headers),
            )
        return escrow

    # -- the retry loop ------------------------------------------------------------------

    def _exchange(self, spec: RequestSpec, budget: _Budget) -> Op[Answer]:
        """Send ``spec`` until it succeeds, fails for good, or (a POST) its answer is lost on a
        server not known to honour idempotency keys — then raise :class:`_Lost`."""
        while True:
            wait = 0.0 if self._limiter is None else self._limiter.acquire(spec.path)
            if wait > 0:
                if wait > LOG_WAITS_OVER:
                    log.info(
                        "waiting %.1f s before %s %s: the service allows %s",
                        wait,
                        spec.method,
                        spec.path,
                        self._limit_text(spec.path),
                    )
                yield Sleep(wait)
            judged = self._judge(spec, (yield Send(spec)))
            self._paced(spec.path, getattr(judged, "error", None))
            if isinstance(judged, Answer):
                return judged
            if judged.verdict is Verdict.FAIL:
                raise judged.error
            lost_post = judged.verdict is Verdict.LOST and spec.method == "POST"
            if lost_post and not self._honours_now():
                raise _Lost(judged.error)
            if not budget.take():
                if lost_post:
                    raise _Lost(judged.error, final=True)
                raise judged.error
            delay = backoff_delay(budget.used, judged.retry_after, rand=self._rand)
            log.info(
                "retrying %s %s in %.2f s after %s (retry %d of %d)",
                spec.method,
                spec.path,
                delay,
                type(judged.error).__name__,
                budget.used,
                self._max_retries,
            )
            yield Sleep(delay)

    def _paced(self, path: str, error: object) -> None:
        """Tell the limiter how a send to ``path`` ended (``error``: the failure, or None)."""
        if self._limiter is None:
            return
        if isinstance(error, RateLimited):
            pause = self._limiter.rate_limited(path)
            log.info("429 on %s: pausing this path %.1f s and slowing down", path, pause)
        else:
            self._limiter.succeeded(path)

    def _limit_text(self, path: str) -> str:
        limit = None if self._limiter is None else self._limiter.limit_for(path)
        if limit is None:
            return "no more right now (rate limited)"
        return f"{limit.per_minute} of these a minute per path and client address"

    def _pause(self, budget: _Budget) -> Sleep:
        return Sleep(backoff_delay(max(budget.used, 1), rand=self._rand))

    # -- believing a short action answer ------------------------------------------------

    def _settle_action(
        self, answer: Answer, escrow_id: str, action: str, key: str | None = None
    ) -> Op[Escrow]:
        """Believe a 2xx answer to a release / complete / dispute only once it agrees with
        the escrow read back.

        The deployed service answers these with a short account of the action, not the
        escrow (a release: ``amount_released``, the NET paid, and ``commission``; gross =
        their sum). The escrow is read back (``GET``, not rate limited) and must be in the
        state the action leads to; a release's gross must be the escrow's amount. An answer
        that is incomplete or contradicts the request is settled by that read-back: applied →
        the escrow; not applied → an ambiguous outcome (never a success, never re-sent). When
        the read-back itself fails, a complete, consistent release answer still stands (the
        server applied it: that must not surface as an error); anything less is ambiguous.
        """
        dialect = self._dialect
        want = ACTION_STATUS[action]
        if answer.too_large:
            told = ActionAnswer(action, None, None, problem="the answer was too large to read")
        else:
            try:
                told = dialect.parse_action(decode_json(answer.body), action)
            except InvalidResponse as exc:
                told = ActionAnswer(action, None, None, problem=exc.message)
        problem = told.problem
        if told.escrow_id is not None and told.escrow_id != escrow_id:
            problem = f"the answer is about escrow {told.escrow_id[:40]}"
        try:
            escrow = yield from self._get_gen(escrow_id)
        except PFMeteredError as exc:
            if action == "release" and problem is None:
                log.info(
                    "escrow %s released (answer: net %s, commission %s); reading it back failed "
                    "(%s), so the escrow is described from the answer",
                    escrow_id,
                    format_usdc(told.net_micro or 0),
                    format_usdc(told.commission_micro or 0),
                    type(exc).__name__,
                )
                return dialect.escrow_from_release(told)
            why = (
                f"it was answered {want} but could not be read back ({type(exc).__name__})"
                if problem is None
                else f"its answer (HTTP {answer.status}) was not believable ({problem}) and "
                f"reading the escrow back failed ({type(exc).__name__})"
            )
            raise self._action_ambiguous(action, escrow_id, key, why) from None
        status = getattr(escrow, "deployed_status", escrow.status)
        applied = status == want or (action == "complete" and status in ("released", "disputed"))
        if not applied:
            why = problem or f"it was answered {want}"
            raise self._action_ambiguous(
                action,
                escrow_id,
                key,
                f"the service answered HTTP {answer.status} ({why}) but the escrow reads {status}",
            )
        gross = told.gross_micro
        if action == "release" and gross is not None and abs(gross - escrow.amount_micro) > 1:
            log.warning(
                "escrow %s: the release answer's gross %s (net %s + commission %s) is not the "
                "escrow's amount %s; the escrow's figures are kept",
                escrow_id,
                format_usdc(gross),
                format_usdc(told.net_micro or 0),
                format_usdc(told.commission_micro or 0),
                format_usdc(escrow.amount_micro),
            )
        if problem is not None:
            log.warning(
                "escrow %s: the %s answer was not believable (%s); the escrow read back shows "
                "it %s",
                escrow_id,
                action,
                problem,
                status,
            )
        return escrow

    @staticmethod
    def _action_ambiguous(
        action: str, escrow_id: str, key: str | None, why: str
    ) -> AmbiguousOutcome:
        cls = AmbiguousRelease if action == "release" else AmbiguousOutcome
        return cls(
            f"the {action} of escrow {escrow_id} may or may not have been applied: {why}; "
            "read the escrow back (get_escrow) before trying again",
            idempotency_key=key,
            escrow_id=escrow_id,
        )

    # -- the one POST loop ---------------------------------------------------------------

    def _post_gen(self, call: _Call[T]) -> Op[T]:
        """Every POST, whatever it does: send with one key and one body; when the answer is
        lost, let the call settle it (read back → done, certainly absent → send again, else an
        ambiguous outcome); a refusal after a lost attempt may mean the lost one landed; a 2xx
        answer is believed only once the call has checked it against what was asked."""
        found = yield from call.first()
        if not isinstance(found, _Absent):
            return found
        budget = _Budget(self._max_retries)
        lost_before = False
        while True:
            try:
                answer = yield from self._exchange(call.spec, budget)
            except _Lost as lost:
                lost_before = True
                may_retry = not lost.final and budget.take()
                found = yield from call.settle(lost, may_retry, self._pause(budget))
                if not isinstance(found, _Absent):
                    log.info("%s reconciled after a lost answer: it had been applied", call.what)
                    return found
                log.info("%s absent after a lost answer: re-sending", call.what)
                continue
            except APIError as exc:
                if not lost_before:
                    raise
                found = yield from call.refused_after_lost(exc)
                if isinstance(found, _Absent):
                    raise
                return found
            return (yield from call.accept(answer))

    # -- operations (validated eagerly; the generator runs only the I/O plan) ------------

    def _get_op(self, escrow_id: str) -> Op[Escrow]:
        _check_id(escrow_id, "escrow_id")
        return self._resolved_op(lambda: self._get_gen(escrow_id))

    def _get_gen(self, escrow_id: str) -> Op[Escrow]:
        spec = self._dialect.get_escrow(escrow_id)
        answer = yield from self._exchange(spec, _Budget(self._max_retries))
        return self._escrow_answer(answer, escrow_id)

    def _releases_op(self, escrow_id: str, offset: object, limit: object) -> Op[ReleasePage]:
        _check_id(escrow_id, "escrow_id")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise InvalidInput("offset", "must be an int >= 0")
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int)
            or not (1 <= limit <= MAX_HISTORY_PAGE)
        ):
            raise InvalidInput("limit", f"must be an int between 1 and {MAX_HISTORY_PAGE}")

        def after() -> Op[ReleasePage]:
            if not self._dialect.capabilities.release_history:
                raise UnsupportedByDialect(
                    f"the {self._dialect.name} dialect keeps no release history to page through"
                )
            return self._releases_gen(escrow_id, offset, limit)

        return self._resolved_op(after)

    def _releases_gen(self, escrow_id: str, offset: int, limit: int) -> Op[ReleasePage]:
        spec = self._dialect.list_releases(escrow_id, offset=offset, limit=limit)
        answer = yield from self._exchange(spec, _Budget(self._max_retries))
        page = self._parse(answer, self._dialect.parse_release_page)
        if page.escrow_id != escrow_id or page.offset != offset or len(page.releases) > limit:
            raise InvalidResponse(
                f"asked for releases {offset}.. (at most {limit}) of escrow {escrow_id}; the "
                "answer is another page",
                status=answer.status,
                request_id=_request_id(answer.headers),
            )
        return page

    def _search_history(self, escrow: Escrow, tag: str) -> Op[tuple[Release, ...]]:
        """The releases tagged ``tag`` among those older than ``escrow``'s recent window,
        read page by page, newest first; raises if the history cannot be read in full."""
        if not self._dialect.capabilities.release_history:
            raise UnsupportedByDialect(f"the {self._dialect.name} dialect has no history")
        end = escrow.total_releases - len(escrow.releases)
        hits: list[Release] = []
        while end > 0:
            offset = max(0, end - MAX_HISTORY_PAGE)
            page = yield from self._releases_gen(escrow.escrow_id, offset, end - offset)
            if len(page.releases) != end - offset or page.release_count < escrow.total_releases:
                raise InvalidResponse("the release history shrank while it was read")
            hits.extend(r for r in page.releases if r.memo.endswith(tag))
            end = offset
        return tuple(hits)

    def _list_op(self) -> Op[list[Escrow]]:
        return self._resolved_op(self._list_gen)

    def _list_gen(self) -> Op[list[Escrow]]:
        answer = yield from self._exchange(self._dialect.list_escrows(), _Budget(self._max_retries))
        return self._parse(answer, self._dialect.parse_escrow_list)

    def _tagged(self, memo: object, key: str) -> tuple[str, bool]:
        """The memo to send, and whether it carries the idempotency tag.

        Decided by configuration alone, never by what this client has learned since: two
        clients (or one before and after a restart) sending the same logical call under the
        same key must send the same body, or an honouring server rightly answers 422.
        """
        if self._honours_declared is True:
            return _check_memo(memo, MAX_MEMO), False
        tag = memo_tag(key)
        text = _check_memo(memo, MAX_MEMO - len(tag) - 1)
        return (f"{text} {tag}" if text else tag), True

    # create --------------------------------------------------------------------------

    def _create_op(
        self,
        to_agent_id: str,
        amount: object,
        memo: object,
        auto_release_hours: object,
        idempotency_key: object,
    ) -> Op[Escrow]:
        _check_id(to_agent_id, "to_agent_id")
        micro = parse_amount(amount, "amount")
        _check_hours(auto_release_hours)
        key, given = _check_idempotency_key(idempotency_key)
        if self._resolved:  # every check before anything is sent, probe included
            self._check_create(micro, auto_release_hours, memo, key)
        return self._resolved_op(
            lambda: self._create_gen(to_agent_id, micro, memo, auto_release_hours, key, given=given)
        )

    def _check_create(self, micro: int, hours: object, memo: object, key: str) -> None:
        caps = self._dialect.capabilities
        if micro < caps.min_escrow_micro:
            raise InvalidInput("amount", f"must be at least {format_usdc(caps.min_escrow_micro)}")
        _check_hours(hours, caps.max_auto_release_hours, self._dialect.name)
        self._tagged(memo, key)

    def _create_gen(
        self,
        to_agent_id: str,
        micro: int,
        memo: object,
        auto_release_hours: object,
        key: str,
        *,
        given: bool,
    ) -> Op[Escrow]:
        self._check_create(micro, auto_release_hours, memo, key)
        hours = _check_hours(auto_release_hours)
        wire_memo, tagged = self._tagged(memo, key)
        spec = self._dialect.create_escrow(
            to_agent_id=to_agent_id,
            amount_micro=micro,
            memo=wire_memo,
            auto_release_hours=hours,
            idempotency_key=key,
        )
        call = _CreateCall(
            self, spec, key, to_agent_id=to_agent_id, micro=micro, tagged=tagged, given=given
        )
        return (yield from self._post_gen(call))

    def _find_created(
        self, escrows: list[Escrow], key: str, to_agent_id: str, micro: int
    ) -> Escrow | None:
        tag = memo_tag(key)
        for escrow in escrows:
            if (
                escrow.memo.endswith(tag)
                and escrow.amount == micro_to_decimal(micro)
                and escrow.to_agent_id in (None, to_agent_id)
            ):
                return escrow
        return None

    def _ambiguous_create(
        self, lost: _Lost, key: str, why: str, to_agent_id: str, micro: int
    ) -> AmbiguousCreate:
        return self._ambiguous_create_because(
            f"the answer was lost ({type(lost.error).__name__}) and {why}", key, to_agent_id, micro
        )

    def _ambiguous_create_because(
        self, why: str, key: str, to_agent_id: str, micro: int, **known: Any
    ) -> AmbiguousCreate:
        # what is known travels with the error: amount, provider and the memo tag (the nonce
        # that identifies the escrow if it exists, e.g. in the deployed service's descriptions)
        if self._dialect.capabilities.listing:
            advice = "reconcile with list_escrows() or retry with the same idempotency_key"
        else:
            advice = (
                f"nothing was re-sent, and the {self._dialect.name} service offers no listing to "
                f"check by: {self._manual_check(key, to_agent_id, micro)}"
            )
        return AmbiguousCreate(
            f"an escrow may have been created: {why}; {advice}",
            idempotency_key=key,
            to_agent_id=to_agent_id,
            amount=micro_to_decimal(micro),
            memo_tag=memo_tag(key).strip(),
            **known,
        )

    @staticmethod
    def _manual_check(key: str, to_agent_id: str, micro: int) -> str:
        """What a caller can do, by hand, about a create that cannot be reconciled here."""
        return (
            f"look for an escrow of {format_usdc(micro)} USDC to {to_agent_id} whose "
            f"description ends with {memo_tag(key).strip()} (on the dashboard, or with "
            "get_escrow(escrow_id) if you know its id), or ask Purple Flea support; create "
            "again (without idempotency_key) only once you know it does not exist"
        )

    def _unlistable_retry(self, key: str, to_agent_id: str, micro: int) -> str:
        return (
            f"cannot retry a create by its idempotency_key here: the {self._dialect.name} "
            "escrow service ignores idempotency keys and offers no listing to check whether "
            "the earlier attempt made an escrow, so nothing was sent; "
            + self._manual_check(key, to_agent_id, micro)
        )

    # release -------------------------------------------------------------------------

    def _release_op(
        self, escrow_id: str, amount: object, memo: object, idempotency_key: object
    ) -> Op[Escrow]:
        _check_id(escrow_id, "escrow_id")
        micro = parse_amount(amount, "amount")
        key, given = _check_idempotency_key(idempotency_key)
        if self._resolved:
            self._tagged(memo, key)
        return self._resolved_op(lambda: self._release_gen(escrow_id, micro, memo, key, given))

    def _release_gen(
        self, escrow_id: str, micro: int, memo: object, key: str, given: bool
    ) -> Op[Escrow]:
        wire_memo, tagged = self._tagged(memo, key)
        spec = self._dialect.release_partial(
            escrow_id=escrow_id, amount_micro=micro, memo=wire_memo, idempotency_key=key
        )
        call = _ReleaseCall(self, spec, key, escrow_id=escrow_id, micro=micro, tagged=tagged)
        call.reconcile_first = given and tagged
        return (yield from self._post_gen(call))

    def _release_state(self, escrow: Escrow, key: str) -> Op[tuple[_Found, tuple[Release, ...]]]:
        """Whether the release tagged with ``key`` is in ``escrow``'s history, and its entries.

        A v1 read carries only the most recent releases; a release just sent is the newest
        one, so the window settles it. When the tag is not in a truncated window, the older
        history is searched page by page; if that cannot be done the answer is UNKNOWN.
        """
        tag = memo_tag(key)
        hits = tuple(r for r in escrow.releases if r.memo.endswith(tag))
        if hits:
            return _Found.FOUND, hits
        if escrow.history_complete:
            if escrow.releases or escrow.released_micro == 0:
                return _Found.ABSENT, ()
            return _Found.UNKNOWN, ()  # money was released but the server shows no history
        try:
            hits = yield from self._search_history(escrow, tag)
        except PFMeteredError as exc:
            log.info(
                "release history of escrow %s could not be searched (%s)",
                escrow.escrow_id,
                type(exc).__name__,
            )
            return _Found.UNKNOWN, ()
        return (_Found.FOUND, hits) if hits else (_Found.ABSENT, ())

    def _ambiguous_release(
        self, lost: _Lost, key: str, escrow_id: str, why: str, escrow: Escrow | None
    ) -> AmbiguousRelease:
        known: dict[str, Any] = {"escrow_id": escrow_id}
        if escrow is not None:
            known["released"] = escrow.released
        return AmbiguousRelease(
            f"a release on escrow {escrow_id} may have been applied: its answer was lost "
            f"({type(lost.error).__name__}) and {why}; retry only with the same "
            f"idempotency_key, or reconcile against the escrow's released figure",
            idempotency_key=key,
            **known,
        )

    # refund --------------------------------------------------------------------------

    def _refund_op(self, escrow_id: str, idempotency_key: object) -> Op[Escrow]:
        _check_id(escrow_id, "escrow_id")
        key, _given = _check_idempotency_key(idempotency_key)

        def after() -> Op[Escrow]:
            spec = self._dialect.refund(escrow_id=escrow_id, idempotency_key=key)
            return self._post_gen(_RefundCall(self, spec, key, escrow_id=escrow_id))

        return self._resolved_op(after)

    # whole release, complete, dispute -------------------------------------------------

    def _release_whole_op(
        self, escrow_id: str, memo: object, idempotency_key: object
    ) -> Op[Escrow]:
        _check_id(escrow_id, "escrow_id")
        _check_memo(memo, MAX_MEMO)
        key, _given = _check_idempotency_key(idempotency_key)
        return self._resolved_op(lambda: self._release_whole_gen(escrow_id, str(memo), key))

    def _release_whole_gen(self, escrow_id: str, memo: str, key: str) -> Op[Escrow]:
        """All of an escrow to its provider: a partial release of what remains where the
        dialect has partial releases, else the dialect's whole-release call."""
        if self._dialect.capabilities.partial_release:
            escrow = yield from self._get_gen(escrow_id)
            if escrow.remaining_micro == 0:
                return escrow
            remaining = micro_to_decimal(escrow.remaining_micro)
            return (yield from self._release_op(escrow_id, remaining, memo, key))
        spec = self._dialect.release_whole(escrow_id=escrow_id, idempotency_key=None)
        return (yield from self._post_gen(_ActionCall(self, spec, key, escrow_id, "release")))

    def _action_op(self, escrow_id: str, action: str, reason: object = "") -> Op[Escrow]:
        _check_id(escrow_id, "escrow_id")
        _check_memo(reason, MAX_MEMO, "reason")

        def after() -> Op[Escrow]:
            if not self._dialect.capabilities.complete_and_dispute:
                raise UnsupportedByDialect(f"the {self._dialect.name} dialect has no {action} call")
            spec = (
                self._dialect.complete(escrow_id=escrow_id)
                if action == "complete"
                else self._dialect.dispute(escrow_id=escrow_id, reason=str(reason))
            )
            return self._post_gen(_ActionCall(self, spec, None, escrow_id, action))

        return self._resolved_op(after)

    _deployed_op = _action_op  # the name it had when only the deployed dialect had these

    # faucet --------------------------------------------------------------------------

    def _faucet_op(self) -> Op[FaucetClaim]:
        key, _given = _check_idempotency_key(None)

        def after() -> Op[FaucetClaim]:
            spec = self._dialect.claim_faucet(idempotency_key=key)
            return self._post_gen(_FaucetCall(self, spec, key))

        return self._resolved_op(after)


# -- the calls -------------------------------------------------------------------------------


class _CreateCall(_Call[Escrow]):
    """``create_escrow``: reconciled by the memo tag in a listing; a create answer that does
    not match the amount and provider asked for is read back by its id before anything else."""

    what = "create"

    def __init__(
        self,
        client: BaseEscrowClient,
        spec: RequestSpec,
        key: str,
        *,
        to_agent_id: str,
        micro: int,
        tagged: bool,
        given: bool,
    ) -> None:
        super().__init__(client, spec, key)
        self.key: str = key
        self.to_agent_id = to_agent_id
        self.micro = micro
        self.tagged = tagged
        self.given = given

    def _ambiguous(self, lost: _Lost, why: str) -> AmbiguousCreate:
        return self.client._ambiguous_create(lost, self.key, why, self.to_agent_id, self.micro)

    def first(self) -> Op[Escrow | _Absent]:
        if not (self.given and self.tagged):
            return ABSENT
        c = self.client
        try:
            listed = yield from c._list_gen()
        except UnsupportedByDialect:
            why = c._unlistable_retry(self.key, self.to_agent_id, self.micro)
            raise UnsupportedByDialect(why) from None
        found = c._find_created(listed, self.key, self.to_agent_id, self.micro)
        return ABSENT if found is None else found

    def settle(self, lost: _Lost, may_retry: bool, pause: Sleep) -> Op[Escrow | _Absent]:
        if not self.tagged:
            raise self._ambiguous(lost, "retries exhausted") from None
        yield pause
        c = self.client
        try:
            escrows = yield from c._list_gen()
        except PFMeteredError as exc:
            raise self._ambiguous(lost, f"listing escrows failed ({type(exc).__name__})") from None
        found = c._find_created(escrows, self.key, self.to_agent_id, self.micro)
        if found is not None:
            return found
        if not may_retry:
            raise self._ambiguous(lost, "retries exhausted") from None
        return ABSENT

    def _matches(self, escrow: Escrow) -> bool:
        return (
            escrow.amount_micro == self.micro
            and escrow.to_agent_id in (None, self.to_agent_id)
            and escrow.is_open
        )

    def accept(self, answer: Answer) -> Op[Escrow]:
        c = self.client
        escrow: Escrow | None
        try:
            escrow = c._parse(answer, c._dialect.parse_escrow)
        except InvalidResponse as exc:
            problem = exc.message
            escrow = None
        if escrow is not None:
            if self._matches(escrow):
                return escrow
            problem = (
                f"it describes escrow {escrow.escrow_id} of {format_usdc(escrow.amount_micro)} "
                f"USDC to {escrow.to_agent_id} ({escrow.status}), not "
                f"{format_usdc(self.micro)} USDC to {self.to_agent_id}"
            )
        # the service said 2xx, so an escrow was probably made: find it before believing anything
        if escrow is not None:
            try:
                back = yield from c._get_gen(escrow.escrow_id)
            except PFMeteredError:
                back = None
            tag_ok = back is not None and (
                not self.tagged or back.memo.endswith(memo_tag(self.key))
            )
            if back is not None and tag_ok and self._matches(back):
                log.warning(
                    "create answer was wrong (%s); escrow %s read back", problem, back.escrow_id
                )
                return back
        elif self.tagged and c._dialect.capabilities.listing:
            try:
                listed = yield from c._list_gen()
            except PFMeteredError:
                listed = []
            found = c._find_created(listed, self.key, self.to_agent_id, self.micro)
            if found is not None:
                return found
        known = {"escrow_id": escrow.escrow_id} if escrow is not None else {}
        raise c._ambiguous_create_because(
            f"the service answered HTTP {answer.status} but its answer contradicts the request "
            f"({problem})",
            self.key,
            self.to_agent_id,
            self.micro,
            **known,
        )


class _ReleaseCall(_Call[Escrow]):
    """``release_partial``: reconciled by the memo tag in the escrow's release history; an
    answer without the release in it is read back, never believed."""

    what = "release"

    def __init__(
        self,
        client: BaseEscrowClient,
        spec: RequestSpec,
        key: str,
        *,
        escrow_id: str,
        micro: int,
        tagged: bool,
    ) -> None:
        super().__init__(client, spec, key)
        self.key: str = key
        self.escrow_id = escrow_id
        self.micro = micro
        self.tagged = tagged
        self.reconcile_first = False

    def first(self) -> Op[Escrow | _Absent]:
        if not self.reconcile_first:
            return ABSENT
        c = self.client
        escrow = yield from c._get_gen(self.escrow_id)
        state, hits = yield from c._release_state(escrow, self.key)
        if state is _Found.UNKNOWN and not escrow.history_complete:
            # an older release with this key may exist beyond the window: never re-send
            raise AmbiguousRelease(
                f"a release on escrow {self.escrow_id} with this idempotency_key may have been "
                "applied: it is not among the recent releases and the older history could "
                "not be read; reconcile against the escrow's released figure",
                idempotency_key=self.key,
                escrow_id=self.escrow_id,
                released=escrow.released,
            )
        if state is _Found.FOUND:
            if any(r.amount_micro != self.micro for r in hits):
                # The key already paid another amount: the same refusal an honouring
                # server gives (422), decided here because this one cannot be trusted to.
                raise IdempotencyConflict(
                    "this idempotency key was already used for a release of another amount",
                    status=422,
                    code="idempotency_key_reused",
                )
            return escrow
        return ABSENT

    def settle(self, lost: _Lost, may_retry: bool, pause: Sleep) -> Op[Escrow | _Absent]:
        c, key, eid = self.client, self.key, self.escrow_id
        if not self.tagged:
            raise c._ambiguous_release(lost, key, eid, "retries exhausted", None) from None
        yield pause
        try:
            escrow = yield from c._get_gen(eid)
        except PFMeteredError as exc:
            raise c._ambiguous_release(
                lost, key, eid, f"reading it back failed ({type(exc).__name__})", None
            ) from None
        state, _hits = yield from c._release_state(escrow, key)
        if state is _Found.FOUND:
            return escrow
        if state is _Found.UNKNOWN:
            raise c._ambiguous_release(
                lost, key, eid, "its release history could not be searched", escrow
            ) from None
        if not may_retry:
            raise c._ambiguous_release(lost, key, eid, "retries exhausted", escrow) from None
        return ABSENT

    def accept(self, answer: Answer) -> Op[Escrow]:
        c = self.client
        escrow = c._escrow_answer(answer, self.escrow_id)
        if self.tagged:
            shown = any(
                r.memo.endswith(memo_tag(self.key)) and r.amount_micro == self.micro
                for r in escrow.releases
            )
        else:
            shown = escrow.released_micro >= self.micro
        if shown:
            return escrow
        # 2xx, yet the answer does not show the release asked for: settle it by reading back
        try:
            back = yield from c._get_gen(self.escrow_id)
            state, hits = (
                (yield from c._release_state(back, self.key))
                if self.tagged
                else (_Found.UNKNOWN, ())
            )
        except PFMeteredError:
            back, state, hits = None, _Found.UNKNOWN, ()
        if (
            back is not None
            and state is _Found.FOUND
            and all(r.amount_micro == self.micro for r in hits)
        ):
            log.warning(
                "release answer on escrow %s did not show the release; the escrow read back does",
                self.escrow_id,
            )
            return back
        raise AmbiguousRelease(
            f"the service answered HTTP {answer.status} to a release of "
            f"{format_usdc(self.micro)} USDC on escrow {self.escrow_id}, but neither its answer "
            "nor the escrow read back shows that release; do not release again before "
            "reconciling against the escrow's released figure",
            idempotency_key=self.key,
            escrow_id=self.escrow_id,
            released=(back or escrow).released,
        )


class _RefundCall(_Call[Escrow]):
    """``refund``: believed only once the escrow reads ``refunded``."""

    what = "refund"

    def __init__(
        self, client: BaseEscrowClient, spec: RequestSpec, key: str, *, escrow_id: str
    ) -> None:
        super().__init__(client, spec, key)
        self.escrow_id = escrow_id

    def settle(self, lost: _Lost, may_retry: bool, pause: Sleep) -> Op[Escrow | _Absent]:
        yield pause
        eid = self.escrow_id
        try:
            escrow = yield from self.client._get_gen(eid)
        except PFMeteredError as exc:
            raise AmbiguousOutcome(
                f"the refund of escrow {eid} may have been applied: its answer was "
                f"lost and reading it back failed ({type(exc).__name__})",
                idempotency_key=self.key,
                escrow_id=eid,
            ) from None
        if escrow.status == "refunded":
            return escrow
        if not may_retry:
            raise AmbiguousOutcome(
                f"the refund of escrow {eid} could not be completed: its answer "
                f"was lost and retries are exhausted (status {escrow.status})",
                idempotency_key=self.key,
                escrow_id=eid,
            ) from None
        return ABSENT

    def accept(self, answer: Answer) -> Op[Escrow]:
        c, eid = self.client, self.escrow_id
        escrow = c._escrow_answer(answer, eid)
        if escrow.status == "refunded":
            return escrow
        try:
            back = yield from c._get_gen(eid)
        except PFMeteredError:
            back = None
        if back is not None and back.status == "refunded":
            log.warning("refund answer on escrow %s said %s; it reads refunded", eid, escrow.status)
            return back
        raise AmbiguousOutcome(
            f"the service answered HTTP {answer.status} to the refund of escrow {eid}, but the "
            f"escrow is {(back or escrow).status}, not refunded: it may still be locked (and "
            "auto-release to the provider); read it back before closing the books",
            idempotency_key=self.key,
            escrow_id=eid,
            status=(back or escrow).status,
        )


class _ActionCall(_Call[Escrow]):
    """A release of the whole escrow, a complete or a dispute, on a dialect whose answers are
    short accounts of the action: settled by reading the escrow back
    (:meth:`BaseEscrowClient._settle_action`)."""

    def __init__(
        self,
        client: BaseEscrowClient,
        spec: RequestSpec,
        key: str | None,
        escrow_id: str,
        action: str,
    ) -> None:
        super().__init__(client, spec, key)
        self.escrow_id = escrow_id
        self.action = action
        self.want = ACTION_STATUS[action]
        self.what = action

    def _ambiguous(self, why: str, cause: object) -> AmbiguousOutcome:
        cls = AmbiguousRelease if self.action == "release" else AmbiguousOutcome
        return cls(
            f"the {self.action} of escrow {self.escrow_id} may have been applied: its answer "
            f"was lost ({type(cause).__name__}) and the escrow is {why}; read it back before "
            f"trying again",
            idempotency_key=self.key,
            escrow_id=self.escrow_id,
        )

    def _read(self, cause: object) -> Op[Escrow]:
        try:
            return (yield from self.client._get_gen(self.escrow_id))
        except PFMeteredError as exc:
            if self.action != "release":
                raise
            raise self._ambiguous(f"unreadable ({type(exc).__name__})", cause) from None

    def settle(self, lost: _Lost, may_retry: bool, pause: Sleep) -> Op[Escrow | _Absent]:
        yield pause
        escrow = yield from self._read(lost.error)
        if escrow.status == self.want or getattr(escrow, "deployed_status", None) == self.want:
            return escrow
        if escrow.status in ("locked", "completed") and may_retry:
            return ABSENT
        if self.action == "release":
            raise self._ambiguous(escrow.status, lost.error) from None
        raise lost.error from None

    def refused_after_lost(self, error: APIError) -> Op[Escrow | _Absent]:
        if self.action != "release" or not isinstance(error, Conflict):
            return ABSENT
        escrow = yield from self._read(error)
        return escrow if escrow.status == "released" else ABSENT

    def accept(self, answer: Answer) -> Op[Escrow]:
        return (
            yield from self.client._settle_action(answer, self.escrow_id, self.action, self.key)
        )


class _FaucetCall(_Call[FaucetClaim]):
    """The keyed faucet claim: a claim is at most once per agent, so a lost answer is simply
    sent again; a refusal as already claimed after a lost attempt means it was credited."""

    what = "faucet claim"

    def settle(self, lost: _Lost, may_retry: bool, pause: Sleep) -> Op[FaucetClaim | _Absent]:
        if not may_retry:
            raise AmbiguousOutcome(
                "the faucet claim may have been credited: its answer was lost",
                idempotency_key=self.key,
            ) from None
        yield pause
        return ABSENT

    def refused_after_lost(self, error: APIError) -> Op[FaucetClaim | _Absent]:
        if isinstance(error, Conflict):
            raise AmbiguousOutcome(
                "the faucet claim may have been credited by the attempt whose answer "
                "was lost (the retry was refused as already claimed)",
                idempotency_key=self.key,
            ) from None
        return ABSENT
        yield  # pragma: no cover

    def accept(self, answer: Answer) -> Op[FaucetClaim]:
        return self.client._parse(answer, self.client._dialect.parse_faucet_claim)
        yield  # pragma: no cover
