"""A private, throw-away ``redis-server`` for the tests and the fleet benchmark.

Why: a test owns what it touches. The Redis tests kill connections, flush the script cache and
fill keyspaces; on a shared server (127.0.0.1:6379) they would disturb other programs and be
disturbed by them. Each test session therefore starts its own server on a free loopback port,
with no persistence and its own working directory, waits until it answers PING, and stops it
at the end.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

SERVER_ENV = "PFM_REDIS_SERVER"
"""Environment variable naming the ``redis-server`` binary (default: ``redis-server`` on PATH,
else ``/usr/bin/redis-server``)."""

START_TIMEOUT_S = 20.0
"""How long a started server may take to answer PING (a loaded 2-core machine, CI)."""


class RedisServerUnavailable(RuntimeError):
    """No ``redis-server`` binary, or it did not come up; the message says which and why."""


def find_binary() -> str:
    """The ``redis-server`` to run, or :class:`RedisServerUnavailable` naming what was tried."""
    wanted = os.environ.get(SERVER_ENV)
    candidates = [wanted] if wanted else [shutil.which("redis-server"), "/usr/bin/redis-server"]
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    tried = wanted if wanted else "redis-server on PATH, /usr/bin/redis-server"
    raise RedisServerUnavailable(f"no redis-server binary found (tried {tried})")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    """One RESP PING on a fresh connection: True when the server answered +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``with RedisServer() as server: server.url`` — a redis-server only this process uses.

    Listens on 127.0.0.1 only, on a port the kernel picked free; ``--save ""`` and
    ``--appendonly no`` (nothing written to disk but its log, in its own temporary ``--dir``,
    removed on stop). A port taken between our probe and the server's bind makes the server
    exit at once; then another port is tried.
    """

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_binary()
        self.port = 0
        self.dir = ""
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.dir = tempfile.mkdtemp(prefix="pfm-redis-")
        last = ""
        for _ in range(5):
            self.port = _free_port()
            log = Path(self.dir) / "redis.log"
            self._proc = subprocess.Popen(  # our own argv, no shell
                [
                    self.binary,
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.dir,
                    "--logfile",
                    str(log),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                if _ping(self.port):
                    return self
                if self._proc.poll() is not None:
                    break  # exited: most likely the port was taken meanwhile
                time.sleep(0.01)  # poll interval; the condition is PING answering
            last = log.read_text(errors="replace")[-500:] if log.exists() else ""
            self._stop_proc()
        self.stop()
        raise RedisServerUnavailable(f"redis-server did not answer PING; its log ends: {last!r}")

    def _stop_proc(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM: with no persistence configured it saves nothing
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def stop(self) -> None:
        self._stop_proc()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
