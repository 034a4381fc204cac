"""Where the command line gets its API key, and the scrubber every printed line passes through.

Why so strict: a key typed on a command line lands in shell history, ``ps`` listings and CI
logs; a key printed in an error lands in bug reports. So the key comes only from the
environment (``PF_API_KEY``) or, when a person is at the keyboard, from a prompt that does not
echo. An option that looks like a key argument is refused *without repeating its value*.

What this module must never do: accept a key from ``argv``, print a key, or keep one in a place
``scrub`` does not know about.
"""

from __future__ import annotations

import getpass
import os
import sys
from typing import Final

from pf_metered.cli._exit import EXIT_CONFIG, EXIT_USAGE, CLIError
from pf_metered.errors import redact

__all__ = [
    "ENV_BASE_URL",
    "ENV_KEY",
    "forbid_key_arguments",
    "remember_secret",
    "resolve_api_key",
    "scrub",
]

ENV_KEY: Final = "PF_API_KEY"
ENV_BASE_URL: Final = "PF_BASE_URL"

_KEY_OPTIONS: Final = ("--api-key", "--apikey", "--key", "--token", "--secret", "--pf-api-key")
_MIN_SECRET: Final = 6

_secrets: set[str] = set()


def remember_secret(value: str | None) -> None:
    """Make ``scrub`` hide ``value`` wherever it appears, whatever its shape."""
    if value and len(value) >= _MIN_SECRET:
        _secrets.add(value)


def scrub(text: str) -> str:
    """``text`` with every known key and anything key-shaped replaced by a marker."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return redact(text)


def forbid_key_arguments(argv: list[str]) -> None:
    """Refuse ``--api-key VALUE`` (and friends) before argparse can echo the value back."""
    for arg in argv:
        if arg == "--":
            return
        name = arg.split("=", 1)[0].lower()
        if name in _KEY_OPTIONS:
            raise CLIError(
                f"{name} is not accepted: the API key is read from the {ENV_KEY} environment "
                "variable, or prompted for (without echo) when run in a terminal. The value you "
                "passed was not used and is not shown.",
                EXIT_USAGE,
                kind="usage",
            )
        if arg.startswith(("pf_live_", "pf_test_", "pf_sbx_", "sk_live_", "sk_test_")):
            raise CLIError(
                "an argument looks like an API key; keys are never passed as arguments (use "
                f"{ENV_KEY}). The value was not used and is not shown.",
                EXIT_USAGE,
                kind="usage",
            )


def resolve_api_key(*, prompt: bool = True) -> str:
    """The key from ``PF_API_KEY``, else from a no-echo prompt when stdin is a terminal."""
    key = os.environ.get(ENV_KEY, "").strip()
    if key:
        remember_secret(key)
        return key
    if prompt and sys.stdin is not None and sys.stdin.isatty():
        try:
            key = getpass.getpass(f"Purple Flea API key ({ENV_KEY} is not set; input hidden): ")
        except EOFError:  # Ctrl-D
            key = ""
        except KeyboardInterrupt:  # Ctrl-C: end the prompt's line, then exit 130 (main)
            sys.stderr.write("\n")
            raise
        key = key.strip()
        if key:
            remember_secret(key)
            return key
        raise CLIError(
            f"no API key entered: type it at the prompt, or set {ENV_KEY} (e.g. export "
            f"{ENV_KEY}=pf_live_...; 'pf-metered register --keys-file agent.env' makes one). "
            "To try things with no key, start a local sandbox: pf-metered sandbox serve",
            EXIT_CONFIG,
            kind="config",
        )
    raise CLIError(
        f"no API key: set {ENV_KEY} (e.g. export {ENV_KEY}=pf_live_...; 'pf-metered register "
        "--keys-file agent.env' makes one), or run in a terminal to be prompted. To try things "
        "with no key, start a local sandbox: pf-metered sandbox serve",
        EXIT_CONFIG,
        kind="config",
    )
