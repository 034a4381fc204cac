"""The in-process httpx transport: a request goes straight to the sandbox, no socket.

Why one object for both worlds: ``EscrowClient`` wants an ``httpx.BaseTransport`` and
``AsyncEscrowClient`` an ``httpx.AsyncBaseTransport``; handing the same object to both keeps
tests symmetrical and lets a test wrap one transport to inject faults (a response lost after
the sandbox applied the request) for either client. The async side runs the ledger call in a
worker thread so a request waiting on the ledger lock never blocks the event loop.

What this module must never do: close the sandbox when a client closes its transport (clients
close theirs on exit; the sandbox outlives them), or leak the request's headers anywhere.
"""

from __future__ import annotations

import anyio.to_thread
import httpx

from pf_metered.sandbox._http import AppRequest, AppResponse, Dispatcher

__all__ = ["SandboxTransport"]


class SandboxTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Serves httpx requests from a :class:`Dispatcher`, sync or async."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    @staticmethod
    def _app_request(request: httpx.Request, body: bytes) -> AppRequest:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return AppRequest(
            request.method,
            request.url.path,
            headers,
            body,
            "in-process",
            request.url.query.decode("ascii", "replace"),
        )

    @staticmethod
    def _response(answer: AppResponse, request: httpx.Request) -> httpx.Response:
        headers = [*answer.headers, ("content-length", str(len(answer.body)))]
        return httpx.Response(
            answer.status,
            headers=headers,
            stream=httpx.ByteStream(answer.body),
            request=request,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()
        answer = self._dispatcher.handle(self._app_request(request, body))
        return self._response(answer, request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        app_request = self._app_request(request, body)
        answer = await anyio.to_thread.run_sync(self._dispatcher.handle, app_request)
        return self._response(answer, request)

    def close(self) -> None:
        """Nothing to release: the sandbox, not the client, owns the ledger."""

    async def aclose(self) -> None:
        """Nothing to release: the sandbox, not the client, owns the ledger."""

    def __repr__(self) -> str:
        return "SandboxTransport()"
