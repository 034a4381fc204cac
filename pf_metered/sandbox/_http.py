"""Transport-neutral HTTP plumbing: request/answer values, strict JSON, the error shape, mounts.

Why a neutral layer: the same application answers in-process (an httpx transport) and over a
loopback socket (a stdlib server), and a second dialect (the deployed service's) will be mounted
beside v1. Transports turn their request into an :class:`AppRequest` and write back an
:class:`AppResponse`; dialect apps see nothing else. The :class:`Dispatcher` owns what every
answer shares whatever the dialect: a fresh ``X-Request-Id``, a JSON content type, the body-size
limit, and a JSON 500 instead of a crashed thread.

What this module must never do: accept ``NaN``/``Infinity`` or duplicate keys in JSON, parse a
JSON number through ``float``, echo a request header (an API key) into an answer, or let an
exception escape to a transport.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, Protocol

__all__ = [
    "MAX_BODY_BYTES",
    "AppRequest",
    "AppResponse",
    "Dispatcher",
    "HTTPApp",
    "InvalidJSON",
    "error_response",
    "json_response",
    "parse_json_object",
]

MAX_BODY_BYTES: Final = 64 * 1024
"""The largest request body the sandbox reads. Real requests are a few hundred bytes."""

_log = logging.getLogger("pf_metered.sandbox")


@dataclass(frozen=True, slots=True)
class AppRequest:
    """A request as every sandbox app sees it. ``headers`` has lower-case names."""

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    client: str = "in-process"
    query: str = ""
    """The raw query string (after ``?``), empty when there is none."""


@dataclass(frozen=True, slots=True)
class AppResponse:
    """An answer: status, JSON body bytes, extra headers (X-Request-Id is added on the way out)."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    def header(self, name: str) -> str | None:
        """The first header called ``name`` (case-insensitive), if any."""
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return None

    def json(self) -> Any:
        """The body parsed (for tests and the Sandbox's read model)."""
        return json.loads(self.body)


class HTTPApp(Protocol):
    """A dialect: turns an :class:`AppRequest` (path relative to its mount) into an answer."""

    def handle(self, request: AppRequest) -> AppResponse: ...


def json_response(
    status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()
) -> AppResponse:
    """An answer with ``obj`` as compact JSON (amounts are already strings)."""
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return AppResponse(status, body.encode("utf-8"), headers)


def error_response(
    status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> AppResponse:
    """The error shape both dialects share: ``{"error": code, "message": text}``."""
    return json_response(status, {"error": code, "message": message}, headers)


class InvalidJSON(ValueError):
    """A request body that is not one strict JSON object."""


def _reject_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise InvalidJSON(f"duplicate field {key!r}")
        out[key] = value
    return out


def parse_json_object(body: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """Parse a body as one JSON object, strictly.

    JSON numbers with a fraction become ``Decimal`` (never ``float``) so a field that wrongly
    carries money as a number can be named and refused rather than silently rounded.
    """
    if not body.strip():
        if empty_ok:
            return {}
        raise InvalidJSON("the request needs a JSON object body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJSON("the body is not UTF-8") from None
    try:
        obj = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=Decimal,
            object_pairs_hook=_no_duplicates,
        )
    except InvalidJSON:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON(f"the body is not valid JSON: {str(exc)[:80]}") from None
    if not isinstance(obj, dict):
        raise InvalidJSON("the body must be a JSON object")
    return obj


def new_request_id() -> str:
    return f"req_{secrets.token_hex(8)}"


class Dispatcher:
    """Routes requests to the dialect mounted on the longest matching path prefix.

    Every answer leaves with ``X-Request-Id`` and ``Content-Type: application/json``; an app
    that raises becomes a 500 ``internal_error`` (logged without the request's headers).
    """

    def __init__(self, mounts: Mapping[str, HTTPApp]) -> None:
        self._mounts = sorted(
            ((prefix.rstrip("/"), app) for prefix, app in mounts.items()),
            key=lambda item: -len(item[0]),
        )

    def mount(self, prefix: str, app: HTTPApp) -> None:
        """Add a dialect beside the others (the deployed dialect, later)."""
        self._mounts = sorted(
            [*self._mounts, (prefix.rstrip("/"), app)], key=lambda item: -len(item[0])
        )

    def handle(self, request: AppRequest) -> AppResponse:
        """Answer one request; never raises."""
        request_id = new_request_id()
        try:
            answer = self._dispatch(request)
        except Exception:
            _log.exception(
                "sandbox: %s %s failed [request %s]", request.method, request.path, request_id
            )
            answer = error_response(500, "internal_error", "the sandbox failed on this request")
        headers = (
            ("content-type", "application/json"),
            ("x-request-id", request_id),
            *answer.headers,
        )
        return AppResponse(answer.status, answer.body, headers)

    def _dispatch(self, request: AppRequest) -> AppResponse:
        if len(request.body) > MAX_BODY_BYTES:
            return error_response(
                413, "invalid_request", f"the body is larger than {MAX_BODY_BYTES} bytes"
            )
        for prefix, app in self._mounts:
            if request.path == prefix or request.path.startswith(prefix + "/"):
                sub = request.path[len(prefix) :] or "/"
                return app.handle(
                    AppRequest(
                        request.method,
                        sub,
                        request.headers,
                        request.body,
                        request.client,
                        request.query,
                    )
                )
        return error_response(404, "not_found", "no such endpoint")
