"""``import pf_metered`` (and ``pf_metered.provider``) must not import Starlette, uvicorn or mcp:
the provider's faces are optional extras."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_package_and_the_gate_imports_no_web_framework():
    code = (
        "import sys, pf_metered, pf_metered.provider, pf_metered.provider.asgi\n"
        "bad = [m for m in ('starlette', 'uvicorn', 'mcp', 'fastapi') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
