"""The API reference builds from the docstrings with ``mkdocs build --strict``.

``./scripts/test`` builds it too; this test is here so that a change landed with pytest alone
(a docstring mkdocstrings cannot render, a public name moved, a page link broken) fails before
it reaches CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_api_reference_builds_strict(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    streams = (site / "reference" / "streams" / "index.html").read_text(encoding="utf-8")
    assert "PaymentStream" in streams and "resume" in streams  # rendered from the docstrings
    errors = (site / "reference" / "errors" / "index.html").read_text(encoding="utf-8")
    assert "BudgetExhausted" in errors and "TrancheFailure" in errors
