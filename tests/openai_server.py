"""A small OpenAI-compatible chat-completions server on a free loopback port, for tests.

Why a real server and not a mock: the point is what a real ``ChatOpenAI`` (the ``openai`` SDK
underneath) does on the wire — which requests it makes, whether it asks for usage when it
streams (``stream_options.include_usage``), what it does when the caller stops reading a
stream — and what a provider would bill for it. The server keeps that bill: every request is
recorded with the tokens it reports (the provider's figure) and the tokens it *generated*
(what it would charge even when the client stopped reading, or was never told).

It answers ``POST /v1/chat/completions``:

* non-streaming: one ``chat.completion`` with ``usage`` (unless ``usage=False``);
* ``"stream": true``: SSE ``chat.completion.chunk`` events, one per word, then a usage chunk
  (``choices: []``) only when the request asked for it with ``stream_options.include_usage``
  (as OpenAI does) and ``usage`` is on, then ``data: [DONE]``.

Token counts are the server's own, deterministic and unlike any client-side guess: prompt
tokens are the words of every message's content plus 3 per message; completion tokens are the
words of the answer. Answers come from ``answers`` in turn (cycling).

What this module must never do: listen anywhere but 127.0.0.1, use a fixed port, or keep
running after ``close()`` (it is a daemon thread with a bounded ``serve_forever``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OpenAIServer", "Served", "prompt_tokens"]

DEFAULT_ANSWERS = (
    "the price of tea is four coins",
    "two apples and a pear",
    "yes",
    "a long answer with many words in it to read slowly",
)


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The server's prompt-token count: words of each message's content, plus 3 per message."""
    total = 0
    for message in messages:
        content = message.get("content") or ""
        text = content if isinstance(content, str) else json.dumps(content)
        total += len(text.split()) + 3
    return total


@dataclass
class Served:
    """One request as the provider saw and billed it."""

    stream: bool
    include_usage: bool
    prompt_tokens: int
    completion_tokens: int
    """Tokens the server generated for the answer (what a provider charges)."""
    reported: bool
    """Whether the answer carried a usage figure the client could read."""
    chunks_written: int = 0
    client_gone: bool = False
    """The client closed the connection before the server finished writing."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class OpenAIServer:
    """``with OpenAIServer() as server: ChatOpenAI(base_url=server.base_url, ...)``."""

    answers: tuple[str, ...] = DEFAULT_ANSWERS
    usage: bool = True
    """Whether the server reports usage at all (off: a provider that never does)."""
    served: list[Served] = field(default_factory=list)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> OpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                server._answer(self, body)

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the provider's side ------------------------------------------------------------

    def _pick(self) -> str:
        with self._lock:
            answer = self.answers[self._next % len(self.answers)]
            self._next += 1
        return answer

    def _answer(self, handler: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        answer = self._pick()
        p_tokens = prompt_tokens(body.get("messages", []))
        words = answer.split(" ")
        c_tokens = len(words)
        stream = bool(body.get("stream"))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        usage = {
            "prompt_tokens": p_tokens,
            "completion_tokens": c_tokens,
            "total_tokens": p_tokens + c_tokens,
        }
        model = body.get("model", "loopback")
        if not stream:
            served = Served(False, False, p_tokens, c_tokens, reported=self.usage)
            with self._lock:
                self.served.append(served)
            payload: dict[str, Any] = {
                "id": f"chatcmpl-{len(self.served)}",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                    }
                ],
            }
            if self.usage:
                payload["usage"] = usage
            data = json.dumps(payload).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        served = Served(True, include, p_tokens, c_tokens, reported=include and self.usage)
        with self._lock:
            self.served.append(served)
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Cache-Control", "no-cache")
        handler.send_header("Connection", "close")
        handler.end_headers()
        handler.close_connection = True
        try:
            events = self._events(f"chatcmpl-s{id(served)}", model, words, served.reported, usage)
            for event in events:
                handler.wfile.write(b"data: " + event.encode() + b"\n\n")
                handler.wfile.flush()
                served.chunks_written += 1
            handler.wfile.write(b"data: [DONE]\n\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            served.client_gone = True

    def _events(
        self, cid: str, model: str, words: list[str], report: bool, usage: dict[str, int]
    ) -> Iterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return json.dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )

        yield chunk({"role": "assistant", "content": ""})
        for i, word in enumerate(words):
            yield chunk({"content": word if i == len(words) - 1 else word + " "})
        yield chunk({}, "stop")
        if report:
            yield json.dumps(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
