"""The canary: an API key that must never appear in a repr, a str, an exception (with its
traceback), or any log record — including httpx's and httpcore's own at DEBUG."""

from __future__ import annotations

import logging
import pickle
import traceback
from typing import Any

import httpx
import pytest
from conftest import CANARY_KEY, Recorder, escrow_json

from pf_metered import errors
from pf_metered.client import AsyncEscrowClient, EscrowClient
from pf_metered.client._secrets import LOGGERS, Secret, redact_text

SECRET_PART = CANARY_KEY[len("pf_live_") : -4]  # everything but the prefix and last 4


def assert_clean(text: str) -> None:
    assert CANARY_KEY not in text
    assert SECRET_PART not in text
    assert "CANARY" not in text


def exception_text(exc: BaseException) -> str:
    """str, repr and args of the exception and of everything chained to it (shown or not)."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 40:
        parts += [str(seen), repr(seen), repr(seen.args)]
        parts += traceback.format_exception_only(type(seen), seen)
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def records_text(records: list[logging.LogRecord]) -> str:
    parts = []
    for r in records:
        parts.append(r.getMessage())
        parts.append(repr(r.args))
        parts.append(repr(r.__dict__))
    return "\n".join(parts)


@pytest.fixture
def debug_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    return caplog


def test_repr_and_str_show_at_most_the_last_four() -> None:
    for cls in (EscrowClient, AsyncEscrowClient):
        client: Any = cls(CANARY_KEY, dialect="deployed")  # named: no probe of the live host
        for text in (repr(client), str(client), repr(client.capabilities), repr(vars(client))):
            assert_clean(text)
        assert "***tail" in repr(client)
    secret = Secret(CANARY_KEY)
    assert_clean(repr(secret) + str(secret) + f"{secret}" + secret.hint)
    assert secret.reveal() == CANARY_KEY
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_bad_keys_are_not_echoed() -> None:
    for bad in (CANARY_KEY + "\n", CANARY_KEY + " x", "\t" + CANARY_KEY):
        with pytest.raises(errors.ConfigError) as info:
            EscrowClient(bad)
        assert_clean(exception_text(info.value))


def test_credentials_in_base_url_are_refused_without_echo() -> None:
    with pytest.raises(errors.ConfigError) as info:
        EscrowClient("pf_live_other0000", base_url=f"https://u:{CANARY_KEY}@example.com/api/v1")
    assert_clean(exception_text(info.value))


def _echoing_handler(kind: str) -> Any:
    def handler(req: httpx.Request) -> httpx.Response:
        auth = req.headers["authorization"]
        if kind == "error-message":
            return httpx.Response(401, json={"error": "unauthorized", "message": f"bad {auth}"})
        if kind == "error-code":
            return httpx.Response(400, json={"error": CANARY_KEY, "message": CANARY_KEY})
        if kind == "request-id":
            return httpx.Response(500, headers={"X-Request-Id": CANARY_KEY})
        if kind == "transport":
            raise httpx.ConnectError(f"could not send {auth} {req.headers!r}", request=req)
        if kind == "timeout":
            raise httpx.ReadTimeout(f"timed out sending {auth}", request=req)
        if kind == "answer-field":
            return httpx.Response(200, json=escrow_json(escrow_id=CANARY_KEY))
        if kind == "answer-money":
            return httpx.Response(200, json=escrow_json(amount=CANARY_KEY))
        if kind == "answer-status":
            return httpx.Response(200, json=escrow_json(status=auth))
        if kind == "non-json":
            return httpx.Response(200, content=auth.encode())
        raise AssertionError(kind)

    return handler


KINDS = [
    "error-message",
    "error-code",
    "request-id",
    "transport",
    "timeout",
    "answer-field",
    "answer-money",
    "answer-status",
    "non-json",
]


@pytest.mark.parametrize("kind", KINDS)
def test_no_exception_carries_the_key(make_client, debug_logs, kind: str) -> None:
    rec = Recorder(_echoing_handler(kind))
    client = make_client(transport=rec.transport, max_retries=1)
    for call, args in (("get_escrow", ("esc_1",)), ("release_partial", ("esc_1", "1.00"))):
        with pytest.raises(errors.PFMeteredError) as info:
            getattr(client, call)(*args)
        assert_clean(exception_text(info.value))
        assert_clean(repr(vars(info.value)))
    assert_clean(records_text(debug_logs.records))


def test_logs_at_debug_over_mock_transport_are_clean(make_client, debug_logs) -> None:
    rec = Recorder(lambda req: httpx.Response(200, json=escrow_json()))
    client = make_client(transport=rec.transport)
    client.get_escrow("esc_1")
    assert any(r.name == "httpx" for r in debug_logs.records)  # httpx did log
    assert_clean(records_text(debug_logs.records))


@pytest.mark.parametrize("name", LOGGERS)
def test_the_filter_redacts_anything_key_shaped_logged_by_anyone(debug_logs, name: str) -> None:
    EscrowClient(CANARY_KEY)  # installs the filter and registers the key
    logger = logging.getLogger(name)
    logger.debug("headers %s", [(b"Authorization", f"Bearer {CANARY_KEY}".encode())])
    logger.debug("Authorization: Bearer %s", CANARY_KEY)
    logger.debug("raw key %s in text", CANARY_KEY)
    logger.debug({"api_key": CANARY_KEY})
    logger.debug("proxy-authorization=%s", "Basic dXNlcjpwYXNz")
    assert len([r for r in debug_logs.records if r.name == name]) == 5
    text = records_text(debug_logs.records)
    assert_clean(text)
    assert "dXNlcjpwYXNz" not in text


def test_redact_text_masks_exact_keys_of_any_shape() -> None:
    odd = "sk-NOT-PF-SHAPED-0123456789"
    Secret(odd)
    keep = Secret(odd)  # a live holder keeps the key registered
    assert odd not in redact_text(f"token={odd}")
    assert "Bearer ***" in redact_text("Authorization Bearer abc.def")
    del keep


def test_real_http_over_loopback_logs_nothing_secret(debug_logs) -> None:
    pytest.importorskip("pf_metered.sandbox")
    from pf_metered.sandbox import Sandbox

    with Sandbox() as sb:
        payer = sb.add_agent(balance="100")
        provider = sb.add_agent()
        server = sb.serve()
        key = payer.api_key
        with EscrowClient(key, base_url=server.base_url) as client:
            escrow = client.create_escrow(provider.agent_id, "10.00")
            client.release_partial(escrow.escrow_id, "1.00")
            with pytest.raises(errors.NotFound) as info:
                client.get_escrow("esc_missing")
            assert key not in exception_text(info.value)
        with EscrowClient(key[:-2] + "zz", base_url=server.base_url) as wrong:
            with pytest.raises(errors.AuthError) as auth_info:
                wrong.list_escrows()
            assert key[8:-4] not in exception_text(auth_info.value)
    assert any(r.name.startswith("httpcore") for r in debug_logs.records)
    text = records_text(debug_logs.records)
    assert key not in text
    assert key[8:-4] not in text


def test_every_logger_of_the_package_carries_the_filter() -> None:
    # A logger's filter does not see its children's records: "pf_metered" alone left
    # "pf_metered.client" (which logs escrow ids a server chose) unfiltered.
    import pathlib
    import re

    import pf_metered

    root = pathlib.Path(pf_metered.__file__).parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        names.update(re.findall(r"getLogger\(\s*\"([^\"]+)\"\s*\)", text))
        if re.search(r"getLogger\(\s*__name__\s*\)", text):
            rel = path.relative_to(root.parent).with_suffix("")
            names.add(".".join(rel.parts))
    assert names, "no loggers found"
    assert names <= set(LOGGERS), sorted(names - set(LOGGERS))
    EscrowClient(CANARY_KEY)
    for name in names:
        assert any(
            isinstance(f, type(logging.getLogger("pf_metered").filters[0]))
            for f in logging.getLogger(name).filters
        ), name


def test_a_logged_traceback_is_redacted_when_formatted(debug_logs) -> None:
    EscrowClient(CANARY_KEY)
    logger = logging.getLogger("pf_metered.client")
    try:
        raise RuntimeError(f"sent Authorization: Bearer {CANARY_KEY}")
    except RuntimeError:
        logger.exception("escrow %s failed", CANARY_KEY)
    logger.debug("with stack", stack_info=True)
    record = next(r for r in debug_logs.records if r.name == "pf_metered.client")
    formatted = logging.Formatter().format(record)
    assert "RuntimeError" in formatted
    assert_clean(formatted)
    assert_clean(debug_logs.text)
    assert_clean(records_text(debug_logs.records))


# -- issue 13 item 7: every server-supplied string, in any case, cut anywhere -------------


def _echo_lowered(kind: str) -> Any:
    key = CANARY_KEY.lower()

    def handler(req: httpx.Request) -> httpx.Response:
        if kind == "code":  # lower-case passes the code's syntax check
            return httpx.Response(400, json={"error": key, "message": "no"})
        if kind == "code-cut":
            return httpx.Response(400, json={"error": key[:30], "message": "no"})
        if kind == "message-cut":  # the key straddles the 1000-character cut
            return httpx.Response(400, json={"error": "bad", "message": "m" * 985 + CANARY_KEY})
        if kind == "request-id":
            return httpx.Response(404, headers={"X-Request-Id": key}, json={"error": "not_found"})
        raise AssertionError(kind)

    return handler


@pytest.mark.parametrize("kind", ["code", "code-cut", "message-cut", "request-id"])
def test_server_strings_are_redacted_even_lowercased_or_cut(make_client, kind: str) -> None:
    rec = Recorder(_echo_lowered(kind))
    client = make_client(transport=rec.transport, max_retries=0)
    with pytest.raises(errors.APIError) as info:
        client.get_escrow("esc_1")
    text = (exception_text(info.value) + repr(vars(info.value))).lower()
    assert CANARY_KEY.lower()[:10] not in text
    middle = CANARY_KEY.lower()[len("pf_live_") : -4]
    for start in range(0, len(middle) - 16 + 1):
        assert middle[start : start + 16] not in text, text


def test_a_key_of_no_known_shape_cut_to_40_characters_is_still_masked(make_client) -> None:
    # the deployed dialect quotes a bad status cut to 40 characters: the exact key is gone,
    # its 40-character prefix is not
    odd = "sk-odd-shaped-0123456789abcdefghijklmnopq"

    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "escrow_id": "esc_1",
                "status": odd,
                "amount_usd": 2,
                "commission_usd": 0.02,
                "net_to_counterparty": 1.98,
                "counterparty_agent_id": "agent_b",
                "creator_agent_id": "agent_a",
                "description": "",
                "timeout_hours": 24,
            },
        )

    rec = Recorder(handler)
    client = make_client(
        api_key=odd, transport=rec.transport, dialect="deployed", base_url="http://localhost/d"
    )
    with pytest.raises(errors.InvalidResponse) as info:
        client.get_escrow("esc_1")
    text = exception_text(info.value) + repr(vars(info.value))
    assert "status" in text
    assert odd[:10] not in text and odd[10:20] not in text, text


# -- issue 13 item 8: proxy environment variables never receive the key -------------------

PROXY_VARS = ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy"]


def _recording_proxy(conn: Any, listener: Any) -> None:
    listener.read_request_head(conn)
    conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Any:
    from loopkit import Listener

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with Listener(_recording_proxy) as listener:
        yield listener


@pytest.mark.parametrize("var", PROXY_VARS)
def test_a_loopback_base_url_never_goes_through_a_proxy(make_client, monkeypatch, proxy, var):
    from pf_metered.sandbox import Sandbox

    monkeypatch.setenv(var, proxy.url)
    with Sandbox() as sb:
        payer = sb.add_agent(balance="10")
        server = sb.serve()
        client = make_client(api_key=payer.api_key, base_url=server.base_url)
        assert client.list_escrows() == []
        https = make_client(
            api_key=payer.api_key,
            base_url=server.base_url.replace("http", "https"),
            max_retries=0,
        )
        with pytest.raises(errors.APIConnectionError):  # TLS to a plain-http port: refused
            https.list_escrows()
        from pf_metered.client import register_agent

        agent = register_agent(base_url=server.url + "/casino")  # its answer carries a key
        assert agent.agent_id
    assert proxy.connections == 0 and bytes(proxy.received) == b""


def test_a_remote_https_base_url_may_use_a_proxy_by_connect_only(monkeypatch, proxy):
    # https elsewhere: the proxy is told only where to connect; the key travels inside TLS
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    client = EscrowClient(CANARY_KEY, base_url="https://escrow.invalid/api/v1", max_retries=0)
    with client, pytest.raises(errors.APIConnectionError):
        client.list_escrows()
    seen = bytes(proxy.received)
    assert seen.startswith(b"CONNECT escrow.invalid:443 ")
    assert CANARY_KEY.encode() not in seen and b"authorization" not in seen.lower()
