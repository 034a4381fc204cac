"""A tiny loopback TCP listener for tests that need a real socket peer of their own.

``Listener(behave)`` binds 127.0.0.1 on a free port, accepts connections on a daemon thread
and runs ``behave(conn, listener)`` for each (on its own thread); everything read through
:meth:`Listener.recv` is kept in ``received``. It stands in for a proxy that records what it
is sent, or a server that drips its answer a byte at a time. The test owns it: ``close()``
(or ``with``) stops accepting, closes every connection and joins the threads.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType


class Listener:
    def __init__(self, behave: Callable[[socket.socket, Listener], None]) -> None:
        self._behave = behave
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port: int = self._sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._behave(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def recv(self, conn: socket.socket, size: int = 65536) -> bytes:
        """Read from ``conn`` and record what was read (``b""`` at EOF)."""
        data = conn.recv(size)
        with self._lock:
            self.received += data
        return data

    def read_request_head(self, conn: socket.socket) -> bytes:
        """Read until the end of an HTTP request head (or EOF); recorded like :meth:`recv`."""
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.recv(conn)
            if not data:
                break
            head += data
        return head

    def close(self) -> None:
        self.stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() does not
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
