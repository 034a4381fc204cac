"""The sandbox over a real loopback socket: a stdlib ThreadingHTTPServer in a background thread.

Why a real socket at all: anything that is not our Python client (curl, another language, a
subprocess, the client's own connection handling and timeouts) needs a server to talk to. It
speaks HTTP/1.1 with keep-alive and ``Content-Length`` on every answer, one thread per
connection, and the same :class:`Dispatcher` the in-process transport uses.

What this module must never do: bind anything but a loopback address (the sandbox mints money
for whoever asks, and keys travel in clear text), read a body larger than the limit, dispatch a
request whose body was cut off (a client that died mid-send made no request), log request
headers, or leave threads and sockets behind after :meth:`SandboxServer.close`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from pf_metered.errors import ConfigError
from pf_metered.sandbox._http import (
    MAX_BODY_BYTES,
    AppRequest,
    AppResponse,
    Dispatcher,
    error_response,
    new_request_id,
)

__all__ = ["SandboxServer", "check_loopback"]

_log = logging.getLogger("pf_metered.sandbox.server")


def check_loopback(host: str) -> str:
    """Return ``host`` if it is a loopback address (or ``localhost``), else refuse it."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"the sandbox serves on loopback only; {host!r} is not an IP") from None
    if not addr.is_loopback:
        raise ConfigError(f"the sandbox serves on loopback only, not {host}")
    return host


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], dispatcher: Dispatcher, family: int) -> None:
        self.address_family = family
        self.dispatcher = dispatcher
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (killed, timed out) is normal life, not news.

        Anything else still gets the stdlib's traceback on stderr.
        """
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
            return
        super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pf-metered-sandbox"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go in two writes; don't wait 40 ms
    server: _Server

    def _serve(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self._send(error_response(411, "invalid_request", "send a Content-Length body"))
            self.close_connection = True
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(error_response(400, "invalid_request", "bad Content-Length"))
            self.close_connection = True
            return
        if length > MAX_BODY_BYTES:
            self._send(
                error_response(
                    413, "invalid_request", f"the body is larger than {MAX_BODY_BYTES} bytes"
                )
            )
            self.close_connection = True
            return
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            # The client hung up before its body arrived (killed, timed out): there is no
            # request to answer. Dispatching the cut-off body would answer — and store under
            # its Idempotency-Key — a request nobody made, refusing the real one when its
            # sender (or whoever resumes it) sends it again under that key.
            self.close_connection = True
            return
        path, _, query = self.path.partition("?")
        headers = {k.lower(): v for k, v in self.headers.items()}
        request = AppRequest(self.command, path, headers, body, self.client_address[0], query)
        self._send(self.server.dispatcher.handle(request))

    def _send(self, answer: AppResponse) -> None:
        self.send_response(answer.status)
        has_request_id = False
        for key, value in answer.headers:
            has_request_id = has_request_id or key.lower() == "x-request-id"
            self.send_header(key, value)
        if not has_request_id:  # answers made here, not by the dispatcher
            self.send_header("content-type", "application/json")
            self.send_header("x-request-id", new_request_id())
        self.send_header("content-length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("sandbox %s: " + format, self.client_address[0], *args)


class SandboxServer:
    """A running loopback server for one sandbox; a context manager.

    ``base_url`` is the v1 base, e.g. ``http://127.0.0.1:54321/api/v1``.
    """

    def __init__(self, dispatcher: Dispatcher, host: str = "127.0.0.1", port: int = 0) -> None:
        host = check_loopback(host)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._httpd = _Server((host, port), dispatcher, family)
        self.host = host
        self.port: int = self._httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.port}"
        self.base_url = f"{self.url}/api/v1"
        self._closed = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"pf-metered-sandbox:{self.port}",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, drop open connections, and wait for the serving thread."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.drop_connections()
        self._httpd.server_close()
        self._thread.join()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> SandboxServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SandboxServer({self.base_url!r}{', closed' if self._closed else ''})"
