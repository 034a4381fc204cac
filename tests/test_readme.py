"""The README's quick start is a real program: it runs, and its receipt is exact."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_quick_start_runs_and_pays_exactly() -> None:
    quick_start = python_blocks()[0]
    assert "Sandbox()" in quick_start, "the first example must run with no key and no network"
    out = io.StringIO()
    namespace: dict[str, object] = {"__name__": "readme"}
    with contextlib.redirect_stdout(out):
        exec(compile(quick_start, str(README), "exec"), namespace)  # our own README
    receipt = str(namespace["stream"].receipt)  # type: ignore[attr-defined]
    assert out.getvalue().strip() == receipt.strip()
    assert "1,234" in receipt  # units
    assert "1.234 USDC" in receipt  # paid: rate × units, exact
    assert "3.766 USDC" in receipt  # refunded: budget − paid


def test_readme_names_the_two_commands_ci_runs() -> None:
    text = README.read_text(encoding="utf-8")
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "./scripts/demo" in text
    assert "./scripts/test" in text and "./scripts/test" in ci
