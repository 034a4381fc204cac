"""A total deadline under the blocking driver: every socket operation of a call is bounded by
what is left of the call's ``total_timeout``.

Why this exists: httpx's timeouts bound each socket operation, not a request. A server that
sends one byte just inside the read timeout — of the status line, a header or the body —
keeps a blocking call alive for ever, and nothing outside the thread can interrupt a ``recv``.
So the clamp sits where every read happens: :class:`DeadlineTransport` is an httpx transport
over httpcore's connection pool whose network streams take ``min(timeout, time left)`` for
each connect, TLS handshake, read and write, and raise httpcore's own timeout once the time is
up. The time left comes from :func:`deadline`, which the driver enters around each exchange (a
context variable: pooled connections are shared, deadlines are per call).

The async driver needs none of this (``asyncio.wait_for`` cancels a pending read).

What it must never do: retry, or change anything of the request; hold a key. A connection
through an environment proxy is left to httpx (``transport_for``): there the deadline is still
checked between body chunks and before every attempt, and the proxy bounds the rest.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
import time
import typing
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Final

import httpcore
import httpx

__all__ = ["DeadlineTransport", "deadline", "transport_for"]

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "pf_metered_deadline", default=None
)


@contextlib.contextmanager
def deadline(at: float) -> Iterator[None]:
    """Bound every socket operation inside the block by ``at`` (a ``time.monotonic()`` value)."""
    token = _DEADLINE.set(at)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _clamp(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    at = _DEADLINE.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the call's total deadline (total_timeout) passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    """A network stream whose every operation is clamped to the current call's deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _clamp(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _clamp(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        clamped = _clamp(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, clamped))

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


_SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        clamped = _clamp(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, clamped, local_address, socket_options))

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[_SocketOption] | None = None,
    ) -> httpcore.NetworkStream:
        clamped = _clamp(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_unix_socket(path, clamped, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


_EXCEPTIONS: Final[tuple[tuple[type[Exception], type[httpx.TransportError]], ...]] = (
    # most specific first: the first match wins
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.ProxyError, httpx.ProxyError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """httpcore's exceptions as httpx's, as httpx's own transport raises them."""
    try:
        yield
    except Exception as exc:
        for core, ours in _EXCEPTIONS:
            if isinstance(exc, core):
                raise ours(str(exc)) from exc
        raise


class _Body(httpx.SyncByteStream):
    def __init__(self, inner: Iterable[bytes]) -> None:
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        with _mapped():
            yield from self._inner

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            with _mapped():
                close()


class DeadlineTransport(httpx.BaseTransport):
    """httpx's direct transport (a pooled HTTP/1.1 client), with every socket operation
    bounded by the deadline of the call under way (:func:`deadline`)."""

    def __init__(self, *, trust_env: bool) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=trust_env),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_Backend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _mapped():
            answer = self._pool.handle_request(core)
        assert isinstance(answer.stream, Iterable)
        return httpx.Response(
            status_code=answer.status,
            headers=answer.headers,
            stream=_Body(answer.stream),
            extensions=answer.extensions,
        )

    def close(self) -> None:
        self._pool.close()


def _env_proxy_for(url: str) -> bool:
    """Whether the environment sends ``url`` through a proxy (``HTTPS_PROXY``/``ALL_PROXY``,
    less ``NO_PROXY``), as httpx with ``trust_env`` would."""
    proxies = urllib.request.getproxies_environment()
    if not (proxies.get("https") or proxies.get("all")):
        return False
    host = httpx.URL(url).host
    return not urllib.request.proxy_bypass_environment(host, proxies)  # type: ignore[attr-defined]


def transport_for(base_url: str, *, trust_env: bool) -> DeadlineTransport | None:
    """The transport the blocking client uses for ``base_url``: a :class:`DeadlineTransport`,
    or ``None`` (httpx's own) when the environment routes it through a proxy."""
    if trust_env and _env_proxy_for(base_url):
        return None
    return DeadlineTransport(trust_env=trust_env)
