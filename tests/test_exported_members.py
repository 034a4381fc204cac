"""The public names, pinned: a change to what users can import is a decision, not an accident."""

from __future__ import annotations

import importlib

import pytest

EXPORTED = {
    "pf_metered": {
        "APIConnectionError",
        "APIError",
        "APITimeout",
        "AmbiguousCreate",
        "AmbiguousOutcome",
        "AmbiguousRelease",
        "AsyncClock",
        "AsyncEscrowClient",
        "AsyncPaymentStream",
        "AuthError",
        "BatchPolicy",
        "BudgetExhausted",
        "Clock",
        "ConfigError",
        "Conflict",
        "DataFeedPayments",
        "Escrow",
        "EscrowClient",
        "FaucetClaim",
        "IdempotencyConflict",
        "InsufficientFunds",
        "InvalidInput",
        "InvalidRequest",
        "InvalidResponse",
        "KeyedStreams",
        "LedgerInvariantError",
        "MemoryStore",
        "Metered",
        "MissingExtra",
        "NotFound",
        "PFMeteredError",
        "PaymentStream",
        "PermissionDenied",
        "RateLimited",
        "Receipt",
        "RedisStore",
        "Registration",
        "Release",
        "SQLiteStore",
        "Sandbox",
        "ServerError",
        "StatusReport",
        "Store",
        "StoreError",
        "StoreUnavailable",
        "StreamBusy",
        "StreamClosed",
        "TrancheFailure",
        "UnsupportedByDialect",
        "__version__",
        "aclaim_faucet_for",
        "aregister_agent",
        "claim_faucet_for",
        "every",
        "format_usdc",
        "metered",
        "register_agent",
    },
    "pf_metered.client": {
        "AsyncEscrowClient",
        "BACKOFF_BASE",
        "BACKOFF_CAP",
        "Capabilities",
        "DEFAULT_BASE_URL",
        "DEFAULT_MAX_RETRIES",
        "DEFAULT_TIMEOUT",
        "DEFAULT_TOTAL_TIMEOUT",
        "Dialect",
        "ENV_API_KEY",
        "ENV_BASE_URL",
        "EscrowClient",
        "MAX_ANSWER_BYTES",
        "RETRY_AFTER_CAP",
        "RequestSpec",
        "claim_faucet_for",
        "register_agent",
    },
    "pf_metered.meter": {
        "BatchPolicy",
        "Intent",
        "MemoryStore",
        "Meter",
        "OpenEscrow",
        "Receipt",
        "RefundRest",
        "ReleaseDue",
        "ReleaseRecord",
        "StatusReport",
        "Store",
        "StreamConfig",
        "StreamState",
        "UnitCounter",
        "every",
        "intent_amount_micro",
        "intent_key",
        "plan_stream",
    },
    "pf_metered.stream": {
        "AsyncClock",
        "AsyncEscrowAPI",
        "AsyncPaymentStream",
        "Clock",
        "DataFeedPayments",
        "EscrowAPI",
        "KeyedStreams",
        "PaymentStream",
        "Receipt",
        "ReleaseRecord",
        "StatusReport",
    },
    "pf_metered.sandbox": {
        "AuditReport",
        "Clock",
        "FEE_ACCOUNT_ID",
        "LedgerInvariantError",
        "ManualClock",
        "RateLimits",
        "Sandbox",
        "SandboxAgent",
        "SandboxClock",
        "SandboxServer",
        "SandboxTransport",
        "serve_forever",
    },
    "pf_metered.tools": {
        "ALL_TOOL_NAMES",
        "Answer",
        "DEFAULT_KEY",
        "Book",
        "Caps",
        "StreamEntry",
        "TOOLS",
        "ToolContext",
        "ToolContexts",
        "ToolDefinition",
        "ToolError",
        "ToolState",
        "explain",
        "format_validation_error",
        "get_definition",
        "render",
        "summarize",
    },
    "pf_metered.langchain": {
        "Caps",
        "Conversations",
        "EscrowCreateTool",
        "EscrowListTool",
        "EscrowRefundTool",
        "EscrowReleaseTool",
        "EscrowStatusTool",
        "FaucetClaimTool",
        "MeteredCallbackHandler",
        "MeteredMiddleware",
        "PurpleFleaTool",
        "PurpleFleaToolkit",
        "SettleConversationMiddleware",
        "StreamCloseTool",
        "StreamListTool",
        "StreamOpenTool",
        "StreamRecordTool",
        "StreamStatusTool",
        "TOOL_CLASSES",
        "ToolContext",
        "ToolContexts",
        "by_configurable",
        "by_context",
        "by_thread",
        "pay_per_call",
    },
}


@pytest.mark.parametrize("module_name", sorted(EXPORTED))
def test_exported_members(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert set(module.__all__) == EXPORTED[module_name]
    assert len(module.__all__) == len(set(module.__all__)), "a name is exported twice"
    for name in module.__all__:
        assert hasattr(module, name), f"{module_name}.{name} is exported but missing"


def test_optional_extras_load_lazily() -> None:
    """`import pf_metered` must work without redis or mcp, yet the stores stay reachable."""
    import pf_metered

    assert pf_metered.RedisStore.__name__ == "RedisStore"


def _package_modules() -> list[str]:
    import pkgutil

    import pf_metered

    return sorted(
        m.name
        for m in pkgutil.walk_packages(pf_metered.__path__, "pf_metered.")
        if not m.name.startswith("pf_metered.mcp")  # the mcp extra may be absent
    )


OWN_SURFACE = {
    "ToolError": "pf_metered.tools",
    "PaymentRefused": "pf_metered.provider",
    "MeterConfigError": "pf_metered.langchain.middleware",
}
"""Exceptions that belong to a subpackage's surface rather than the top level, and why:
``ToolError`` is what a tool answers a model with, raised to LangChain/MCP, not to callers;
``PaymentRefused`` is a provider's gate refusing a caller, caught by the provider's own code;
``MeterConfigError`` is ``MeteredMiddleware``'s bad argument, importable only with the
``langchain`` extra, and caught as the top level's ``ConfigError`` or ``InvalidInput``."""


def test_every_exception_a_caller_can_catch_is_exported() -> None:
    import pf_metered
    from pf_metered.errors import PFMeteredError

    found: dict[str, str] = {}
    for name in _package_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                isinstance(value, type)
                and issubclass(value, PFMeteredError)
                and not attr.startswith("_")
                and value.__module__ == name
            ):
                found[attr] = name
    assert {"TrancheFailure", "LedgerInvariantError", "StoreUnavailable"} <= set(found)
    for attr, module in found.items():
        if attr in OWN_SURFACE:
            assert attr in importlib.import_module(OWN_SURFACE[attr]).__all__
            continue
        assert attr in pf_metered.__all__, f"{module}.{attr} is raised but not exported"
        assert getattr(pf_metered, attr) is getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize(
    ("module_name", "name"),
    [
        ("pf_metered.money", "parse_amount"),
        ("pf_metered.money", "parse_rate"),
        ("pf_metered.money", "Rate"),
        ("pf_metered.meter.open", "open_store"),
        ("pf_metered.models", "EscrowList"),
        ("pf_metered.client._ratelimit", "RateLimit"),
        ("pf_metered.meter.redis_store", "StoreUnavailable"),
    ],
)
def test_names_taken_off_the_top_level_stay_importable_from_their_modules(
    module_name: str, name: str
) -> None:
    import pf_metered

    assert hasattr(importlib.import_module(module_name), name)
    if name != "StoreUnavailable":
        assert name not in pf_metered.__all__


def test_one_name_for_one_faucet() -> None:
    """``claim_faucet`` is the client's keyed call; the agent-id faucet has its own name."""
    import pf_metered

    assert not hasattr(pf_metered, "claim_faucet")
    assert callable(pf_metered.EscrowClient.claim_faucet)
    assert pf_metered.claim_faucet_for is pf_metered.client.claim_faucet_for
    assert pf_metered.register_agent is pf_metered.client.register_agent


def test_redis_store_without_the_extra_names_the_pip_line() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['redis'] = None\n"  # as if the redis extra were not installed
        "import pf_metered\n"
        "try:\n"
        "    pf_metered.RedisStore\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, isinstance(exc, pf_metered.ConfigError), exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.startswith("MissingExtra True RedisStore needs the optional extra")
    assert "pip install 'pf-metered[redis]'" in out
